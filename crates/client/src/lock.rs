//! The lock service client: sessions kept alive in the background, lock
//! guards that carry their fencing token and release on drop.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tonic::Status> {
//! use dsync_client::{LockClient, LockMode};
//! use std::time::Duration;
//! let client = LockClient::connect(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])?;
//! let session = client.open_session(Duration::from_secs(10), "billing-worker").await?;
//! let guard = session.acquire("invoice/42", LockMode::Exclusive, None).await?;
//! // Pass guard.fencing_token() to the storage you protect.
//! guard.release().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use proto::lock::v1::lock_service_client::LockServiceClient;
use proto::lock::v1::*;
use tonic::{Code, Request, Status};

use crate::{Conn, Options};

/// Client of a lock-svc replica set.
#[derive(Clone)]
pub struct LockClient {
    conn: Conn,
}

fn req<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

impl LockClient {
    /// A client with the default [`Options`], watching the leader
    /// ([`Options::watch_leader`]): every lock call is safe to repeat.
    pub fn connect(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Result<Self, Status> {
        let opts = Options {
            watch_leader: true,
            ..Options::default()
        };
        Self::with_options(endpoints, opts)
    }

    pub fn with_options(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        opts: Options,
    ) -> Result<Self, Status> {
        Ok(Self {
            conn: Conn::new(endpoints, opts)?,
        })
    }

    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    fn timeout(&self) -> Duration {
        self.conn.options().request_timeout
    }

    /// Opens a session and keeps it alive every `ttl / 3` until it is
    /// closed or dropped.
    pub async fn open_session(&self, ttl: Duration, name: &str) -> Result<Session, Status> {
        let r = self.open_session_unmanaged(ttl, name).await?;
        Ok(Session::start(
            self.clone(),
            r.session_id,
            Duration::from_millis(r.ttl_ms),
        ))
    }

    /// Opens a session that nothing keeps alive: the caller sends
    /// keep-alives (or lets it expire).
    pub async fn open_session_unmanaged(
        &self,
        ttl: Duration,
        name: &str,
    ) -> Result<OpenSessionResponse, Status> {
        let t = self.timeout();
        // One id for every attempt: a retry answers the session opened.
        let request_id = rand::random::<u64>() | 1;
        Ok(self
            .conn
            .call(|ch| {
                let msg = OpenSessionRequest {
                    ttl_ms: ttl.as_millis() as u64,
                    client_name: name.to_owned(),
                    request_id,
                };
                async move { LockServiceClient::new(ch).open_session(req(msg, t)).await }
            })
            .await?
            .into_inner())
    }

    /// Attaches to an existing session without keeping it alive.
    pub fn session(&self, id: u64) -> Session {
        Session {
            client: self.clone(),
            id,
            ttl: Duration::ZERO,
            lost: Arc::new(AtomicBool::new(false)),
            keepalive: None,
            close_on_drop: false,
        }
    }

    pub async fn keep_alive(&self, session_id: u64) -> Result<KeepAliveResponse, Status> {
        let t = self.timeout();
        Ok(self
            .conn
            .call(|ch| async move {
                LockServiceClient::new(ch)
                    .keep_alive(req(
                        KeepAliveRequest {
                            session_id,
                            ..Default::default()
                        },
                        t,
                    ))
                    .await
            })
            .await?
            .into_inner())
    }

    /// Renews many sessions in one call; each answers in `results`, in
    /// order (a session that is gone answers its reason, not an error).
    pub async fn keep_alive_many(&self, session_ids: &[u64]) -> Result<KeepAliveResponse, Status> {
        let t = self.timeout();
        let msg = KeepAliveRequest {
            session_id: 0,
            session_ids: session_ids.to_vec(),
        };
        Ok(self
            .conn
            .call(|ch| {
                let msg = msg.clone();
                async move { LockServiceClient::new(ch).keep_alive(req(msg, t)).await }
            })
            .await?
            .into_inner())
    }

    /// Closes a session. A retry after an attempt that may have closed it
    /// (see [`crate::maybe_repeated`]) that finds it gone answers Ok with
    /// zero counts: what the first attempt released is not known.
    pub async fn close_session(&self, session_id: u64) -> Result<CloseSessionResponse, Status> {
        let t = self.timeout();
        let closed = self
            .conn
            .call(|ch| async move {
                LockServiceClient::new(ch)
                    .close_session(req(CloseSessionRequest { session_id }, t))
                    .await
            })
            .await;
        match closed {
            Ok(r) => Ok(r.into_inner()),
            Err(e)
                if crate::maybe_repeated(&e)
                    && proto::status::reason(&e) == "SESSION_NOT_FOUND" =>
            {
                Ok(CloseSessionResponse::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Acquires with a wait (`None` = the server default of 30 s, zero =
    /// try-lock). Retries across leader changes are idempotent: each call
    /// carries a random request id the server deduplicates on.
    pub async fn acquire(
        &self,
        session_id: u64,
        resource: &str,
        mode: LockMode,
        wait: Option<Duration>,
    ) -> Result<AcquireResponse, Status> {
        let request_id = rand::random::<u64>() | 1;
        let wait_ms = wait.map(|w| w.as_millis() as u64);
        let t = Duration::from_millis(wait_ms.unwrap_or(30_000)) + self.timeout();
        Ok(self
            .conn
            .call(|ch| {
                let msg = AcquireRequest {
                    session_id,
                    resource: resource.to_owned(),
                    mode: mode as i32,
                    wait_timeout_ms: wait_ms,
                    request_id,
                };
                async move { LockServiceClient::new(ch).acquire(req(msg, t)).await }
            })
            .await?
            .into_inner())
    }

    pub async fn release(
        &self,
        session_id: u64,
        lock_id: u64,
        resource: &str,
    ) -> Result<(), Status> {
        let t = self.timeout();
        let released = self
            .conn
            .call(|ch| {
                let msg = ReleaseRequest {
                    session_id,
                    lock_id,
                    resource: resource.to_owned(),
                };
                async move { LockServiceClient::new(ch).release(req(msg, t)).await }
            })
            .await;
        match released {
            // A retry after an attempt that may have released it.
            Err(e)
                if crate::maybe_repeated(&e) && proto::status::reason(&e) == "LOCK_NOT_FOUND" =>
            {
                Ok(())
            }
            r => r.map(drop),
        }
    }

    pub async fn status(&self, resource: &str) -> Result<GetStatusResponse, Status> {
        let t = self.timeout();
        Ok(self
            .conn
            .call(|ch| {
                let msg = GetStatusRequest {
                    resource: resource.to_owned(),
                };
                async move { LockServiceClient::new(ch).get_status(req(msg, t)).await }
            })
            .await?
            .into_inner())
    }

    pub async fn list_locks(
        &self,
        page_size: u32,
        page_token: &str,
        session_id: u64,
    ) -> Result<ListLocksResponse, Status> {
        let t = self.timeout();
        Ok(self
            .conn
            .call(|ch| {
                let msg = ListLocksRequest {
                    page_size,
                    page_token: page_token.to_owned(),
                    session_id,
                };
                async move { LockServiceClient::new(ch).list_locks(req(msg, t)).await }
            })
            .await?
            .into_inner())
    }

    pub async fn list_sessions(&self) -> Result<ListSessionsResponse, Status> {
        let t = self.timeout();
        Ok(self
            .conn
            .call(|ch| async move {
                LockServiceClient::new(ch)
                    .list_sessions(req(ListSessionsRequest {}, t))
                    .await
            })
            .await?
            .into_inner())
    }

    pub async fn upgrade(
        &self,
        session_id: u64,
        lock_id: u64,
        wait: Option<Duration>,
    ) -> Result<u64, Status> {
        let wait_ms = wait.map(|w| w.as_millis() as u64);
        let t = Duration::from_millis(wait_ms.unwrap_or(30_000)) + self.timeout();
        Ok(self
            .conn
            .call(|ch| {
                let msg = UpgradeRequest {
                    session_id,
                    lock_id,
                    wait_timeout_ms: wait_ms,
                };
                async move { LockServiceClient::new(ch).upgrade(req(msg, t)).await }
            })
            .await?
            .into_inner()
            .fencing_token)
    }

    pub async fn downgrade(&self, session_id: u64, lock_id: u64) -> Result<u64, Status> {
        let t = self.timeout();
        Ok(self
            .conn
            .call(|ch| async move {
                LockServiceClient::new(ch)
                    .downgrade(req(
                        DowngradeRequest {
                            session_id,
                            lock_id,
                        },
                        t,
                    ))
                    .await
            })
            .await?
            .into_inner()
            .fencing_token)
    }
}

/// A lock-service session. Kept alive in the background; closed (locks
/// released) when dropped, unless it was attached with
/// [`LockClient::session`].
pub struct Session {
    client: LockClient,
    id: u64,
    ttl: Duration,
    lost: Arc<AtomicBool>,
    keepalive: Option<tokio::task::JoinHandle<()>>,
    close_on_drop: bool,
}

impl Session {
    fn start(client: LockClient, id: u64, ttl: Duration) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let (c, l) = (client.clone(), lost.clone());
        let keepalive = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match c.keep_alive(id).await {
                    Ok(_) => {}
                    Err(e) if matches!(e.code(), Code::NotFound | Code::FailedPrecondition) => {
                        tracing::warn!(session = id, error = %e, "session lost");
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(session = id, error = %e, "keep-alive failed; retrying")
                    }
                }
            }
        });
        Self {
            client,
            id,
            ttl,
            lost,
            keepalive: Some(keepalive),
            close_on_drop: true,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// True once the service said the session expired: its locks are gone.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub fn client(&self) -> &LockClient {
        &self.client
    }

    /// Acquires `resource`; see [`LockClient::acquire`].
    pub async fn acquire(
        &self,
        resource: &str,
        mode: LockMode,
        wait: Option<Duration>,
    ) -> Result<LockGuard, Status> {
        let r = match self.client.acquire(self.id, resource, mode, wait).await {
            Ok(r) => r,
            Err(e) => {
                // The server withdraws the wait or grant of every call whose
                // answer it did not send. Only a connection that broke with
                // the answer in flight leaves a grant this client never saw;
                // a release by resource frees it.
                if crate::replica_failed(&e) && proto::status::error_info(&e).is_none() {
                    let (c, id, res) = (self.client.clone(), self.id, resource.to_owned());
                    tokio::spawn(async move {
                        let _ = c.release(id, 0, &res).await;
                    });
                }
                return Err(e);
            }
        };
        Ok(LockGuard {
            client: self.client.clone(),
            session_id: self.id,
            lock_id: r.lock_id,
            token: r.fencing_token,
            mode: LockMode::try_from(r.mode).unwrap_or(mode),
            resource: resource.to_owned(),
            released: false,
        })
    }

    /// Stops the keep-alive and closes the session (releasing its locks).
    pub async fn close(mut self) -> Result<CloseSessionResponse, Status> {
        self.close_on_drop = false;
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
        self.client.close_session(self.id).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
        if self.close_on_drop {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (c, id) = (self.client.clone(), self.id);
                rt.spawn(async move {
                    let _ = c.close_session(id).await;
                });
            }
        }
    }
}

/// A held lock. Released on [`LockGuard::release`] or, in the background,
/// on drop.
pub struct LockGuard {
    client: LockClient,
    session_id: u64,
    lock_id: u64,
    token: u64,
    mode: LockMode,
    resource: String,
    released: bool,
}

impl LockGuard {
    pub fn fencing_token(&self) -> u64 {
        self.token
    }
    pub fn lock_id(&self) -> u64 {
        self.lock_id
    }
    pub fn mode(&self) -> LockMode {
        self.mode
    }
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Upgrades an upgradeable lock to exclusive; the token changes.
    pub async fn upgrade(&mut self, wait: Option<Duration>) -> Result<u64, Status> {
        self.token = self
            .client
            .upgrade(self.session_id, self.lock_id, wait)
            .await?;
        self.mode = LockMode::Exclusive;
        Ok(self.token)
    }

    /// Downgrades to shared.
    pub async fn downgrade(&mut self) -> Result<u64, Status> {
        self.token = self.client.downgrade(self.session_id, self.lock_id).await?;
        self.mode = LockMode::Shared;
        Ok(self.token)
    }

    pub async fn release(mut self) -> Result<(), Status> {
        self.released = true;
        self.client.release(self.session_id, self.lock_id, "").await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (c, s, l) = (self.client.clone(), self.session_id, self.lock_id);
            rt.spawn(async move {
                let _ = c.release(s, l, "").await;
            });
        }
    }
}

type Answer = session_response::Result;
type Op = session_request::Op;
type Reply = oneshot::Sender<Result<Answer, Status>>;

/// One session's acquires and releases on one bidirectional stream to the
/// leader ([`LockClient::stream`]): no call per operation, and the stream
/// keeps the session alive (a ping every TTL / 3). Operations may run
/// concurrently; each is answered by its own sequence number.
///
/// When the stream breaks (a leader change, the leader down, hung or cut
/// off — noticed from the leader watch as calls are), it is opened again on
/// the new leader and every operation still unanswered is sent again: an
/// acquire with its own request id (the leader takes over the grant or wait
/// it already has: a former leader abandons a broken stream's calls only
/// after a grace), a release by lock id taking LOCK_NOT_FOUND as done. An
/// operation the replica refuses without deciding it (no leader for a
/// moment) is sent again after a pause. Operations fail when that lasts
/// past the client's `retry_for`, or on an error that is the service's
/// answer; when the session is gone, every later operation fails so too.
/// An acquire whose caller stopped waiting is released when its grant
/// arrives. Dropping the stream withdraws its waits; grants nobody read
/// stay with the session.
pub struct SessionStream {
    session: u64,
    shared: Arc<parking_lot::Mutex<Shared>>,
    driver: tokio::task::JoinHandle<()>,
}

/// What a [`SessionStream`]'s callers and its driver task share: an
/// operation is owed and sent on the current stream under one lock, so a
/// re-attach either sees it owed (and sends it again) or comes first.
struct Shared {
    /// Unanswered operations by seq (sent in seq order on a new stream).
    owed: BTreeMap<u64, Owed>,
    next: u64,
    /// The current stream's sender, and how many streams came before it.
    tx: mpsc::UnboundedSender<SessionRequest>,
    generation: u64,
    /// Why the stream ended for good, once it has.
    ended: Option<Status>,
}

impl Shared {
    /// Swaps the current stream's sender for a dead one: nothing more goes
    /// out on that stream (and its request side closes once the driver
    /// lets go of it too).
    fn detach(&mut self) {
        self.tx = mpsc::unbounded_channel().0;
    }

