//! Tunables of a consensus node, documented once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Configuration of one node hosting many Raft groups.
#[derive(Debug, Clone)]
pub struct Config {
    /// Raft id of this node, unique in the cluster, never 0.
    pub node_id: u64,
    /// Directory of the raft-engine log (shared by all groups).
    pub data_dir: PathBuf,
    /// Length of one Raft tick.
    pub tick_interval: Duration,
    /// Election timeout is randomised in `[min, max)` ticks.
    /// Defaults: 15..30 ticks of 10 ms = 150–300 ms.
    pub min_election_ticks: usize,
    pub max_election_ticks: usize,
    /// Leader heartbeat period in ticks (30 ms by default).
    pub heartbeat_ticks: usize,
    /// Take a snapshot once this many entries were applied since the last
    /// — and, when the last snapshot was over `snapshot_large_bytes`
    /// (16 MiB), once the commands
    /// applied since add up to a quarter of its size, so a large state is
    /// not rewritten every few thousand small commands (its cost stays a
    /// fraction of the log's).
    pub snapshot_entries: u64,
    /// Snapshots over this size are amortized as `snapshot_entries` says.
    pub snapshot_large_bytes: u64,
    /// Also take one when this much time passed and anything was applied.
    pub snapshot_interval: Duration,
    /// Entries kept in the log below a snapshot, so that a follower slightly
    /// behind is caught up from the log rather than by a full snapshot.
    pub compact_lag: u64,
    /// How long `propose`, `read_index` and membership changes wait.
    pub request_timeout: Duration,
    /// Largest command accepted by `propose`, in bytes.
    pub max_command_bytes: usize,
    /// Bound of each group's inbox (proposals + inbound messages). A full
    /// inbox rejects proposals with `Dropped` and drops Raft messages, which
    /// Raft recovers from by retransmission.
    pub inbox_capacity: usize,
    /// Raft flow control: max bytes per append message and in-flight appends.
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    /// fsync each ready. Only tests of non-durable behaviour turn this off.
    pub sync: bool,
}

impl Config {
    pub fn new(node_id: u64, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            data_dir: data_dir.into(),
            tick_interval: Duration::from_millis(10),
            min_election_ticks: 15,
            max_election_ticks: 30,
            heartbeat_ticks: 3,
            snapshot_entries: 10_000,
            snapshot_large_bytes: 16 << 20,
            snapshot_interval: Duration::from_secs(300),
            compact_lag: 1_000,
            request_timeout: Duration::from_secs(5),
            max_command_bytes: 4 << 20,
            inbox_capacity: 65_536,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            sync: true,
        }
    }

    pub(crate) fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.node_id,
            election_tick: self.min_election_ticks,
            min_election_tick: self.min_election_ticks,
            max_election_tick: self.max_election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            applied,
            max_size_per_msg: self.max_size_per_msg,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            // Bound memory held by entries proposed but not yet committed.
            max_uncommitted_size: 64 << 20,
            ..Default::default()
        }
    }
}

/// Parses a peer list `id=host:port,…` (ids non-zero, at least one).
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
