//! lock-svc: a replicated lock service on the `consensus` core.
//!
//! - [`state`] — the lock table, a pure deterministic state machine
//!   (modes, FIFO queues, sessions, fencing tokens, deadlock detection).
//! - [`lessor`] — session leases in the leader's memory (keep-alives
//!   never touch the log; expiries do).
//! - [`machine`] — plugs the table into consensus and routes wait outcomes
//!   to the handlers blocked on them.
//! - [`service`] — the gRPC API: validation, proposals, status mapping.
//! - [`server`] — a running replica (node + gRPC server + ticker).
//! - [`config`] — flags, env vars and limits.

pub mod config;
pub mod lessor;
pub mod machine;
pub mod server;
pub mod service;
pub mod state;

pub use config::{Flags, LockConfig};
pub use server::LockServer;
