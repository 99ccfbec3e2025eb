//! The gRPC face of lock-svc: validates requests, turns them into Raft
//! commands, waits for their outcome, and translates outcomes to statuses.
//!
//! Writes are proposed on this replica's Raft group; a follower answers
//! `UNAVAILABLE` with the leader's address (see `consensus::grpc_status`).
//! Reads use `read_index` and then read the local state, so they are
//! linearizable on any replica.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use consensus::grpc_status::to_status;
use consensus::GroupHandle;
use parking_lot::RwLock;
use prost::Message;
use proto::lock::v1::internal::{
    self as cmd, command::Cmd, outcome::Result as Res, ErrorCode, Outcome,
};
use proto::lock::v1::lock_service_server::LockService;
use proto::lock::v1::*;
use tonic::{Request, Response, Status};

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
    pub limits: Limits,
}

fn outcome_to_status(e: cmd::Error) -> Status {
    let code = match ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified) {
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::Timeout => tonic::Code::DeadlineExceeded,
        ErrorCode::Deadlock => tonic::Code::Aborted,
        ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorCode::Unspecified => tonic::Code::Internal,
    };
    Status::new(code, e.message)
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("unexpected state machine outcome for {what}"))
}

/// Cancels a wait through Raft if the handler waiting on it goes away
/// (client cancelled, connection lost) before it was decided.
struct WaitGuard {
    locks: Locks,
    id: u64,
    decided: bool,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.decided {
            return;
        }
        self.locks.waits.forget(self.id);
        let locks = self.locks.clone();
        let id = self.id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = locks
                    .propose(Cmd::CancelWait(cmd::CancelWait { waiter_id: id }))
                    .await;
            });
        }
    }
}

impl Locks {
    /// Proposes a command and decodes the state machine's outcome.
    pub async fn propose(&self, c: Cmd) -> Result<Res, Status> {
        let command = cmd::Command {
            now_ms: now_ms(),
            cmd: Some(c),
        };
        let bytes = self
            .group
            .propose(command.encode_to_vec())
            .await
            .map_err(|e| to_status(&e, GROUP))?;
        let outcome = Outcome::decode(bytes.as_slice())
            .map_err(|e| Status::internal(format!("undecodable outcome: {e}")))?;
        match outcome.result {
            Some(Res::Error(e)) => Err(outcome_to_status(e)),
            Some(r) => Ok(r),
            None => Err(unexpected("an empty outcome")),
        }
    }

