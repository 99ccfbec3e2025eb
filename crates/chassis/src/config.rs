//! Replica configuration shared by every service: flags, `DSYNC_*` env vars,
//! and Kubernetes mode.
//!
//! Locally, give `--node-id` and `--peers id=host:port,…`. In a StatefulSet,
//! give neither: the node id is the pod's ordinal + 1 (from `DSYNC_POD_NAME`,
//! e.g. `lock-svc-2` → 3), and peers are `DSYNC_REPLICAS` names built from
//! `DSYNC_PEER_TEMPLATE` (e.g. `lock-svc-{ordinal}.lock-svc-headless:7001`).
//! A pod whose ordinal is at or past `DSYNC_INITIAL_REPLICAS` was added by
//! scaling up: it starts empty and asks the cluster to add it (learner, then
//! voter once caught up) instead of bootstrapping.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Flags every replica binary accepts (each also from the env var shown).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonFlags {
    /// Raft id of this replica (non-zero). Default: pod ordinal + 1.
    #[arg(long, env = "DSYNC_NODE_ID")]
    pub node_id: Option<u64>,
    /// Pod name of a StatefulSet replica (`<name>-<ordinal>`).
    #[arg(long, env = "DSYNC_POD_NAME")]
    pub pod_name: Option<String>,
    /// Address the gRPC server binds (API, Raft, health, admin).
    #[arg(long, env = "DSYNC_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: String,
    /// All founding replicas as id=host:port,… (including this one).
    #[arg(long, env = "DSYNC_PEERS")]
    pub peers: Option<String>,
    /// Kubernetes: number of replicas the peers list is built for.
    #[arg(long, env = "DSYNC_REPLICAS")]
    pub replicas: Option<u64>,
    /// Kubernetes: host:port of replica `{ordinal}`.
    #[arg(long, env = "DSYNC_PEER_TEMPLATE")]
    pub peer_template: Option<String>,
    /// Replicas that bootstrap the cluster; higher ordinals join it.
    #[arg(long, env = "DSYNC_INITIAL_REPLICAS", default_value_t = 3)]
    pub initial_replicas: u64,
    /// Address other replicas and clients reach this one at. Default: this
    /// node's entry in the peers list.
    #[arg(long, env = "DSYNC_ADVERTISE")]
    pub advertise: Option<String>,
    /// Join an existing cluster instead of bootstrapping one.
    #[arg(long, env = "DSYNC_JOIN", default_value_t = false)]
    pub join: bool,
    /// Directory of the Raft log and snapshots.
    #[arg(long, env = "DSYNC_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Address of the Prometheus `/metrics` listener ("" disables it).
    #[arg(long, env = "DSYNC_METRICS_LISTEN", default_value = "")]
    pub metrics_listen: String,
    /// Server-side limit of a request that does not wait by design.
    #[arg(long, env = "DSYNC_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Requests served at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "DSYNC_MAX_CONCURRENT_REQUESTS", default_value_t = 4096)]
    pub max_concurrent_requests: usize,
}

/// A resolved replica configuration.
#[derive(Clone)]
pub struct ReplicaConfig {
    /// Service name, reported by health and admin (e.g. "lock-svc").
    pub service: &'static str,
    pub node_id: u64,
    pub peers: HashMap<u64, String>,
    pub advertise: String,
    pub data_dir: PathBuf,
    /// Start empty and ask the cluster to add this replica.
    pub join: bool,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub request_timeout: Duration,
    /// Per-method server limits for methods that wait by design, as
    /// (method path suffix, limit), e.g. ("/Acquire", 330 s).
    pub long_methods: Vec<(String, Duration)>,
    pub max_concurrent_requests: usize,
    /// Adjusts consensus settings (tests shorten timeouts).
    pub raft: Arc<dyn Fn(&mut consensus::Config) + Send + Sync>,
    /// Test hook: link faults applied to the Raft transport.
    pub faults: Option<Arc<consensus::testkit::Faults>>,
    /// What this build supports, reported by admin Status (see
    /// `StatusResponse.features`).
    pub features: Vec<&'static str>,
}

impl std::fmt::Debug for ReplicaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaConfig")
            .field("service", &self.service)
            .field("node_id", &self.node_id)
            .field("peers", &self.peers)
            .field("advertise", &self.advertise)
            .field("data_dir", &self.data_dir)
            .field("join", &self.join)
            .field("metrics_listen", &self.metrics_listen)
            .field("request_timeout", &self.request_timeout)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .finish_non_exhaustive()
    }
}

pub use consensus::config::parse_peers;

/// The ordinal of a StatefulSet pod name (`lock-svc-2` → 2).
pub fn ordinal(pod: &str) -> Result<u64, String> {
    pod.rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| format!("pod name {pod:?} does not end in -<ordinal>"))
}

impl ReplicaConfig {
    /// A local configuration with defaults (tests and embedding).
    pub fn new(
        service: &'static str,
        node_id: u64,
        peers: HashMap<u64, String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        let advertise = peers.get(&node_id).cloned().unwrap_or_default();
        Self {
            service,
            node_id,
            peers,
            advertise,
            data_dir: data_dir.into(),
            join: false,
            metrics_listen: None,
            request_timeout: Duration::from_secs(10),
            long_methods: Vec::new(),
            max_concurrent_requests: 4096,
            raft: Arc::new(|_| {}),
            faults: None,
            features: Vec::new(),
        }
    }

