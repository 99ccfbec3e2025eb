//! The home's directory entry of one key: who holds the key's line, in
//! which MESI state, under which grant — and the protocol's transitions,
//! pure so every one of them is unit-tested. The I/O around them (recalls,
//! store reads and writes) is in `node.rs`, which calls these under the
//! key's lock, so transitions of one key never interleave.
//!
//! Invariants of an entry:
//! - at most one holder is Exclusive or Modified, and then it is the only
//!   holder;
//! - a node absent from `holders` holds no line of the key (a node may be
//!   listed without a line: it dropped it and its release is in flight; a
//!   recall then finds nothing, which is harmless);
//! - `known`, when set, is the key's current version and presence — all
//!   writes pass through the home, so it stays exact while the entry lives.

use std::collections::BTreeMap;

use proto::cache::v1::internal::LineState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Shared,
    Exclusive,
    Modified,
}

impl State {
    pub fn to_proto(self) -> LineState {
        match self {
            State::Shared => LineState::Shared,
            State::Exclusive => LineState::Exclusive,
            State::Modified => LineState::Modified,
        }
    }

    pub fn from_proto(s: LineState) -> Option<Self> {
        match s {
            LineState::Invalid => None,
            LineState::Shared => Some(State::Shared),
            LineState::Exclusive => Some(State::Exclusive),
            LineState::Modified => Some(State::Modified),
        }
    }
}

/// One node's copy as the directory records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub state: State,
    /// The grant that gave it; a release naming another grant is stale.
    pub grant: u64,
    /// The holder's incarnation then; a restarted holder holds nothing.
    pub incarnation: u64,
}

/// What the home knows of the key's current value without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub found: bool,
    pub version: u64,
    /// Unix ms; 0 = none.
    pub expires_at_ms: u64,
}

impl Known {
    pub fn of(e: &crate::store::Entry) -> Self {
        Self {
            found: e.found,
            version: e.version,
            expires_at_ms: e.expires_at_ms,
        }
    }

    pub fn absent() -> Self {
        Self {
            found: false,
            version: 0,
            expires_at_ms: 0,
        }
    }

