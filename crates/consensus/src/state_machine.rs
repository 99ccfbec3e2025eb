//! The contract between `consensus` and a service's replicated state.

use std::io::{Read, Write};

pub use crate::snapfile::SnapshotJob;

/// A deterministic state machine replicated by one Raft group.
///
/// Every replica applies the same commands in the same order and must reach
/// the same state, so `apply` may depend only on the state and the command:
/// no clocks, no randomness, no I/O. Time enters as commands the leader
/// proposes (e.g. `Tick { now }`).
///
/// `apply` runs on the group's driver thread: keep it short. Services that
/// serve reads share the state behind a lock and read it after
/// [`crate::GroupHandle::read_index`] resolves.
pub trait StateMachine: Send + 'static {
    /// Applies the command committed at `index` and returns the response
    /// handed to the proposer (if this replica proposed it). Errors that are
    /// part of the service's semantics (lock busy, unknown session…) belong
    /// in the response, not in a panic: every replica must agree on them.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;

    /// Serialises the whole state as of the last applied index. Used as is
    /// for a new group's bootstrap snapshot, and by the default
    /// [`StateMachine::snapshot_job`].
    fn snapshot(&self) -> Vec<u8>;

    /// Captures the state as of the last applied index and returns a job
    /// that writes it out. The capture runs on the driver thread and must
    /// be cheap (share immutable data, clone persistent structures); the
    /// job runs on a background thread while the group goes on applying,
    /// and its output is what [`StateMachine::restore_from`] reads.
    ///
    /// The default serialises on the driver thread with `snapshot()`.
    fn snapshot_job(&self) -> SnapshotJob {
        let data = self.snapshot();
        Box::new(move |out: &mut dyn Write| out.write_all(&data))
    }

    /// Replaces the whole state with a snapshot taken at `index`.
    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), String>;

    /// Replaces the whole state with a snapshot taken at `index`, read from
    /// a stream (snapshots are files). The default reads it into memory and
    /// calls [`StateMachine::restore`].
    fn restore_from(&mut self, index: u64, data: &mut dyn Read) -> Result<(), String> {
        let mut buf = Vec::new();
        data.read_to_end(&mut buf)
            .map_err(|e| format!("reading snapshot: {e}"))?;
        self.restore(index, &buf)
    }
}
