//! lock-svc's configuration: the chassis' common flags plus the lock
//! table's limits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use chassis::{CommonFlags, ReplicaConfig};

use crate::state::Limits;

/// Flags of a lock-svc replica (each also from a `DSYNC_*` env var).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "lock-svc", about = "dsync lock service replica")]
pub struct Flags {
    #[command(flatten)]
    pub common: CommonFlags,
    /// Most locks held at once (each costs ~0.6 KB per replica).
    #[arg(long, env = "DSYNC_MAX_LOCKS", default_value_t = Limits::default().max_locks)]
    pub max_locks: usize,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Cmd {
    /// Serve (the default).
    Serve,
    /// Remove this replica from the cluster (before scaling down).
    Leave,
}

/// Everything a replica needs to start.
#[derive(Clone)]
pub struct LockConfig {
    pub replica: ReplicaConfig,
    pub limits: Limits,
    /// How often the leader proposes a `Tick` (session and wait expiry).
    pub tick_interval: Duration,
}

impl LockConfig {
    pub fn new(node_id: u64, peers: HashMap<u64, String>, data_dir: impl Into<PathBuf>) -> Self {
        Self::from_replica(ReplicaConfig::new("lock-svc", node_id, peers, data_dir))
    }

    pub fn from_flags(f: &Flags) -> Result<Self, String> {
        let mut cfg = Self::from_replica(ReplicaConfig::from_flags("lock-svc", &f.common)?);
        cfg.limits.max_locks = f.max_locks;
        Ok(cfg)
    }

    fn from_replica(mut replica: ReplicaConfig) -> Self {
        let limits = Limits::default();
        // Waiting calls may legitimately last as long as their wait.
        let long = Duration::from_millis(limits.max_wait_ms) + Duration::from_secs(15);
        replica.features = vec![crate::lessor::FEATURE];
        replica.long_methods = vec![
            ("/dsync.lock.v1.LockService/Acquire".into(), long),
            ("/dsync.lock.v1.LockService/Upgrade".into(), long),
        ];
        Self {
            replica,
            limits,
            tick_interval: Duration::from_millis(250),
        }
    }
}
