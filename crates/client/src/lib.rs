//! The dsync Rust client.
//!
//! [`Conn`] talks to a replica set: it sends each call to the replica it
//! believes leads, follows `UNAVAILABLE` + leader hints to the real leader,
//! and retries with backoff across elections and dead replicas. Service
//! clients ([`lock::LockClient`]) are built on it.

pub mod cache;
pub mod lock;
pub mod queue;
pub mod routing;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use cache::CacheClient;
pub use lock::{LockClient, LockGuard, Session, SessionStream};
pub use proto::lock::v1::LockMode;
pub use queue::QueueClient;

/// True when `err` says the replica did not handle the call (down,
/// unreachable, not the leader, connection lost mid-call, or this client's
/// own timeout) rather than the service deciding it. Such a call may or may
/// not have taken effect; the service APIs make retrying it safe.
pub fn replica_failed(err: &Status) -> bool {
    match err.code() {
        Code::Unavailable => true,
        // The server noticed this client's per-attempt deadline first.
        Code::DeadlineExceeded => proto::status::reason(err) == "CLIENT_DEADLINE",
        // tonic reports its client-side timeout as CANCELLED, and so a
        // stream whose connection closed (the status then carries the
        // transport's error: no replica sends one) …
        Code::Cancelled => {
            err.message().contains("Timeout expired") || std::error::Error::source(err).is_some()
        }
        // … and a connection that breaks mid-call as UNKNOWN.
        Code::Unknown => {
            err.message().contains("transport error") || err.message().contains("connection")
        }
        _ => false,
    }
}

/// Metadata a [`Conn::call`] error carries when an earlier attempt of the
/// call may have taken effect (it reached a replica and was moved, broke
/// mid-call, timed out, or its outcome is unknown — not one refused or
/// never connected): a Release answering LOCK_NOT_FOUND then most likely
/// found the lock its first attempt released.
const MAYBE_REPEATED: &str = "dsync-maybe-repeated";

/// True when `err` ended a call one of whose earlier attempts may have
/// taken effect (see [`Conn::call`]).
pub fn maybe_repeated(err: &Status) -> bool {
    err.metadata().contains_key(MAYBE_REPEATED)
}

/// `err`, saying that an earlier attempt of its call may have taken
/// effect (see [`maybe_repeated`]).
pub(crate) fn mark_maybe_repeated(mut err: Status) -> Status {
    err.metadata_mut().insert(
        MAYBE_REPEATED,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    err
}

/// True when a failed attempt certainly took no effect: refused before it
/// was proposed (a leader hint: not the leader, no leader; not applied;
/// overloaded; a session still expiring), or never connected.
pub(crate) fn certainly_not_applied(err: &Status) -> bool {
    let refused = matches!(
        proto::status::reason(err).as_str(),
        "NOT_LEADER" | "NO_LEADER" | "NOT_APPLIED" | "OVERLOADED" | "SESSION_EXPIRING"
    );
    let m = err.message();
    let unconnected = m.contains("tcp connect error")
        || m.contains("error trying to connect")
        || m.contains("Connection refused");
    refused || unconnected || proto::leader_hint(err).is_some()
}

/// The longest pause between retries of a call. Elections take 150–300
/// ms: a client polling at most this far apart finds the new leader
/// within this much of its election (a replica answers NO_LEADER at once,
/// so the polling costs little).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// How a [`Conn`] retries.
#[derive(Debug, Clone)]
pub struct Options {
    pub connect_timeout: Duration,
    /// Give up on a call after retrying this long (elections take ~0.3 s).
    pub retry_for: Duration,
    /// Per-attempt timeout of calls that do not wait for a lock.
    pub request_timeout: Duration,
    /// Keep an admin `WatchLeader` stream open to every replica, and move a
    /// call in flight to a newly elected leader the moment any replica
    /// reports one (rather than when the call's own connection to a dead or
    /// cut-off leader times out). For services with one Raft group
    /// (lock-svc: [`LockClient::connect`] turns it on); every call made
    /// through [`Conn::call`] must then be safe to repeat.
    pub watch_leader: bool,
    /// How long the replica a call is on gets to report, on its own watch,
    /// a newer leader's term before the call moves ([`MOVE_GRACE`]).
    pub move_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            retry_for: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            watch_leader: false,
            move_grace: MOVE_GRACE,
        }
    }
}

