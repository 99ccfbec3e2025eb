//! The driver loop of one Raft group, and the handle callers use to talk to it.
//!
//! Each group runs on its own OS thread and owns its `RawNode`, its storage
//! and its state machine; nothing else touches them. Callers and the
//! transport reach it only through a bounded inbox, so a slow group never
//! blocks another and a caller never holds a lock across Raft work.
//!
//! The loop is raft-rs's standard one:
//!
//! ```text
//! loop {
//!     wait for an inbox message or the next tick
//!     drain the inbox: propose / step / read_index / conf change …  (group commit)
//!     tick if due; expire requests past their deadline
//!     if has_ready:
//!         send leader messages                (may precede the fsync)
//!         persist snapshot + entries + hard state, fsync
//!         restore snapshot into the state machine, apply committed entries,
//!         answer their proposers
//!         send persisted messages (votes, append responses: after the fsync)
//!         advance; apply what the light ready committed; advance_apply
//!         answer reads whose index is applied; maybe start a snapshot
//! }
//! ```
//!
//! Snapshots do not stall the loop: the state machine captures its state
//! cheaply ([`StateMachine::snapshot_job`]), a background thread writes it
//! to a file and fsyncs it (`crate::snapfile`), and the loop records it in
//! storage and compacts the log when `SnapshotDone` comes back. At most
//! one is in progress per group.
//!
//! Invariants:
//! - A proposal is answered `Ok` only after its entry was committed (hence
//!   fsync'd on a quorum) and applied here; the answer is the state
//!   machine's response for exactly that entry (same index *and* term).
//! - A message that acknowledges log state (vote, append response) leaves
//!   only after that state is fsync'd.
//! - A storage error stops the group: nothing more is acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
    MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::oneshot;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::snapfile::{self, SnapDir};
use crate::state_machine::StateMachine;
use crate::status::{GroupStatus, LeaderView};
use crate::storage::{GroupStorage, WriteSet};
use crate::transport::Transport;

type Reply<T> = oneshot::Sender<Result<T>>;
/// A proposer's reply channel with the answer it is owed.
type Answer = (Reply<Vec<u8>>, Result<Vec<u8>>);

/// What callers and the transport send to a group's driver.
pub(crate) enum Request {
    Propose {
        data: Vec<u8>,
        /// Append only while leading in this term.
        term: Option<u64>,
        deadline: Instant,
        reply: Reply<Vec<u8>>,
    },
    ConfChange {
        cc: ConfChangeV2,
        deadline: Instant,
        reply: Reply<Vec<u8>>,
    },
    ReadIndex {
        deadline: Instant,
        reply: Reply<u64>,
    },
    TransferLeader {
        to: u64,
        deadline: Instant,
        reply: Reply<()>,
    },
    /// Fire-and-forget proposal: appended by the leader, or forwarded to
    /// it by a follower (raft-rs `MsgPropose`); nobody is told the outcome.
    Forward(Vec<u8>),
    Campaign,
    Snapshot {
        reply: Reply<u64>,
    },
    /// A background snapshot finished: `snap` carries the metadata and the
    /// descriptor of its file, `written` its size or what failed.
    SnapshotDone {
        snap: Snapshot,
        compact_to: u64,
        written: std::result::Result<u64, String>,
    },
    Raft(Message),
    Stop,
}

/// A proposal waiting for its entry to be applied.
struct Pending {
    term: u64,
    deadline: Instant,
    reply: Reply<Vec<u8>>,
}

