//! The chassis every dsync service binary runs on.
//!
//! A service brings its state machine and its gRPC API; the chassis brings
//! the rest, the same way for every service:
//! - [`config`] — flags and `DSYNC_*` env, including Kubernetes mode (node id
//!   from the pod ordinal, peers from the headless service's DNS names);
//! - [`logging`] — tracing logs, human or JSON (`DSYNC_LOG_FORMAT`);
//! - [`metrics`] — Prometheus exporter and Raft gauges;
//! - [`layer`] — per-request span, timeout, load shedding with
//!   `RESOURCE_EXHAUSTED`, request count and latency metrics;
//! - [`replica`] — the consensus node, one gRPC server carrying the service
//!   API plus Raft transport, `grpc.health.v1`, reflection and the admin API,
//!   automatic join for scaled-up replicas, and graceful shutdown;
//! - [`admin`] — `dsync.admin.v1.Admin`: status and membership;
//! - [`delivery`] — cleanup for answers that never reached their client.

pub mod admin;
pub mod config;
pub mod delivery;
pub mod layer;
pub mod logging;
pub mod metrics;
pub mod replica;

pub use config::{CommonFlags, ReplicaConfig};
pub use delivery::{attach, Delivery};
pub use layer::{GrpcLayer, MAX_REQUEST_BYTES};
pub use replica::Replica;

/// Dials a peer replica (host:port or `http://…`): the one way a service
/// opens a channel to another replica of itself, so transport security can
/// be added here once.
pub async fn dial(addr: &str) -> Result<tonic::transport::Channel, String> {
    consensus::transport::connect(addr).await
}