/// A leader-following connection to one dsync replica set.
#[derive(Clone)]
pub struct Conn {
    inner: Arc<Inner>,
}

/// How long the replica a call is on gets to show, on its own watch, that
/// it follows a newer leader reported elsewhere before the call moves: a
/// live former leader (a leadership transfer) still applies the log and
/// answers its calls, so only a dead or cut-off one loses them.
pub const MOVE_GRACE: Duration = Duration::from_millis(100);

/// The newest leader the watches reported.
#[derive(Debug, Clone, Default)]
struct Leader {
    term: u64,
    id: u64,
    /// Where this client calls it.
    addr: String,
}

struct Inner {
    opts: Options,
    state: Mutex<State>,
    moved: tokio::sync::watch::Sender<Leader>,
    /// Dropped with the last clone of the `Conn`: ends its watches.
    alive: tokio::sync::watch::Sender<()>,
}

struct State {
    endpoints: Vec<String>,
    leader: Option<String>,
    next: usize,
    channels: HashMap<String, Channel>,
    /// The leader watch of each endpoint.
    watched: HashMap<String, tokio::task::JoinHandle<()>>,
    /// Node id → the endpoint this client reaches it at, as the watches
    /// learned them (a leader is called where this client dialed it, not
    /// at the address the replicas know it by).
    nodes: HashMap<u64, String>,
    /// The newest term each endpoint's watch reported (with a leader or
    /// not): a replica in touch with the others knows the current one.
    terms: HashMap<String, u64>,
}