pub(crate) struct Driver {
    group: u64,
    cfg: Arc<Config>,
    raw: RawNode<GroupStorage>,
    storage: GroupStorage,
    sm: Box<dyn StateMachine>,
    transport: Arc<dyn Transport>,
    inbox: Receiver<Request>,
    /// The sending side of our own inbox, for background snapshot jobs.
    to_self: Sender<Request>,
    status: Arc<Mutex<GroupStatus>>,
    /// The term and leader, published when either changes.
    leader_view: tokio::sync::watch::Sender<LeaderView>,
    snaps: SnapDir,
    /// Index of the snapshot being written in the background, if any.
    snapshot_in_progress: Option<u64>,
    /// Whether this replica led at the end of the last ready.
    led: bool,
    /// `snapshot()` callers waiting for the one in progress.
    snapshot_waiters: Vec<Reply<u64>>,
    /// Proposals by the log index their entry was appended at.
    pending: BTreeMap<u64, Pending>,
    /// read_index requests by the context id of the raft-rs read that
    /// answers them, until raft-rs confirms it. Requests that arrive in one
    /// drain of the inbox share one raft-rs read (one heartbeat round).
    reads: HashMap<u64, Vec<(Instant, Reply<u64>)>>,
    /// The read collecting this drain's requests, issued after the drain.
    open_read: Option<u64>,
    /// When each unconfirmed read was last (re)sent: a read request, or
    /// its answer, lost in transit (raft-rs also drops one that reaches a
    /// leader before it committed in its term) is never retried by raft-rs.
    reads_sent: HashMap<u64, Instant>,
    /// Confirmed reads waiting for `applied` to reach their index.
    ready_reads: Vec<(u64, Reply<u64>)>,
    next_read_id: u64,
    transfers: Vec<(u64, Instant, Reply<()>)>,
    /// Answers to proposals applied in this ready, sent after the status is
    /// published so a caller never sees a status older than its answer.
    answers: Vec<Answer>,
    applied: u64,
    applied_term: u64,
    snapshot_index: u64,
    last_snapshot_at: Instant,
    /// Size of the last snapshot file written here, and bytes of commands
    /// applied since the last snapshot started.
    last_snapshot_bytes: u64,
    applied_bytes: u64,
    /// `applied_bytes` when the snapshot in progress was captured.
    applied_bytes_at_capture: u64,
    snapshots_taken: u64,
    snapshots_installed: u64,
    proposals: u64,
    /// After a restart: when the driver started and the commit index it
    /// found, until the entries up to it are applied again (logged).
    replay: Option<(Instant, u64)>,
}

