//! Which fills may install their line: the requester's half of resolving
//! races between fills and invalidations.
//!
//! The home serializes a key's protocol, but its answer to a fill travels
//! back on its own while a later write's invalidation may overtake it. A
//! node therefore counts, per key, the invalidations (recalls) it received
//! while a fill of that key was in flight. A fill installs its line only if
//! the count moved by exactly the recalls its own call sent the requester
//! (the home says how many). Anything more was a later write: the answer
//! is still returned to the reader (it was current when the home gave it),
//! but it is not cached.

use std::collections::HashMap;

use bytes::Bytes;

#[derive(Default)]
struct Slot {
    active: usize,
    recalls: u64,
}

#[derive(Default)]
pub struct FillTracker {
    slots: HashMap<Bytes, Slot>,
}

/// A fill in flight: where the key's recall count stood when it began.
#[derive(Debug, Clone, Copy)]
pub struct FillTicket {
    start: u64,
}

impl FillTracker {
    pub fn begin(&mut self, key: &Bytes) -> FillTicket {
        let slot = self.slots.entry(key.clone()).or_default();
        slot.active += 1;
        FillTicket {
            start: slot.recalls,
        }
    }

    /// A recall of `key` arrived (whether or not a line was held).
    pub fn recalled(&mut self, key: &[u8]) {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.recalls += 1;
        }
    }

    /// Ends a fill; answers whether its line may be installed, given the
    /// recalls its own call caused (`own_recalls`).
    pub fn finish(&mut self, key: &[u8], ticket: FillTicket, own_recalls: u64) -> bool {
        let Some(slot) = self.slots.get_mut(key) else {
            return false;
        };
        let clean = slot.recalls - ticket.start == own_recalls;
        slot.active -= 1;
        if slot.active == 0 {
            self.slots.remove(key);
        }
        clean
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k() -> Bytes {
        Bytes::from_static(b"k")
    }

    #[test]
    fn a_fill_without_recalls_installs() {
        let mut f = FillTracker::default();
        let t = f.begin(&k());
        assert!(f.finish(b"k", t, 0));
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn an_invalidation_overtaking_the_answer_blocks_the_install() {
        // Home grants S, then a write's invalidation reaches the node
        // before the grant does: the stale grant must not be cached.
        let mut f = FillTracker::default();
        let t = f.begin(&k());
        f.recalled(b"k");
        assert!(!f.finish(b"k", t, 0));
    }

    #[test]
    fn a_writer_expects_its_own_recall() {
        // The home invalidates every copy, the writer's own included, then
        // grants the writer the new line: one recall is the writer's own.
        let mut f = FillTracker::default();
        let t = f.begin(&k());
        f.recalled(b"k");
        assert!(f.finish(b"k", t, 1));
        // A second recall (a later write overtook the answer) blocks it.
        let t = f.begin(&k());
        f.recalled(b"k");
        f.recalled(b"k");
        assert!(!f.finish(b"k", t, 1));
    }

    #[test]
    fn concurrent_fills_see_recalls_since_their_own_start() {
        let mut f = FillTracker::default();
        let a = f.begin(&k());
        f.recalled(b"k");
        let b = f.begin(&k());
        // `b` began after the recall: its answer is newer than it.
        assert!(f.finish(b"k", b, 0));
        assert!(!f.finish(b"k", a, 0));
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn recalls_without_fills_leave_nothing_behind() {
        let mut f = FillTracker::default();
        f.recalled(b"k");
        assert_eq!(f.in_flight(), 0);
    }
}