    /// Owes `op` and sends it on the current stream.
    fn send(&mut self, op: Op, reply: Reply) -> u64 {
        let seq = self.next;
        self.next += 1;
        // A stream already gone shows in the driver, which sends it again.
        let _ = self.tx.send(SessionRequest {
            seq,
            op: Some(op.clone()),
        });
        self.owed.insert(
            seq,
            Owed {
                op,
                reply,
                repeated: false,
                since: Instant::now(),
                backoff: Duration::from_millis(20),
            },
        );
        seq
    }
}

/// An operation the stream owes an answer for: kept until answered, and
/// sent again on the next stream if this one breaks first.
struct Owed {
    op: Op,
    reply: Reply,
    /// Sent where it may have applied without its answer reaching us (a
    /// stream that broke, an outcome the replica could not tell).
    repeated: bool,
    /// When it was first sent: it is retried for the client's `retry_for`.
    since: Instant,
    /// Pause before it is sent again after a refusal (backs off).
    backoff: Duration,
}

impl Owed {
    /// Answers the caller with `err` (marked maybe-repeated if it is).
    fn fail(self, err: Status) {
        let err = if self.repeated {
            crate::mark_maybe_repeated(err)
        } else {
            err
        };
        let _ = self.reply.send(Err(err));
    }
}

/// A session stream attached on one replica.
struct Link {
    addr: String,
    /// Unbounded: nobody waits to send (the driver must keep reading
    /// answers, or a full stream both ways would stall); the operations
    /// in flight are the callers' own.
    tx: mpsc::UnboundedSender<SessionRequest>,
    inbound: tonic::Streaming<SessionResponse>,
    ttl: Duration,
}

/// Opens a session stream for `session_id` on the leader (following hints
/// and retrying as calls do) and attaches it.
async fn attach(conn: &Conn, session_id: u64) -> Result<Link, Status> {
    conn.call_on(|ch, addr| async move {
        let (tx, rx) = mpsc::unbounded_channel();
        let attach = SessionRequest {
            seq: 0,
            op: Some(Op::Attach(AttachSession { session_id })),
        };
        let _ = tx.send(attach);
        let mut inbound = LockServiceClient::new(ch)
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        match inbound.message().await? {
            Some(SessionResponse {
                result: Some(Answer::AttachedTtlMs(ttl)),
                ..
            }) => Ok(Link {
                addr,
                tx,
                inbound,
                ttl: Duration::from_millis(ttl.max(3)),
            }),
            Some(SessionResponse {
                result: Some(Answer::Error(e)),
                ..
            }) => Err(op_status(e)),
            _ => Err(Status::unavailable(
                "the session stream ended before its attach was answered",
            )),
        }
    })
    .await
}

impl LockClient {
    /// Opens a session stream for `session_id` on the leader (following
    /// hints as calls do).
    pub async fn stream(&self, session_id: u64) -> Result<SessionStream, Status> {
        let moves = self.conn.moves();
        let link = attach(&self.conn, session_id).await?;
        let shared = Arc::new(parking_lot::Mutex::new(Shared {
            owed: BTreeMap::new(),
            next: 1,
            tx: link.tx.clone(),
            generation: 0,
            ended: None,
        }));
        let driver = Driver {
            conn: self.conn.clone(),
            session: session_id,
            shared: shared.clone(),
        };
        Ok(SessionStream {
            session: session_id,
            shared,
            driver: tokio::spawn(driver.run(link, moves)),
        })
    }
}

/// The task behind a [`SessionStream`]: hands out the answers, pings, and
/// re-attaches on the new leader when the stream breaks.
struct Driver {
    conn: Conn,
    session: u64,
    shared: Arc<parking_lot::Mutex<Shared>>,
}

impl Driver {
    async fn run(self, mut link: Link, mut moves: tokio::sync::watch::Receiver<crate::Leader>) {
        let retry_for = self.conn.options().retry_for;
        // Streams that broke before answering anything, back to back: a
        // pause between them, and an end after `retry_for` of them.
        let mut fruitless: Option<(Instant, Duration)> = None;
        let end = loop {
            let (conn, addr) = (self.conn.clone(), link.addr.clone());
            let mut answered = false;
            let served = conn
                .unless_moved(&addr, &mut moves, self.serve(&mut link, &mut answered))
                .await;
            let broke = match served {
                Ok(never) => match never {},
                Err(None) => Status::unavailable("a newer leader was elected"),
                Err(Some(s)) => s,
            };
            if !crate::replica_failed(&broke) {
                break broke;
            }
            tracing::debug!(session = self.session, error = %broke, "session stream broke: re-attaching");
            if answered {
                fruitless = None;
            }
            let (since, pause) = *fruitless.get_or_insert((Instant::now(), Duration::ZERO));
            if since.elapsed() >= retry_for {
                break broke;
            }
            tokio::time::sleep(pause).await;
            let next_pause = (pause * 2).clamp(Duration::from_millis(20), crate::MAX_BACKOFF);
            fruitless = Some((since, next_pause));
            let by_resource = {
                let mut sh = self.shared.lock();
                // Until the next stream is in, operations are only owed:
                // none goes out on this one, and the next sends each once.
                sh.detach();
                for o in sh.owed.values_mut() {
                    o.repeated = true;
                }
                // A release by resource is not sent again: the session may
                // hold the resource anew by now (an acquire on this stream).
                sh.owed
                    .extract_if(.., |_, o| matches!(&o.op, Op::Release(r) if r.lock_id == 0))
                    .map(|(_, o)| o)
                    .collect::<Vec<_>>()
            };
            for o in by_resource {
                o.fail(broke.clone());
            }
            moves = self.conn.moves();
            link = match attach(&self.conn, self.session).await {
                Ok(l) => l,
                Err(e) => break e,
            };
            let mut sh = self.shared.lock();
            sh.tx = link.tx.clone();
            sh.generation += 1;
            for (&seq, o) in &sh.owed {
                let again = SessionRequest {
                    seq,
                    op: Some(o.op.clone()),
                };
                let _ = link.tx.send(again);
            }
        };
        self.end(end);
    }