impl Conn {
    /// Connects lazily to `endpoints` (host:port, any replica of the set).
    pub fn new(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        opts: Options,
    ) -> Result<Self, Status> {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() {
            return Err(Status::invalid_argument("no endpoints given"));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                opts,
                state: Mutex::new(State {
                    endpoints,
                    leader: None,
                    next: 0,
                    channels: HashMap::new(),
                    watched: HashMap::new(),
                    nodes: HashMap::new(),
                    terms: HashMap::new(),
                }),
                moved: tokio::sync::watch::channel(Leader::default()).0,
                alive: tokio::sync::watch::channel(()).0,
            }),
        })
    }

    pub fn options(&self) -> &Options {
        &self.inner.opts
    }

    /// The replica calls currently go to.
    pub fn current(&self) -> String {
        let s = self.inner.state.lock();
        s.leader
            .clone()
            .unwrap_or_else(|| s.endpoints[s.next % s.endpoints.len()].clone())
    }

    /// The cached channel to `addr`, or a new one to the address it
    /// resolves to now. Resolution is bounded: a stopped container's or
    /// pod's name can take the system resolver many seconds to give up on,
    /// which would stall every call routed there.
    async fn channel(&self, addr: &str) -> Result<Channel, Status> {
        if let Some(c) = self.inner.state.lock().channels.get(addr) {
            return Ok(c.clone());
        }
        // A replica cut off by a partition drops packets silently; HTTP/2
        // pings notice within ~0.75 s and fail its in-flight calls as
        // UNAVAILABLE, which `call` retries on another replica.
        let ch = self
            .dial(addr, Duration::from_millis(250), Duration::from_millis(500))
            .await?;
        self.inner
            .state
            .lock()
            .channels
            .insert(addr.to_owned(), ch.clone());
        Ok(ch)
    }

    /// A new channel to the address `addr` resolves to now, pinging the
    /// replica every `ping` and giving up on it `timeout` after a ping
    /// went unanswered — while a call or stream is open on it: an idle
    /// client costs the replicas nothing (a dead idle connection shows on
    /// the next call, whose pings then notice it).
    async fn dial(&self, addr: &str, ping: Duration, timeout: Duration) -> Result<Channel, Status> {
        let hostport = addr.trim_start_matches("http://");
        let ip = match hostport.parse::<std::net::SocketAddr>() {
            Ok(sa) => sa,
            Err(_) => tokio::time::timeout(
                self.inner.opts.connect_timeout * 2,
                tokio::net::lookup_host(hostport),
            )
            .await
            .map_err(|_| Status::unavailable(format!("resolving {hostport} timed out")))?
            .map_err(|e| Status::unavailable(format!("cannot resolve {hostport}: {e}")))?
            .next()
            .ok_or_else(|| Status::unavailable(format!("{hostport} resolves to no address")))?,
        };
        let ch = Endpoint::from_shared(format!("http://{ip}"))
            .map_err(|e| Status::invalid_argument(format!("bad endpoint {addr}: {e}")))?
            .connect_timeout(self.inner.opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(ping)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(false)
            .connect_lazy();
        Ok(ch)
    }

    fn follow(&self, addr: &str, hint: Option<String>) {
        let mut s = self.inner.state.lock();
        match hint {
            Some(h) => {
                if !s.endpoints.contains(&h) {
                    s.endpoints.push(h.clone());
                }
                s.leader = Some(h);
                drop(s);
                self.watch();
            }
            None => {
                // Re-resolve next time: a restarted replica may have moved.
                s.channels.remove(addr);
                if s.leader.as_deref() == Some(addr) {
                    s.leader = None;
                }
                if s.endpoints
                    .get(s.next % s.endpoints.len())
                    .map(String::as_str)
                    == Some(addr)
                {
                    s.next += 1;
                }
            }
        }
    }

    /// Runs `f` against the leader, following hints and retrying
    /// UNAVAILABLE (no leader, not the leader, replica down or unreachable)
    /// and this client's own per-attempt timeout (the replica did not
    /// answer) on other replicas until `retry_for` passes. Other errors are
    /// returned as they are.
    ///
    /// Retried calls must be safe to repeat: the lock client makes
    /// `Acquire` idempotent with a request id.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_on(|ch, _| f(ch)).await
    }

    /// [`call`](Self::call), telling `f` also the endpoint it runs against
    /// (for a caller that keeps a stream open there).
    pub(crate) async fn call_on<T, F, Fut>(&self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel, String) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.watch();
        let deadline = Instant::now() + self.inner.opts.retry_for;
        let mut backoff = Duration::from_millis(20);
        // An earlier attempt may have taken effect.
        let mut repeated = false;
        let fail = |err: Status, repeated: bool| {
            Err(if repeated {
                mark_maybe_repeated(err)
            } else {
                err
            })
        };
        loop {
            // Subscribed before choosing the replica: a report that comes
            // while the channel is set up still moves the attempt.
            let mut moved = self.inner.moved.subscribe();
            let term_then = moved.borrow().term;
            let addr = self.current();
            // Setting up the channel counts as part of the attempt: a dead
            // replica's name can take a while to fail to resolve. Only
            // what follows it can have reached the replica.
            let sent = std::sync::atomic::AtomicBool::new(false);
            let attempt = async {
                let ch = self.channel(&addr).await?;
                sent.store(true, std::sync::atomic::Ordering::Relaxed);
                f(ch, addr.clone()).await
            };
            let attempt = self.unless_moved(&addr, &mut moved, attempt).await;
            let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
            let err = match attempt {
                Ok(v) => {
                    // Not over a newer leader reported meanwhile (a former
                    // leader that answered after a transfer).
                    let settled = {
                        let now = self.inner.moved.borrow();
                        now.term == term_then || now.addr == addr
                    };
                    if settled {
                        self.inner.state.lock().leader = Some(addr);
                    }
                    return Ok(v);
                }
                // Moves are bounded by elections: always retried, whatever
                // the deadline (a wait may be older than `retry_for`).
                Err(None) => {
                    repeated |= sent;
                    continue;
                }
                Err(Some(e)) => e,
            };
            if !replica_failed(&err) || Instant::now() >= deadline {
                return fail(err, repeated);
            }
            repeated |= sent && !certainly_not_applied(&err);
            // A hint older than the leader the watches reported names a
            // deposed leader (a lagging replica's view).
            let newest = self.inner.moved.borrow().term;
            let hint = proto::leader_hint(&err)
                .filter(|h| !h.leader_addr.is_empty() && h.leader_addr != addr)
                .filter(|h| h.term == 0 || h.term >= newest)
                .map(|h| h.leader_addr);
            let followed = hint.is_some();
            self.follow(&addr, hint);
            if !followed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// `attempt` on `addr`, abandoned (`Err(None)`) when the watches report
    /// a newer leader elsewhere and `addr` does not show within
    /// [`Options::move_grace`] that it follows it too (it is dead, hung or cut off):
    /// the caller retries at the new leader at once.
    pub(crate) async fn unless_moved<T>(
        &self,
        addr: &str,
        moved: &mut tokio::sync::watch::Receiver<Leader>,
        attempt: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Option<Status>> {
        if !self.inner.opts.watch_leader {
            return attempt.await.map_err(Some);
        }
        let elsewhere = async {
            while moved.changed().await.is_ok() {
                let newer = moved.borrow_and_update().clone();
                if newer.addr == addr {
                    continue;
                }
                tokio::time::sleep(self.inner.opts.move_grace).await;
                // A replica whose watch never reported (not connected yet,
                // or an alias of the leader) is left to the call's own
                // failure: only one that went quiet is taken for gone.
                let seen = self.inner.state.lock().terms.get(addr).copied();
                if seen.is_some_and(|t| t < newer.term) {
                    return;
                }
            }
            std::future::pending().await
        };
        tokio::select! {
            r = attempt => r.map_err(Some),
            _ = elsewhere => {
                tracing::debug!(from = addr, "a newer leader was elected: call moved");
                Err(None)
            }
        }
    }

    /// The leader the watches reported last; a receiver taken before a
    /// call is made and handed to [`unless_moved`](Self::unless_moved)
    /// while it runs.
    pub(crate) fn moves(&self) -> tokio::sync::watch::Receiver<Leader> {
        self.inner.moved.subscribe()
    }

    /// Starts a leader watch on every known endpoint without a running one
    /// (when [`Options::watch_leader`] is on and a runtime is at hand).
    fn watch(&self) {
        if !self.inner.opts.watch_leader {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut s = self.inner.state.lock();
        let unwatched: Vec<String> = s
            .endpoints
            .iter()
            .filter(|e| s.watched.get(*e).is_none_or(|h| h.is_finished()))
            .cloned()
            .collect();
        for e in unwatched {
            let task = rt.spawn(watch_leader(
                Arc::downgrade(&self.inner),
                self.inner.alive.subscribe(),
                e.clone(),
            ));
            s.watched.insert(e, task);
        }
    }

    /// What the watch on `endpoint` (node `node`) reported: a leader of a
    /// newer term than any reported becomes where calls go, and calls in
    /// flight elsewhere are told ([`Conn::unless_moved`]).
    fn learn(&self, endpoint: &str, node: u64, hint: proto::common::v1::LeaderHint) {
        let mut s = self.inner.state.lock();
        if node != 0 {
            s.nodes.insert(node, endpoint.to_owned());
        }
        let seen = s.terms.entry(endpoint.to_owned()).or_default();
        *seen = (*seen).max(hint.term);
        if hint.leader_id == 0 {
            return;
        }
        let dialed = s.nodes.get(&hint.leader_id).cloned();
        let Some(addr) = dialed
            .clone()
            .or_else(|| Some(hint.leader_addr.clone()).filter(|a| !a.is_empty()))
        else {
            return;
        };
        // Compared and set under the state lock: two watches never publish
        // out of order.
        let mut newer = false;
        self.inner.moved.send_if_modified(|m| {
            if hint.term > m.term {
                *m = Leader {
                    term: hint.term,
                    id: hint.leader_id,
                    addr: addr.clone(),
                };
                newer = true;
                return true;
            }
            if hint.term == m.term && hint.leader_id == m.id && dialed.is_some() && m.addr != addr {
                // The same leader, now known at the endpoint this client
                // dialed: calls go there from now on; nothing moves.
                let old = std::mem::replace(&mut m.addr, addr.clone());
                if s.leader.as_deref() == Some(old.as_str()) {
                    s.leader = Some(addr.clone());
                }
            }
            false
        });
        if !newer {
            return;
        }
        if !s.endpoints.contains(&addr) {
            s.endpoints.push(addr.clone());
        }
        s.leader = Some(addr);
        drop(s);
        self.watch();
    }

    /// Like [`Conn::call`], but for one of many groups with leaders of
    /// their own (a queue partition): `route` holds where that group's
    /// calls go, and is updated by its leader hints. Without a route the
    /// call goes where [`Conn::call`] would.
    pub async fn call_via<T, F, Fut>(
        &self,
        route: &Mutex<Option<String>>,
        mut f: F,
    ) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.inner.opts.retry_for;
        let mut backoff = Duration::from_millis(20);
        loop {
            let addr = route.lock().clone().unwrap_or_else(|| self.current());
            let attempt = match self.channel(&addr).await {
                Ok(ch) => f(ch).await,
                Err(e) => Err(e),
            };
            let err = match attempt {
                Ok(v) => {
                    *route.lock() = Some(addr);
                    return Ok(v);
                }
                Err(e) => e,
            };
            if !replica_failed(&err) || Instant::now() >= deadline {
                return Err(err);
            }
            let hint = proto::leader_hint(&err)
                .filter(|h| !h.leader_addr.is_empty() && h.leader_addr != addr)
                .map(|h| h.leader_addr);
            match hint {
                Some(h) => *route.lock() = Some(h),
                None => {
                    *route.lock() = None;
                    // Move the shared rotation on, off this replica.
                    self.follow(&addr, None);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Every endpoint known (given, or learned from hints).
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.state.lock().endpoints.clone()
    }
}

/// Keeps an admin `WatchLeader` stream open to `endpoint` while the `Conn`
/// lives, reporting what it says to [`Conn::learn`]; reopens it after a
/// failure (a replica down, restarting, or of a build without it), backing
/// off from 200 ms to 5 s while it keeps failing.
async fn watch_leader(
    inner: Weak<Inner>,
    mut alive: tokio::sync::watch::Receiver<()>,
    endpoint: String,
) {
    const FIRST: Duration = Duration::from_millis(200);
    let mut pause = FIRST;
    loop {
        let mut heard = false;
        let ended = tokio::select! {
            r = follow_leader(&inner, &endpoint, &mut heard) => r,
            _ = alive.changed() => return,
        };
        if heard {
            pause = FIRST;
        }
        let wait = match ended {
            // A build without the watch will not grow one soon.
            Err(e) if e.code() == Code::Unimplemented => Duration::from_secs(30),
            // Each stream dials anew (a restarted replica may have moved).
            Err(_) | Ok(()) => pause,
        };
        pause = (pause * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = alive.changed() => return,
        }
    }
}

/// One `WatchLeader` stream on `endpoint`, until it ends; `heard` is set
/// once it delivered a message. Holds the `Conn` only between messages.
/// The stream has a connection of its own with slow pings: a watch that
/// goes quiet costs nothing (the other replicas' watches report the next
/// leader), so only calls need the fast ones, and a client's idle
/// connections to followers stay nearly silent.
async fn follow_leader(
    inner: &Weak<Inner>,
    endpoint: &str,
    heard: &mut bool,
) -> Result<(), Status> {
    use proto::admin::v1::admin_client::AdminClient;
    let conn = Conn {
        inner: inner.upgrade().ok_or_else(|| Status::cancelled("closed"))?,
    };
    let slow = Duration::from_secs(5);
    let ch = conn.dial(endpoint, slow, slow).await?;
    drop(conn);
    let req = proto::admin::v1::WatchLeaderRequest { group_id: 0 };
    let mut events = AdminClient::new(ch).watch_leader(req).await?.into_inner();
    while let Some(ev) = events.message().await? {
        *heard = true;
        let Some(inner) = inner.upgrade() else {
            break;
        };
        if let Some(hint) = ev.leader {
            Conn { inner }.learn(endpoint, ev.node_id, hint);
        }
    }
    Ok(())
}
