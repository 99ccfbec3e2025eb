//! The gRPC face of lock-svc: validates requests, turns them into Raft
//! commands, waits for their outcome, and translates outcomes to statuses.
//!
//! Writes are proposed on this replica's Raft group; a follower answers
//! `UNAVAILABLE` with the leader's address (see `consensus::grpc_status`).
//! Reads use `read_index` and then read the local state, so they are
//! linearizable on any replica. Every error carries a `google.rpc.ErrorInfo`
//! whose reason (the table in lock.proto) a client can act on.
//!
//! An `Acquire` or `Upgrade` is a call whose success the client must
//! learn: each draws a random call id, sent with its command, and holds a
//! [`Delivery`] from before it proposes until its answer has been handed
//! whole to the transport. If the handler goes away first — the client
//! cancelled, its deadline or ours passed, the connection dropped — the
//! delivery proposes `Abandon(call)`, which withdraws the wait or releases
//! the grant the call owns (or, if it overtook its command, makes the state
//! machine refuse that command). A lock is thus held only by a call whose
//! answer left the server.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chassis::{attach, Delivery};
use consensus::grpc_status::to_status;
use consensus::GroupHandle;
use parking_lot::RwLock;
use prost::Message;
use proto::lock::v1::internal::{
    self as cmd, command::Cmd, outcome::Result as Res, ErrorCode, Outcome,
};
use proto::lock::v1::lock_service_server::LockService;
use proto::lock::v1::*;
use proto::status::error;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::lessor::{Lessor, Renewal};
use crate::machine::Waits;
use crate::state::{Holder as StateHolder, Limits, LockState, Mode};

/// The Raft group lock-svc runs in.
pub const GROUP: u64 = 1;

/// Leader wall clock for commands, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone)]
pub struct Locks {
    pub group: GroupHandle,
    pub state: Arc<RwLock<LockState>>,
    pub waits: Arc<Waits>,
    pub lessor: Arc<Lessor>,
    pub limits: Limits,
}

/// Most operations of one session stream in flight at once.
pub const MAX_STREAM_OPS: usize = 1024;

/// How long the calls of a broken session stream stay before they are
/// abandoned: a client re-attaching on the new leader sends them again
/// within this (by request id), and takes its waits and grants over
/// instead of queueing anew behind the withdrawal.
pub const STREAM_ABANDON_GRACE: Duration = Duration::from_secs(2);

/// Most sessions one KeepAlive renews.
pub const MAX_KEEPALIVE_SESSIONS: usize = 10_000;

/// The status for a state machine error: its code, message, reason and
/// metadata.
fn outcome_to_status(e: cmd::Error) -> Status {
    let code = match ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified) {
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::Timeout => tonic::Code::DeadlineExceeded,
        ErrorCode::Deadlock | ErrorCode::Aborted => tonic::Code::Aborted,
        ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorCode::Unspecified => tonic::Code::Internal,
    };
    let reason = if e.reason.is_empty() {
        "INTERNAL".to_owned()
    } else {
        e.reason
    };
    error(code, e.message, &reason, e.metadata)
}

fn invalid(field: &str, message: impl Into<String>) -> Status {
    error(
        tonic::Code::InvalidArgument,
        message,
        "INVALID_ARGUMENT",
        [("field", field)],
    )
}

fn internal(message: String) -> Status {
    error(
        tonic::Code::Internal,
        message,
        "INTERNAL",
        std::iter::empty::<(String, String)>(),
    )
}

fn unexpected(what: &str) -> Status {
    internal(format!("unexpected state machine outcome for {what}"))
}

/// Why a proposal failed, and whether its command may have been applied.
struct Failed {
    status: Status,
    maybe_applied: bool,
}

impl Failed {
    /// A failure that certainly changed nothing.
    fn definite(status: Status) -> Self {
        Self {
            status,
            maybe_applied: false,
        }
    }
}

impl From<Failed> for Status {
    fn from(f: Failed) -> Status {
        f.status
    }
}

/// A random, non-zero call id.
fn new_call_id() -> u64 {
    rand::random::<u64>() | 1
}

impl Locks {
    /// Proposes a command and decodes the state machine's outcome.
    pub async fn propose(&self, c: Cmd) -> Result<Res, Status> {
        self.propose_checked(c).await.map_err(Status::from)
    }

