//! The errors `consensus` hands to callers. Each variant is something a
//! caller can act on: follow the leader, retry, or give up.

/// Why a proposal, read or membership change did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// This replica is not the leader. `leader` is the leader's node id when
    /// one is known, with its address when the transport knows it; `term`
    /// is this replica's term (the leader's, when it knows one), so a
    /// client can ignore a hint older than one it already followed.
    #[error("not the leader (leader: {})", leader_display(*.leader, .leader_addr))]
    NotLeader {
        leader: Option<u64>,
        leader_addr: Option<String>,
        term: u64,
    },
    /// The request was accepted but did not complete before its deadline;
    /// it may or may not have been applied.
    #[error("timed out waiting for the group to commit or apply")]
    Timeout,
    /// The proposal was appended, but this node can no longer tell whether
    /// it will be (or was) applied: a snapshot superseded it, or the group
    /// stopped with it in flight.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The proposal was dropped: leadership changed and its log slot was
    /// taken by another entry, or raft-rs refused it (e.g. a leader transfer
    /// in progress). It was not applied; retrying is safe.
    #[error("proposal dropped: {0}")]
    Dropped(String),
    /// The group or node is shutting down or does not exist here.
    #[error("group {0} is not running on this node")]
    Stopped(u64),
    /// The request itself is invalid (e.g. an unknown node in a conf change).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A durable-storage failure. The group stops rather than risk
    /// acknowledging something that is not on disk.
    #[error("storage error: {0}")]
    Storage(String),
}

fn leader_display(leader: Option<u64>, addr: &Option<String>) -> String {
    match (leader, addr) {
        (Some(id), Some(a)) => format!("{id} at {a}"),
        (Some(id), None) => id.to_string(),
        _ => "unknown".to_owned(),
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