    /// Ends the stream for good: every owed and later operation fails with
    /// `why`, and the request side closes (the replica's handler ends).
    fn end(&self, why: Status) {
        let owed = {
            let mut sh = self.shared.lock();
            if sh.ended.is_some() {
                return;
            }
            sh.ended = Some(why.clone());
            sh.detach();
            std::mem::take(&mut sh.owed)
        };
        for (_, o) in owed {
            o.fail(why.clone());
        }
    }

    /// Runs the stream `link` until it breaks (its error); `answered`
    /// tells whether any operation was answered on it.
    async fn serve(
        &self,
        link: &mut Link,
        answered: &mut bool,
    ) -> Result<std::convert::Infallible, Status> {
        let mut ping = tokio::time::interval(link.ttl / 3);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = link.inbound.message() => match msg {
                    Ok(Some(r)) => {
                        *answered = true;
                        self.answer(r)?;
                    }
                    Ok(None) => return Err(Status::unavailable("the session stream ended")),
                    Err(s) => return Err(s),
                },
                _ = ping.tick() => {
                    let ping = SessionRequest { seq: 0, op: Some(Op::Ping(Ping {})) };
                    let _ = link.tx.send(ping);
                }
            }
        }
    }

    /// Hands answer `r` to its operation. A refusal that says the replica
    /// did not decide it (no leader for a moment, an outcome it could not
    /// tell) sends it again on this stream after a pause, for the client's
    /// `retry_for`; a replica that is stopping breaks the stream (Err), and
    /// the next one sends it; an answer that the session is gone is the
    /// operation's and ends the stream too.
    fn answer(&self, r: SessionResponse) -> Result<(), Status> {
        let Some(result) = r.result else {
            return Ok(());
        };
        let mut sh = self.shared.lock();
        let Some(mut o) = sh.owed.remove(&r.seq) else {
            // A grant nobody is owed (cannot happen: one send per stream):
            // released rather than left with the session.
            if let Answer::Acquired(a) = result {
                sh.send(
                    release_op(self.session, a.lock_id, ""),
                    oneshot::channel().0,
                );
            }
            return Ok(());
        };
        let result = match result {
            Answer::Error(e) => {
                let status = op_status(e.clone());
                let reason = proto::status::reason(&status);
                if reason == "REPLICA_STOPPING" {
                    sh.owed.insert(r.seq, o);
                    return Err(status);
                }
                let retry_for = self.conn.options().retry_for;
                if crate::replica_failed(&status) && o.since.elapsed() < retry_for {
                    o.repeated |= !crate::certainly_not_applied(&status);
                    self.send_again(r.seq, &mut o, sh.generation);
                    sh.owed.insert(r.seq, o);
                    return Ok(());
                }
                if o.repeated && matches!(o.op, Op::Release(_)) && reason == "LOCK_NOT_FOUND" {
                    // A release sent again finds the lock its first send
                    // released.
                    Answer::Released(ReleaseResponse {})
                } else if matches!(reason.as_str(), "SESSION_NOT_FOUND" | "SESSION_EXPIRED") {
                    drop(sh);
                    o.fail(status.clone());
                    return Err(status);
                } else {
                    Answer::Error(e)
                }
            }
            other => other,
        };
        drop(sh);
        // Nobody waits for this grant any more: release it (owed like any
        // operation, so a broken stream sends it again).
        if let Err(Ok(Answer::Acquired(a))) = o.reply.send(Ok(result)) {
            let op = release_op(self.session, a.lock_id, "");
            self.shared.lock().send(op, oneshot::channel().0);
        }
        Ok(())
    }

    /// Sends owed operation `seq` again after its backoff, on the same
    /// stream (`generation`): a newer stream sends it itself.
    fn send_again(&self, seq: u64, o: &mut Owed, generation: u64) {
        let again = SessionRequest {
            seq,
            op: Some(o.op.clone()),
        };
        let (shared, pause) = (self.shared.clone(), o.backoff);
        o.backoff = (o.backoff * 2).min(crate::MAX_BACKOFF);
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let sh = shared.lock();
            if sh.generation == generation && sh.owed.contains_key(&seq) {
                let _ = sh.tx.send(again);
            }
        });
    }
}

