//! [`CacheNode`]: one node's coherence engine — its lines (L2), the
//! directory of the keys it is home of, and both halves of the protocol.
//!
//! Requester half (any node): `get` serves a line it holds, else asks the
//! key's home to `fill` it; `write` sends every write to the home. Home
//! half: `home_fetch`, `home_write` and `on_release` run under the key's
//! lock (a striped async mutex), so one key's fills, writes, invalidations
//! and write-backs never interleave; the directory transitions are in
//! `directory.rs`. Holder half: `on_recall` drops or downgrades a line and,
//! before answering, invalidates the near caches that registered it.
//!
//! Coherence invariants:
//! - a write is answered only after every copy the directory lists was
//!   recalled (or its holder fenced out), and only while the home's member
//!   lease holds — after the store write too;
//! - a node serves lines, and answers as a home, only while its member
//!   lease holds: it confirmed, less than `lease` ago (measured from
//!   before it asked), that it is a member of the epoch it acts in;
//! - after a membership change nobody serves for `lease`, so a node fenced
//!   out has stopped serving before anyone relies on its being gone;
//! - a fill installs its line only if no invalidation overtook its answer
//!   (`fills.rs`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use consensus::GroupHandle;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;
use parking_lot::{Mutex, RwLock};
use proto::cache::v1::internal::{
    FetchRequest, LineGrant, LineState, RecallReply, RecallRequest, ReleaseRequest, Released,
    WriteOp, WriteReply, WriteRequest,
};
use proto::status::error;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::config::{CacheLimits, WritePolicy};
use crate::directory::{DirEntry, Holder, Known, State};
use crate::fills::FillTracker;
use crate::membership::{Command, Membership, View};
use crate::peer::Peers;
use crate::store::{now_ms, BackingStore, Entry, StoreError};
use crate::watchers::Watchers;

const STRIPES: usize = 1024;

/// A cached line of one key on this node.
pub struct Line {
    pub entry: Entry,
    pub state: State,
    pub grant: u64,
    /// The home (node, incarnation) that granted it.
    pub home: (u64, u64),
    pub filled: Instant,
    pub hits: AtomicU32,
    pub refreshing: AtomicBool,
}

/// Where a read's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Local,
    Peer,
    Store,
}

/// The epoch this node acts in.
pub struct Epoch {
    pub view: View,
    /// This node's incarnation in it (None: not a member).
    pub incarnation: Option<u64>,
    /// Nobody serves in a new epoch before this.
    pub serving_from: Instant,
}

#[derive(Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub peer_hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub writes: AtomicU64,
    pub invalidations_sent: AtomicU64,
    pub invalidations_received: AtomicU64,
    pub refreshes: AtomicU64,
    pub fenced: AtomicU64,
    /// Lines per state: Shared, Exclusive, Modified.
    pub lines: [AtomicI64; 3],
}

fn state_slot(s: State) -> usize {
    match s {
        State::Shared => 0,
        State::Exclusive => 1,
        State::Modified => 2,
    }
}

/// A line lives until its entry expires or its line TTL runs out.
struct LineExpiry {
    line_ttl: Duration,
}

impl LineExpiry {
    fn ttl(&self, line: &Line) -> Duration {
        if line.entry.expires_at_ms == 0 {
            return self.line_ttl;
        }
        let left = line.entry.expires_at_ms.saturating_sub(now_ms());
        self.line_ttl.min(Duration::from_millis(left))
    }
}

impl Expiry<Bytes, Arc<Line>> for LineExpiry {
    fn expire_after_create(&self, _k: &Bytes, v: &Arc<Line>, _at: Instant) -> Option<Duration> {
        Some(self.ttl(v))
    }

    fn expire_after_update(
        &self,
        _k: &Bytes,
        v: &Arc<Line>,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.ttl(v))
    }
}

/// A line that left the cache by eviction or expiry: its home must hear.
struct Evicted {
    key: Bytes,
    line: Arc<Line>,
}

pub struct Inner {
    pub me: u64,
    pub limits: CacheLimits,
    pub store: Arc<dyn BackingStore>,
    pub peers: Arc<Peers>,
    pub watchers: Watchers,
    pub stats: Stats,
    lines: Cache<Bytes, Arc<Line>>,
    dir: Mutex<HashMap<Bytes, DirEntry>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    fills: Mutex<FillTracker>,
    epoch: RwLock<Arc<Epoch>>,
    /// (epoch, until): the member lease, valid only in the epoch it was
    /// confirmed in.
    lease_until: Mutex<Option<(u64, Instant)>>,
    membership: GroupHandle,
    next_grant: AtomicU64,
    /// Peers failing calls: (first failure, last failure, failures).
    suspects: Mutex<HashMap<u64, (Instant, Instant, u32)>>,
    /// Incarnations below this are from an earlier run of this node (its
    /// memory did not survive them): it is not a member under them.
    min_incarnation: AtomicU64,
}

/// One node's cache; cheap to clone.
#[derive(Clone)]
pub struct CacheNode(pub Arc<Inner>);

impl std::ops::Deref for CacheNode {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub fn unavailable(reason: &str, msg: impl Into<String>) -> Status {
    error(Code::Unavailable, msg, reason, [] as [(String, String); 0])
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => unavailable("STORE_UNAVAILABLE", m),
        StoreError::Unknown(m) => unavailable("OUTCOME_UNKNOWN", m),
    }
}

