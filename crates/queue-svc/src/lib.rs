//! queue-svc: a replicated queue service on the `consensus` core.
//!
//! A topic is split into partitions; each partition is one Raft group whose
//! state machine is a [`partition::PartitionState`]. Consumer groups read a
//! partition independently, with leases (visibility timeouts), retries with
//! backoff, dead letters, priorities (shared groups) or strict order
//! (ordered groups).
//!
//! - [`partition`] — one partition's pure, deterministic state: offsets,
//!   retention, deduplication, groups, leases, redelivery and dead letters.
//!   It knows nothing of Raft, gRPC or disks; payloads live with the caller,
//!   keyed by offset.

pub mod machine;
pub mod meta;
pub mod partition;
pub mod segments;
pub mod server;
pub mod service;
