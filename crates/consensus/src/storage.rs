//! Durable Raft storage on `raft-engine`, tikv's multi-Raft log store.
//!
//! One [`LogStore`] (one raft-engine instance, one directory) serves every
//! group hosted by a node; each group sees it through a [`GroupStorage`],
//! which implements raft-rs's [`raft::Storage`]. raft-engine keeps one
//! append-only log for all groups, so concurrent writers from many groups are
//! merged by its write barrier into a single fsync, and batches above 8 KiB
//! are lz4-compressed.
//!
//! Per group it holds, keyed by group id:
//! - the log entries (`add_entries`, compacted with `Command::Compact`);
//! - `hard_state`: term, vote, commit;
//! - `snapshot`: the latest snapshot, metadata (index, term, conf state)
//!   and state-machine data together.
//!
//! Invariants:
//! - Everything the driver loop hands to [`GroupStorage::persist`] with
//!   `sync = true` is fsync'd before it returns, so a `kill -9` after a write
//!   was acknowledged cannot lose it.
//! - Entries below `snapshot.index + 1` may be gone; `term(snapshot.index)`
//!   is still answered from the snapshot metadata, as raft-rs requires.
//! - Installing a snapshot replaces the whole group state atomically: one log
//!   batch cleans the group, then writes the snapshot and the hard state.

use std::sync::Arc;

use parking_lot::RwLock;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt, ReadableSize};

use crate::error::Error;

const HARD_STATE_KEY: &[u8] = b"hard_state";
/// Index (and term) of the snapshot a new group is bootstrapped with.
pub const BOOTSTRAP_INDEX: u64 = 5;
const SNAPSHOT_KEY: &[u8] = b"snapshot";

/// Tells raft-engine how to read the index of a raft-rs entry.
#[derive(Clone)]
pub struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// One raft-engine instance shared by all groups of a node.
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, recovering whatever was synced.
    pub fn open(dir: &std::path::Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let cfg = raft_engine::Config {
            dir: dir.to_string_lossy().into_owned(),
            // Smaller files than the default 128 MiB so that purging after
            // compaction returns disk space sooner.
            target_file_size: ReadableSize::mb(32),
            purge_threshold: ReadableSize::mb(256),
            batch_compression_threshold: ReadableSize::kb(8),
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(|e| Error::Storage(e.to_string()))?;
        Ok(Self {
            engine: Arc::new(engine),
        })
    }

    /// Groups that have any durable state in this store.
    pub fn groups(&self) -> Vec<u64> {
        self.engine.raft_groups()
    }

    /// Rewrites or deletes log files no longer needed after compaction.
    /// Returns groups whose old entries hold files back (they should take a
    /// snapshot so their log can be compacted).
    pub fn purge(&self) -> Result<Vec<u64>, Error> {
        self.engine
            .purge_expired_files()
            .map_err(|e| Error::Storage(e.to_string()))
    }

    /// Deletes everything stored for `group` (log, hard state, snapshot).
    pub fn remove_group(&self, group: u64) -> Result<(), Error> {
        let mut batch = LogBatch::default();
        batch.add_command(group, Command::Clean);
        self.engine.write(&mut batch, true).map_err(storage_err)?;
        Ok(())
    }

    /// The storage of one group. Loads its hard state and snapshot metadata.
    pub fn group(&self, group: u64) -> Result<GroupStorage, Error> {
        let hard_state: HardState = self
            .engine
            .get_message(group, HARD_STATE_KEY)
            .map_err(storage_err)?
            .unwrap_or_default();
        let snapshot: Snapshot = self
            .engine
            .get_message(group, SNAPSHOT_KEY)
            .map_err(storage_err)?
            .unwrap_or_default();
        Ok(GroupStorage {
            group,
            engine: self.engine.clone(),
            state: Arc::new(RwLock::new(State {
                hard_state,
                snapshot_meta: snapshot.get_metadata().clone(),
                wants_snapshot: false,
            })),
        })
    }
}

fn storage_err(e: raft_engine::Error) -> Error {
    Error::Storage(e.to_string())
}

fn raft_err(e: raft_engine::Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

struct State {
    hard_state: HardState,
    snapshot_meta: SnapshotMetadata,
    /// Set when raft-rs asked for a snapshot the stored one cannot serve
    /// (too old, or from before the requesting peer joined); the driver
    /// takes a fresh one and raft-rs asks again.
    wants_snapshot: bool,
}

/// The durable state of one Raft group, as raft-rs reads it.
#[derive(Clone)]
pub struct GroupStorage {
    group: u64,
    engine: Arc<Engine>,
    state: Arc<RwLock<State>>,
}

/// What one `ready` asks to make durable, written as one log batch.
#[derive(Default)]
pub struct WriteSet<'a> {
    pub snapshot: Option<&'a Snapshot>,
    pub entries: &'a [Entry],
    pub hard_state: Option<HardState>,
}

