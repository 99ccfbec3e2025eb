//! A node: one process's host for many Raft groups.
//!
//! The node owns the shared raft-engine log and the transport, starts one
//! driver thread per group, and routes inbound messages to the group named
//! in each envelope. Groups are independent: each has its own inbox,
//! thread, storage view and state machine; they share only the disk (where
//! raft-engine merges their concurrent fsyncs) and the transport.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use raft::eraftpb::Message;
use raft::RawNode;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::group::{Driver, GroupHandle};
use crate::logger::raft_logger;
use crate::snapfile::{self, SnapDir};
use crate::state_machine::StateMachine;
use crate::status::{GroupStatus, LeaderView};
use crate::storage::LogStore;
use crate::transport::{Inbound, Transport};

/// Hosts Raft groups. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    cfg: Arc<Config>,
    /// Taken at shutdown so the log's directory lock is released even if
    /// clones of the node outlive it (e.g. in a server's connection tasks).
    store: RwLock<Option<LogStore>>,
    transport: Arc<dyn Transport>,
    snaps: SnapDir,
    groups: RwLock<HashMap<u64, GroupHandle>>,
    /// Driver threads by group; the purge thread under `u64::MAX`.
    threads: Mutex<HashMap<u64, JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl Node {
    /// Opens the node's log (recovering it) and starts its purge thread.
    pub fn open(cfg: Config, transport: Arc<dyn Transport>) -> Result<Self> {
        if cfg.node_id == 0 {
            return Err(Error::Invalid("node id 0 is reserved".into()));
        }
        let store = LogStore::open(&cfg.data_dir)?;
        let snaps = SnapDir::open(cfg.data_dir.join("snapshots"))?;
        let node = Self {
            inner: Arc::new(NodeInner {
                cfg: Arc::new(cfg),
                store: RwLock::new(Some(store)),
                transport,
                snaps,
                groups: RwLock::new(HashMap::new()),
                threads: Mutex::new(HashMap::new()),
                stopped: AtomicBool::new(false),
            }),
        };
        let weak = Arc::downgrade(&node.inner);
        let purge = std::thread::Builder::new()
            .name("raft-purge".into())
            .spawn(move || purge_loop(weak))?;
        node.inner.threads.lock().insert(u64::MAX, purge);
        Ok(node)
    }

    pub fn id(&self) -> u64 {
        self.inner.cfg.node_id
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// Groups with durable state on this node (to restart after a crash).
    pub fn stored_groups(&self) -> Vec<u64> {
        self.inner
            .store
            .read()
            .as_ref()
            .map(|s| s.groups())
            .unwrap_or_default()
    }

    /// Starts (or restarts) `group` with its state machine.
    ///
    /// - Existing durable state: recovered; `initial_voters` is ignored.
    /// - New group, `initial_voters` non-empty: bootstrapped with them (every
    ///   founding member must pass the same list).
    /// - New group, empty list: starts empty, waiting to be added by the
    ///   leader (as a learner) and caught up by log or snapshot.
    pub fn start_group(
        &self,
        group: u64,
        initial_voters: &[u64],
        sm: Box<dyn StateMachine>,
    ) -> Result<GroupHandle> {
        self.start_group_with(group, initial_voters, sm, |_| {})
    }

    /// [`Node::start_group`] with this group's own settings: the node's
    /// [`Config`] changed by `tweak` (e.g. `sync = false` for a group whose
    /// users chose latency over the last moments of writes, or a larger
    /// `snapshot_entries` for a group whose snapshots are large).
    pub fn start_group_with(
        &self,
        group: u64,
        initial_voters: &[u64],
        mut sm: Box<dyn StateMachine>,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<GroupHandle> {
        if self.inner.stopped.load(Ordering::SeqCst) {
            return Err(Error::Stopped(group));
        }
        let mut groups = self.inner.groups.write();
        if groups.contains_key(&group) {
            return Err(Error::Invalid(format!("group {group} is already running")));
        }
        let mut own = (*self.inner.cfg).clone();
        tweak(&mut own);
        let cfg = Arc::new(own);
        let storage = match self.inner.store.read().as_ref() {
            Some(store) => store.group(group)?,
            None => return Err(Error::Stopped(group)),
        };
        if storage.is_empty() && !initial_voters.is_empty() {
            storage.bootstrap(initial_voters, sm.snapshot())?;
        }
        let snap = storage.load_snapshot()?;
        let meta = snap.get_metadata().clone();
        if meta.index > 0 {
            let started = Instant::now();
            let mut data = snapfile::reader(&snap.data)?;
            sm.restore_from(meta.index, &mut data).map_err(|e| {
                Error::Storage(format!("restoring group {group} at {}: {e}", meta.index))
            })?;
            tracing::info!(
                group,
                index = meta.index,
                ms = started.elapsed().as_millis() as u64,
                "restored the state machine from its snapshot"
            );
        }
        self.inner.snaps.gc(group, meta.index);
        let raw = RawNode::new(
            &cfg.raft_config(meta.index),
            storage.clone(),
            &raft_logger(cfg.node_id, group),
        )
        .map_err(|e| Error::Storage(e.to_string()))?;
        let (tx, rx) = crossbeam_channel::bounded(cfg.inbox_capacity);
        let status = Arc::new(Mutex::new(GroupStatus {
            group,
            node: cfg.node_id,
            running: true,
            ..Default::default()
        }));
        let (leader_tx, leader_view) = tokio::sync::watch::channel(LeaderView::default());
        let driver = Driver::new(
            group,
            cfg.clone(),
            raw,
            storage,
            sm,
            self.inner.transport.clone(),
            tx.clone(),
            rx,
            status.clone(),
            leader_tx,
            self.inner.snaps.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("raft-g{group}"))
            .spawn(move || driver.run())?;
        let handle = GroupHandle {
            group,
            inbox: tx,
            status,
            leader_view,
            cfg,
        };
        groups.insert(group, handle.clone());
        self.inner.threads.lock().insert(group, thread);
        Ok(handle)
    }

    /// Stops `group` on this node and deletes its durable state (log, hard
    /// state, snapshots): the replica leaves no trace. Its state machine's
    /// own files, if any, are the service's to remove. Pending requests
    /// fail with `Stopped`.
    pub fn remove_group(&self, group: u64) -> Result<()> {
        let handle = self.inner.groups.write().remove(&group);
        if let Some(handle) = handle {
            handle.stop();
        }
        let thread = self.inner.threads.lock().remove(&group);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        if let Some(store) = self.inner.store.read().as_ref() {
            store.remove_group(group)?;
        }
        self.inner.snaps.remove_group(group);
        Ok(())
    }

    pub fn group(&self, group: u64) -> Option<GroupHandle> {
        self.inner.groups.read().get(&group).cloned()
    }

    /// Ids of the groups running here, sorted.
    pub fn groups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.inner.groups.read().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Status of every running group, by group id.
    pub fn status(&self) -> Vec<GroupStatus> {
        let mut all: Vec<GroupStatus> = self
            .inner
            .groups
            .read()
            .values()
            .map(|g| g.status())
            .collect();
        all.sort_by_key(|s| s.group);
        all
    }

    /// Stops every group and waits for their threads. Everything already
    /// acknowledged is on disk; pending requests fail with `Stopped`.
    pub fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let groups: Vec<GroupHandle> = self.inner.groups.write().drain().map(|(_, g)| g).collect();
        for g in &groups {
            g.stop();
        }
        let threads: Vec<JoinHandle<()>> =
            self.inner.threads.lock().drain().map(|(_, t)| t).collect();
        for t in threads {
            let _ = t.join();
        }
        self.inner.store.write().take();
    }

    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }
}

