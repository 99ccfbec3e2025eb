//! A running cache-svc node: the chassis replica (one gRPC server with the
//! cache API, the peer protocol, Raft, health, reflection, admin), the
//! membership group, the embedded store group (unless Redis backs the
//! cache), the [`CacheNode`], and its loops:
//! - `join_loop`: joins the membership after start and after being fenced;
//! - `membership_loop`: moves the node to each new epoch;
//! - `lease_loop`: renews the member lease by a `read_index` of the
//!   membership group every `lease / 4`, and probes the other members
//!   every `lease / 2` (one unreachable for `fence_after` is fenced out);
//! - `gauges_loop`: publishes the cache's figures as metrics (and, on the
//!   embedded store's leader, purges expired entries).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chassis::{Replica, ReplicaConfig};
use consensus::{GroupHandle, Node};
use parking_lot::RwLock;
use proto::cache::v1::cache_service_server::CacheServiceServer;
use proto::cache::v1::internal::cache_peer_server::CachePeerServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;

use crate::config::CacheLimits;
use crate::membership::{self, Command, Membership, MembershipMachine};
use crate::node::CacheNode;
use crate::peer::{PeerApi, Peers};
use crate::service::Caches;
use crate::store::{self, BackingStore, EmbeddedStore, RedisStore, StoreMachine, StoreState};

/// The gRPC service name reported by health checks.
pub const SERVICE_NAME: &str = "dsync.cache.v1.CacheService";

#[derive(Clone)]
pub struct CacheConfig {
    pub replica: ReplicaConfig,
    pub limits: CacheLimits,
    /// "embedded" or a Redis URL.
    pub store: String,
}

impl CacheConfig {
    pub fn new(
        node_id: u64,
        peers: std::collections::HashMap<u64, String>,
        data_dir: impl Into<std::path::PathBuf>,
    ) -> Self {
        Self::from_replica(
            ReplicaConfig::new("cache-svc", node_id, peers, data_dir),
            CacheLimits::default(),
            "embedded".into(),
        )
    }

    pub fn from_replica(mut replica: ReplicaConfig, limits: CacheLimits, store: String) -> Self {
        // A write may wait for a fence, a slow near cache and its lease.
        replica.long_methods = vec![
            (
                "/dsync.cache.v1.CacheService/Set".into(),
                Duration::from_secs(15),
            ),
            (
                "/dsync.cache.v1.CacheService/BatchSet".into(),
                Duration::from_secs(15),
            ),
            (
                "/dsync.cache.v1.CacheService/Delete".into(),
                Duration::from_secs(15),
            ),
            (
                "/dsync.cache.v1.CacheService/Invalidate".into(),
                Duration::from_secs(15),
            ),
            (
                "/dsync.cache.v1.internal.CachePeer/Write".into(),
                Duration::from_secs(15),
            ),
        ];
        Self {
            replica,
            limits,
            store,
        }
    }
}

pub struct CacheServer {
    pub caches: Caches,
    pub addr: std::net::SocketAddr,
    membership: GroupHandle,
    replica: Replica,
    tasks: Vec<JoinHandle<()>>,
}

