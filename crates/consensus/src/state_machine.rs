//! The contract between `consensus` and a service's replicated state.

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

    /// Serialises the whole state as of the last applied index.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the whole state with a snapshot taken at `index`.
    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), String>;
}