impl Driver {
    /// A driver for a group whose state machine was restored to the
    /// snapshot at (`applied`, `applied_term`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        group: u64,
        cfg: Arc<Config>,
        raw: RawNode<GroupStorage>,
        storage: GroupStorage,
        sm: Box<dyn StateMachine>,
        transport: Arc<dyn Transport>,
        to_self: Sender<Request>,
        inbox: Receiver<Request>,
        status: Arc<Mutex<GroupStatus>>,
        leader_view: tokio::sync::watch::Sender<LeaderView>,
        snaps: SnapDir,
    ) -> Self {
        let meta = storage.snapshot_metadata();
        let last_snapshot_bytes = snapshot_size(&storage);
        let commit = storage.hard_state().commit;
        Self {
            group,
            cfg,
            raw,
            storage,
            sm,
            transport,
            inbox,
            to_self,
            status,
            leader_view,
            snaps,
            snapshot_in_progress: None,
            led: false,
            snapshot_waiters: Vec::new(),
            pending: BTreeMap::new(),
            reads: HashMap::new(),
            open_read: None,
            reads_sent: HashMap::new(),
            ready_reads: Vec::new(),
            // Read ids are the raft-rs context of a read, matched on the
            // leader against the reads of every node: random starting
            // points keep nodes (and restarts of one) from reusing an id.
            next_read_id: rand::random::<u64>() >> 1,
            transfers: Vec::new(),
            answers: Vec::new(),
            applied: meta.index,
            applied_term: meta.term,
            snapshot_index: meta.index,
            last_snapshot_at: Instant::now(),
            last_snapshot_bytes,
            applied_bytes: 0,
            applied_bytes_at_capture: 0,
            snapshots_taken: 0,
            snapshots_installed: 0,
            proposals: 0,
            replay: Some((Instant::now(), commit)),
        }
    }

    pub fn run(mut self) {
        let tick = self.cfg.tick_interval;
        let mut next_tick = Instant::now() + tick;
        let mut stopping = false;
        while !stopping {
            match self.inbox.recv_deadline(next_tick) {
                Ok(req) => {
                    stopping = !self.handle(req);
                    // Group commit: take everything already queued before
                    // building one ready (one fsync for all of it).
                    for _ in 0..self.cfg.inbox_capacity {
                        match self.inbox.try_recv() {
                            Ok(req) => {
                                if !self.handle(req) {
                                    stopping = true;
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stopping = true,
            }
            self.issue_read();
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + tick;
                self.expire(now);
                let requested = self.storage.take_snapshot_request();
                self.maybe_snapshot(requested);
            }
            if let Err(e) = self.on_ready() {
                tracing::error!(group = self.group, error = %e, "raft group stopped on a storage failure");
                break;
            }
        }
        self.fail_all(Error::Stopped(self.group));
        self.status.lock().running = false;
    }

    /// Handles one inbox message; false means stop.
    fn handle(&mut self, req: Request) -> bool {
        match req {
            Request::Raft(m) => {
                if let Err(e) = self.raw.step(m) {
                    tracing::debug!(group = self.group, error = %e, "dropped raft message");
                }
            }
            Request::Propose {
                data,
                term,
                deadline,
                reply,
            } => {
                if term.is_some_and(|t| t != self.raw.raft.term) {
                    let _ = reply.send(Err(self.not_leader()));
                } else if let Some(reply) = self.check_leader(reply) {
                    let before = self.raw.raft.raft_log.last_index();
                    let res = self.raw.propose(Vec::new(), data);
                    self.track(before, res, deadline, reply);
                }
            }
            Request::ConfChange {
                cc,
                deadline,
                reply,
            } => {
                if let Some(reply) = self.check_leader(reply) {
                    let before = self.raw.raft.raft_log.last_index();
                    let res = self.raw.propose_conf_change(Vec::new(), cc);
                    self.track(before, res, deadline, reply);
                }
            }
            Request::ReadIndex { deadline, reply } => {
                if self.raw.raft.leader_id == raft::INVALID_ID {
                    let _ = reply.send(Err(self.not_leader()));
                } else {
                    let id = match self.open_read {
                        Some(id) => id,
                        None => {
                            self.next_read_id += 1;
                            self.open_read = Some(self.next_read_id);
                            self.next_read_id
                        }
                    };
                    self.reads.entry(id).or_default().push((deadline, reply));
                }
            }
            Request::TransferLeader {
                to,
                deadline,
                reply,
            } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                } else if to == self.raw.raft.id {
                    let _ = reply.send(Ok(()));
                } else if !self.raw.raft.prs().conf().voters().contains(to) {
                    let _ = reply.send(Err(Error::Invalid(format!("node {to} is not a voter"))));
                } else {
                    self.raw.transfer_leader(to);
                    self.transfers.push((to, deadline, reply));
                }
            }
            Request::Forward(data) => {
                if self.raw.raft.leader_id != raft::INVALID_ID {
                    if let Err(e) = self.raw.propose(Vec::new(), data) {
                        tracing::debug!(group = self.group, error = %e, "forwarded proposal dropped");
                    }
                }
            }
            Request::Campaign => {
                let _ = self.raw.campaign();
            }
            Request::Snapshot { reply } => {
                self.maybe_snapshot(true);
                match self.snapshot_in_progress {
                    Some(_) => self.snapshot_waiters.push(reply),
                    None => {
                        let _ = reply.send(Ok(self.snapshot_index));
                    }
                }
            }
            Request::SnapshotDone {
                snap,
                compact_to,
                written,
            } => {
                if let Err(e) = self.snapshot_done(snap, compact_to, written) {
                    tracing::error!(group = self.group, error = %e, "saving a snapshot failed");
                    return false;
                }
            }
            Request::Stop => return false,
        }
        true
    }

    /// Returns the reply back if this node leads; otherwise answers NotLeader.
    fn check_leader<T>(&self, reply: Reply<T>) -> Option<Reply<T>> {
        if self.raw.raft.state == StateRole::Leader && self.raw.raft.lead_transferee.is_none() {
            Some(reply)
        } else {
            let _ = reply.send(Err(self.not_leader()));
            None
        }
    }

    fn not_leader(&self) -> Error {
        let lead = self.raw.raft.leader_id;
        let (leader, leader_addr) = if lead == raft::INVALID_ID || lead == self.raw.raft.id {
            (None, None)
        } else {
            (Some(lead), self.transport.peer_addr(lead))
        };
        Error::NotLeader {
            leader,
            leader_addr,
            term: self.raw.raft.term,
        }
    }

    /// Records a proposal at the index raft-rs appended it to.
    fn track(
        &mut self,
        before: u64,
        res: raft::Result<()>,
        deadline: Instant,
        reply: Reply<Vec<u8>>,
    ) {
        let index = self.raw.raft.raft_log.last_index();
        match res {
            Ok(()) if index > before => {
                self.proposals += 1;
                let pending = Pending {
                    term: self.raw.raft.term,
                    deadline,
                    reply,
                };
                if let Some(old) = self.pending.insert(index, pending) {
                    // A proposal from an earlier term whose entry was
                    // overwritten: it will never be applied.
                    let _ = old.reply.send(Err(Error::Dropped(
                        "its log entry was replaced after a leader change".into(),
                    )));
                }
            }
            Ok(()) => {
                let _ = reply.send(Err(Error::Dropped("raft-rs did not append it".into())));
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Dropped(e.to_string())));
            }
        }
    }

    /// Issues the read that this drain's read_index requests share (each
    /// arrived before it, so its confirmation is fresh for all of them).
    fn issue_read(&mut self) {
        if let Some(id) = self.open_read.take() {
            self.reads_sent.insert(id, Instant::now());
            self.raw.read_index(id.to_be_bytes().to_vec());
        }
    }

    fn expire(&mut self, now: Instant) {
        // Re-send reads unconfirmed for a while (raft-rs ignores a
        // duplicate of one it still holds).
        let resend = Duration::from_millis(150);
        self.reads_sent.retain(|id, _| self.reads.contains_key(id));
        let due: Vec<u64> = self
            .reads_sent
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= resend)
            .map(|(id, _)| *id)
            .collect();
        if self.raw.raft.leader_id != raft::INVALID_ID {
            for id in due {
                self.reads_sent.insert(id, now);
                self.raw.read_index(id.to_be_bytes().to_vec());
            }
        }
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(i, _)| *i)
            .collect();
        for i in expired {
            if let Some(p) = self.pending.remove(&i) {
                let _ = p.reply.send(Err(Error::Timeout));
            }
        }
        for waiting in self.reads.values_mut() {
            let (late, on_time): (Vec<_>, Vec<_>) = std::mem::take(waiting)
                .into_iter()
                .partition(|(d, _)| *d <= now);
            *waiting = on_time;
            for (_, reply) in late {
                let _ = reply.send(Err(Error::Timeout));
            }
        }
        self.reads.retain(|_, waiting| !waiting.is_empty());
        let leader = self.raw.raft.leader_id;
        let transfers = std::mem::take(&mut self.transfers);
        for (to, deadline, reply) in transfers {
            if leader == to {
                let _ = reply.send(Ok(()));
            } else if deadline <= now {
                let _ = reply.send(Err(Error::Timeout));
            } else {
                self.transfers.push((to, deadline, reply));
            }
        }
    }

    /// Leadership was lost (deposed by a higher term, or check-quorum
    /// found no quorum). Proposals still pending may yet commit under the
    /// next leader, or not: say so now rather than at their deadline, so
    /// callers retry on the new leader at once. Unconfirmed reads go too.
    fn stepped_down(&mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(Error::Unknown(
                "this replica lost leadership before it committed; it may still commit".into(),
            )));
        }
        let err = self.not_leader();
        for (_, r) in self.reads.drain().flat_map(|(_, w)| w) {
            let _ = r.send(Err(err.clone()));
        }
    }

    fn fail_all(&mut self, err: Error) {
        // Appended proposals may still commit on the other replicas.
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(Error::Unknown(format!(
                "it was in flight when the group stopped here ({err})"
            ))));
        }
        for (_, r) in self.reads.drain().flat_map(|(_, w)| w) {
            let _ = r.send(Err(err.clone()));
        }
        for (_, r) in self.ready_reads.drain(..) {
            let _ = r.send(Err(err.clone()));
        }
        for (_, _, r) in self.transfers.drain(..) {
            let _ = r.send(Err(err.clone()));
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        for m in &msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // Report optimistically: if the snapshot is lost, the
                // follower rejects the next append and the leader resends.
                self.raw.report_snapshot(m.to, SnapshotStatus::Finish);
            }
        }
        self.transport.send(self.group, msgs);
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if !rd.messages().is_empty() {
            let msgs = rd.take_messages();
            self.send(msgs);
        }
        let snapshot = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
        // Without `sync` (a group that trades the last moments of writes
        // for latency), a vote or a new term is still fsync'd: forgetting
        // one after a crash could elect two leaders in one term. So is a
        // snapshot, which replaces the log.
        let sync = self.cfg.sync
            || snapshot.is_some()
            || rd.hs().is_some_and(|hs| {
                let stored = self.storage.hard_state();
                hs.term != stored.term || hs.vote != stored.vote
            });
        self.storage.persist(
            WriteSet {
                snapshot: snapshot.as_ref(),
                entries: rd.entries(),
                hard_state: rd.hs().cloned(),
            },
            sync,
        )?;
        if let Some(snap) = snapshot {
            self.install_snapshot(&snap)?;
        }
        for rs in rd.take_read_states() {
            let id = read_id(&rs.request_ctx);
            for (_, reply) in self.reads.remove(&id).unwrap_or_default() {
                self.ready_reads.push((rs.index, reply));
            }
        }
        self.apply(rd.take_committed_entries());
        let msgs = rd.take_persisted_messages();
        self.send(msgs);
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        let msgs = light.take_messages();
        self.send(msgs);
        self.apply(light.take_committed_entries());
        self.raw.advance_apply();
        if let Some((started, commit)) = self.replay {
            if self.applied >= commit {
                self.replay = None;
                tracing::info!(
                    group = self.group,
                    applied = self.applied,
                    entries = commit.saturating_sub(self.snapshot_index),
                    ms = started.elapsed().as_millis() as u64,
                    "replayed the log up to the commit index found at start"
                );
            }
        }
        let requested = self.storage.take_snapshot_request();
        self.maybe_snapshot(requested);
        self.publish_status();
        for (reply, res) in self.answers.drain(..) {
            let _ = reply.send(res);
        }
        let leads = self.raw.raft.state == StateRole::Leader;
        if self.led && !leads {
            self.stepped_down();
        }
        self.led = leads;
        self.release_reads();
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        let meta = snap.get_metadata();
        let mut data = snapfile::reader(&snap.data)?;
        self.sm
            .restore_from(meta.index, &mut data)
            .map_err(|e| Error::Storage(format!("restoring snapshot at {}: {e}", meta.index)))?;
        drop(data);
        self.last_snapshot_bytes = snapfile_size(&snap.data);
        self.applied_bytes = 0;
        self.snaps.gc(self.group, meta.index);
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.snapshot_index = meta.index;
        self.last_snapshot_at = Instant::now();
        self.snapshots_installed += 1;
        // Proposals at or below the snapshot were applied by others; this
        // node cannot tell their outcome.
        let later = self.pending.split_off(&(meta.index + 1));
        for (_, p) in std::mem::replace(&mut self.pending, later) {
            let _ = p
                .reply
                .send(Err(Error::Unknown("superseded by a snapshot".into())));
        }
        tracing::info!(group = self.group, index = meta.index, "installed snapshot");
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            let index = entry.index;
            self.applied_bytes += entry.data.len() as u64;
            let response = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => Vec::new(),
                EntryType::EntryNormal => self.sm.apply(index, &entry.data),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_change(&entry)
                }
            };
            self.applied = index;
            self.applied_term = entry.term;
            // Anything pending below this index can no longer be applied.
            while let Some(first) = self.pending.first_key_value().map(|(i, _)| *i) {
                if first > index {
                    break;
                }
                let p = self.pending.remove(&first).expect("present");
                let res = if first == index && p.term == entry.term {
                    Ok(response.clone())
                } else {
                    Err(Error::Dropped(
                        "its log entry was replaced after a leader change".into(),
                    ))
                };
                self.answers.push((p.reply, res));
            }
        }
    }

    /// Applies a committed membership change; returns an empty response or
    /// the error text (every replica reaches the same verdict).
    fn apply_conf_change(&mut self, entry: &Entry) -> Vec<u8> {
        let cc = if entry.get_entry_type() == EntryType::EntryConfChange {
            match ConfChange::parse_from_bytes(&entry.data) {
                Ok(v1) => {
                    // We only propose v2; v1 is decoded for completeness.
                    let mut single = ConfChangeSingle::default();
                    single.set_change_type(v1.get_change_type());
                    single.node_id = v1.node_id;
                    let mut cc = ConfChangeV2::default();
                    cc.set_changes(vec![single].into());
                    cc.context = v1.context;
                    cc
                }
                Err(e) => return format!("undecodable conf change: {e}").into_bytes(),
            }
        } else {
            match ConfChangeV2::parse_from_bytes(&entry.data) {
                Ok(cc) => cc,
                Err(e) => return format!("undecodable conf change: {e}").into_bytes(),
            }
        };
        // The context carries "id=addr" pairs of nodes being added, so every
        // member learns how to reach them.
        for pair in String::from_utf8_lossy(&cc.context).split(',') {
            if let Some((id, addr)) = pair.split_once('=') {
                if let Ok(id) = id.parse::<u64>() {
                    self.transport.set_peer_addr(id, addr.to_owned());
                }
            }
        }
        match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                tracing::info!(group = self.group, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(group = self.group, error = %e, "conf change rejected");
                format!("conf change rejected: {e}").into_bytes()
            }
        }
    }

    fn release_reads(&mut self) {
        if self.ready_reads.is_empty() {
            return;
        }
        let applied = self.applied;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ready_reads)
            .into_iter()
            .partition(|(i, _)| *i <= applied);
        self.ready_reads = waiting;
        for (index, reply) in done {
            let _ = reply.send(Ok(index));
        }
    }

    /// Starts a snapshot when enough entries or time went by (or `force`)
    /// and none is in progress: the state machine captures its state here,
    /// a background thread writes and fsyncs the file, and
    /// [`Driver::snapshot_done`] records it.
    fn maybe_snapshot(&mut self, force: bool) {
        let since = self.applied.saturating_sub(self.snapshot_index);
        if since == 0 || self.snapshot_in_progress.is_some() {
            return;
        }
        // A large state (over 16 MiB) is rewritten only once the commands
        // since add up to a quarter of it.
        let large = self.last_snapshot_bytes > self.cfg.snapshot_large_bytes;
        let due = (since >= self.cfg.snapshot_entries
            && (!large || self.applied_bytes.saturating_mul(4) >= self.last_snapshot_bytes))
            || self.last_snapshot_at.elapsed() >= self.cfg.snapshot_interval;
        if !force && !due {
            return;
        }
        let (group, index, term) = (self.group, self.applied, self.applied_term);
        self.applied_bytes_at_capture = self.applied_bytes;
        let job = self.sm.snapshot_job();
        let mut snap = Snapshot {
            data: snapfile::descriptor(&self.snaps.file(group, index, term, None)).into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
        let compact_to = index.saturating_sub(self.cfg.compact_lag) + 1;
        let snaps = self.snaps.clone();
        let to_self = self.to_self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("raft-g{group}-snap"))
            .spawn(move || {
                let written = snaps
                    .write(group, index, term, job)
                    .map_err(|e| e.to_string());
                // Blocks while the inbox is full; the driver drains it.
                let _ = to_self.send(Request::SnapshotDone {
                    snap,
                    compact_to,
                    written,
                });
            });
        match spawned {
            Ok(_) => self.snapshot_in_progress = Some(index),
            Err(e) => tracing::error!(group, error = %e, "cannot start a snapshot thread"),
        }
    }

    /// Records a snapshot whose file is written and compacts the log below
    /// it. A snapshot installed from the leader meanwhile supersedes it.
    fn snapshot_done(
        &mut self,
        snap: Snapshot,
        compact_to: u64,
        written: std::result::Result<u64, String>,
    ) -> Result<()> {
        self.snapshot_in_progress = None;
        let index = snap.get_metadata().index;
        let result = match written {
            Err(e) => {
                // Not fatal: the log is intact; the next one may succeed.
                tracing::error!(group = self.group, index, error = %e, "writing a snapshot failed");
                self.last_snapshot_at = Instant::now();
                Ok(())
            }
            Ok(_) if index <= self.snapshot_index => {
                self.snaps.gc(self.group, self.snapshot_index);
                Ok(())
            }
            Ok(bytes) => self.storage.save_snapshot(&snap, compact_to).map(|()| {
                self.snapshot_index = index;
                self.last_snapshot_bytes = bytes;
                // Commands applied since the capture count toward the next.
                self.applied_bytes = self
                    .applied_bytes
                    .saturating_sub(self.applied_bytes_at_capture);
                self.last_snapshot_at = Instant::now();
                self.snapshots_taken += 1;
                self.snaps.gc(self.group, index);
                tracing::debug!(
                    group = self.group,
                    index,
                    compact_to,
                    bytes,
                    "took snapshot"
                );
            }),
        };
        for reply in self.snapshot_waiters.drain(..) {
            let _ = reply.send(match &result {
                Ok(()) => Ok(self.snapshot_index),
                Err(e) => Err(Error::Storage(e.to_string())),
            });
        }
        result
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let mut conf = raft.prs().conf().to_conf_state();
        conf.voters.sort_unstable();
        conf.learners.sort_unstable();
        let mut s = self.status.lock();
        s.role = raft.state.into();
        s.term = raft.term;
        let leader = (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id);
        if s.leader != leader || (s.leader_addr.is_none() && leader.is_some_and(|l| l != raft.id)) {
            s.leader_addr = leader
                .filter(|l| *l != raft.id)
                .and_then(|l| self.transport.peer_addr(l));
        }
        s.leader = leader;
        s.commit = raft.raft_log.committed;
        s.applied = self.applied;
        s.last_index = raft.raft_log.last_index();
        s.snapshot_index = self.snapshot_index;
        s.voters = conf.voters;
        s.learners = conf.learners;
        s.matched.clear();
        if raft.state == StateRole::Leader {
            s.matched
                .extend(raft.prs().iter().map(|(id, pr)| (*id, pr.matched)));
            s.matched.sort_unstable();
        }
        s.snapshots_taken = self.snapshots_taken;
        s.snapshots_installed = self.snapshots_installed;
        s.proposals = self.proposals;
        s.running = true;
        drop(s);
        let view = LeaderView {
            term: raft.term,
            leader,
        };
        self.leader_view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }
}