impl GroupStorage {
    /// True when this group has never been initialised on this node.
    pub fn is_empty(&self) -> bool {
        let s = self.state.read();
        s.hard_state == HardState::default()
            && s.snapshot_meta.index == 0
            && s.snapshot_meta.get_conf_state() == &ConfState::default()
            && self.engine.last_index(self.group).is_none()
    }

    /// Bootstraps a brand-new group with its initial voters and the
    /// state machine's empty state, as a snapshot at [`BOOTSTRAP_INDEX`].
    ///
    /// Why not index 0: the founding conf state lives only in this
    /// snapshot, never in a log entry. With the log starting above it, a
    /// replica that joins later cannot be caught up from entries (it would
    /// replay only the later membership changes and believe itself the
    /// sole voter); it must receive a snapshot, which carries the full
    /// conf state. (TiKV initialises its regions the same way.)
    pub fn bootstrap(&self, voters: &[u64], data: Vec<u8>) -> Result<(), Error> {
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = BOOTSTRAP_INDEX;
        meta.term = BOOTSTRAP_INDEX;
        meta.mut_conf_state().voters = voters.to_vec();
        self.persist(
            WriteSet {
                snapshot: Some(&snap),
                ..Default::default()
            },
            true,
        )
    }

    /// Writes a ready's snapshot, entries and hard state in one batch.
    pub fn persist(&self, w: WriteSet<'_>, sync: bool) -> Result<(), Error> {
        let mut batch = LogBatch::default();
        let mut state = self.state.write();
        let mut hard_state = w.hard_state.clone();
        if let Some(snap) = w.snapshot {
            // A snapshot replaces everything: drop the old log and keys, then
            // re-write the hard state in the same batch (Clean removed it).
            batch.add_command(self.group, Command::Clean);
            batch
                .put_message(self.group, SNAPSHOT_KEY.to_vec(), snap)
                .map_err(storage_err)?;
            let meta = snap.get_metadata();
            let mut hs = hard_state.unwrap_or_else(|| state.hard_state.clone());
            hs.term = hs.term.max(meta.term);
            hs.commit = hs.commit.max(meta.index);
            hard_state = Some(hs);
        }
        if !w.entries.is_empty() {
            batch
                .add_entries::<EntryExt>(self.group, w.entries)
                .map_err(storage_err)?;
        }
        if let Some(hs) = &hard_state {
            batch
                .put_message(self.group, HARD_STATE_KEY.to_vec(), hs)
                .map_err(storage_err)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.engine.write(&mut batch, sync).map_err(storage_err)?;
        if let Some(snap) = w.snapshot {
            state.snapshot_meta = snap.get_metadata().clone();
        }
        if let Some(hs) = hard_state {
            state.hard_state = hs;
        }
        Ok(())
    }

    /// Records a commit index learned from a light ready. Not synced: the
    /// commit index can always be re-learned from the quorum.
    pub fn set_commit(&self, commit: u64) -> Result<(), Error> {
        let mut hs = self.state.read().hard_state.clone();
        if commit <= hs.commit {
            return Ok(());
        }
        hs.commit = commit;
        self.persist(
            WriteSet {
                hard_state: Some(hs),
                ..Default::default()
            },
            false,
        )
    }

    /// Stores a snapshot taken locally by the state machine and compacts the
    /// log below `compact_to` (exclusive), which must be at most
    /// `snapshot.index + 1`. Synced: the snapshot replaces log entries.
    pub fn save_snapshot(&self, snap: &Snapshot, compact_to: u64) -> Result<(), Error> {
        let meta = snap.get_metadata();
        debug_assert!(compact_to <= meta.index + 1);
        let mut batch = LogBatch::default();
        batch
            .put_message(self.group, SNAPSHOT_KEY.to_vec(), snap)
            .map_err(storage_err)?;
        if compact_to > 0 {
            batch.add_command(self.group, Command::Compact { index: compact_to });
        }
        let mut state = self.state.write();
        self.engine.write(&mut batch, true).map_err(storage_err)?;
        state.snapshot_meta = meta.clone();
        Ok(())
    }

    /// True (once) if raft-rs needed a newer snapshot than the stored one.
    pub fn take_snapshot_request(&self) -> bool {
        std::mem::take(&mut self.state.write().wants_snapshot)
    }

    pub fn hard_state(&self) -> HardState {
        self.state.read().hard_state.clone()
    }

    pub fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.state.read().snapshot_meta.clone()
    }

    /// The stored snapshot with its data.
    pub fn load_snapshot(&self) -> Result<Snapshot, Error> {
        Ok(self
            .engine
            .get_message(self.group, SNAPSHOT_KEY)
            .map_err(storage_err)?
            .unwrap_or_default())
    }