    /// Resolves flags (local or Kubernetes mode).
    pub fn from_flags(service: &'static str, f: &CommonFlags) -> Result<Self, String> {
        let ordinal = f.pod_name.as_deref().map(ordinal).transpose()?;
        let node_id = match (f.node_id, ordinal) {
            (Some(id), _) => id,
            (None, Some(o)) => o + 1,
            (None, None) => return Err("give --node-id (or DSYNC_POD_NAME in Kubernetes)".into()),
        };
        if node_id == 0 {
            return Err("--node-id must be non-zero".into());
        }
        let peers = match (&f.peers, f.replicas, &f.peer_template) {
            (Some(p), _, _) => parse_peers(p)?,
            (None, Some(n), Some(t)) => {
                if !t.contains("{ordinal}") {
                    return Err("DSYNC_PEER_TEMPLATE must contain {ordinal}".into());
                }
                // Always include this pod (a scaled-up ordinal may be past
                // a stale replica count).
                (0..n.max(f.initial_replicas).max(node_id))
                    .map(|o| (o + 1, t.replace("{ordinal}", &o.to_string())))
                    .collect()
            }
            _ => {
                return Err(
                    "give --peers, or DSYNC_REPLICAS with DSYNC_PEER_TEMPLATE in Kubernetes".into(),
                )
            }
        };
        // Founding voters are the first `initial_replicas` ids; a replica
        // past them joins.
        let founders: HashMap<u64, String> = if f.peers.is_some() {
            peers.clone()
        } else {
            peers
                .iter()
                .filter(|(id, _)| **id <= f.initial_replicas)
                .map(|(id, a)| (*id, a.clone()))
                .collect()
        };
        let join = f.join || !founders.contains_key(&node_id);
        let advertise = match &f.advertise {
            Some(a) => a.clone(),
            None => peers.get(&node_id).cloned().ok_or_else(|| {
                format!("the peers list has no entry for node {node_id}; give --advertise")
            })?,
        };
        let metrics_listen = if f.metrics_listen.is_empty() {
            None
        } else {
            Some(
                f.metrics_listen
                    .parse()
                    .map_err(|e| format!("--metrics-listen {}: {e}", f.metrics_listen))?,
            )
        };
        let mut all = founders;
        all.insert(node_id, advertise.clone());
        Ok(Self {
            service,
            node_id,
            peers: all,
            advertise,
            data_dir: f.data_dir.clone(),
            join,
            metrics_listen,
            request_timeout: Duration::from_millis(f.request_timeout_ms),
            long_methods: Vec::new(),
            max_concurrent_requests: f.max_concurrent_requests,
            raft: Arc::new(|_| {}),
            faults: None,
            features: Vec::new(),
        })
    }

    /// Founding voters to bootstrap with (empty when joining).
    pub fn voters(&self) -> Vec<u64> {
        if self.join {
            return Vec::new();
        }
        let mut v: Vec<u64> = self.peers.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonFlags,
    }

    fn flags(args: &[&str]) -> CommonFlags {
        Cli::parse_from(std::iter::once("x").chain(args.iter().copied())).common
    }

    #[test]
    fn kubernetes_mode_derives_id_and_peers() {
        let f = flags(&[
            "--pod-name",
            "lock-svc-1",
            "--replicas",
            "3",
            "--peer-template",
            "lock-svc-{ordinal}.lock-svc-headless:7001",
        ]);
        let c = ReplicaConfig::from_flags("lock-svc", &f).unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.peers[&1], "lock-svc-0.lock-svc-headless:7001");
        assert_eq!(c.peers[&3], "lock-svc-2.lock-svc-headless:7001");
        assert_eq!(c.advertise, "lock-svc-1.lock-svc-headless:7001");
        assert!(!c.join);
        assert_eq!(c.voters(), vec![1, 2, 3]);
    }

    #[test]
    fn scaled_up_pod_joins_instead_of_bootstrapping() {
        let f = flags(&[
            "--pod-name",
            "lock-svc-3",
            "--replicas",
            "3",
            "--peer-template",
            "lock-svc-{ordinal}.h:7001",
        ]);
        let c = ReplicaConfig::from_flags("lock-svc", &f).unwrap();
        assert_eq!(c.node_id, 4);
        assert!(c.join);
        assert!(c.voters().is_empty());
        assert_eq!(c.peers.len(), 4, "founders plus itself");
    }

    #[test]
    fn bad_configuration_is_explained() {
        assert!(ReplicaConfig::from_flags("x", &flags(&[]))
            .unwrap_err()
            .contains("--node-id"));
        let e = ReplicaConfig::from_flags("x", &flags(&["--node-id", "1", "--peers", "1=a:1,zz"]))
            .unwrap_err();
        assert!(e.contains("id=host:port"), "{e}");
        let e = ReplicaConfig::from_flags("x", &flags(&["--node-id", "5", "--peers", "1=a:1"]))
            .unwrap_err();
        assert!(e.contains("no entry for node 5"), "{e}");
        assert!(ordinal("web").is_err());
    }
}