    /// As of `now_ms`: an entry past its TTL is absent (version 0).
    pub fn at(self, now_ms: u64) -> Self {
        if self.found && self.expires_at_ms != 0 && self.expires_at_ms <= now_ms {
            Self::absent()
        } else {
            self
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirEntry {
    pub holders: BTreeMap<u64, Holder>,
    pub known: Option<Known>,
    /// Write-back mode: the written value the store does not have yet
    /// (the home keeps it until the write-behind flush stored it, so no
    /// holder's eviction or crash can lose it).
    pub dirty: Option<crate::store::Entry>,
}

/// What a release of a line does to the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Names an older grant (the node holds a newer line) or a node not
    /// listed: nothing changes.
    Stale,
    /// The holder is removed.
    Dropped,
}

impl DirEntry {
    /// The holder that must write back before the key is read or changed.
    pub fn modified(&self) -> Option<u64> {
        self.holders
            .iter()
            .find(|(_, h)| h.state == State::Modified)
            .map(|(n, _)| *n)
    }

    /// A clean Exclusive holder other than `requester`: it is downgraded to
    /// Shared so another node can share the line.
    pub fn exclusive_other_than(&self, requester: u64) -> Option<u64> {
        self.holders
            .iter()
            .find(|(n, h)| **n != requester && h.state == State::Exclusive)
            .map(|(n, _)| *n)
    }

    /// The state a fill grants `requester`: Exclusive when nobody else
    /// holds a copy, else Shared.
    pub fn fill_state(&self, requester: u64) -> State {
        if self.holders.keys().any(|n| *n != requester) {
            State::Shared
        } else {
            State::Exclusive
        }
    }

    /// Records a grant to `node` (replacing its previous one).
    pub fn grant(&mut self, node: u64, holder: Holder) {
        debug_assert!(
            holder.state == State::Shared || self.holders.keys().all(|n| *n == node),
            "an exclusive grant while others hold copies"
        );
        self.holders.insert(node, holder);
    }

    /// `node` was recalled to Shared (it answered) — or, if it had no
    /// line any more, removed.
    pub fn downgraded(&mut self, node: u64, had: bool) {
        if !had {
            self.holders.remove(&node);
        } else if let Some(h) = self.holders.get_mut(&node) {
            h.state = State::Shared;
        }
    }

    /// `node` was recalled to Invalid.
    pub fn invalidated(&mut self, node: u64) {
        self.holders.remove(&node);
    }

    /// Every copy was invalidated and `writer` holds the written line
    /// (`holder`, if it keeps one); the key is now `known`.
    pub fn written(&mut self, writer: u64, holder: Option<Holder>, known: Option<Known>) {
        self.holders.clear();
        if let Some(h) = holder {
            self.holders.insert(writer, h);
        }
        self.known = known;
    }

    /// `node` dropped the line it got with `grant` (eviction, expiry).
    pub fn release(&mut self, node: u64, grant: u64) -> Released {
        match self.holders.get(&node) {
            Some(h) if h.grant == grant => {
                self.holders.remove(&node);
                Released::Dropped
            }
            _ => Released::Stale,
        }
    }

    /// Removes holders that left the membership or restarted since their
    /// grant (`members`: node → incarnation).
    pub fn drop_departed(&mut self, members: &BTreeMap<u64, u64>) {
        self.holders
            .retain(|n, h| members.get(n) == Some(&h.incarnation));
    }

    /// Holders other than `except` (who must be invalidated on a write).
    pub fn others(&self, except: Option<u64>) -> Vec<u64> {
        self.holders
            .keys()
            .copied()
            .filter(|n| Some(*n) != except)
            .collect()
    }

    /// Nothing to remember: no holder and nothing dirty.
    pub fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.dirty.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(state: State, grant: u64) -> Holder {
        Holder {
            state,
            grant,
            incarnation: 1,
        }
    }

    #[test]
    fn first_fill_is_exclusive_then_shared() {
        let mut d = DirEntry::default();
        // I → E: nobody else holds it.
        assert_eq!(d.fill_state(1), State::Exclusive);
        d.grant(1, h(State::Exclusive, 1));
        // The same node asking again (it lost its line) stays exclusive.
        assert_eq!(d.fill_state(1), State::Exclusive);
        // A second reader: the E holder is downgraded (E → S), reader gets S.
        assert_eq!(d.exclusive_other_than(2), Some(1));
        d.downgraded(1, true);
        assert_eq!(d.fill_state(2), State::Shared);
        d.grant(2, h(State::Shared, 2));
        assert_eq!(d.holders[&1].state, State::Shared);
        assert_eq!(d.holders[&2].state, State::Shared);
        assert_eq!(d.exclusive_other_than(3), None);
    }

    #[test]
    fn downgrade_of_a_holder_without_a_line_removes_it() {
        let mut d = DirEntry::default();
        d.grant(1, h(State::Exclusive, 1));
        d.downgraded(1, false);
        assert!(d.is_idle());
        assert_eq!(d.fill_state(2), State::Exclusive);
    }

    #[test]
    fn modified_holder_is_found_and_downgraded_on_fill() {
        let mut d = DirEntry::default();
        d.written(
            1,
            Some(h(State::Modified, 7)),
            Some(Known {
                found: true,
                version: 3,
                expires_at_ms: 0,
            }),
        );
        assert_eq!(d.modified(), Some(1));
        // M → S after write-back; the reader gets S.
        d.downgraded(1, true);
        assert_eq!(d.modified(), None);
        assert_eq!(d.fill_state(2), State::Shared);
    }

    #[test]
    fn write_invalidates_every_other_copy() {
        let mut d = DirEntry::default();
        d.grant(1, h(State::Shared, 1));
        d.grant(2, h(State::Shared, 2));
        d.grant(3, h(State::Shared, 3));
        assert_eq!(d.others(None), vec![1, 2, 3]);
        assert_eq!(d.others(Some(2)), vec![1, 3]);
        // S → I everywhere, writer gets E (write-through) …
        d.written(
            2,
            Some(h(State::Exclusive, 4)),
            Some(Known {
                found: true,
                version: 9,
                expires_at_ms: 0,
            }),
        );
        assert_eq!(d.holders.len(), 1);
        assert_eq!(d.holders[&2].state, State::Exclusive);
        assert_eq!(
            d.known,
            Some(Known {
                found: true,
                version: 9,
                expires_at_ms: 0
            })
        );
        // … or nothing (a delete, an invalidate).
        d.written(2, None, Some(Known::absent()));
        assert!(d.is_idle());
    }

    #[test]
    fn releases_name_their_grant() {
        let mut d = DirEntry::default();
        d.grant(1, h(State::Exclusive, 5));
        // A release of an older line (the node refilled since) is stale.
        assert_eq!(d.release(1, 4), Released::Stale);
        assert_eq!(d.holders.len(), 1);
        // A node not listed.
        assert_eq!(d.release(2, 5), Released::Stale);
        assert_eq!(d.release(1, 5), Released::Dropped);
        assert!(d.is_idle());
    }

    #[test]
    fn a_dirty_value_outlives_its_modified_holder() {
        // Write-back: the writer holds M, the home the value to store.
        let mut d = DirEntry::default();
        let e = crate::store::Entry {
            found: true,
            value: bytes::Bytes::from_static(b"v"),
            version: 3,
            expires_at_ms: 0,
        };
        d.written(
            1,
            Some(h(State::Modified, 5)),
            Some(Known {
                found: true,
                version: 3,
                expires_at_ms: 0,
            }),
        );
        d.dirty = Some(e);
        // The M line is evicted: the holder goes, the entry stays (dirty).
        assert_eq!(d.release(1, 5), Released::Dropped);
        assert!(d.holders.is_empty());
        assert!(!d.is_idle());
        // Stored by the flush: now it may go.
        d.dirty = None;
        assert!(d.is_idle());
    }

    #[test]
    fn known_entries_expire() {
        let k = Known {
            found: true,
            version: 4,
            expires_at_ms: 1000,
        };
        assert_eq!(k.at(999), k);
        assert_eq!(k.at(1000), Known::absent());
        let forever = Known {
            found: true,
            version: 4,
            expires_at_ms: 0,
        };
        assert_eq!(forever.at(u64::MAX), forever);
    }

    #[test]
    fn departed_and_restarted_holders_are_dropped() {
        let mut d = DirEntry::default();
        d.grant(1, h(State::Shared, 1));
        d.grant(2, h(State::Shared, 2));
        d.grant(3, h(State::Shared, 3));
        // 2 left, 3 restarted (incarnation 8), 1 unchanged.
        let members = BTreeMap::from([(1, 1), (3, 8)]);
        d.drop_departed(&members);
        assert_eq!(d.others(None), vec![1]);
    }
}
