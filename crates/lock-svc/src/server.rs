//! A running lock-svc replica: the chassis replica (node, gRPC server with
//! Raft, health, reflection, admin, metrics), the lock group, and the
//! leader's ticker.

use std::sync::Arc;
use std::time::Duration;

use chassis::Replica;
use consensus::Node;
use parking_lot::RwLock;
use proto::lock::v1::internal::{command::Cmd, ExpireSessions, Tick};
use proto::lock::v1::lock_service_server::LockServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;

use crate::config::LockConfig;
use crate::lessor::Lessor;
use crate::machine::{LockMachine, Waits};
use crate::service::{Locks, GROUP};
use crate::state::LockState;

/// The gRPC service name reported by health checks.
pub const SERVICE_NAME: &str = "dsync.lock.v1.LockService";

pub struct LockServer {
    pub locks: Locks,
    pub addr: std::net::SocketAddr,
    replica: Replica,
    ticker: JoinHandle<()>,
}

impl LockServer {
    /// Starts a replica serving on `listener`. Needs a multi-threaded
    /// tokio runtime.
    pub fn start(cfg: LockConfig, listener: tokio::net::TcpListener) -> Result<Self, String> {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut replica = Replica::open(cfg.replica.clone())?;
        let state = Arc::new(RwLock::new(LockState::new(cfg.limits)));
        let waits = Arc::new(Waits::default());
        let lessor = Arc::new(Lessor::default());
        let group = replica
            .node()
            .start_group(
                GROUP,
                &cfg.replica.voters(),
                Box::new(LockMachine {
                    state: state.clone(),
                    waits: waits.clone(),
                    lessor: lessor.clone(),
                }),
            )
            .map_err(|e| e.to_string())?;
        let locks = Locks {
            group,
            state,
            waits,
            lessor,
            limits: cfg.limits,
        };
        replica.serve(
            listener,
            Routes::new(
                LockServiceServer::new(locks.clone())
                    .max_decoding_message_size(chassis::MAX_REQUEST_BYTES),
            ),
            &[SERVICE_NAME],
        )?;
        let ticker = tokio::spawn(tick_loop(
            locks.clone(),
            cfg.tick_interval,
            replica.closed(),
        ));
        Ok(Self {
            locks,
            addr,
            replica,
            ticker,
        })
    }

    pub fn node(&self) -> &Node {
        self.replica.node()
    }

    /// Graceful stop (SIGTERM): leadership handed to a peer, waits failed
    /// over to other replicas, server and group stopped.
    pub async fn shutdown(self) {
        self.ticker.abort();
        self.locks.waits.close();
        self.replica.shutdown().await;
    }

    /// Abrupt stop (tests): connections drop, the group stops.
    pub async fn kill(self) {
        self.ticker.abort();
        self.locks.waits.close();
        self.replica.kill().await;
    }
}

/// On the leader, every `interval`: expires the sessions whose leases
/// passed (`ExpireSessions`, see `crate::lessor`), and proposes a `Tick`
/// while waits exist (overdue waits, the deadlock scan). A replica that
/// does not lead keeps no leases. Also publishes the lock table's gauges
/// (on every replica).
async fn tick_loop(locks: Locks, interval: Duration, mut closed: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        publish_gauges(&locks);
        let st = locks.group.status();
        if !st.is_leader() {
            locks.lessor.deactivate();
            continue;
        }
        // A new leader starts its leases now rather than at its first
        // keep-alive, so its sessions' expiry does not wait for one.
        let term = match locks.confirm_leading().await {
            Ok(term) if term == st.term => term,
            _ => continue,
        };
        let due = locks.lessor.due(term, std::time::Instant::now());
        if !due.is_empty() {
            tracing::info!(sessions = ?due, "sessions expired: no keep-alive within their TTL");
            let expire = Cmd::ExpireSessions(ExpireSessions {
                session_ids: due.clone(),
            });
            if let Err(e) = locks.propose(expire).await {
                tracing::debug!(error = %e, "session expiry not committed; retried");
                locks.lessor.retry(term, &due);
            }
        }
        if locks.state.read().waiters.is_empty() {
            continue;
        }
        let tick = Cmd::Tick(Tick {
            refresh_sessions: false,
            leases_in_memory: true,
        });
        if let Err(e) = locks.propose(tick).await {
            tracing::debug!(error = %e, "tick not committed");
        }
    }
}

fn publish_gauges(locks: &Locks) {
    let s = locks.state.read();
    metrics::gauge!("dsync_lock_sessions").set(s.sessions.len() as f64);
    metrics::gauge!("dsync_lock_leases_kept").set(locks.lessor.len() as f64);
    metrics::gauge!("dsync_lock_locks_held").set(s.locks.len() as f64);
    metrics::gauge!("dsync_lock_waiters").set(s.waiters.len() as f64);
    metrics::gauge!("dsync_lock_resources").set(s.resources.len() as f64);
    metrics::counter!("dsync_lock_grants_total").absolute(s.stats.grants);
    metrics::counter!("dsync_lock_timeouts_total").absolute(s.stats.timeouts);
    metrics::counter!("dsync_lock_deadlocks_total").absolute(s.stats.deadlocks);
    metrics::counter!("dsync_lock_sessions_expired_total").absolute(s.stats.expired_sessions);
}