    fn first_last(&self, snap_index: u64) -> (u64, u64) {
        let first = self
            .engine
            .first_index(self.group)
            .map_or(snap_index + 1, |f| f.max(snap_index + 1));
        let last = self
            .engine
            .last_index(self.group)
            .map_or(snap_index, |l| l.max(snap_index));
        (first, last)
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let s = self.state.read();
        Ok(RaftState {
            hard_state: s.hard_state.clone(),
            conf_state: s.snapshot_meta.get_conf_state().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let snap_index = self.state.read().snapshot_meta.index;
        let (first, last) = self.first_last(snap_index);
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        if low == high {
            return Ok(out);
        }
        let max = max_size.into().map(|m| m as usize);
        self.engine
            .fetch_entries_to::<EntryExt>(self.group, low, high, max, &mut out)
            .map_err(raft_err)?;
        if out.is_empty() {
            // raft-rs requires at least one entry when any exist in range.
            if let Some(e) = self
                .engine
                .get_entry::<EntryExt>(self.group, low)
                .map_err(raft_err)?
            {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.state.read().snapshot_meta.clone();
        if idx == meta.index {
            return Ok(meta.term);
        }
        let (first, last) = self.first_last(meta.index);
        if idx < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self
            .engine
            .get_entry::<EntryExt>(self.group, idx)
            .map_err(raft_err)?
        {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        let snap_index = self.state.read().snapshot_meta.index;
        Ok(self.first_last(snap_index).0)
    }

    fn last_index(&self) -> raft::Result<u64> {
        let snap_index = self.state.read().snapshot_meta.index;
        Ok(self.first_last(snap_index).1)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let snap = self.load_snapshot().map_err(|e| {
            raft::Error::Store(StorageError::Other(Box::new(std::io::Error::other(
                e.to_string(),
            ))))
        })?;
        let cs = snap.get_metadata().get_conf_state();
        let knows_peer = [
            &cs.voters,
            &cs.learners,
            &cs.voters_outgoing,
            &cs.learners_next,
        ]
        .iter()
        .any(|ids| ids.contains(&to));
        if snap.get_metadata().index < request_index || !knows_peer {
            // A peer refuses a snapshot whose conf state does not include
            // it; the driver takes a fresh snapshot and raft-rs retries.
            self.state.write().wants_snapshot = true;
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 10].into(),
            ..Default::default()
        }
    }

    #[test]
    fn entries_hard_state_and_snapshot_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LogStore::open(dir.path()).unwrap();
            let g = store.group(7).unwrap();
            assert!(g.is_empty());
            g.bootstrap(&[1, 2, 3], Vec::new()).unwrap();
            assert_eq!(g.first_index().unwrap(), BOOTSTRAP_INDEX + 1);
            assert_eq!(g.hard_state().term, BOOTSTRAP_INDEX);
            let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
            let hs = HardState {
                term: 1,
                vote: 2,
                commit: 8,
                ..Default::default()
            };
            g.persist(
                WriteSet {
                    entries: &ents,
                    hard_state: Some(hs),
                    ..Default::default()
                },
                true,
            )
            .unwrap();
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 5;
            snap.mut_metadata().term = 1;
            snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
            snap.data = b"state@5".to_vec().into();
            g.save_snapshot(&snap, 4).unwrap();
        }
        let store = LogStore::open(dir.path()).unwrap();
        assert_eq!(store.groups(), vec![7]);
        let g = store.group(7).unwrap();
        assert!(!g.is_empty());
        let st = g.initial_state().unwrap();
        assert_eq!(st.hard_state.commit, 8);
        assert_eq!(st.hard_state.vote, 2);
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(g.first_index().unwrap(), 6);
        assert_eq!(g.last_index().unwrap(), 10);
        assert_eq!(g.term(5).unwrap(), 1);
        assert!(matches!(
            g.entries(4, 6, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let got = g
            .entries(6, 11, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![6, 7, 8, 9, 10]
        );
        assert_eq!(&g.load_snapshot().unwrap().data[..], b"state@5");
    }

    #[test]
    fn installing_a_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        let g = store.group(1).unwrap();
        let ents: Vec<_> = (1..=20).map(|i| entry(i, 1)).collect();
        g.persist(
            WriteSet {
                entries: &ents,
                ..Default::default()
            },
            true,
        )
        .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 12;
        snap.mut_metadata().term = 2;
        g.persist(
            WriteSet {
                snapshot: Some(&snap),
                ..Default::default()
            },
            true,
        )
        .unwrap();
        assert_eq!(g.first_index().unwrap(), 13);
        assert_eq!(g.last_index().unwrap(), 12);
        assert_eq!(g.hard_state().commit, 12);
        assert_eq!(g.hard_state().term, 2);
        // Appending after the snapshot works (no hole, no stale tail).
        g.persist(
            WriteSet {
                entries: &[entry(13, 2)],
                ..Default::default()
            },
            true,
        )
        .unwrap();
        assert_eq!(g.last_index().unwrap(), 13);
        assert_eq!(g.term(13).unwrap(), 2);
    }
}