    /// [`propose`](Self::propose), telling a command that certainly did not
    /// apply (not the leader, dropped, refused by the state machine) from
    /// one that may have (timed out before commit).
    async fn propose_checked(&self, c: Cmd) -> Result<Res, Failed> {
        self.propose_command(c, None).await
    }

    /// Proposes a command only while this replica leads in `term` (for
    /// decisions made from what it knew in that term).
    pub async fn propose_in_term(&self, c: Cmd, term: u64) -> Result<Res, Status> {
        self.propose_command(c, Some(term))
            .await
            .map_err(Status::from)
    }

    async fn propose_command(&self, c: Cmd, term: Option<u64>) -> Result<Res, Failed> {
        let command = cmd::Command {
            now_ms: now_ms(),
            cmd: Some(c),
        }
        .encode_to_vec();
        let proposed = match term {
            Some(t) => self.group.propose_in_term(command, t).await,
            None => self.group.propose(command).await,
        };
        let bytes = proposed.map_err(|e| Failed {
            status: to_status(&e, GROUP),
            maybe_applied: matches!(e, consensus::Error::Timeout | consensus::Error::Unknown(_)),
        })?;
        let outcome = Outcome::decode(bytes.as_slice())
            .map_err(|e| Failed::definite(internal(format!("undecodable outcome: {e}"))))?;
        match outcome.result {
            Some(Res::Error(e)) => Err(Failed::definite(outcome_to_status(e))),
            Some(r) => Ok(r),
            None => Err(Failed::definite(unexpected("an empty outcome"))),
        }
    }

