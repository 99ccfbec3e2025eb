//! Every limit, default and timing of a cache-svc node, in one place.
//!
//! Timings that make coherence safe: a node serves its lines (and lets its
//! clients serve their near caches) only while its *member lease* holds: it
//! confirmed, at most `lease` ago, that it is a member of the current epoch.
//! When a membership change commits, every node waits `lease` before serving
//! in the new epoch, so a fenced node's lease has run out before anyone
//! relies on it being gone. `invalidation_timeout` bounds how long a write
//! waits for a holder before fencing it out.

use std::time::Duration;

use clap::Parser;

/// Write policy of a node: when is a write's value in the backing store?
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WritePolicy {
    /// The home writes the backing store before the write is acknowledged.
    Through,
    /// The write is acknowledged once every other copy is invalidated; the
    /// writer holds the line Modified and the home keeps the dirty value,
    /// storing it `--write-behind-ms` later (coalescing the writes made
    /// meanwhile). Risk: until stored, an acknowledged write lives only in
    /// the home's memory, so if the home crashes or is fenced out it is
    /// lost; and when a home moves (membership change) the old home stores
    /// its dirty values as it leaves, racing the new home's first reads.
    Back,
}

impl WritePolicy {
    pub fn name(self) -> &'static str {
        match self {
            WritePolicy::Through => "write-through",
            WritePolicy::Back => "write-back",
        }
    }
}

/// Cache flags (each also from a `DSYNC_*` env var).
#[derive(Debug, Clone, Parser)]
pub struct CacheFlags {
    /// Backing store: `redis://host:port[/db]`, `redis+cluster://h1:p1,h2:p2`,
    /// or `embedded` (a Raft-replicated store inside the nodes).
    #[arg(long, env = "DSYNC_STORE", default_value = "embedded")]
    pub store: String,
    #[arg(
        long,
        env = "DSYNC_WRITE_POLICY",
        value_enum,
        default_value = "through"
    )]
    pub write_policy: WritePolicy,
    /// Write-back: how long a dirty value waits before it is stored.
    #[arg(long, env = "DSYNC_WRITE_BEHIND_MS", default_value_t = 100)]
    pub write_behind_ms: u64,
    /// Memory for cached lines (keys + values + overhead), in MiB.
    #[arg(long, env = "DSYNC_MEMORY_LIMIT_MB", default_value_t = 256)]
    pub memory_limit_mb: u64,
    /// TTL of entries written without one (0 = never expire).
    #[arg(long, env = "DSYNC_DEFAULT_TTL_MS", default_value_t = 0)]
    pub default_ttl_ms: u64,
    /// Largest TTL a write may ask for.
    #[arg(long, env = "DSYNC_MAX_TTL_MS", default_value_t = 30 * 24 * 3600 * 1000)]
    pub max_ttl_ms: u64,
    /// How long a node keeps a line before reloading it from the store.
    #[arg(long, env = "DSYNC_LINE_TTL_MS", default_value_t = 300_000)]
    pub line_ttl_ms: u64,
    /// Refresh a hot line when less than this fraction of its line TTL is
    /// left (0 = no refresh-ahead).
    #[arg(long, env = "DSYNC_REFRESH_AHEAD", default_value_t = 0.2)]
    pub refresh_ahead: f64,
    #[arg(long, env = "DSYNC_MAX_KEY_BYTES", default_value_t = 1024)]
    pub max_key_bytes: usize,
    #[arg(long, env = "DSYNC_MAX_VALUE_BYTES", default_value_t = 1024 * 1024)]
    pub max_value_bytes: usize,
    #[arg(long, env = "DSYNC_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,
    #[arg(long, env = "DSYNC_LEASE_MS", default_value_t = 1500)]
    pub lease_ms: u64,
    /// How long a node waits for a near cache's ack (then forgets it and
    /// waits out its lease); a home waits about twice this for a node.
    #[arg(long, env = "DSYNC_INVALIDATION_TIMEOUT_MS", default_value_t = 500)]
    pub invalidation_timeout_ms: u64,
}

/// The parsed, validated form of [`CacheFlags`].
#[derive(Debug, Clone)]
pub struct CacheLimits {
    pub write_policy: WritePolicy,
    pub write_behind: Duration,
    pub memory_limit_bytes: u64,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub line_ttl: Duration,
    pub refresh_ahead: f64,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_batch: usize,
    /// Member lease; also the near-cache lease given to clients.
    pub lease: Duration,
    pub invalidation_timeout: Duration,
    /// A peer failing calls this long is fenced out by the caller.
    pub fence_after: Duration,
    /// Tracked keys per near-cache client.
    pub max_tracked_per_client: usize,
    /// Deadline of a call to a peer or to the backing store.
    pub peer_timeout: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            write_policy: WritePolicy::Through,
            write_behind: Duration::from_millis(100),
            memory_limit_bytes: 256 << 20,
            default_ttl: Duration::ZERO,
            max_ttl: Duration::from_secs(30 * 24 * 3600),
            line_ttl: Duration::from_secs(300),
            refresh_ahead: 0.2,
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_batch: 1000,
            lease: Duration::from_millis(1500),
            invalidation_timeout: Duration::from_millis(500),
            fence_after: Duration::from_millis(1500),
            max_tracked_per_client: 100_000,
            peer_timeout: Duration::from_millis(2000),
        }
    }
}

impl CacheLimits {
    pub fn from_flags(f: &CacheFlags) -> Result<Self, String> {
        if !(0.0..1.0).contains(&f.refresh_ahead) {
            return Err("--refresh-ahead must be in [0, 1)".into());
        }
        if f.lease_ms < 100 || f.invalidation_timeout_ms < 50 {
            return Err("--lease-ms must be ≥ 100 and --invalidation-timeout-ms ≥ 50".into());
        }
        if f.default_ttl_ms > f.max_ttl_ms {
            return Err("--default-ttl-ms exceeds --max-ttl-ms".into());
        }
        Ok(Self {
            write_policy: f.write_policy,
            write_behind: Duration::from_millis(f.write_behind_ms),
            memory_limit_bytes: f.memory_limit_mb << 20,
            default_ttl: Duration::from_millis(f.default_ttl_ms),
            max_ttl: Duration::from_millis(f.max_ttl_ms),
            line_ttl: Duration::from_millis(f.line_ttl_ms.max(1)),
            refresh_ahead: f.refresh_ahead,
            max_key_bytes: f.max_key_bytes,
            max_value_bytes: f.max_value_bytes,
            max_batch: f.max_batch,
            lease: Duration::from_millis(f.lease_ms),
            invalidation_timeout: Duration::from_millis(f.invalidation_timeout_ms),
            fence_after: Duration::from_millis(f.lease_ms),
            ..Self::default()
        })
    }
}