/// A peer's answer that says it could not be reached (no dsync reason).
fn unreachable(s: &Status) -> bool {
    proto::status::error_info(s).is_none()
        && matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        )
}

impl CacheNode {
    /// A node with no membership yet (it serves nothing until it joined and
    /// its lease holds). Spawns its release task on the current runtime.
    pub fn new(
        me: u64,
        limits: CacheLimits,
        store: Arc<dyn BackingStore>,
        peers: Arc<Peers>,
        membership: GroupHandle,
    ) -> Self {
        let (evicted_tx, evicted_rx) = mpsc::unbounded_channel::<Evicted>();
        let stats = Stats::default();
        let node = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let weak = weak.clone();
            let lines = Cache::builder()
                .max_capacity(limits.memory_limit_bytes)
                .weigher(|k: &Bytes, v: &Arc<Line>| v.entry.weight(k))
                .expire_after(LineExpiry {
                    line_ttl: limits.line_ttl,
                })
                .eviction_listener(move |k: Arc<Bytes>, v: Arc<Line>, cause| {
                    if let Some(inner) = weak.upgrade() {
                        inner.stats.lines[state_slot(v.state)].fetch_sub(1, Ordering::Relaxed);
                        if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                            if cause == RemovalCause::Size {
                                inner.stats.evictions.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = evicted_tx.send(Evicted {
                                key: (*k).clone(),
                                line: v,
                            });
                        }
                    }
                })
                .build();
            Inner {
                me,
                watchers: Watchers::new(
                    me,
                    limits.invalidation_timeout,
                    limits.lease,
                    limits.max_tracked_per_client,
                ),
                limits,
                store,
                peers,
                stats,
                lines,
                dir: Mutex::default(),
                stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
                fills: Mutex::default(),
                epoch: RwLock::new(Arc::new(Epoch {
                    view: View::empty(),
                    incarnation: None,
                    serving_from: Instant::now(),
                })),
                lease_until: Mutex::new(None),
                membership,
                next_grant: AtomicU64::new(1),
                suspects: Mutex::default(),
                min_incarnation: AtomicU64::new(u64::MAX),
            }
        });
        let node = CacheNode(node);
        tokio::spawn(release_loop(Arc::downgrade(&node.0), evicted_rx));
        node
    }

    pub fn epoch(&self) -> Arc<Epoch> {
        self.epoch.read().clone()
    }

    // ------------------------------------------------------------ leases

    /// Only incarnations from `index` on are this run's (set before the
    /// node's first Join, from a read of the membership group's commit).
    pub fn set_min_incarnation(&self, index: u64) {
        self.min_incarnation.store(index, Ordering::Release);
    }

    /// What is left of this node's member lease.
    pub fn lease_left(&self) -> Option<Duration> {
        let (epoch, until) = (*self.lease_until.lock())?;
        if epoch != self.epoch().view.epoch {
            return None;
        }
        until.checked_duration_since(Instant::now())
    }

    fn lease_valid(&self) -> bool {
        self.lease_left().is_some()
    }

    /// Renews the member lease: `asked` is when the confirming read of the
    /// membership group began and `membership` what it read.
    pub fn renew_lease(&self, asked: Instant, membership: &Membership) {
        let ep = self.epoch();
        if ep.view.epoch != membership.epoch
            || ep.incarnation.is_none()
            || membership.incarnation(self.me) != ep.incarnation
            || Instant::now() < ep.serving_from
        {
            return;
        }
        let mut l = self.lease_until.lock();
        let until = asked + self.limits.lease;
        let epoch = ep.view.epoch;
        if l.is_none_or(|(e, u)| e != epoch || u < until) {
            *l = Some((epoch, until));
        }
    }

    /// Why this node cannot serve right now.
    fn not_serving(&self) -> Status {
        let ep = self.epoch();
        if ep.incarnation.is_none() {
            unavailable(
                "NOT_MEMBER",
                format!("node {} is (re)joining the cache membership", self.me),
            )
        } else if Instant::now() < ep.serving_from {
            unavailable(
                "EPOCH_CHANGING",
                format!("cache membership changed to epoch {}; retry", ep.view.epoch),
            )
        } else {
            unavailable(
                "NO_LEASE",
                format!(
                    "node {} cannot confirm its membership (no quorum in the membership group)",
                    self.me
                ),
            )
        }
    }

    fn check_serving(&self) -> Result<Arc<Epoch>, Status> {
        let ep = self.epoch();
        if !self.lease_valid() || Instant::now() < ep.serving_from {
            return Err(self.not_serving());
        }
        Ok(ep)
    }

    /// A home's check of a protocol request: same epoch, really home, lease.
    fn check_home(&self, epoch: u64, key: &[u8]) -> Result<Arc<Epoch>, Status> {
        let ep = self.check_serving()?;
        if ep.view.epoch != epoch || ep.view.home(key).map(|h| h.0) != Some(self.me) {
            return Err(self.stale_epoch(epoch, ep.view.epoch));
        }
        Ok(ep)
    }

    /// A home's entry into the protocol for `key` on behalf of `from`:
    /// checked (epoch, home, lease), the key's lock taken, checked again
    /// (the epoch may have moved while it waited), and `from`'s incarnation.
    async fn serialize(
        &self,
        epoch: u64,
        key: &Bytes,
        from: u64,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, Arc<Epoch>, u64), Status> {
        self.check_home(epoch, key)?;
        let guard = self.stripe(key).lock().await;
        let ep = self.check_home(epoch, key)?;
        let Some(&from_inc) = ep.view.members.get(&from) else {
            return Err(unavailable(
                "NOT_MEMBER",
                format!("node {from} is not a member"),
            ));
        };
        Ok((guard, ep, from_inc))
    }

    /// FAILED_PRECONDITION STALE_EPOCH: a request of epoch `epoch` reached
    /// a node at epoch `at`.
    fn stale_epoch(&self, epoch: u64, at: u64) -> Status {
        error(
            Code::FailedPrecondition,
            format!(
                "request of epoch {epoch}; node {} is at epoch {at}",
                self.me
            ),
            "STALE_EPOCH",
            [("epoch", at.to_string())],
        )
    }

    fn stripe(&self, key: &[u8]) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.stripes[(h.finish() as usize) % STRIPES]
    }

    /// Reads the key's directory entry in place (an absent one is empty).
    fn dir_read<R>(&self, key: &[u8], f: impl FnOnce(&DirEntry) -> R) -> R {
        match self.dir.lock().get(key) {
            Some(d) => f(d),
            None => f(&DirEntry::default()),
        }
    }

    fn dir_entry(&self, key: &[u8]) -> DirEntry {
        self.dir.lock().get(key).cloned().unwrap_or_default()
    }

    fn dir_update<R>(&self, key: &Bytes, f: impl FnOnce(&mut DirEntry) -> R) -> R {
        let mut dir = self.dir.lock();
        let e = dir.entry(key.clone()).or_default();
        let r = f(e);
        if e.is_idle() {
            dir.remove(key);
        }
        r
    }

    fn grant_id(&self) -> u64 {
        self.next_grant.fetch_add(1, Ordering::Relaxed)
    }

    fn install(&self, key: Bytes, entry: Entry, state: State, grant: u64, home: (u64, u64)) {
        self.stats.lines[state_slot(state)].fetch_add(1, Ordering::Relaxed);
        self.lines.insert(
            key,
            Arc::new(Line {
                entry,
                state,
                grant,
                home,
                filled: Instant::now(),
                hits: AtomicU32::new(0),
                refreshing: AtomicBool::new(false),
            }),
        );
    }

    // --------------------------------------------------------- requester

    /// Reads `key`. With `client`, registers it for that near-cache client
    /// first (so an invalidation after this read reaches the client);
    /// answers whether the registration took.
    pub async fn get(&self, key: &Bytes, client: u64) -> Result<(Entry, Source, bool), Status> {
        let ep = self.check_serving()?;
        let tracked = client != 0 && self.watchers.track(client, key);
        if let Some(line) = self.lines.get(key) {
            let now = now_ms();
            // A line of another home (left over from an older epoch) is
            // not one the current home knows of.
            if !line.entry.expired(now) && ep.view.home(key) == Some(line.home) {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                self.maybe_refresh(key, &line);
                return Ok((line.entry.clone(), Source::Local, tracked));
            }
        }
        let (entry, source) = self.fill(key, false).await?;
        Ok((entry, source, tracked))
    }

    /// Refresh-ahead: a line read at least twice that is in the last
    /// `refresh_ahead` fraction of its line TTL is reloaded in the
    /// background, so hot keys do not miss when it runs out.
    fn maybe_refresh(&self, key: &Bytes, line: &Arc<Line>) {
        let hits = line.hits.fetch_add(1, Ordering::Relaxed) + 1;
        let ra = self.limits.refresh_ahead;
        if ra <= 0.0 || hits < 2 {
            return;
        }
        let ttl = self.limits.line_ttl;
        if line.filled.elapsed() < ttl.mul_f64(1.0 - ra) {
            return;
        }
        if line.entry.expires_at_ms != 0 && line.entry.expires_at_ms <= now_ms() + 1 {
            return;
        }
        if line.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let node = self.clone();
        let key = key.clone();
        let line = line.clone();
        tokio::spawn(async move {
            if node.fill(&key, true).await.is_ok() {
                node.stats.refreshes.fetch_add(1, Ordering::Relaxed);
            } else {
                line.refreshing.store(false, Ordering::Release);
            }
        });
    }

    /// Asks the key's home for a line and caches it unless an invalidation
    /// overtook the answer. Runs to the end even if the caller goes away,
    /// so the fill's ticket is always settled.
    async fn fill(&self, key: &Bytes, refresh: bool) -> Result<(Entry, Source), Status> {
        let node = self.clone();
        let key = key.clone();
        match tokio::spawn(async move { node.fill_inner(&key, refresh).await }).await {
            Ok(r) => r,
            Err(e) => Err(Status::internal(format!("fill task failed: {e}"))),
        }
    }

    async fn fill_inner(&self, key: &Bytes, refresh: bool) -> Result<(Entry, Source), Status> {
        let ep = self.check_serving()?;
        let home = ep.view.home(key).ok_or_else(|| self.not_serving())?;
        let ticket = self.fills.lock().begin(key);
        let req = FetchRequest {
            epoch: ep.view.epoch,
            from: self.me,
            key: key.to_vec(),
            refresh,
        };
        let res = if home.0 == self.me {
            self.home_fetch(req).await
        } else {
            self.peers.fetch(home.0, req, self.recall_timeout()).await
        };
        let own = res.as_ref().map_or(0, |g| g.self_recalls as u64);
        {
            // Decide and install under the fills lock, so a recall arriving
            // now either finds the line or counts against this fill.
            let mut f = self.fills.lock();
            let clean = f.finish(key, ticket, own);
            if let Ok(g) = &res {
                let entry = Entry::from_proto(g.entry.clone());
                if let Some(state) = State::from_proto(g.state()) {
                    if clean && self.epoch().view.epoch == ep.view.epoch && !entry.expired(now_ms())
                    {
                        self.install(key.clone(), entry, state, g.grant, home);
                    }
                }
            }
        }
        let g = self.peer_result(home, res)?;
        let entry = Entry::from_proto(g.entry);
        let source = match g.source {
            2 => Source::Store,
            _ => Source::Peer,
        };
        // A refresh is background work, not a read.
        if !refresh {
            match source {
                Source::Store => self.stats.misses.fetch_add(1, Ordering::Relaxed),
                _ => self.stats.peer_hits.fetch_add(1, Ordering::Relaxed),
            };
        }
        Ok((entry, source))
    }

    /// Maps a home's answer: protocol refusals become retryable statuses,
    /// and a home that stays unreachable is fenced out.
    fn peer_result<T>(&self, home: (u64, u64), res: Result<T, Status>) -> Result<T, Status> {
        match res {
            Ok(v) => {
                if home.0 != self.me {
                    self.suspects.lock().remove(&home.0);
                }
                Ok(v)
            }
            Err(s) if proto::status::reason(&s) == "STALE_EPOCH" => Err(unavailable(
                "EPOCH_CHANGING",
                format!("cache membership is changing: {}", s.message()),
            )),
            Err(s) if home.0 != self.me && unreachable(&s) => {
                if self.suspect(home.0) {
                    self.fence(home.0, home.1, "unreachable");
                }
                Err(unavailable(
                    "HOME_UNREACHABLE",
                    format!(
                        "home node {} of the key did not answer: {}",
                        home.0,
                        s.message()
                    ),
                ))
            }
            Err(s) => Err(s),
        }
    }

    /// How long a home waits for a holder's recall.
    fn recall_timeout(&self) -> Duration {
        // A holder answers within its own ack timeout — twice if another
        // invalidation of the key was under way — and reports any lease
        // still to wait out instead of sleeping it.
        self.limits.invalidation_timeout * 2 + Duration::from_millis(500)
    }

    /// Records a failed call to `node`; true when it has failed at least
    /// three times in a row over `fence_after` (a lone failure, or one
    /// long after the previous, starts over).
    fn suspect(&self, node: u64) -> bool {
        let now = Instant::now();
        let mut sus = self.suspects.lock();
        let e = sus.entry(node).or_insert((now, now, 0));
        if now.duration_since(e.1) > self.limits.fence_after {
            *e = (now, now, 0);
        }
        e.1 = now;
        e.2 += 1;
        if e.2 >= 3 && now.duration_since(e.0) >= self.limits.fence_after {
            sus.remove(&node);
            return true;
        }
        false
    }

    /// Proposes that `node` (at `incarnation`) be fenced out.
    fn fence(&self, node: u64, incarnation: u64, why: &str) {
        tracing::warn!(node, incarnation, why, "fencing a cache node out");
        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .membership
            .forward(Command::Fence { node, incarnation }.encode());
    }

    /// Writes through the key's home (set, delete or invalidate). Runs to
    /// the end even if the caller goes away.
    pub async fn write(&self, req: WriteRequest) -> Result<WriteReply, Status> {
        let node = self.clone();
        match tokio::spawn(async move { node.write_inner(req).await }).await {
            Ok(r) => r,
            Err(e) => Err(Status::internal(format!("write task failed: {e}"))),
        }
    }

    async fn write_inner(&self, mut req: WriteRequest) -> Result<WriteReply, Status> {
        let ep = self.check_serving()?;
        let key = Bytes::from(std::mem::take(&mut req.key));
        let home = ep.view.home(&key).ok_or_else(|| self.not_serving())?;
        req.epoch = ep.view.epoch;
        req.from = self.me;
        req.key = key.to_vec();
        let ticket = self.fills.lock().begin(&key);
        let res = if home.0 == self.me {
            self.home_write(req).await
        } else {
            match self.peers.write(home.0, req, self.recall_timeout()).await {
                // Sent, but no answer: the home may have applied it.
                Err(s) if unreachable(&s) && !s.message().starts_with(crate::peer::NOT_SENT) => {
                    Err(unavailable(
                        "OUTCOME_UNKNOWN",
                        format!(
                            "home node {} did not answer the write ({}); read the key to learn the outcome",
                            home.0,
                            s.message()
                        ),
                    ))
                }
                r => r,
            }
        };
        let own = res.as_ref().map_or(0, |r| r.self_recalls as u64);
        {
            let mut f = self.fills.lock();
            let clean = f.finish(&key, ticket, own);
            if let Ok(r) = &res {
                if let (Some(state), Some(e)) = (State::from_proto(r.state()), &r.entry) {
                    if clean && self.epoch().view.epoch == ep.view.epoch && r.grant != 0 {
                        self.install(
                            key,
                            Entry::from_proto(Some(e.clone())),
                            state,
                            r.grant,
                            home,
                        );
                    }
                }
            }
        }
        let reply = self.peer_result(home, res)?;
        Ok(reply)
    }

    // -------------------------------------------------------------- home

    /// Recalls `node`'s line of `key` to `to` (Shared or Invalid); a holder
    /// that does not answer in time is fenced out.
    async fn recall(
        &self,
        ep: &Epoch,
        node: u64,
        key: &Bytes,
        to: LineState,
    ) -> Result<RecallReply, Status> {
        self.stats
            .invalidations_sent
            .fetch_add(1, Ordering::Relaxed);
        if node == self.me {
            let me = self.clone();
            let key = key.clone();
            return tokio::spawn(async move { me.on_recall(&key, to).await })
                .await
                .map_err(|e| Status::internal(format!("recall task failed: {e}")));
        }
        let Some(&incarnation) = ep.view.members.get(&node) else {
            // Not a member any more: its lines were dropped when it left,
            // and its near caches' leases ran out before this epoch served.
            return Ok(RecallReply::default());
        };
        let req = RecallRequest {
            epoch: ep.view.epoch,
            home: self.me,
            key: key.to_vec(),
            to: to as i32,
            incarnation,
        };
        match self.peers.recall(node, req, self.recall_timeout()).await {
            Ok(r) => Ok(r),
            Err(s) => {
                self.fence(node, incarnation, "did not answer a recall in time");
                Err(unavailable(
                    "EPOCH_CHANGING",
                    format!(
                        "node {node} did not acknowledge an invalidation ({}); it is being fenced out, retry",
                        s.message()
                    ),
                ))
            }
        }
    }

    /// A Modified holder (write-back mode) is downgraded to Shared before
    /// another node shares the line. Its value is the home's dirty entry.
    async fn settle_modified(&self, ep: &Epoch, key: &Bytes) -> Result<(), Status> {
        let Some(m) = self.dir_read(key, DirEntry::modified) else {
            return Ok(());
        };
        let r = self.recall(ep, m, key, LineState::Shared).await?;
        // A holder whose forgotten near cache may still serve stays
        // listed, so a later write still recalls it (and waits that out).
        self.dir_update(key, |d| d.downgraded(m, r.had || r.wait_ms > 0));
        Ok(())
    }

    async fn store_entry(&self, key: &Bytes, e: &Entry) -> Result<(), StoreError> {
        if e.found {
            self.store.put(key, e).await
        } else {
            self.store.delete(key).await.map(|_| ())
        }
    }

    /// Write-behind (write-back mode): stores the key's dirty entry, retrying
    /// with backoff while this node is its home; clears it once stored (if
    /// no newer write replaced it meanwhile).
    fn flush_later(&self, key: Bytes) {
        let node = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(node.limits.write_behind).await;
            let mut backoff = Duration::from_millis(50);
            loop {
                {
                    let _g = node.stripe(&key).lock().await;
                    let ep = node.epoch();
                    if ep.view.home(&key).map(|h| h.0) != Some(node.me) {
                        return; // `enter` flushed it when the home moved.
                    }
                    let Some(e) = node.dir_read(&key, |d| d.dirty.clone()) else {
                        return;
                    };
                    match node.store_entry(&key, &e).await {
                        Ok(()) => {
                            node.dir_update(&key, |d| {
                                if d.dirty.as_ref().is_some_and(|x| x.version == e.version) {
                                    d.dirty = None;
                                }
                            });
                            return;
                        }
                        Err(err) => {
                            tracing::warn!(key = ?key, error = %err, "write-behind failed; retrying")
                        }
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// Fill of `key` for `req.from`: from a copy if one exists (the
    /// Exclusive holder downgraded, or the home's own line), else from the
    /// store. Grants E when no other node holds a copy, else S — and then
    /// the home keeps a copy too, so later fills do not reach the store.
    pub async fn home_fetch(&self, req: FetchRequest) -> Result<LineGrant, Status> {
        let key = Bytes::from(req.key);
        let from = req.from;
        let (_g, ep, from_inc) = self.serialize(req.epoch, &key, from).await?;
        let mut self_recalls = 0;
        if self.dir_read(&key, DirEntry::modified) == Some(from) {
            self_recalls += 1;
        }
        self.settle_modified(&ep, &key).await?;
        // A dirty value (write-back) is the current one.
        let mut found = self.dir_read(&key, |d| d.dirty.clone()).map(|e| (e, 1u32));
        // An Exclusive holder becomes Shared (a refresh too, so E stays
        // the only copy); its line supplies the value unless refreshing.
        if let Some(x) = self.dir_read(&key, |d| d.exclusive_other_than(from)) {
            let r = self.recall(&ep, x, &key, LineState::Shared).await?;
            self.dir_update(&key, |d| d.downgraded(x, r.had || r.wait_ms > 0));
            if r.had && found.is_none() && !req.refresh {
                found = Some((Entry::from_proto(r.entry), 1));
            }
        }
        if found.is_none() && !req.refresh && from != self.me {
            if let Some(line) = self.lines.get(&key) {
                if !line.entry.expired(now_ms()) {
                    found = Some((line.entry.clone(), 1));
                }
            }
        }
        let (entry, source) = match found {
            Some(f) => f,
            None => {
                let e = self.store.get(&key).await.map_err(store_status)?;
                let known = self.dir_read(&key, |d| d.known);
                if req.refresh
                    && known.is_some_and(|k| k.found != e.found || k.version != e.version)
                {
                    // The store changed behind dsync's back: no copy of the
                    // old value may outlive this refresh.
                    for n in self.dir_read(&key, |d| d.others(Some(from))) {
                        self.recall(&ep, n, &key, LineState::Invalid).await?;
                        self.dir_update(&key, |d| d.invalidated(n));
                    }
                }
                (e, 2)
            }
        };
        // The epoch may have moved while this waited: its directory entry
        // must not come back then. Checked and recorded under the fills
        // lock, which `enter` holds while it switches epochs.
        let _f = self.fills.lock();
        let ep = self.check_home(req.epoch, &key)?;
        let mut d = self.dir_entry(&key);
        let state = d.fill_state(from);
        if state == State::Shared && from != self.me && !d.holders.contains_key(&self.me) {
            if let Some(my_inc) = ep.incarnation {
                let g = self.grant_id();
                self.install(
                    key.clone(),
                    entry.clone(),
                    State::Shared,
                    g,
                    (self.me, my_inc),
                );
                d.grant(
                    self.me,
                    Holder {
                        state: State::Shared,
                        grant: g,
                        incarnation: my_inc,
                    },
                );
            }
        }
        let grant = self.grant_id();
        d.grant(
            from,
            Holder {
                state,
                grant,
                incarnation: from_inc,
            },
        );
        d.known = Some(Known::of(&entry));
        tracing::trace!(node = self.me, key = ?key, from, ?state, grant, holders = ?d.holders.keys().collect::<Vec<_>>(), "granted");
        self.dir.lock().insert(key.clone(), d);
        Ok(LineGrant {
            entry: Some(entry.to_proto()),
            state: state.to_proto() as i32,
            grant,
            source,
            self_recalls,
        })
    }

    /// A write of `req.key` for `req.from`: CAS check, every copy recalled,
    /// the store written (write-through, deletes), the writer granted the
    /// new line (E, or M in write-back mode).
    pub async fn home_write(&self, mut req: WriteRequest) -> Result<WriteReply, Status> {
        let key = Bytes::from(std::mem::take(&mut req.key));
        let from = req.from;
        let (_g, ep, from_inc) = self.serialize(req.epoch, &key, from).await?;
        let op = req.op();
        let cur = match self.dir_read(&key, |d| d.known) {
            Some(k) => k.at(now_ms()),
            None => Known::of(&self.store.get(&key).await.map_err(store_status)?),
        };
        if let Some(v) = req.if_version {
            if v != cur.version {
                return Err(error(
                    Code::FailedPrecondition,
                    format!("version is {}, not {v}", cur.version),
                    "VERSION_MISMATCH",
                    [("current_version", cur.version.to_string())],
                ));
            }
        }
        let targets = self.dir_read(&key, |d| d.others(None));
        tracing::trace!(node = self.me, key = ?key, from, ?op, ?targets, "write");
        let recalls = futures::future::join_all(
            targets
                .iter()
                .map(|&n| self.recall(&ep, n, &key, LineState::Invalid)),
        )
        .await;
        let mut invalidated = Vec::new();
        let mut failure = None;
        let mut self_recalls = 0;
        let mut wait = Duration::ZERO;
        for (n, r) in targets.iter().zip(recalls) {
            if *n == from {
                self_recalls += 1;
            }
            match r {
                Ok(r) => {
                    self.dir_update(&key, |d| d.invalidated(*n));
                    if r.had {
                        invalidated.push(*n);
                    }
                    wait = wait.max(Duration::from_millis(r.wait_ms));
                }
                Err(s) => failure = Some(s),
            }
        }
        if let Some(s) = failure {
            return Err(s);
        }
        // A near cache that missed its invalidation serves until its lease
        // ends: the write is acknowledged after that.
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        // Still this epoch's home, with a lease of this epoch?
        self.check_home(req.epoch, &key)?;
        let mut reply = WriteReply {
            invalidated,
            self_recalls,
            ..Default::default()
        };
        match op {
            WriteOp::Invalidate => {
                reply.version = cur.version;
                return Ok(reply);
            }
            WriteOp::Delete => {
                // Unknown until the store answers (if this task died now,
                // the next write must read the store's version). A dirty
                // value is superseded.
                self.dir_update(&key, |d| {
                    d.known = None;
                    d.dirty = None;
                });
                let r = self.store.delete(&key).await;
                if let Err(e) = r {
                    self.after_failed_write(&key, &e, cur);
                    return Err(store_status(e));
                }
                let _f = self.fills.lock();
                self.require_lease_after_store(req.epoch, &key)?;
                self.dir_update(&key, |d| d.written(from, None, Some(Known::absent())));
                reply.existed = cur.found;
            }
            WriteOp::Set => {
                let entry = Entry {
                    found: true,
                    value: Bytes::from(req.value),
                    version: cur.version + 1,
                    expires_at_ms: if req.ttl_ms == 0 {
                        0
                    } else {
                        now_ms() + req.ttl_ms
                    },
                };
                let state = match self.limits.write_policy {
                    WritePolicy::Through => {
                        self.dir_update(&key, |d| d.known = None);
                        if let Err(e) = self.store.put(&key, &entry).await {
                            self.after_failed_write(&key, &e, cur);
                            return Err(store_status(e));
                        }
                        self.require_lease_after_store(req.epoch, &key)?;
                        State::Exclusive
                    }
                    WritePolicy::Back => State::Modified,
                };
                let grant = self.grant_id();
                let back = state == State::Modified;
                // Recorded only if still this epoch's home (see home_fetch).
                let _f = self.fills.lock();
                self.require_lease_after_store(req.epoch, &key)?;
                self.dir_update(&key, |d| {
                    if back {
                        d.dirty = Some(entry.clone());
                    }
                    d.written(
                        from,
                        Some(Holder {
                            state,
                            grant,
                            incarnation: from_inc,
                        }),
                        Some(Known::of(&entry)),
                    )
                });
                if back {
                    self.flush_later(key.clone());
                }
                reply.version = entry.version;
                reply.grant = grant;
                reply.state = state.to_proto() as i32;
                reply.expires_at_ms = entry.expires_at_ms;
                reply.entry = Some(entry.to_proto());
            }
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        Ok(reply)
    }

    /// After the store was written: if the lease ran out or the epoch moved
    /// meanwhile, a new home may have read the store before the write
    /// landed, so the write cannot be acknowledged.
    fn require_lease_after_store(&self, epoch: u64, key: &[u8]) -> Result<(), Status> {
        if self.check_home(epoch, key).is_ok() {
            Ok(())
        } else {
            Err(unavailable(
                "OUTCOME_UNKNOWN",
                "the home lost its membership lease while writing; read the key to learn the outcome",
            ))
        }
    }

    /// Every copy is gone already; what the home knows depends on whether
    /// the store may have taken the write.
    fn after_failed_write(&self, key: &Bytes, e: &StoreError, cur: Known) {
        let known = match e {
            StoreError::Unavailable(_) => Some(cur),
            StoreError::Unknown(_) => None,
        };
        self.dir_update(key, |d| d.written(0, None, known));
    }

    /// Lines a holder dropped (eviction, expiry): it leaves the directory
    /// (unless the release names an older grant).
    pub async fn on_release(&self, req: ReleaseRequest) -> Result<(), Status> {
        let ep = self.epoch();
        if ep.view.epoch != req.epoch {
            return Err(self.stale_epoch(req.epoch, ep.view.epoch));
        }
        for r in req.lines {
            let key = Bytes::from(r.key);
            let _g = self.stripe(&key).lock().await;
            if self.epoch().view.epoch != req.epoch {
                break;
            }
            self.dir_update(&key, |d| d.release(req.from, r.grant));
        }
        Ok(())
    }

    // ------------------------------------------------------------ holder

    /// A home recalls this node's line: drop it (`Invalid`) or keep it
    /// Shared. Near caches that registered the key are invalidated before
    /// the answer. Always honoured, whatever the epoch: dropping or
    /// downgrading a line never breaks coherence.
    pub async fn on_recall(&self, key: &Bytes, to: LineState) -> RecallReply {
        self.stats
            .invalidations_received
            .fetch_add(1, Ordering::Relaxed);
        let line = {
            let mut f = self.fills.lock();
            f.recalled(key);
            if to == LineState::Invalid {
                self.lines.remove(key)
            } else {
                let line = self.lines.get(key);
                if let Some(l) = &line {
                    if l.state != State::Shared {
                        self.install(key.clone(), l.entry.clone(), State::Shared, l.grant, l.home);
                    }
                }
                line
            }
        };
        // A downgrade finding no line (its fill was not installed, or it
        // was evicted) takes this node out of the directory: near caches
        // that registered the key through it must go too.
        let dropping = to == LineState::Invalid || line.is_none();
        let (mut told, mut until) = (0, None);
        if dropping && self.watchers.tracks(key) {
            (told, until) = self.watchers.invalidate(key).await;
        }
        tracing::trace!(node = self.me, key = ?key, ?to, had = line.is_some(), told, "recalled");
        let mut reply = RecallReply {
            wait_ms: until.map_or(0, |u: Instant| {
                u.saturating_duration_since(Instant::now()).as_millis() as u64 + 1
            }),
            ..Default::default()
        };
        if let Some(l) = line {
            reply.had = true;
            reply.entry = Some(l.entry.to_proto());
        }
        reply
    }

    // ------------------------------------------------------- membership

    /// Moves to a new membership: drops lines whose home is no longer the
    /// same (node, incarnation), forgets directory entries of keys homed
    /// elsewhere now and holders that left or restarted, ends every watch
    /// stream, stores dirty values whose home moved (write-back), and
    /// serves again only after `lease`.
    pub async fn enter(&self, m: &Membership) {
        let old = self.epoch();
        if m.epoch <= old.view.epoch && old.view.epoch != 0 {
            return;
        }
        let view = m.view();
        let min = self.min_incarnation.load(Ordering::Acquire);
        let inc = m.incarnation(self.me).filter(|i| *i >= min);
        let same_self = inc.is_some() && inc == old.incarnation;
        let new = Arc::new(Epoch {
            view,
            incarnation: inc,
            serving_from: Instant::now() + self.limits.lease,
        });
        {
            // Under the fills lock, so no fill of the old epoch installs a
            // line after the sweep.
            let _f = self.fills.lock();
            *self.epoch.write() = new.clone();
            *self.lease_until.lock() = None;
            let drop_keys: Vec<Bytes> = self
                .lines
                .iter()
                .filter(|(k, line)| !same_self || new.view.home(k) != Some(line.home))
                .map(|(k, _)| (*k).clone())
                .collect();
            for k in drop_keys {
                self.lines.remove(&k);
            }
        }
        self.watchers.close_all();
        let mut dirty: Vec<(Bytes, Entry)> = Vec::new();
        {
            let mut dir = self.dir.lock();
            dir.retain(|k, e| {
                if !same_self || new.view.home(k).map(|h| h.0) != Some(self.me) {
                    // Its new home reads the store: store what it lacks.
                    if same_self {
                        if let Some(d) = e.dirty.take() {
                            dirty.push((k.clone(), d));
                        }
                    }
                    return false;
                }
                e.drop_departed(&new.view.members);
                !e.is_idle()
            });
        }
        tracing::info!(
            node = self.me,
            epoch = new.view.epoch,
            members = ?new.view.members.keys().collect::<Vec<_>>(),
            member = inc.is_some(),
            "cache membership changed"
        );
        if !dirty.is_empty() {
            let node = self.clone();
            tokio::spawn(async move {
                for (k, e) in dirty {
                    if let Err(err) = node.store_entry(&k, &e).await {
                        tracing::error!(key = ?k, error = %err, "write-back on a membership change failed; the write is lost");
                    }
                }
            });
        }
    }

    /// Probes every other member; one that stays unreachable for
    /// `fence_after` is fenced out, so a dead node's keys move even when
    /// no request happens to need it.
    pub async fn probe_peers(&self) {
        let ep = self.epoch();
        if !self.lease_valid() {
            return;
        }
        let others: Vec<(u64, u64)> = ep
            .view
            .members
            .iter()
            .filter(|(n, _)| **n != self.me)
            .map(|(n, i)| (*n, *i))
            .collect();
        let probes = others.iter().map(|&(n, _)| {
            let req = ReleaseRequest {
                epoch: ep.view.epoch,
                from: self.me,
                lines: Vec::new(),
            };
            async move { self.peers.release(n, req, self.limits.lease / 2).await }
        });
        let results = futures::future::join_all(probes).await;
        for ((n, inc), r) in others.into_iter().zip(results) {
            match r {
                Err(s) if unreachable(&s) => {
                    let _ = self.peer_result::<()>((n, inc), Err(s));
                }
                // Any answer, a refusal included, shows the node is alive.
                _ => {
                    self.suspects.lock().remove(&n);
                }
            }
        }
    }

    // ------------------------------------------------------------ stats

    pub fn entries(&self) -> u64 {
        self.lines.entry_count()
    }

    pub fn size_bytes(&self) -> u64 {
        self.lines.weighted_size()
    }

    pub fn directory_entries(&self) -> usize {
        self.dir.lock().len()
    }

    /// Runs moka's pending maintenance (evictions, expiry notifications).
    pub fn run_pending(&self) {
        self.lines.run_pending_tasks();
    }
}

/// Tells homes about lines that left this node's cache: first the near
/// caches that registered them are invalidated (the home still lists this
/// node meanwhile, so writes keep reaching them), then the home drops this
/// node from its directory.
async fn release_loop(node: std::sync::Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Evicted>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 512).await > 0 {
        let Some(inner) = node.upgrade() else { return };
        let node = CacheNode(inner);
        let ep = node.epoch();
        let mut by_home: HashMap<u64, Vec<Released>> = HashMap::new();
        let mut tracked = Vec::new();
        for Evicted { key, line } in batch.drain(..) {
            // A line of an older home: that home's directory is gone.
            if ep.view.home(&key) != Some(line.home) {
                continue;
            }
            if node.watchers.tracks(&key) {
                tracked.push(key.clone());
            }
            by_home.entry(line.home.0).or_default().push(Released {
                key: key.to_vec(),
                grant: line.grant,
            });
        }
        // Run to the end (see Watchers::invalidate); a forgotten near cache's
        // lease runs out before the home stops listing this node.
        let w = node.clone();
        let _ = tokio::spawn(async move {
            let waits =
                futures::future::join_all(tracked.iter().map(|k| w.watchers.invalidate(k))).await;
            if let Some(until) = waits.into_iter().filter_map(|(_, u)| u).max() {
                tokio::time::sleep_until(until.into()).await;
            }
        })
        .await;
        for (home, lines) in by_home {
            let req = ReleaseRequest {
                epoch: ep.view.epoch,
                from: node.me,
                lines,
            };
            let res = if home == node.me {
                node.on_release(req).await
            } else {
                node.peers
                    .release(home, req, node.limits.peer_timeout)
                    .await
            };
            // An undelivered release leaves this node listed: harmless (a
            // later recall finds nothing), so it is not retried.
            if let Err(s) = res {
                tracing::debug!(home, error = %s.message(), "release not delivered");
            }
        }
    }
}

/// Lines this node holds, by state (Shared, Exclusive, Modified), counted
/// one by one (tests; `Stats::lines` is the cheap running count).
pub fn count_states(node: &CacheNode) -> [u64; 3] {
    let mut counts = [0u64; 3];
    for (_, l) in node.lines.iter() {
        counts[state_slot(l.state)] += 1;
    }
    counts
}