    /// A [`Delivery`] that abandons `call` if its answer never leaves
    /// (`grace` later: see [`STREAM_ABANDON_GRACE`]).
    fn answer_for(&self, call: u64, session: u64, grace: Duration) -> Delivery {
        let locks = self.clone();
        Delivery::new(move || {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if !grace.is_zero() {
                        tokio::time::sleep(grace).await;
                    }
                    locks.abandon(call, session).await
                });
            }
        })
    }

    /// Proposes `Abandon(call)` until it is applied. On a replica that lost
    /// leadership it is forwarded to the leader instead; a forwarded
    /// proposal may be lost, so after each try a linearizable read checks
    /// whether the abandon landed (it always leaves a tombstone) or the
    /// session is gone, and tries again (Abandon is idempotent). Gives up
    /// only when this replica stops, or after a minute without a leader.
    async fn abandon(&self, call: u64, session: u64) {
        metrics::counter!("dsync_lock_abandoned_calls_total").increment(1);
        let bytes = cmd::Command {
            now_ms: now_ms(),
            cmd: Some(Cmd::Abandon(cmd::Abandon {
                call_id: call,
                session_id: session,
            })),
        }
        .encode_to_vec();
        let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.group.propose(bytes.clone()).await {
                Ok(_) => return,
                Err(consensus::Error::Stopped(_)) => break,
                Err(consensus::Error::NotLeader {
                    leader: Some(_), ..
                }) => {
                    let _ = self.group.forward(bytes.clone());
                }
                Err(_) => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            if self.group.read_index().await.is_ok() {
                let st = self.state.read();
                if st.abandoned_set.contains(&call) || !st.sessions.contains_key(&session) {
                    return;
                }
            }
            if tokio::time::Instant::now() > give_up {
                break;
            }
        }
        tracing::warn!(
            call,
            session,
            "could not abandon a call; it stays until its session ends"
        );
    }

    /// Blocks until wait `id` is decided; after `timeout` asks Raft to
    /// cancel it (an outcome still arrives: granted if the grant won).
    /// If the handler goes away meanwhile, the caller's [`Delivery`]
    /// withdraws the wait. A state machine's verdict (timed out, deadlock
    /// victim, withdrawn, session ended) is definite: the wait is gone,
    /// nothing to abandon.
    async fn wait_for(&self, id: u64, timeout: Duration) -> Result<cmd::Granted, Failed> {
        let mut rx = self.waits.wait(id);
        let outcome = tokio::select! {
            o = &mut rx => match o {
                Ok(o) => Some(o),
                Err(_) if self.waits.is_closed() => {
                    return Err(Failed {
                        status: error(
                            tonic::Code::Unavailable,
                            format!(
                                "this replica is stopping; retry the acquire with the same request_id on another replica (wait {id} is withdrawn unless the retry takes it over first)"
                            ),
                            "REPLICA_STOPPING",
                            [("waiter_id", id.to_string())],
                        ),
                        maybe_applied: true,
                    })
                }
                // Another call with the same request_id took the wait over.
                Err(_) => {
                    return Err(Failed::definite(error(
                        tonic::Code::Aborted,
                        format!("a retry of this acquire (same request_id) took wait {id} over"),
                        "SUPERSEDED",
                        [("waiter_id", id.to_string())],
                    )))
                }
            },
            _ = tokio::time::sleep(timeout) => None,
        };
        let outcome = match outcome {
            Some(o) => Some(o),
            None => {
                // Best effort: if this replica lost leadership the cancel
                // fails, and the leader's Tick expires the wait after its
                // grace period instead.
                let _ = self
                    .propose(Cmd::CancelWait(cmd::CancelWait { waiter_id: id }))
                    .await;
                tokio::time::timeout(Duration::from_secs(5), rx)
                    .await
                    .ok()
                    .and_then(|r| r.ok())
            }
        };
        match outcome.and_then(|o| o.result) {
            Some(Res::Granted(g)) => Ok(g),
            Some(Res::Error(e)) => Err(Failed::definite(outcome_to_status(e))),
            Some(_) => Err(Failed::definite(unexpected("a wait"))),
            None => {
                // The cancellation was not confirmed: the caller's delivery
                // abandons the call.
                self.waits.forget(id);
                Err(Failed {
                    status: error(
                        tonic::Code::DeadlineExceeded,
                        format!(
                            "timed out after {} ms waiting (wait {id}); the wait is withdrawn",
                            timeout.as_millis()
                        ),
                        "WAIT_TIMEOUT",
                        [
                            ("waiter_id", id.to_string()),
                            ("waited_ms", timeout.as_millis().to_string()),
                        ],
                    ),
                    maybe_applied: true,
                })
            }
        }
    }

    /// Proposes an Acquire or Upgrade made by call `call` and waits for its
    /// grant, answering for it with a [`Delivery`] the whole time: on every
    /// path where the client may not learn the outcome, the delivery stays
    /// armed and abandons the call.
    async fn grant_call(
        &self,
        c: Cmd,
        call: u64,
        session: u64,
        wait: Duration,
        grace: Duration,
    ) -> Result<(cmd::Granted, Delivery), Status> {
        let delivery = self.answer_for(call, session, grace);
        let granted = match self.propose_checked(c).await {
            Ok(Res::Granted(g)) => Ok(g),
            Ok(Res::Queued(q)) => self.wait_for(q.waiter_id, wait).await,
            Ok(_) => return Err(unexpected("Acquire")),
            Err(f) => Err(f),
        };
        match granted {
            Ok(g) => Ok((g, delivery)),
            Err(f) => {
                // A definite failure left nothing to abandon.
                if !f.maybe_applied {
                    delivery.disarm();
                }
                Err(f.status)
            }
        }
    }

    fn check_wait(&self, ms: Option<u64>) -> Result<Duration, Status> {
        let ms = ms.unwrap_or(self.limits.default_wait_ms);
        LockState::check_wait(&self.limits, ms).map_err(|m| invalid("wait_timeout_ms", m))?;
        Ok(Duration::from_millis(ms))
    }

    /// Keep-alives as builds before leases in memory made them (until every
    /// member runs a build that leases sessions, see `EnableLeases`): a
    /// `KeepAlive` command per session.
    async fn keep_alive_through_log(
        &self,
        r: KeepAliveRequest,
    ) -> Result<Response<KeepAliveResponse>, Status> {
        let renew = |id| self.propose(Cmd::KeepAlive(cmd::KeepAlive { session_id: id }));
        let mut resp = KeepAliveResponse::default();
        if r.session_id != 0 {
            match renew(r.session_id).await? {
                Res::Session(s) => resp.ttl_ms = s.ttl_ms,
                _ => return Err(unexpected("KeepAlive")),
            }
        }
        for id in r.session_ids {
            let (ttl_ms, reason) = match renew(id).await {
                Ok(Res::Session(s)) => (s.ttl_ms, String::new()),
                Ok(_) => return Err(unexpected("KeepAlive")),
                Err(e) if e.code() == tonic::Code::Unavailable => return Err(e),
                Err(e) => (0, proto::status::reason(&e)),
            };
            resp.results.push(KeepAliveResult {
                session_id: id,
                ttl_ms,
                reason,
            });
        }
        Ok(Response::new(resp))
    }

    /// Renews one session as KeepAlive does (in either mode): its TTL.
    async fn renew_session(&self, id: u64) -> Result<u64, Status> {
        self.renew_session_from(id, std::time::Instant::now()).await
    }

    /// Renews one session for its TTL from `received` (when the client
    /// last showed it is alive; a replicated KeepAlive renews from now).
    async fn renew_session_from(
        &self,
        id: u64,
        received: std::time::Instant,
    ) -> Result<u64, Status> {
        if !self.state.read().leases_in_memory {
            return match self
                .propose(Cmd::KeepAlive(cmd::KeepAlive { session_id: id }))
                .await?
            {
                Res::Session(s) => Ok(s.ttl_ms),
                _ => Err(unexpected("KeepAlive")),
            };
        }
        let term = self.confirm_leading().await?;
        self.renew(term, id, received)?
    }

    /// Validates and runs an Acquire (unary, or on a session stream with
    /// [`STREAM_ABANDON_GRACE`]): the grant, and the delivery that abandons
    /// it (`grace` later) unless disarmed.
    async fn acquire_call(
        &self,
        r: AcquireRequest,
        grace: Duration,
    ) -> Result<(AcquireResponse, Delivery), Status> {
        check_session(r.session_id)?;
        LockState::check_resource(&self.limits, &r.resource).map_err(|m| invalid("resource", m))?;
        if Mode::from_proto(r.mode).is_none() {
            return Err(invalid(
                "mode",
                "mode must be SHARED, EXCLUSIVE or UPGRADEABLE",
            ));
        }
        let wait = self.check_wait(r.wait_timeout_ms)?;
        let call = new_call_id();
        let (g, delivery) = self
            .grant_call(
                Cmd::Acquire(cmd::Acquire {
                    session_id: r.session_id,
                    resource: r.resource,
                    mode: r.mode,
                    wait_timeout_ms: wait.as_millis() as u64,
                    request_id: r.request_id,
                    call_id: call,
                }),
                call,
                r.session_id,
                wait,
                grace,
            )
            .await?;
        let resp = AcquireResponse {
            lock_id: g.lock_id,
            fencing_token: g.fencing_token,
            mode: g.mode,
            call_id: call,
        };
        Ok((resp, delivery))
    }

    async fn release_call(&self, r: ReleaseRequest) -> Result<ReleaseResponse, Status> {
        check_session(r.session_id)?;
        if r.lock_id == 0 {
            LockState::check_resource(&self.limits, &r.resource).map_err(|m| {
                invalid(
                    "resource",
                    format!("give a lock_id or a valid resource: {m}"),
                )
            })?;
        }
        self.propose(Cmd::Release(cmd::Release {
            session_id: r.session_id,
            lock_id: r.lock_id,
            resource: r.resource,
        }))
        .await?;
        Ok(ReleaseResponse {})
    }

    /// Serves one session stream after its attach: runs its operations
    /// (each in a task of its own, at most [`MAX_STREAM_OPS`] at once, so
    /// waits do not block the stream), renews the session every TTL / 3
    /// from the last message heard (in a task, so renewals do not hold up
    /// messages), and ends the stream on NOT_LEADER. A half-close lets the
    /// operations in flight finish; a broken stream drops them, so their
    /// deliveries abandon the waits still open.
    async fn serve_stream(
        self,
        session: u64,
        ttl: Duration,
        mut inbound: Streaming<SessionRequest>,
        out: mpsc::Sender<Result<SessionResponse, Status>>,
    ) {
        use std::time::Instant;
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_STREAM_OPS));
        let mut ops = tokio::task::JoinSet::new();
        let (fail_tx, mut failed) = mpsc::channel::<Status>(1);
        let mut renew = tokio::time::interval(ttl / 3);
        renew.tick().await;
        let (mut heard, mut renewed_from) = (Instant::now(), Instant::now());
        let mut renewing: Option<tokio::task::JoinHandle<()>> = None;
        let broken = loop {
            tokio::select! {
                (permit, msg) = next_message(permits.clone(), &mut inbound) => {
                    let m = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => break false,
                        Err(_) => break true,
                    };
                    heard = Instant::now();
                    if matches!(m.op, Some(session_request::Op::Ping(_))) {
                        continue;
                    }
                    let (locks, out, fail) = (self.clone(), out.clone(), fail_tx.clone());
                    ops.spawn(async move {
                        let _permit = permit;
                        if let Err(s) = locks.stream_op(session, m, &out).await {
                            let _ = fail.try_send(s);
                        }
                    });
                }
                _ = renew.tick() => {
                    // A stream with more operations than run at once is
                    // not silent: its client's messages wait to be read.
                    if permits.available_permits() == 0 {
                        heard = Instant::now();
                    }
                    let idle = renewing.as_ref().is_none_or(|t| t.is_finished());
                    // Only a client heard from since the last renewal is
                    // renewed: an open but silent stream lets it expire.
                    if idle && heard > renewed_from {
                        renewed_from = heard;
                        let (locks, fail) = (self.clone(), fail_tx.clone());
                        renewing = Some(tokio::spawn(async move {
                            if let Err(s) = locks.renew_session_from(session, heard).await {
                                let _ = fail.try_send(s);
                            }
                        }));
                    }
                }
                Some(status) = failed.recv() => {
                    let _ = out.try_send(Err(status));
                    break true;
                }
                _ = out.closed() => break true,
                Some(_) = ops.join_next(), if !ops.is_empty() => {}
            }
        };
        if let Some(t) = renewing {
            t.abort();
        }
        // A broken stream withdraws the waits still open (their handlers
        // go away); after a half-close they run on while the client still
        // reads the answers, and are withdrawn if it stops (cancels).
        let mut aborted = broken;
        if aborted {
            ops.abort_all();
        }
        loop {
            tokio::select! {
                done = ops.join_next() => if done.is_none() { break },
                _ = out.closed(), if !aborted => {
                    aborted = true;
                    ops.abort_all();
                }
            }
        }
    }

    /// Runs one stream operation and sends its answer; a NOT_LEADER error
    /// is returned (it ends the stream: the client re-attaches elsewhere).
    async fn stream_op(
        &self,
        session: u64,
        m: SessionRequest,
        out: &mpsc::Sender<Result<SessionResponse, Status>>,
    ) -> Result<(), Status> {
        use session_request::Op;
        use session_response::Result as Answer;
        let seq = m.seq;
        let answer = match m.op {
            Some(Op::Acquire(mut r)) => {
                if let Err(e) = stream_session(&mut r.session_id, session) {
                    Err(e)
                } else {
                    match self.acquire_call(r, STREAM_ABANDON_GRACE).await {
                        Ok((granted, delivery)) => {
                            let sent = out
                                .send(Ok(SessionResponse {
                                    seq,
                                    result: Some(Answer::Acquired(granted)),
                                }))
                                .await;
                            // Handed to the stream: kept (see the Session
                            // rpc); not handed over: abandoned.
                            if sent.is_ok() {
                                delivery.disarm();
                            }
                            return Ok(());
                        }
                        Err(status) => Err(status),
                    }
                }
            }
            Some(Op::Release(mut r)) => match stream_session(&mut r.session_id, session) {
                Err(e) => Err(e),
                Ok(()) => self.release_call(r).await.map(Answer::Released),
            },
            Some(Op::Attach(_)) => Err(invalid("attach", "this stream is already attached")),
            Some(Op::Ping(_)) => return Ok(()),
            None => Err(invalid("op", "an operation is required")),
        };
        let result = match answer {
            Ok(a) => a,
            Err(status) if proto::status::reason(&status) == "NOT_LEADER" => return Err(status),
            Err(status) => Answer::Error(op_error(&status)),
        };
        let _ = out
            .send(Ok(SessionResponse {
                seq,
                result: Some(result),
            }))
            .await;
        Ok(())
    }

    /// Confirms that this replica leads, with a read index issued now (so
    /// after whatever request the caller received): answers the term it
    /// leads in, with its session leases kept for that term. A new leader's
    /// first call starts the leases (every session gets a fresh TTL) once
    /// everything committed before its term is applied.
    pub async fn confirm_leading(&self) -> Result<u64, Status> {
        let st = self.group.status();
        if !st.is_leader() {
            return Err(to_status(&st.not_leader(), GROUP));
        }
        self.read_barrier().await?;
        let now = self.group.status();
        if !now.is_leader() || now.term != st.term {
            return Err(to_status(&now.not_leader(), GROUP));
        }
        if self.lessor.term() != st.term {
            let table = self.state.read();
            self.lessor
                .activate(st.term, table.sessions.values().map(|s| (s.id, s.ttl_ms)));
        }
        Ok(st.term)
    }

    /// Renews one session's lease for the leader of `term`: its TTL in ms,
    /// or the status that says why not (the outer error: not leading).
    fn renew(
        &self,
        term: u64,
        id: u64,
        received: std::time::Instant,
    ) -> Result<Result<u64, Status>, Status> {
        let gone = |st: &LockState| {
            let (reason, message) = match st.expired.get(&id) {
                Some(at) => (
                    "SESSION_EXPIRED",
                    format!("session {id} expired at {at} ms (its TTL passed without a keep-alive); open a new session"),
                ),
                None => ("SESSION_NOT_FOUND", format!("session {id} does not exist")),
            };
            let code = if reason == "SESSION_EXPIRED" {
                tonic::Code::FailedPrecondition
            } else {
                tonic::Code::NotFound
            };
            error(code, message, reason, [("session_id", id.to_string())])
        };
        match self.lessor.renew(term, id, received) {
            Renewal::Renewed(ttl) => Ok(Ok(ttl.as_millis() as u64)),
            Renewal::Expiring => Ok(Err(error(
                tonic::Code::Unavailable,
                format!("session {id}'s TTL passed without a keep-alive and its expiry is being committed; retry to learn the outcome"),
                "SESSION_EXPIRING",
                [("session_id", id.to_string())],
            ))),
            Renewal::Unknown => Ok(Err(gone(&self.state.read()))),
            Renewal::NotLeading => Err(to_status(&self.group.status().not_leader(), GROUP)),
        }
    }

    async fn read_barrier(&self) -> Result<u64, Status> {
        self.group
            .read_index()
            .await
            .map_err(|e| to_status(&e, GROUP))
    }
}

