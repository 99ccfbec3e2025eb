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
            replica.node().transport().clone(),
            cfg.replica.features.contains(&crate::lessor::FEATURE),
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
/// does not lead keeps no leases. Until leases are enabled (every member
/// runs a build with them: [`enable_leases`]) it ticks as earlier builds
/// did. Also publishes the lock table's gauges (on every replica).
/// `leases_built`: this replica reports the feature itself; one that does
/// not (it stands for an older build) never proposes `EnableLeases`.
async fn tick_loop(
    locks: Locks,
    interval: Duration,
    transport: Arc<dyn consensus::Transport>,
    leases_built: bool,
    mut closed: watch::Receiver<bool>,
) {
    let mut ticked_term = 0;
    let mut last_gate = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        publish_gauges(&locks);
        let st = locks.group.status();
        if !st.is_leader() {
            locks.lessor.deactivate();
            ticked_term = 0;
            continue;
        }
        if !locks.state.read().leases_in_memory {
            // As earlier builds: a Tick while sessions exist, the first of
            // each term refreshing every session.
            let refresh = st.term != ticked_term;
            if refresh || !locks.state.read().sessions.is_empty() {
                let tick = Cmd::Tick(Tick {
                    refresh_sessions: refresh,
                    leases_in_memory: false,
                });
                match locks.propose(tick).await {
                    Ok(_) => ticked_term = st.term,
                    Err(e) => tracing::debug!(error = %e, "tick not committed"),
                }
            }
            if leases_built && last_gate.elapsed() >= Duration::from_secs(1) {
                last_gate = std::time::Instant::now();
                enable_leases(&locks, &st, transport.as_ref()).await;
            }
            continue;
        }
        // A new leader starts its leases now rather than at its first
        // keep-alive, so its sessions' expiry does not wait for one.
        let term = match locks.confirm_leading().await {
            Ok(term) if term == st.term => term,
            _ => continue,
        };
        loop {
            let due = locks.lessor.due(term, std::time::Instant::now());
            if due.is_empty() {
                break;
            }
            tracing::info!(sessions = ?due, "sessions expired: no keep-alive within their TTL");
            let expire = Cmd::ExpireSessions(ExpireSessions {
                session_ids: due.clone(),
            });
            // Decided from this term's leases: appended only in this term.
            if let Err(e) = locks.propose_in_term(expire, term).await {
                tracing::debug!(error = %e, "session expiry not committed; retried");
                locks.lessor.retry(term, &due);
                break;
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

/// Proposes `EnableLeases` once every member of the group (voters and
/// learners) reports the feature in its admin Status: no replica that
/// would not understand `ExpireSessions` is left (a rolling upgrade
/// finished). Permanent: a rollback below this build is not supported.
async fn enable_leases(
    locks: &Locks,
    st: &consensus::GroupStatus,
    transport: &dyn consensus::Transport,
) {
    use proto::admin::v1::admin_client::AdminClient;
    for &id in st.voters.iter().chain(&st.learners) {
        if id == st.node {
            continue;
        }
        let Some(addr) = transport.peer_addr(id) else {
            return;
        };
        let features = async {
            let ch = chassis::dial(&addr).await.ok()?;
            let mut req = tonic::Request::new(proto::admin::v1::StatusRequest {});
            req.set_timeout(Duration::from_secs(1));
            let st = AdminClient::new(ch).status(req).await.ok()?;
            Some(st.into_inner().features)
        };
        let has = tokio::time::timeout(Duration::from_secs(2), features)
            .await
            .ok()
            .flatten()
            .is_some_and(|f| f.iter().any(|f| f == crate::lessor::FEATURE));
        if !has {
            tracing::debug!(node = id, "leases stay off: a member lacks the feature");
            return;
        }
    }
    match locks
        .propose(Cmd::EnableLeases(
            proto::lock::v1::internal::EnableLeases {},
        ))
        .await
    {
        Ok(_) => tracing::info!("every member leases sessions in memory: leases enabled"),
        Err(e) => tracing::debug!(error = %e, "EnableLeases not committed"),
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