impl CacheServer {
    /// Starts a node serving on `listener`. Needs a multi-threaded tokio
    /// runtime. With a Redis store, Redis must answer once at start.
    pub async fn start(
        cfg: CacheConfig,
        listener: tokio::net::TcpListener,
    ) -> Result<Self, String> {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let me = cfg.replica.node_id;
        let mut replica = Replica::open(cfg.replica.clone())?;
        let node = replica.node().clone();
        let voters = cfg.replica.voters();
        let state = Arc::new(RwLock::new(Membership::default()));
        let (changed_tx, changed) = watch::channel(0u64);
        let mgroup = node
            .start_group(
                membership::GROUP,
                &voters,
                Box::new(MembershipMachine {
                    state: state.clone(),
                    changed: changed_tx,
                }),
            )
            .map_err(|e| e.to_string())?;
        let peers = Arc::new(Peers::new(
            me,
            cfg.replica.peers.clone(),
            cfg.replica.faults.clone(),
            cfg.limits.peer_timeout,
        ));
        let api = PeerApi {
            me,
            node: Arc::new(OnceLock::new()),
            embedded: Arc::new(OnceLock::new()),
            faults: cfg.replica.faults.clone(),
        };
        let mut tasks = Vec::new();
        let backing: Arc<dyn BackingStore> = if cfg.store == "embedded" {
            let sstate = Arc::new(RwLock::new(StoreState::default()));
            let group = node
                .start_group(
                    store::GROUP,
                    &voters,
                    Box::new(StoreMachine {
                        state: sstate.clone(),
                    }),
                )
                .map_err(|e| e.to_string())?;
            let fwd_peers = peers.clone();
            let embedded = Arc::new(EmbeddedStore {
                group,
                state: sstate,
                forward: Arc::new(move |to, cmd| {
                    let p = fwd_peers.clone();
                    Box::pin(async move { p.store(to, cmd).await })
                }),
            });
            let _ = api.embedded.set(embedded.clone());
            tasks.push(tokio::spawn(purge_loop(embedded.clone(), replica.closed())));
            embedded
        } else {
            Arc::new(RedisStore::connect(&cfg.store, cfg.limits.peer_timeout).await?)
        };
        let cache = CacheNode::new(me, cfg.limits.clone(), backing, peers, mgroup.clone());
        let _ = api.node.set(cache.clone());
        let caches = Caches {
            node: cache.clone(),
        };
        replica.serve(
            listener,
            Routes::new(
                CacheServiceServer::new(caches.clone()).max_decoding_message_size(
                    chassis::MAX_REQUEST_BYTES.max(cfg.limits.max_value_bytes + (64 << 10)),
                ),
            )
            .add_service(CachePeerServer::new(api).max_decoding_message_size(64 << 20)),
            &[SERVICE_NAME],
        )?;
        let closed = replica.closed();
        tasks.push(tokio::spawn(membership_loop(
            cache.clone(),
            state.clone(),
            changed,
            closed.clone(),
        )));
        tasks.push(tokio::spawn(join_loop(
            cache.clone(),
            mgroup.clone(),
            closed.clone(),
        )));
        tasks.push(tokio::spawn(lease_loop(
            cache.clone(),
            mgroup.clone(),
            state,
            closed.clone(),
        )));
        tasks.push(tokio::spawn(gauges_loop(caches.clone(), closed)));
        Ok(Self {
            caches,
            addr,
            membership: mgroup,
            replica,
            tasks,
        })
    }

    pub fn node(&self) -> &Node {
        self.replica.node()
    }

    pub fn cache(&self) -> &CacheNode {
        &self.caches.node
    }

    /// Graceful stop (SIGTERM): leaves the membership (so homes move now,
    /// not when peers notice a dead node; dirty lines are written back on
    /// the way out), then stops the replica.
    pub async fn shutdown(self) {
        let cache = self.caches.node.clone();
        if let Some(inc) = cache.epoch().incarnation {
            let before = cache.epoch().view.epoch;
            let _ = self.membership.forward(
                Command::Fence {
                    node: cache.me,
                    incarnation: inc,
                }
                .encode(),
            );
            let deadline = Instant::now() + Duration::from_secs(2);
            while cache.epoch().view.epoch == before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for t in &self.tasks {
            t.abort();
        }
        self.replica.shutdown().await;
    }

    /// Abrupt stop (tests): connections drop, groups stop, memory is lost.
    pub async fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.replica.kill().await;
    }
}

async fn membership_loop(
    cache: CacheNode,
    state: Arc<RwLock<Membership>>,
    mut changed: watch::Receiver<u64>,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        let m = state.read().clone();
        cache.enter(&m).await;
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}