/// An operation's session on a stream: the attached one (0 = it), never
/// another.
fn stream_session(id: &mut u64, attached: u64) -> Result<(), Status> {
    if *id == 0 {
        *id = attached;
    }
    if *id != attached {
        return Err(invalid(
            "session_id",
            "a stream acts for its attached session only",
        ));
    }
    Ok(())
}

/// A stream's next message, once one more operation may run.
async fn next_message(
    permits: Arc<tokio::sync::Semaphore>,
    inbound: &mut Streaming<SessionRequest>,
) -> (
    tokio::sync::OwnedSemaphorePermit,
    Result<Option<SessionRequest>, Status>,
) {
    let permit = permits.acquire_owned().await.expect("never closed");
    (permit, inbound.message().await)
}

/// A status as a session stream's per-operation error.
fn op_error(s: &Status) -> OpError {
    let info = proto::status::error_info(s);
    OpError {
        code: s.code() as i32,
        message: s.message().to_owned(),
        reason: info.as_ref().map(|i| i.reason.clone()).unwrap_or_default(),
        metadata: info
            .map(|i| i.metadata.into_iter().collect())
            .unwrap_or_default(),
    }
}

fn check_session(id: u64) -> Result<(), Status> {
    if id == 0 {
        return Err(invalid("session_id", "session_id is required"));
    }
    Ok(())
}