    /// Blocks until wait `id` is decided; after `timeout` asks Raft to
    /// cancel it (an outcome still arrives: granted if the grant won).
    async fn wait_for(&self, id: u64, timeout: Duration) -> Result<cmd::Granted, Status> {
        let mut guard = WaitGuard {
            locks: self.clone(),
            id,
            decided: false,
        };
        let mut rx = self.waits.wait(id);
        let stopping = || {
            Status::unavailable(format!(
                "this replica is stopping; retry the acquire with the same request_id on another replica to resume wait {id}"
            ))
        };
        let outcome = tokio::select! {
            o = &mut rx => match o {
                Ok(o) => Some(o),
                Err(_) => {
                    guard.decided = true;
                    return Err(stopping());
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
        guard.decided = true;
        match outcome.and_then(|o| o.result) {
            Some(Res::Granted(g)) => Ok(g),
            Some(Res::Error(e)) => Err(outcome_to_status(e)),
            Some(_) => Err(unexpected("a wait")),
            None => {
                self.waits.forget(id);
                Err(Status::deadline_exceeded(format!(
                    "timed out after {} ms waiting (wait {id}); its cancellation was not confirmed, \
                     the leader expires it shortly",
                    timeout.as_millis()
                )))
            }
        }
    }

    fn check_wait(&self, ms: Option<u64>) -> Result<Duration, Status> {
        let ms = ms.unwrap_or(self.limits.default_wait_ms);
        LockState::check_wait(&self.limits, ms).map_err(Status::invalid_argument)?;
        Ok(Duration::from_millis(ms))
    }

    async fn read_barrier(&self) -> Result<u64, Status> {
        self.group
            .read_index()
            .await
            .map_err(|e| to_status(&e, GROUP))
    }
}

fn check_session(id: u64) -> Result<(), Status> {
    if id == 0 {
        return Err(Status::invalid_argument("session_id is required"));
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
            return Err(Status::invalid_argument(format!(
                "ttl_ms {ttl} is out of range {}..={}",
                self.limits.min_ttl_ms, self.limits.max_ttl_ms
            )));
        }
        match self
            .propose(Cmd::OpenSession(cmd::OpenSession {
                ttl_ms: ttl,
                client_name: r.client_name,
            }))
            .await?
        {
            Res::Session(s) => Ok(Response::new(OpenSessionResponse {
                session_id: s.session_id,
                ttl_ms: s.ttl_ms,
            })),
            _ => Err(unexpected("OpenSession")),
        }
    }

    async fn keep_alive(
        &self,
        req: Request<KeepAliveRequest>,
    ) -> Result<Response<KeepAliveResponse>, Status> {
        let id = req.into_inner().session_id;
        check_session(id)?;
        match self
            .propose(Cmd::KeepAlive(cmd::KeepAlive { session_id: id }))
            .await?
        {
            Res::Session(s) => Ok(Response::new(KeepAliveResponse { ttl_ms: s.ttl_ms })),
            _ => Err(unexpected("KeepAlive")),
        }
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
        let r = req.into_inner();
        check_session(r.session_id)?;
        LockState::check_resource(&self.limits, &r.resource).map_err(Status::invalid_argument)?;
        if Mode::from_proto(r.mode).is_none() {
            return Err(Status::invalid_argument(
                "mode must be SHARED, EXCLUSIVE or UPGRADEABLE",
            ));
        }
        let wait = self.check_wait(r.wait_timeout_ms)?;
        let out = self
            .propose(Cmd::Acquire(cmd::Acquire {
                session_id: r.session_id,
                resource: r.resource,
                mode: r.mode,
                wait_timeout_ms: wait.as_millis() as u64,
                request_id: r.request_id,
            }))
            .await?;
        let g = match out {
            Res::Granted(g) => g,
            Res::Queued(q) => self.wait_for(q.waiter_id, wait).await?,
            _ => return Err(unexpected("Acquire")),
        };
        Ok(Response::new(AcquireResponse {
            lock_id: g.lock_id,
            fencing_token: g.fencing_token,
            mode: g.mode,
        }))
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let r = req.into_inner();
        check_session(r.session_id)?;
        if r.lock_id == 0 {
            LockState::check_resource(&self.limits, &r.resource).map_err(|m| {
                Status::invalid_argument(format!("give a lock_id or a valid resource: {m}"))
            })?;
        }
        self.propose(Cmd::Release(cmd::Release {
            session_id: r.session_id,
            lock_id: r.lock_id,
            resource: r.resource,
        }))
        .await?;
        Ok(Response::new(ReleaseResponse {}))
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
        let g = match self
            .propose(Cmd::Upgrade(cmd::Upgrade {
                session_id: r.session_id,
                lock_id: r.lock_id,
                wait_timeout_ms: wait.as_millis() as u64,
            }))
            .await?
        {
            Res::Granted(g) => g,
            Res::Queued(q) => self.wait_for(q.waiter_id, wait).await?,
            _ => return Err(unexpected("Upgrade")),
        };
        Ok(Response::new(UpgradeResponse {
            fencing_token: g.fencing_token,
        }))
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
        LockState::check_resource(&self.limits, &resource).map_err(Status::invalid_argument)?;
        let read_index = self.read_barrier().await?;
        let st = self.state.read();
        let mut resp = GetStatusResponse {
            resource: resource.clone(),
            read_index,
            ..Default::default()
        };
        if let Some(res) = st.resources.get(&resource) {
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
                return Err(Status::invalid_argument(format!(
                    "page_size {n} is out of range 1..=1000"
                )))
            }
        };
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token.parse::<u64>().map_err(|_| {
                Status::invalid_argument("page_token is not one this service issued")
            })?
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
        let st = self.state.read();
        let sessions = st
            .sessions
            .values()
            .map(|s| Session {
                session_id: s.id,
                client_name: s.name.clone(),
                ttl_ms: s.ttl_ms,
                expires_at_ms: s.expires_at(),
                locks_held: s.locks.len() as u32,
                waits: s.waits.len() as u32,
            })
            .collect();
        Ok(Response::new(ListSessionsResponse { sessions }))
    }
}