/// Joins once the node knows which incarnations are its own, and again
/// whenever it is not a member (fenced out, or its Join was lost).
async fn join_loop(cache: CacheNode, group: GroupHandle, mut closed: watch::Receiver<bool>) {
    let baseline = loop {
        match group.read_index().await {
            Ok(i) => break i,
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = closed.wait_for(|c| *c) => return,
                }
            }
        }
    };
    cache.set_min_incarnation(baseline + 1);
    let mut last_join: Option<Instant> = None;
    loop {
        if cache.epoch().incarnation.is_none()
            && last_join.is_none_or(|t| t.elapsed() > Duration::from_secs(1))
        {
            if group
                .forward(Command::Join { node: cache.me }.encode())
                .is_ok()
            {
                tracing::info!(node = cache.me, "joining the cache membership");
            }
            last_join = Some(Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}

async fn lease_loop(
    cache: CacheNode,
    group: GroupHandle,
    state: Arc<RwLock<Membership>>,
    mut closed: watch::Receiver<bool>,
) {
    let every = cache.limits.lease / 4;
    let mut round = 0u64;
    loop {
        round += 1;
        if round.is_multiple_of(2) {
            let c = cache.clone();
            tokio::spawn(async move { c.probe_peers().await });
        }
        let asked = Instant::now();
        if let Ok(Ok(_)) = tokio::time::timeout(every * 2, group.read_index()).await {
            let m = state.read().clone();
            cache.renew_lease(asked, &m);
        }
        let wait = every.saturating_sub(asked.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}

async fn purge_loop(store: Arc<EmbeddedStore>, mut closed: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        let st = store.group.status();
        if st.leader != Some(st.node) {
            continue;
        }
        let now = crate::store::now_ms();
        let expired = store.state.read().map.values().any(|e| e.expired(now));
        if expired {
            let _ = store
                .propose(crate::store::StoreCommand::Purge { now_ms: now })
                .await;
        }
    }
}

async fn gauges_loop(caches: Caches, mut closed: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        let s = caches.stats();
        let ep = caches.node.epoch();
        metrics::gauge!("dsync_cache_entries").set(s.entries as f64);
        metrics::gauge!("dsync_cache_size_bytes").set(s.size_bytes as f64);
        metrics::gauge!("dsync_cache_capacity_bytes").set(s.capacity_bytes as f64);
        metrics::gauge!("dsync_cache_utilization").set(s.utilization);
        metrics::gauge!("dsync_cache_hit_rate").set(s.hit_rate);
        metrics::gauge!("dsync_cache_lines", "state" => "modified").set(s.lines_modified as f64);
        metrics::gauge!("dsync_cache_lines", "state" => "exclusive").set(s.lines_exclusive as f64);
        metrics::gauge!("dsync_cache_lines", "state" => "shared").set(s.lines_shared as f64);
        metrics::gauge!("dsync_cache_directory_entries").set(s.directory_entries as f64);
        metrics::gauge!("dsync_cache_watchers").set(s.watchers as f64);
        metrics::gauge!("dsync_cache_epoch").set(ep.view.epoch as f64);
        metrics::gauge!("dsync_cache_member").set(if ep.incarnation.is_some() { 1.0 } else { 0.0 });
        metrics::counter!("dsync_cache_hits_total").absolute(s.hits);
        metrics::counter!("dsync_cache_peer_hits_total").absolute(s.peer_hits);
        metrics::counter!("dsync_cache_misses_total").absolute(s.misses);
        metrics::counter!("dsync_cache_evictions_total").absolute(s.evictions);
        metrics::counter!("dsync_cache_writes_total").absolute(s.writes);
        metrics::counter!("dsync_cache_refreshes_total").absolute(s.refreshes);
        metrics::counter!("dsync_cache_invalidations_sent_total").absolute(s.invalidations_sent);
        metrics::counter!("dsync_cache_invalidations_received_total")
            .absolute(s.invalidations_received);
        metrics::counter!("dsync_cache_fenced_total").absolute(s.fenced);
    }
}