fn holder_proto(resource: &str, h: &StateHolder, name: &str) -> Holder {
    Holder {
        lock_id: h.lock_id,
        session_id: h.session,
        mode: h.mode.to_proto() as i32,
        fencing_token: h.token,
        since_ms: h.since_ms,
        resource: resource.to_owned(),
        client_name: name.to_owned(),
    }
}

#[tonic::async_trait]
impl LockService for Locks {
    async fn open_session(
        &self,
        req: Request<OpenSessionRequest>,
    ) -> Result<Response<OpenSessionResponse>, Status> {
        let r = req.into_inner();
        let ttl = if r.ttl_ms == 0 {
            self.limits.default_ttl_ms
        } else {
            r.ttl_ms
        };
        if !(self.limits.min_ttl_ms..=self.limits.max_ttl_ms).contains(&ttl) {
            return Err(invalid(
                "ttl_ms",
                format!(
                    "ttl_ms {ttl} is out of range {}..={}",
                    self.limits.min_ttl_ms, self.limits.max_ttl_ms
                ),
            ));
        }
        let open = Cmd::OpenSession(cmd::OpenSession {
            ttl_ms: ttl,
            client_name: r.client_name,
            request_id: r.request_id,
        });
        for _ in 0..3 {
            let Res::Session(s) = self.propose(open.clone()).await? else {
                return Err(unexpected("OpenSession"));
            };
            // A retry (same request_id) answered with a session whose
            // expiry is already decided would be lost right after: wait
            // for that expiry to apply, then open a new one.
            if !self.lessor.is_expiring(s.session_id) {
                return Ok(Response::new(OpenSessionResponse {
                    session_id: s.session_id,
                    ttl_ms: s.ttl_ms,
                }));
            }
            let gone = tokio::time::Instant::now() + Duration::from_secs(5);
            while self.state.read().sessions.contains_key(&s.session_id)
                && self.lessor.is_expiring(s.session_id)
                && tokio::time::Instant::now() < gone
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Err(error(
            tonic::Code::Unavailable,
            "the session this request_id opened is expiring; retry",
            "SESSION_EXPIRING",
            std::iter::empty::<(String, String)>(),
        ))
    }

    async fn keep_alive(
        &self,
        req: Request<KeepAliveRequest>,
    ) -> Result<Response<KeepAliveResponse>, Status> {
        let received = std::time::Instant::now();
        let r = req.into_inner();
        if r.session_id == 0 && r.session_ids.is_empty() {
            return Err(invalid("session_id", "session_id is required"));
        }
        if r.session_ids.len() > MAX_KEEPALIVE_SESSIONS {
            return Err(invalid(
                "session_ids",
                format!(
                    "{} session_ids; at most {MAX_KEEPALIVE_SESSIONS} per call",
                    r.session_ids.len()
                ),
            ));
        }
        if !self.state.read().leases_in_memory {
            return self.keep_alive_through_log(r).await;
        }
        let term = self.confirm_leading().await?;
        let mut resp = KeepAliveResponse::default();
        if r.session_id != 0 {
            resp.ttl_ms = match self.renew(term, r.session_id, received)? {
                Ok(ttl) => ttl,
                Err(status) => return Err(status),
            };
        }
        for id in r.session_ids {
            let (ttl_ms, reason) = match self.renew(term, id, received)? {
                Ok(ttl) => (ttl, String::new()),
                Err(status) => (0, proto::status::reason(&status)),
            };
            resp.results.push(KeepAliveResult {
                session_id: id,
                ttl_ms,
                reason,
            });
        }
        Ok(Response::new(resp))
    }

    async fn close_session(
        &self,
        req: Request<CloseSessionRequest>,
    ) -> Result<Response<CloseSessionResponse>, Status> {
        let id = req.into_inner().session_id;
        check_session(id)?;
        match self
            .propose(Cmd::CloseSession(cmd::CloseSession { session_id: id }))
            .await?
        {
            Res::Counts(c) => Ok(Response::new(CloseSessionResponse {
                released: c.released,
                cancelled: c.cancelled,
            })),
            _ => Err(unexpected("CloseSession")),
        }
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let (granted, delivery) = self.acquire_call(req.into_inner(), Duration::ZERO).await?;
        let mut resp = Response::new(granted);
        attach(&mut resp, delivery);
        Ok(resp)
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        Ok(Response::new(self.release_call(req.into_inner()).await?))
    }

    type SessionStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<SessionResponse, Status>> + Send + 'static>,
    >;

    async fn session(
        &self,
        req: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid("attach", "the stream ended before its attach"))?;
        let Some(session_request::Op::Attach(a)) = first.op else {
            return Err(invalid("attach", "the first message must be an attach"));
        };
        check_session(a.session_id)?;
        let ttl = self.renew_session(a.session_id).await?;
        let (tx, rx) = mpsc::channel(1024);
        let _ = tx
            .send(Ok(SessionResponse {
                seq: first.seq,
                result: Some(session_response::Result::AttachedTtlMs(ttl)),
            }))
            .await;
        tokio::spawn(self.clone().serve_stream(
            a.session_id,
            Duration::from_millis(ttl.max(3)),
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn release_all(
        &self,
        req: Request<ReleaseAllRequest>,
    ) -> Result<Response<ReleaseAllResponse>, Status> {
        let id = req.into_inner().session_id;
        check_session(id)?;
        match self
            .propose(Cmd::ReleaseAll(cmd::ReleaseAll { session_id: id }))
            .await?
        {
            Res::Counts(c) => Ok(Response::new(ReleaseAllResponse {
                released: c.released,
                cancelled: c.cancelled,
            })),
            _ => Err(unexpected("ReleaseAll")),
        }
    }

    async fn upgrade(
        &self,
        req: Request<UpgradeRequest>,
    ) -> Result<Response<UpgradeResponse>, Status> {
        let r = req.into_inner();
        check_session(r.session_id)?;
        let wait = self.check_wait(r.wait_timeout_ms)?;
        let call = new_call_id();
        let (g, delivery) = self
            .grant_call(
                Cmd::Upgrade(cmd::Upgrade {
                    session_id: r.session_id,
                    lock_id: r.lock_id,
                    wait_timeout_ms: wait.as_millis() as u64,
                    call_id: call,
                }),
                call,
                r.session_id,
                wait,
                Duration::ZERO,
            )
            .await?;
        let mut resp = Response::new(UpgradeResponse {
            fencing_token: g.fencing_token,
            call_id: call,
        });
        attach(&mut resp, delivery);
        Ok(resp)
    }

    async fn downgrade(
        &self,
        req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        let r = req.into_inner();
        check_session(r.session_id)?;
        match self
            .propose(Cmd::Downgrade(cmd::Downgrade {
                session_id: r.session_id,
                lock_id: r.lock_id,
            }))
            .await?
        {
            Res::Granted(g) => Ok(Response::new(DowngradeResponse {
                fencing_token: g.fencing_token,
            })),
            _ => Err(unexpected("Downgrade")),
        }
    }

    async fn get_status(
        &self,
        req: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let resource = req.into_inner().resource;
        LockState::check_resource(&self.limits, &resource).map_err(|m| invalid("resource", m))?;
        let read_index = self.read_barrier().await?;
        let st = self.state.read();
        let mut resp = GetStatusResponse {
            resource: resource.clone(),
            read_index,
            ..Default::default()
        };
        if let Some(res) = st.resources.get(resource.as_str()) {
            resp.mode = res.mode().map_or(LockMode::Unspecified, Mode::to_proto) as i32;
            resp.holders = res
                .holders
                .values()
                .map(|h| {
                    let name = st.sessions.get(&h.session).map_or("", |s| s.name.as_str());
                    holder_proto(&resource, h, name)
                })
                .collect();
            resp.waiters = res
                .queue
                .iter()
                .map(|w| Waiter {
                    waiter_id: w.id,
                    session_id: w.session,
                    mode: w.mode.to_proto() as i32,
                    since_ms: w.since_ms,
                    deadline_ms: w.deadline_ms,
                    upgrade_of: w.upgrade_of.unwrap_or(0),
                })
                .collect();
        }
        Ok(Response::new(resp))
    }

    async fn list_locks(
        &self,
        req: Request<ListLocksRequest>,
    ) -> Result<Response<ListLocksResponse>, Status> {
        let r = req.into_inner();
        let size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(invalid(
                    "page_size",
                    format!("page_size {n} is out of range 1..=1000"),
                ))
            }
        };
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<u64>()
                .map_err(|_| invalid("page_token", "page_token is not one this service issued"))?
        };
        self.read_barrier().await?;
        let st = self.state.read();
        let page = st.list_locks(after, r.session_id, size + 1);
        let more = page.len() > size;
        let locks: Vec<Holder> = page
            .iter()
            .take(size)
            .map(|(res, h)| {
                let name = st.sessions.get(&h.session).map_or("", |s| s.name.as_str());
                holder_proto(res, h, name)
            })
            .collect();
        let next_page_token = if more {
            locks
                .last()
                .map(|h| h.lock_id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListLocksResponse {
            locks,
            next_page_token,
        }))
    }

    async fn list_sessions(
        &self,
        _req: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        self.read_barrier().await?;
        // A copy is O(1) (persistent maps): the table is not held while
        // the answer is built.
        let st = self.state.read().clone();
        let sessions = st.sessions.values().collect::<Vec<_>>();
        let deadlines = self.lessor.deadlines(sessions.iter().map(|s| s.id));
        let (now, wall) = (std::time::Instant::now(), now_ms());
        let sessions = sessions
            .iter()
            .zip(deadlines)
            .map(|(s, deadline)| Session {
                session_id: s.id,
                client_name: s.name.clone(),
                ttl_ms: s.ttl_ms,
                expires_at_ms: deadline.map_or(0, |d| {
                    wall + d.saturating_duration_since(now).as_millis() as u64
                }),
                locks_held: s.locks.len() as u32,
                waits: s.waits.len() as u32,
            })
            .collect();
        Ok(Response::new(ListSessionsResponse { sessions }))
    }
}
