//! dsync cache service: a coherent distributed cache.
//!
//! - `directory` — a home's directory entry and the MESI transitions (pure);
//! - `fills` — which fills may install their line (pure);
//! - `membership` — the membership Raft group: members, incarnations, epoch;
//! - `store` — L3: the `BackingStore` trait, Redis and the embedded store;
//! - `node` — `CacheNode`: lines (L2, moka), directory, the protocol;
//! - `watchers` — near-cache clients (L1) and their invalidations;
//! - `peer` — the node-to-node protocol over gRPC;
//! - `service` — the public gRPC API;
//! - `server` — a running node: chassis replica, groups, loops;
//! - `history` — a linearizability checker for recorded histories (tests).

pub mod config;
pub mod directory;
pub mod fills;
pub mod history;
pub mod membership;
pub mod node;
pub mod peer;
pub mod server;
pub mod service;
pub mod store;
pub mod watchers;
