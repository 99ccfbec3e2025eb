//! `consensus` hosts many Raft groups in one process.
//!
//! A [`Node`] owns one durable log ([`storage::LogStore`], on raft-engine)
//! and one [`Transport`]; each group it hosts runs raft-rs's `RawNode` on its
//! own driver thread ([`group`]) together with the service's
//! [`StateMachine`]. Services call a group through a [`GroupHandle`]:
//! `propose` (resolved with the state machine's response once applied),
//! `read_index` (linearizable reads without a log write), membership changes
//! and leader transfer. Errors are [`Error`]s a caller can act on:
//! `NotLeader { leader }`, `Timeout`, `Dropped`.
//!
//! The Raft core stays pure (raft-rs owns no I/O); I/O lives at the edges:
//! storage (`storage`), the network (`transport`), and threads and clocks
//! (`group`, `node`). [`testkit`] replaces the network with one that drops,
//! delays and partitions, for deterministic fault tests.
//!
//! Invariants, upheld together by `group` and `storage`:
//! - a proposal is acknowledged only after it is fsync'd on a quorum and
//!   applied locally, so `kill -9` of any minority loses nothing acknowledged;
//! - every replica applies the same entries in the same order;
//! - a leader cut off from its quorum steps down within an election timeout
//!   (check-quorum), and a minority never commits.

pub mod config;
pub mod error;
mod group;
pub mod grpc_status;
mod logger;
pub mod node;
pub mod snapfile;
pub mod state_machine;
pub mod status;
pub mod storage;
pub mod testkit;
pub mod transport;

pub use config::Config;
pub use error::{Error, Result};
pub use group::GroupHandle;
pub use node::Node;
pub use state_machine::{SnapshotJob, StateMachine};
pub use status::{GroupStatus, LeaderView, Role};
pub use transport::{GrpcTransport, Inbound, RaftTransportService, Transport};
