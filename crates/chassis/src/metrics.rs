//! Prometheus metrics: the exporter (an HTTP listener serving `/metrics`)
//! and the Raft gauges every service exports. Service-specific figures are
//! recorded by the services with the `metrics` macros.
//!
//! Names (labels in braces):
//! - `dsync_grpc_requests_total{method,code}`, `dsync_grpc_request_duration_seconds{method,code}`,
//!   `dsync_grpc_shed_total{method}` — from [`crate::layer`];
//! - `dsync_raft_term{group}`, `dsync_raft_is_leader{group}`, `dsync_raft_role{group}`
//!   (0 follower, 1 pre-candidate, 2 candidate, 3 leader), `dsync_raft_commit_index{group}`,
//!   `dsync_raft_applied_index{group}`, `dsync_raft_last_index{group}`,
//!   `dsync_raft_snapshot_index{group}`, `dsync_raft_snapshots_taken{group}`,
//!   `dsync_raft_snapshots_installed{group}`, `dsync_raft_voters{group}`,
//!   `dsync_raft_proposals_total{group}` (proposals accepted as leader since start).

use std::net::SocketAddr;
use std::time::Duration;

use consensus::{Node, Role};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Serves `/metrics` on `addr`. Must run inside a tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ])
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("metrics exporter on {addr}: {e}"))
}

/// Publishes every group's Raft figures once a second until `closed`.
pub async fn raft_gauges(node: Node, mut closed: tokio::sync::watch::Receiver<bool>) {
    loop {
        for s in node.status() {
            let g = s.group.to_string();
            let role = match s.role {
                Role::Follower => 0.0,
                Role::PreCandidate => 1.0,
                Role::Candidate => 2.0,
                Role::Leader => 3.0,
            };
            metrics::gauge!("dsync_raft_term", "group" => g.clone()).set(s.term as f64);
            metrics::gauge!("dsync_raft_role", "group" => g.clone()).set(role);
            metrics::gauge!("dsync_raft_is_leader", "group" => g.clone()).set(if s.is_leader() {
                1.0
            } else {
                0.0
            });
            metrics::gauge!("dsync_raft_commit_index", "group" => g.clone()).set(s.commit as f64);
            metrics::gauge!("dsync_raft_applied_index", "group" => g.clone()).set(s.applied as f64);
            metrics::gauge!("dsync_raft_last_index", "group" => g.clone()).set(s.last_index as f64);
            metrics::gauge!("dsync_raft_snapshot_index", "group" => g.clone())
                .set(s.snapshot_index as f64);
            metrics::gauge!("dsync_raft_snapshots_taken", "group" => g.clone())
                .set(s.snapshots_taken as f64);
            metrics::gauge!("dsync_raft_snapshots_installed", "group" => g.clone())
                .set(s.snapshots_installed as f64);
            metrics::gauge!("dsync_raft_voters", "group" => g.clone()).set(s.voters.len() as f64);
            metrics::counter!("dsync_raft_proposals_total", "group" => g).absolute(s.proposals);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}