impl Inbound for Node {
    fn deliver(&self, group: u64, mut msg: Message) {
        // A snapshot file of another node's directory (the in-memory test
        // network passes descriptors as they are): copy it in first.
        if let Some(path) = snapfile::file_of(&msg.get_snapshot().data) {
            if !self.inner.groups.read().contains_key(&group) {
                return;
            }
            if !self.inner.snaps.contains(&path) {
                match self.inner.snaps.import(group, msg.from, &path) {
                    Ok(local) => msg.mut_snapshot().data = snapfile::descriptor(&local).into(),
                    Err(e) => {
                        tracing::warn!(group, error = %e, "cannot copy a snapshot file; dropped");
                        return;
                    }
                }
            }
        }
        // Stepped under the read lock rather than through a cloned handle:
        // this runs for every Raft message.
        if let Some(g) = self.inner.groups.read().get(&group) {
            g.step(msg);
        }
    }

    fn snapshot_dir(&self) -> Option<SnapDir> {
        Some(self.inner.snaps.clone())
    }
}

/// Every few seconds asks raft-engine to drop obsolete log files, and asks
/// groups that hold old files back to snapshot (so their log compacts).
fn purge_loop(node: std::sync::Weak<NodeInner>) {
    let period = Duration::from_secs(10);
    let mut last = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let Some(inner) = node.upgrade() else { return };
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        if last.elapsed() < period {
            continue;
        }
        last = Instant::now();
        let purged = match inner.store.read().as_ref() {
            Some(store) => store.purge(),
            None => return,
        };
        match purged {
            Ok(lagging) => {
                for group in lagging {
                    if let Some(g) = inner.groups.read().get(&group) {
                        let (tx, _rx) = tokio::sync::oneshot::channel();
                        let _ = g
                            .inbox
                            .try_send(crate::group::Request::Snapshot { reply: tx });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "purging raft log files failed"),
        }
    }
}