/// Size of the snapshot file a descriptor names (0 if unknown).
fn snapfile_size(descriptor: &[u8]) -> u64 {
    snapfile::file_of(descriptor)
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len())
}

/// Size of the group's current snapshot file, when it has one.
fn snapshot_size(storage: &GroupStorage) -> u64 {
    storage
        .load_snapshot()
        .map_or(0, |s| snapfile_size(&s.data))
}

fn read_id(ctx: &[u8]) -> u64 {
    ctx.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// A cheap, cloneable handle to one group running on this node.
#[derive(Clone)]
pub struct GroupHandle {
    pub(crate) group: u64,
    pub(crate) inbox: Sender<Request>,
    pub(crate) status: Arc<Mutex<GroupStatus>>,
    pub(crate) leader_view: tokio::sync::watch::Receiver<LeaderView>,
    pub(crate) cfg: Arc<Config>,
}

impl GroupHandle {
    pub fn id(&self) -> u64 {
        self.group
    }

    /// Replicates `command` and resolves with the state machine's response
    /// once it is committed and applied on this node (the leader).
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>> {
        self.check_command(&command)?;
        self.call(|deadline, reply| Request::Propose {
            data: command,
            term: None,
            deadline,
            reply,
        })
        .await
    }

    /// [`propose`](Self::propose), but appended only if this node still
    /// leads in `term` (else NotLeader): for commands a leader decided on
    /// from what it knew in that term alone.
    pub async fn propose_in_term(&self, command: Vec<u8>, term: u64) -> Result<Vec<u8>> {
        self.check_command(&command)?;
        self.call(|deadline, reply| Request::Propose {
            data: command,
            term: Some(term),
            deadline,
            reply,
        })
        .await
    }

    /// Proposes `command` without waiting for or learning its outcome: the
    /// leader appends it, a follower forwards it to the leader. It may be
    /// lost (no leader, a dropped message, a leader change), so it is only
    /// for idempotent commands a caller may send more than once — cleanup
    /// that must reach the leader from whichever replica noticed the need.
    pub fn forward(&self, command: Vec<u8>) -> Result<()> {
        self.check_command(&command)?;
        self.enqueue(Request::Forward(command))
    }

    fn check_command(&self, command: &[u8]) -> Result<()> {
        if command.is_empty() {
            return Err(Error::Invalid("empty command".into()));
        }
        if command.len() > self.cfg.max_command_bytes {
            return Err(Error::Invalid(format!(
                "command of {} bytes exceeds the limit of {}",
                command.len(),
                self.cfg.max_command_bytes
            )));
        }
        Ok(())
    }

    /// Linearizable read barrier: resolves with a commit index once this
    /// node has applied at least that index and a quorum confirmed the
    /// leader still leads. State read after it reflects every write
    /// acknowledged before the call. Works on followers too (the leader
    /// answers the index); fails fast with NotLeader when no leader is known.
    pub async fn read_index(&self) -> Result<u64> {
        self.call(|deadline, reply| Request::ReadIndex { deadline, reply })
            .await
    }

    /// Adds `node` (reachable at `addr`) as a learner: it receives the log
    /// and snapshots but does not vote. Promote it once caught up.
    pub async fn add_learner(&self, node: u64, addr: &str) -> Result<()> {
        self.conf_change(
            ConfChangeType::AddLearnerNode,
            node,
            format!("{node}={addr}"),
        )
        .await
    }

    /// Makes `node` a voter (a learner being promoted, or a new node).
    pub async fn promote(&self, node: u64) -> Result<()> {
        self.conf_change(ConfChangeType::AddNode, node, String::new())
            .await
    }

    /// Removes `node` from the group.
    pub async fn remove(&self, node: u64) -> Result<()> {
        self.conf_change(ConfChangeType::RemoveNode, node, String::new())
            .await
    }

    async fn conf_change(&self, ty: ConfChangeType, node: u64, context: String) -> Result<()> {
        if node == 0 {
            return Err(Error::Invalid("node id 0 is reserved".into()));
        }
        let mut single = ConfChangeSingle::default();
        single.set_change_type(ty);
        single.node_id = node;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.context = context.into_bytes().into();
        let resp = self
            .call(|deadline, reply| Request::ConfChange {
                cc,
                deadline,
                reply,
            })
            .await?;
        if resp.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(String::from_utf8_lossy(&resp).into_owned()))
        }
    }

    /// Hands leadership to `to` and resolves once this node sees it lead.
    pub async fn transfer_leader(&self, to: u64) -> Result<()> {
        self.call(|deadline, reply| Request::TransferLeader {
            to,
            deadline,
            reply,
        })
        .await
    }

    /// Starts an election on this node now (tests and operators).
    pub fn campaign(&self) -> Result<()> {
        self.enqueue(Request::Campaign)
    }

    /// Takes a snapshot now; resolves with its index.
    pub async fn snapshot(&self) -> Result<u64> {
        self.call(|_, reply| Request::Snapshot { reply }).await
    }

    pub fn status(&self) -> GroupStatus {
        self.status.lock().clone()
    }

    /// The term and leader as this node sees them, marked changed each
    /// time either changes (a follower learns of a new leader with the
    /// first message it gets from it). Closed when the group stops.
    pub fn watch_leader(&self) -> tokio::sync::watch::Receiver<LeaderView> {
        self.leader_view.clone()
    }

    pub(crate) fn step(&self, msg: Message) {
        // A full inbox drops the message; Raft retransmits.
        let _ = self.inbox.try_send(Request::Raft(msg));
    }

    pub(crate) fn stop(&self) {
        // Stop must get through even when the inbox is full.
        let _ = self.inbox.send(Request::Stop);
    }

    fn enqueue(&self, req: Request) -> Result<()> {
        self.inbox.try_send(req).map_err(|e| match e {
            TrySendError::Full(_) => Error::Dropped("group inbox is full".into()),
            TrySendError::Disconnected(_) => Error::Stopped(self.group),
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Instant, Reply<T>) -> Request) -> Result<T> {
        let timeout = self.cfg.request_timeout;
        let (tx, rx) = oneshot::channel();
        self.enqueue(make(Instant::now() + timeout, tx))?;
        // The driver enforces the deadline; this outer bound only guards
        // against a driver that died without answering.
        match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(Error::Stopped(self.group)),
            Err(_) => Err(Error::Timeout),
        }
    }
}
