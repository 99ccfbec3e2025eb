//! lock-svc's configuration: flags and `DSYNC_*` environment variables.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::state::Limits;

/// Command-line flags of a lock-svc replica (each also read from the
/// environment variable named in brackets).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "lock-svc", about = "dsync lock service replica")]
pub struct Flags {
    /// Raft id of this replica, unique, non-zero.
    #[arg(long, env = "DSYNC_NODE_ID")]
    pub node_id: u64,
    /// Address to serve gRPC (API and Raft) on.
    #[arg(long, env = "DSYNC_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: String,
    /// All replicas as id=host:port,… (including this one).
    #[arg(long, env = "DSYNC_PEERS")]
    pub peers: String,
    /// Directory of the Raft log and snapshots.
    #[arg(long, env = "DSYNC_DATA_DIR", default_value = "data/lock")]
    pub data_dir: PathBuf,
    /// Join an existing cluster (start empty, wait to be added) instead of
    /// bootstrapping with --peers as the founding voters.
    #[arg(long, env = "DSYNC_JOIN", default_value_t = false)]
    pub join: bool,
}

/// Parses `id=host:port,…`.
pub fn parse_peers(s: &str) -> Result<HashMap<u64, String>, String> {
    let mut out = HashMap::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = p
            .split_once('=')
            .ok_or_else(|| format!("peer {p:?} is not id=host:port"))?;
        let id: u64 = id.parse().map_err(|e| format!("peer id {id:?}: {e}"))?;
        if id == 0 {
            return Err("peer id 0 is reserved".into());
        }
        out.insert(id, addr.to_owned());
    }
    if out.is_empty() {
        return Err("no peers given".into());
    }
    Ok(out)
}

/// Everything a replica needs to start.
#[derive(Clone)]
pub struct LockConfig {
    pub node_id: u64,
    pub peers: HashMap<u64, String>,
    pub data_dir: PathBuf,
    /// Bootstrap the group with `peers` as voters when there is no state.
    pub bootstrap: bool,
    pub limits: Limits,
    /// How often the leader proposes a `Tick` (session and wait expiry).
    pub tick_interval: Duration,
    /// Adjusts the consensus configuration (tests shorten timeouts).
    pub raft: Arc<dyn Fn(&mut consensus::Config) + Send + Sync>,
    /// Test hook: link faults applied to the Raft transport.
    pub faults: Option<Arc<consensus::testkit::Faults>>,
}

impl LockConfig {
    pub fn new(node_id: u64, peers: HashMap<u64, String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            peers,
            data_dir: data_dir.into(),
            bootstrap: true,
            limits: Limits::default(),
            tick_interval: Duration::from_millis(250),
            raft: Arc::new(|_| {}),
            faults: None,
        }
    }

    pub fn from_flags(f: &Flags) -> Result<Self, String> {
        if f.node_id == 0 {
            return Err("--node-id must be non-zero".into());
        }
        let peers = parse_peers(&f.peers)?;
        if !peers.contains_key(&f.node_id) {
            return Err(format!("--peers does not list this node ({})", f.node_id));
        }
        let mut c = Self::new(f.node_id, peers, &f.data_dir);
        c.bootstrap = !f.join;
        Ok(c)
    }
}