/// A stream Release of `lock_id` (or, with 0, of `resource`).
fn release_op(session_id: u64, lock_id: u64, resource: &str) -> Op {
    Op::Release(ReleaseRequest {
        session_id,
        lock_id,
        resource: resource.to_owned(),
    })
}

/// A session stream's per-operation error as the unary call's status.
fn op_status(e: OpError) -> Status {
    proto::status::error(Code::from(e.code), e.message, &e.reason, e.metadata)
}

impl SessionStream {
    pub fn session_id(&self) -> u64 {
        self.session
    }

    async fn op(&self, op: Op) -> Result<Answer, Status> {
        let (tx, rx) = oneshot::channel();
        {
            let mut sh = self.shared.lock();
            if let Some(e) = &sh.ended {
                return Err(e.clone());
            }
            sh.send(op, tx);
        }
        match rx.await {
            Ok(Ok(Answer::Error(e))) => Err(op_status(e)),
            Ok(r) => r,
            Err(_) => Err(self
                .shared
                .lock()
                .ended
                .clone()
                .unwrap_or_else(|| Status::unavailable("the session stream ended"))),
        }
    }

    /// As [`LockClient::acquire`], on the stream (sent again on the new
    /// leader's stream if this one breaks; if this future is dropped, a
    /// later grant is released).
    pub async fn acquire(
        &self,
        resource: &str,
        mode: LockMode,
        wait: Option<Duration>,
    ) -> Result<AcquireResponse, Status> {
        let op = Op::Acquire(AcquireRequest {
            session_id: self.session,
            resource: resource.to_owned(),
            mode: mode as i32,
            wait_timeout_ms: wait.map(|w| w.as_millis() as u64),
            request_id: rand::random::<u64>() | 1,
        });
        match self.op(op).await? {
            Answer::Acquired(a) => Ok(a),
            _ => Err(Status::internal("unexpected answer to an acquire")),
        }
    }

    /// Releases by lock id (or, with `lock_id` 0, by resource).
    pub async fn release(&self, lock_id: u64, resource: &str) -> Result<(), Status> {
        match self.op(release_op(self.session, lock_id, resource)).await? {
            Answer::Released(_) => Ok(()),
            _ => Err(Status::internal("unexpected answer to a release")),
        }
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        self.driver.abort();
        // Close the request side now (a pending resend holds `Shared`).
        self.shared.lock().detach();
    }
}

impl Drop for Driver {
    /// However the task ends (aborted, or a panic), nobody waits forever.
    fn drop(&mut self) {
        self.end(Status::unavailable("the session stream's task ended"));
    }
}
