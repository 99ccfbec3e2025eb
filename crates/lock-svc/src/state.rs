//! The lock table: a pure, deterministic state machine.
//!
//! Every replica applies the same [`Command`]s in the same order and reaches
//! the same state; nothing here reads a clock, draws a random number or does
//! I/O. Time is `Command::now_ms`, the leader's wall clock when it proposed
//! the command (kept monotone here). Identifiers come from the Raft index of
//! the command that created the thing: a session opened at index 41 is
//! session 41, a lock granted by (or a wait queued by) the `Acquire` at
//! index 57 is lock 57.
//!
//! Semantics:
//! - Modes: shared (S), exclusive (X), upgradeable (U). S is compatible with
//!   S and U; U with S only; X with nothing. A U holder upgrades to X once
//!   it is the only holder, without releasing; X or U downgrade to S.
//! - Waiting is strictly FIFO per resource: a request is granted at once
//!   only if nobody waits and it is compatible with every holder; otherwise
//!   it queues. When holders change, waiters are granted from the head while
//!   compatible (so compatible waiters at the head are granted together) and
//!   granting stops at the first incompatible one — a writer is never
//!   starved by a stream of readers. Upgrade waits go to the head.
//! - Fencing tokens come from one counter that only ever increases and is
//!   part of the replicated state, so a token is strictly greater than any
//!   token granted before it for any resource, across leader changes.
//! - Sessions own locks and waits. Keep-alives are not commands: the leader
//!   keeps each session's lease in memory (`crate::lessor`) and proposes
//!   `ExpireSessions` for the ones whose TTL passed; their locks are
//!   released, their waits cancelled. (Logs of earlier builds carry
//!   `KeepAlive` commands and session-expiring `Tick`s; both still apply.)
//! - Deadlocks: sessions form a wait-for graph (a waiter waits for the
//!   incompatible holders and the incompatible waiters ahead of it). A new
//!   wait that closes a cycle, or a cycle found by the periodic scan in
//!   `Tick`, aborts the youngest wait in the cycle with a message naming it.
//!
//! `apply` returns the outcome for the proposer plus [`Event`]s for waits
//! decided by this command (granted, timed out, aborted); the service layer
//! routes those to the handlers blocked on them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};

use proto::lock::v1::internal::{
    command::Cmd, outcome::Result as Res, Command, Counts, Error, ErrorCode, Granted, Outcome,
    Queued, SessionOpened,
};
use proto::lock::v1::LockMode;
use serde::{Deserialize, Serialize};

/// Abandoned-call tombstones kept (an Abandon overtakes its Acquire only
/// within a leader change, so a small window suffices).
const ABANDONED_REMEMBERED: usize = 10_000;

/// Limits and defaults, documented once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    pub max_resource_bytes: usize,
    pub max_client_name_bytes: usize,
    pub min_ttl_ms: u64,
    pub max_ttl_ms: u64,
    pub default_ttl_ms: u64,
    pub default_wait_ms: u64,
    pub max_wait_ms: u64,
    pub max_sessions: usize,
    pub max_locks: usize,
    pub max_waiters_per_resource: usize,
    /// How long after its deadline a wait nobody cancelled is expired by a
    /// `Tick` (the handler that waits normally cancels it on time).
    pub wait_grace_ms: u64,
    /// Expired session ids remembered, to answer "expired" not "unknown".
    pub remembered_expired: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_resource_bytes: 512,
            max_client_name_bytes: 256,
            min_ttl_ms: 1_000,
            max_ttl_ms: 3_600_000,
            default_ttl_ms: 10_000,
            default_wait_ms: 30_000,
            max_wait_ms: 300_000,
            max_sessions: 100_000,
            max_locks: 2_000_000,
            max_waiters_per_resource: 10_000,
            wait_grace_ms: 2_000,
            remembered_expired: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mode {
    Shared,
    Exclusive,
    Upgradeable,
}

impl Mode {
    pub fn from_proto(m: i32) -> Option<Mode> {
        match LockMode::try_from(m).ok()? {
            LockMode::Shared => Some(Mode::Shared),
            LockMode::Exclusive => Some(Mode::Exclusive),
            LockMode::Upgradeable => Some(Mode::Upgradeable),
            LockMode::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> LockMode {
        match self {
            Mode::Shared => LockMode::Shared,
            Mode::Exclusive => LockMode::Exclusive,
            Mode::Upgradeable => LockMode::Upgradeable,
        }
    }

    pub fn compatible(self, other: Mode) -> bool {
        matches!(
            (self, other),
            (Mode::Shared, Mode::Shared)
                | (Mode::Shared, Mode::Upgradeable)
                | (Mode::Upgradeable, Mode::Shared)
        )
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Exclusive => "exclusive",
            Mode::Upgradeable => "upgradeable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: u64,
    pub name: String,
    pub ttl_ms: u64,
    pub last_seen_ms: u64,
    pub locks: OrdSet<u64>,
    pub waits: OrdSet<u64>,
    /// Idempotency: request id → lock or waiter id it created.
    pub requests: OrdMap<u64, u64>,
    /// The OpenSession request id that opened it (0: none).
    #[serde(default)]
    pub request_id: u64,
}

impl Session {
    pub fn expires_at(&self) -> u64 {
        self.last_seen_ms.saturating_add(self.ttl_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub lock_id: u64,
    pub session: u64,
    pub mode: Mode,
    pub token: u64,
    pub since_ms: u64,
    /// The call that answers for this grant until it reaches its client
    /// (see `Cmd::Abandon`); 0 when none.
    #[serde(default)]
    pub call: u64,
    /// The request id that acquired it (0: none); [`UNKNOWN_REQUEST`] in
    /// snapshots of builds that did not record it.
    #[serde(default = "unknown_request")]
    pub request_id: u64,
}

/// A holder's request id as restored from a build that did not record it.
pub const UNKNOWN_REQUEST: u64 = u64::MAX;

fn unknown_request() -> u64 {
    UNKNOWN_REQUEST
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    pub id: u64,
    pub session: u64,
    pub mode: Mode,
    pub since_ms: u64,
    pub deadline_ms: u64,
    /// The held lock this wait upgrades, if it is an upgrade.
    pub upgrade_of: Option<u64>,
    pub request_id: u64,
    /// The call blocked on this wait; 0 when none.
    #[serde(default)]
    pub call: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub holders: Holders,
    pub queue: Queue,
}

/// A resource's FIFO of waiters: boxed, and absent while nobody waits
/// (most resources), so an idle resource costs one pointer for it.
/// Serialized as the sequence of waiters.
#[derive(Debug, Clone, Default)]
// The box is the point: one pointer in every resource instead of a
// VecDeque's four words.
#[allow(clippy::box_collection)]
pub struct Queue(Option<Box<VecDeque<Waiter>>>);

impl Queue {
    /// Frees the box once nobody waits.
    fn shrink(&mut self) {
        if self.0.as_ref().is_some_and(|q| q.is_empty()) {
            self.0 = None;
        }
    }
}

impl PartialEq for Queue {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Queue {}

static NO_WAITERS: VecDeque<Waiter> = VecDeque::new();

impl std::ops::Deref for Queue {
    type Target = VecDeque<Waiter>;
    fn deref(&self) -> &VecDeque<Waiter> {
        self.0.as_deref().unwrap_or(&NO_WAITERS)
    }
}

impl std::ops::DerefMut for Queue {
    fn deref_mut(&mut self) -> &mut VecDeque<Waiter> {
        self.0.get_or_insert_with(Default::default)
    }
}

impl Serialize for Queue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Queue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let q = VecDeque::<Waiter>::deserialize(d)?;
        Ok(Queue((!q.is_empty()).then(|| Box::new(q))))
    }
}

thread_local! {
    /// Set while decoding a compact snapshot of the first layout, whose
    /// holders have no `request_id` (postcard is not self-describing, so
    /// a missing trailing field cannot default by itself).
    static FIRST_LAYOUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` decoding holders in the first compact layout.
pub fn with_first_layout<T>(f: impl FnOnce() -> T) -> T {
    /// Clears the flag however `f` ends (a panic included).
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            FIRST_LAYOUT.with(|l| l.set(false));
        }
    }
    FIRST_LAYOUT.with(|l| l.set(true));
    let _reset = Reset;
    f()
}

/// A holder as the first compact layout wrote it (no `request_id`).
#[derive(Deserialize)]
struct HolderFirstLayout {
    lock_id: u64,
    session: u64,
    mode: Mode,
    token: u64,
    since_ms: u64,
    #[serde(default)]
    call: u64,
}

/// A resource's holders by lock id. Usually one, so a vector sorted by
/// lock id (a map's node would cost ~700 bytes per held lock). Serialized
/// as a map (lock id → holder), as earlier builds wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holders(Vec<Holder>);

impl Holders {
    fn position(&self, id: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |h| h.lock_id)
    }

    pub fn get(&self, id: &u64) -> Option<&Holder> {
        self.position(*id).ok().map(|i| &self.0[i])
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut Holder> {
        self.position(*id).ok().map(|i| &mut self.0[i])
    }

    pub fn contains_key(&self, id: &u64) -> bool {
        self.position(*id).is_ok()
    }

    pub fn insert(&mut self, h: Holder) {
        match self.position(h.lock_id) {
            Ok(i) => self.0[i] = h,
            Err(i) => self.0.insert(i, h),
        }
    }

    pub fn remove(&mut self, id: &u64) -> Option<Holder> {
        self.position(*id).ok().map(|i| self.0.remove(i))
    }

    /// In lock id order.
    pub fn values(&self) -> std::slice::Iter<'_, Holder> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Holders {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|h| (h.lock_id, h)))
    }
}

impl<'de> Deserialize<'de> for Holders {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !FIRST_LAYOUT.with(|l| l.get()) {
            let map = BTreeMap::<u64, Holder>::deserialize(d)?;
            return Ok(Holders(map.into_values().collect()));
        }
        let map = BTreeMap::<u64, HolderFirstLayout>::deserialize(d)?;
        Ok(Holders(
            map.into_values()
                .map(|h| Holder {
                    lock_id: h.lock_id,
                    session: h.session,
                    mode: h.mode,
                    token: h.token,
                    since_ms: h.since_ms,
                    call: h.call,
                    request_id: UNKNOWN_REQUEST,
                })
                .collect(),
        ))
    }
}

impl Resource {
    /// The strongest mode held, if any.
    pub fn mode(&self) -> Option<Mode> {
        self.holders
            .values()
            .map(|h| h.mode)
            .max_by_key(|m| match m {
                Mode::Shared => 0,
                Mode::Upgradeable => 1,
                Mode::Exclusive => 2,
            })
    }

    fn compatible_with_holders(&self, mode: Mode) -> bool {
        self.holders.values().all(|h| mode.compatible(h.mode))
    }
}

/// Counters kept in the replicated state (so every replica agrees).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub grants: u64,
    pub timeouts: u64,
    pub deadlocks: u64,
    pub expired_sessions: u64,
}

/// A wait decided by a command other than the one that queued it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub waiter_id: u64,
    pub outcome: Outcome,
}

/// The lock table. Its maps are persistent (copy-on-write) b-trees, so a
/// snapshot's copy of the whole table costs O(1) on the driver thread and
/// the writes that follow copy only the nodes they touch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    pub limits: Limits,
    pub sessions: OrdMap<u64, Session>,
    /// Resource names are shared (one allocation per resource, however
    /// many indexes name it).
    pub resources: OrdMap<Arc<str>, Resource>,
    /// lock id → resource.
    pub locks: OrdMap<u64, Arc<str>>,
    /// waiter id → resource.
    pub waiters: OrdMap<u64, Arc<str>>,
    /// Recently expired sessions: id → when.
    pub expired: OrdMap<u64, u64>,
    /// Call id → the wait or lock that call owns (answers for).
    #[serde(default)]
    pub calls: OrdMap<u64, u64>,
    /// Abandoned calls, oldest first (bounded): a command of one that
    /// arrives later is refused, and the abandoning replica reads here
    /// that its Abandon landed.
    #[serde(default)]
    pub abandoned: VecDeque<u64>,
    #[serde(default)]
    pub abandoned_set: OrdSet<u64>,
    /// OpenSession request id → the session it opened.
    #[serde(default)]
    pub opened: OrdMap<u64, u64>,
    pub next_token: u64,
    pub now_ms: u64,
    pub applied: u64,
    pub stats: Stats,
    /// Sessions are leased in the leader's memory (`EnableLeases` applied).
    /// Not part of the table's serde form: snapshots carry it after the
    /// table, so snapshots of earlier builds (without it) still decode.
    #[serde(skip)]
    pub leases_in_memory: bool,
}

/// Why a command failed: the `google.rpc.ErrorInfo` reason a client acts
/// on (the table in lock.proto), which also fixes the status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InvalidArgument,
    SessionNotFound,
    SessionExpired,
    LockNotFound,
    AlreadyHeld,
    AlreadyWaiting,
    WrongMode,
    LockBusy,
    WaitTimeout,
    DeadlockVictim,
    WaitWithdrawn,
    LimitReached,
    CallAbandoned,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::InvalidArgument => "INVALID_ARGUMENT",
            Reason::SessionNotFound => "SESSION_NOT_FOUND",
            Reason::SessionExpired => "SESSION_EXPIRED",
            Reason::LockNotFound => "LOCK_NOT_FOUND",
            Reason::AlreadyHeld => "ALREADY_HELD",
            Reason::AlreadyWaiting => "ALREADY_WAITING",
            Reason::WrongMode => "WRONG_MODE",
            Reason::LockBusy => "LOCK_BUSY",
            Reason::WaitTimeout => "WAIT_TIMEOUT",
            Reason::DeadlockVictim => "DEADLOCK_VICTIM",
            Reason::WaitWithdrawn => "WAIT_WITHDRAWN",
            Reason::LimitReached => "LIMIT_REACHED",
            Reason::CallAbandoned => "CALL_ABANDONED",
        }
    }

    pub fn code(self) -> ErrorCode {
        match self {
            Reason::InvalidArgument => ErrorCode::InvalidArgument,
            Reason::SessionNotFound | Reason::LockNotFound => ErrorCode::NotFound,
            Reason::SessionExpired
            | Reason::AlreadyHeld
            | Reason::AlreadyWaiting
            | Reason::WrongMode
            | Reason::WaitWithdrawn
            | Reason::CallAbandoned => ErrorCode::FailedPrecondition,
            Reason::LockBusy => ErrorCode::Aborted,
            Reason::WaitTimeout => ErrorCode::Timeout,
            Reason::DeadlockVictim => ErrorCode::Deadlock,
            Reason::LimitReached => ErrorCode::ResourceExhausted,
        }
    }
}

fn err(reason: Reason, message: impl Into<String>) -> Outcome {
    err_with(reason, message, [])
}

/// An error outcome with `ErrorInfo` metadata.
fn err_with<const N: usize>(
    reason: Reason,
    message: impl Into<String>,
    metadata: [(&str, String); N],
) -> Outcome {
    Outcome {
        result: Some(Res::Error(Error {
            code: reason.code() as i32,
            message: message.into(),
            reason: reason.name().to_owned(),
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        })),
    }
}

fn granted(lock_id: u64, token: u64, mode: Mode) -> Outcome {
    Outcome {
        result: Some(Res::Granted(Granted {
            lock_id,
            fencing_token: token,
            mode: mode.to_proto() as i32,
        })),
    }
}

fn counts(released: usize, cancelled: usize) -> Outcome {
    Outcome {
        result: Some(Res::Counts(Counts {
            released: released as u32,
            cancelled: cancelled as u32,
        })),
    }
}

impl LockState {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            next_token: 1,
            ..Default::default()
        }
    }

    /// Applies the command committed at `index`.
    pub fn apply(&mut self, index: u64, cmd: Command) -> (Outcome, Vec<Event>) {
        self.applied = index;
        // The leader's clock may step back after a failover; keep time monotone.
        self.now_ms = self.now_ms.max(cmd.now_ms);
        let mut events = Vec::new();
        let outcome = match cmd.cmd {
            None => err(Reason::InvalidArgument, "empty command"),
            Some(Cmd::OpenSession(c)) => {
                self.open_session(index, c.ttl_ms, c.client_name, c.request_id)
            }
            Some(Cmd::KeepAlive(c)) => match self.session_mut(c.session_id) {
                Ok(s) => {
                    s.last_seen_ms = cmd.now_ms.max(s.last_seen_ms);
                    Outcome {
                        result: Some(Res::Session(SessionOpened {
                            session_id: s.id,
                            ttl_ms: s.ttl_ms,
                        })),
                    }
                }
                Err(e) => e,
            },
            Some(Cmd::CloseSession(c)) => match self.session_mut(c.session_id) {
                Ok(_) => {
                    let (r, w) = self.end_session(c.session_id, "closed", &mut events);
                    counts(r, w)
                }
                Err(e) => e,
            },
            Some(Cmd::Acquire(c)) => self.acquire(index, c, &mut events),
            Some(Cmd::Release(c)) => {
                self.release(c.session_id, c.lock_id, &c.resource, &mut events)
            }
            Some(Cmd::ReleaseAll(c)) => match self.session_mut(c.session_id) {
                Ok(_) => {
                    let (r, w) = self.release_all(
                        c.session_id,
                        Reason::WaitWithdrawn,
                        "its session released all locks",
                        &mut events,
                    );
                    counts(r, w)
                }
                Err(e) => e,
            },
            Some(Cmd::Upgrade(c)) => self.upgrade(index, c, &mut events),
            Some(Cmd::Downgrade(c)) => self.downgrade(c.session_id, c.lock_id, &mut events),
            Some(Cmd::CancelWait(c)) => {
                let n = self.cancel_wait(c.waiter_id, &mut events);
                counts(0, n)
            }
            Some(Cmd::Tick(t)) => {
                // Once leases are in memory no Tick expires sessions, even
                // one proposed before EnableLeases applied.
                let sessions = !t.leases_in_memory && !self.leases_in_memory;
                self.tick(t.refresh_sessions, sessions, &mut events);
                counts(0, 0)
            }
            Some(Cmd::EnableLeases(_)) => {
                self.leases_in_memory = true;
                counts(0, 0)
            }
            Some(Cmd::ExpireSessions(e)) => {
                let (mut r, mut w) = (0, 0);
                for sid in e.session_ids {
                    if self.sessions.contains_key(&sid) {
                        let (released, cancelled) = self.end_session(sid, "expired", &mut events);
                        (r, w) = (r + released, w + cancelled);
                        self.expired.insert(sid, self.now_ms);
                        self.stats.expired_sessions += 1;
                    }
                }
                self.forget_expired();
                counts(r, w)
            }
            Some(Cmd::Abandon(c)) => self.abandon(c.call_id, &mut events),
        };
        (outcome, events)
    }

    fn session_mut(&mut self, id: u64) -> Result<&mut Session, Outcome> {
        if let Some(at) = self.expired.get(&id) {
            let at = *at;
            return Err(err_with(
                Reason::SessionExpired,
                format!("session {id} expired at {at} ms (its TTL passed without a keep-alive); open a new session"),
                [("session_id", id.to_string())],
            ));
        }
        self.sessions.get_mut(&id).ok_or_else(|| {
            err_with(
                Reason::SessionNotFound,
                format!("session {id} does not exist"),
                [("session_id", id.to_string())],
            )
        })
    }

    fn open_session(&mut self, index: u64, ttl_ms: u64, name: String, request_id: u64) -> Outcome {
        if let Some(s) = self
            .opened
            .get(&request_id)
            .and_then(|id| self.sessions.get(id))
        {
            return Outcome {
                result: Some(Res::Session(SessionOpened {
                    session_id: s.id,
                    ttl_ms: s.ttl_ms,
                })),
            };
        }
        let l = self.limits;
        let ttl = if ttl_ms == 0 {
            l.default_ttl_ms
        } else {
            ttl_ms
        };
        if !(l.min_ttl_ms..=l.max_ttl_ms).contains(&ttl) {
            return err(
                Reason::InvalidArgument,
                format!(
                    "ttl_ms {ttl} is out of range {}..={}",
                    l.min_ttl_ms, l.max_ttl_ms
                ),
            );
        }
        if name.len() > l.max_client_name_bytes {
            return err(
                Reason::InvalidArgument,
                format!(
                    "client_name is {} bytes; the limit is {}",
                    name.len(),
                    l.max_client_name_bytes
                ),
            );
        }
        if self.sessions.len() >= l.max_sessions {
            return err(
                Reason::LimitReached,
                format!("the limit of {} open sessions is reached", l.max_sessions),
            );
        }
        self.sessions.insert(
            index,
            Session {
                id: index,
                name,
                ttl_ms: ttl,
                last_seen_ms: self.now_ms,
                locks: OrdSet::new(),
                waits: OrdSet::new(),
                requests: OrdMap::new(),
                request_id,
            },
        );
        if request_id != 0 {
            self.opened.insert(request_id, index);
        }
        Outcome {
            result: Some(Res::Session(SessionOpened {
                session_id: index,
                ttl_ms: ttl,
            })),
        }
    }

    /// Checks a resource name against the limits.
    pub fn check_resource(limits: &Limits, resource: &str) -> Result<(), String> {
        if resource.is_empty() {
            return Err("resource name must not be empty".into());
        }
        if resource.len() > limits.max_resource_bytes {
            return Err(format!(
                "resource name is {} bytes; the limit is {}",
                resource.len(),
                limits.max_resource_bytes
            ));
        }
        Ok(())
    }

    /// Checks a wait timeout (ms) against the limits.
    pub fn check_wait(limits: &Limits, ms: u64) -> Result<(), String> {
        if ms > limits.max_wait_ms {
            return Err(format!(
                "wait_timeout_ms {ms} exceeds the maximum {}",
                limits.max_wait_ms
            ));
        }
        Ok(())
    }

    fn acquire(
        &mut self,
        index: u64,
        c: proto::lock::v1::internal::Acquire,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let Some(mode) = Mode::from_proto(c.mode) else {
            return err(
                Reason::InvalidArgument,
                "mode must be SHARED, EXCLUSIVE or UPGRADEABLE",
            );
        };
        if let Err(m) = Self::check_resource(&self.limits, &c.resource) {
            return err(Reason::InvalidArgument, m);
        }
        if let Err(m) = Self::check_wait(&self.limits, c.wait_timeout_ms) {
            return err(Reason::InvalidArgument, m);
        }
        let previous = match self.session_mut(c.session_id) {
            Ok(s) => s.requests.get(&c.request_id).copied(),
            Err(e) => return e,
        };
        if let Some(e) = self.refuse_abandoned(c.call_id) {
            return e;
        }
        // A retry of a request already granted or waiting answers the same,
        // and its call now answers for the grant or wait.
        if c.request_id != 0 {
            if let Some(id) = previous {
                if let Some(h) = self.holder(id).cloned() {
                    self.adopt(id, h.call, c.call_id);
                    return granted(h.lock_id, h.token, h.mode);
                }
                if let Some(w) = self.waiter(id).cloned() {
                    self.adopt(id, w.call, c.call_id);
                    return Outcome {
                        result: Some(Res::Queued(Queued { waiter_id: id })),
                    };
                }
            }
        }
        let sid = c.session_id;
        let now = self.now_ms;
        if self.locks.len() >= self.limits.max_locks {
            return err(
                Reason::LimitReached,
                format!(
                    "the limit of {} held locks is reached",
                    self.limits.max_locks
                ),
            );
        }
        let max_waiters = self.limits.max_waiters_per_resource;
        let name = self.name(&c.resource);
        let res = self.resources.entry(name.clone()).or_default();
        if let Some(h) = res.holders.values().find(|h| h.session == sid) {
            return err(
                Reason::AlreadyHeld,
                format!(
                    "session {sid} already holds '{}' (lock {}, {}); upgrade or downgrade it instead",
                    c.resource,
                    h.lock_id,
                    h.mode.name()
                ),
            );
        }
        if let Some(w) = res.queue.iter().find(|w| w.session == sid) {
            return err(
                Reason::AlreadyWaiting,
                format!(
                    "session {sid} is already waiting for '{}' (wait {})",
                    c.resource, w.id
                ),
            );
        }
        if res.queue.is_empty() && res.compatible_with_holders(mode) {
            let token = self.next_token;
            self.next_token += 1;
            res.holders.insert(Holder {
                lock_id: index,
                session: sid,
                mode,
                token,
                since_ms: now,
                call: c.call_id,
                request_id: c.request_id,
            });
            self.own(c.call_id, index);
            self.locks.insert(index, name);
            self.stats.grants += 1;
            let s = self.sessions.get_mut(&sid).expect("checked above");
            s.locks.insert(index);
            if c.request_id != 0 {
                s.requests.insert(c.request_id, index);
            }
            return granted(index, token, mode);
        }
        if c.wait_timeout_ms == 0 {
            let holders = describe_holders(res);
            self.stats.timeouts += 1;
            self.gc_resource(&c.resource);
            return err_with(
                Reason::LockBusy,
                format!(
                    "'{}' is busy ({holders}); try-lock did not wait",
                    c.resource
                ),
                [("resource", c.resource.clone())],
            );
        }
        if res.queue.len() >= max_waiters {
            return err(
                Reason::LimitReached,
                format!("'{}' already has {max_waiters} waiters", c.resource),
            );
        }
        res.queue.push_back(Waiter {
            id: index,
            session: sid,
            mode,
            since_ms: now,
            deadline_ms: now.saturating_add(c.wait_timeout_ms),
            upgrade_of: None,
            request_id: c.request_id,
            call: c.call_id,
        });
        self.own(c.call_id, index);
        self.waiters.insert(index, name);
        let s = self.sessions.get_mut(&sid).expect("checked above");
        s.waits.insert(index);
        if c.request_id != 0 {
            s.requests.insert(c.request_id, index);
        }
        self.queued_outcome(index, sid, events)
    }

    /// After queueing wait `id` of session `sid`: abort a deadlock it closed.
    fn queued_outcome(&mut self, id: u64, sid: u64, events: &mut Vec<Event>) -> Outcome {
        if let Some(cycle) = self.find_cycle(sid) {
            let (victim, message) = self.describe_cycle(&cycle);
            self.stats.deadlocks += 1;
            if victim == id {
                if let Some(resource) = self.remove_waiter(id) {
                    self.grant_waiters(&resource, events);
                }
                return err(Reason::DeadlockVictim, message);
            }
            self.abort_waiter(victim, err(Reason::DeadlockVictim, message), events);
        }
        Outcome {
            result: Some(Res::Queued(Queued { waiter_id: id })),
        }
    }

    /// Records that `call` answers for wait or lock `id`.
    fn own(&mut self, call: u64, id: u64) {
        if call != 0 {
            self.calls.insert(call, id);
        }
    }

    fn disown(&mut self, call: u64, id: u64) {
        disown(&mut self.calls, call, id);
    }

    /// A retry (same request id) by call `new` takes over wait or lock `id`
    /// from call `old`: only the newest call's abandonment withdraws it.
    fn adopt(&mut self, id: u64, old: u64, new: u64) {
        self.disown(old, id);
        self.own(new, id);
        if let Some(r) = self.locks.get(&id) {
            if let Some(h) = self
                .resources
                .get_mut(r)
                .and_then(|r| r.holders.get_mut(&id))
            {
                h.call = new;
            }
        } else if let Some(r) = self.waiters.get(&id) {
            if let Some(w) = self
                .resources
                .get_mut(r)
                .and_then(|r| r.queue.iter_mut().find(|w| w.id == id))
            {
                w.call = new;
            }
        }
    }

    /// Refuses a command whose call was abandoned before it applied.
    fn refuse_abandoned(&self, call: u64) -> Option<Outcome> {
        (call != 0 && self.abandoned_set.contains(&call)).then(|| {
            err(
                Reason::CallAbandoned,
                format!("call {call} was abandoned by its client before this command applied"),
            )
        })
    }

    /// The handler of `call` went away before its answer reached the
    /// client: withdraw the wait or release the lock the call answers for.
    /// Every abandoned call leaves a tombstone (see `abandoned`).
    fn abandon(&mut self, call: u64, events: &mut Vec<Event>) -> Outcome {
        if call == 0 {
            return err(Reason::InvalidArgument, "call_id is required");
        }
        // Always remembered: it refuses a command of the call that is still
        // to come, and tells the proposer (by a read) that it landed.
        if self.abandoned_set.insert(call).is_none() {
            self.abandoned.push_back(call);
            while self.abandoned.len() > ABANDONED_REMEMBERED {
                if let Some(old) = self.abandoned.pop_front() {
                    self.abandoned_set.remove(&old);
                }
            }
        }
        let Some(id) = self.calls.get(&call).copied() else {
            return counts(0, 0);
        };
        if self.waiters.contains_key(&id) {
            self.abort_waiter(
                id,
                err(
                    Reason::WaitWithdrawn,
                    format!("wait {id} withdrawn: the call waiting for it went away"),
                ),
                events,
            );
            return counts(0, 1);
        }
        if self.locks.contains_key(&id) {
            self.drop_lock(id, events);
            return counts(1, 0);
        }
        self.calls.remove(&call);
        counts(0, 0)
    }

    fn waiter(&self, id: u64) -> Option<&Waiter> {
        let r = self.waiters.get(&id)?;
        self.resources.get(r)?.queue.iter().find(|w| w.id == id)
    }

    fn holder(&self, lock_id: u64) -> Option<&Holder> {
        let r = self.locks.get(&lock_id)?;
        self.resources.get(r)?.holders.get(&lock_id)
    }

    fn release(
        &mut self,
        sid: u64,
        lock_id: u64,
        resource: &str,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if let Err(e) = self.session_mut(sid) {
            return e;
        }
        let lock_id = if lock_id != 0 {
            lock_id
        } else if resource.is_empty() {
            return err(
                Reason::InvalidArgument,
                "give a lock_id or a resource to release",
            );
        } else {
            // By resource, a release also withdraws this session's wait for
            // it: a client that gave up on an acquire cleans up either way.
            let res = self.resources.get(resource);
            let wait = res.and_then(|r| {
                r.queue
                    .iter()
                    .find(|w| w.session == sid && w.upgrade_of.is_none())
            });
            let held = res.and_then(|r| r.holders.values().find(|h| h.session == sid));
            match (held.map(|h| h.lock_id), wait.map(|w| w.id)) {
                (held, Some(w)) => {
                    self.abort_waiter(
                        w,
                        err(
                            Reason::WaitWithdrawn,
                            format!("wait withdrawn: session {sid} released '{resource}'"),
                        ),
                        events,
                    );
                    if let Some(l) = held {
                        self.drop_lock(l, events);
                    }
                    return counts(usize::from(held.is_some()), 1);
                }
                (Some(l), None) => l,
                (None, None) => {
                    return err(
                        Reason::LockNotFound,
                        format!("session {sid} neither holds nor waits for '{resource}'"),
                    )
                }
            }
        };
        match self.held_by(lock_id, sid) {
            Err(e) => e,
            Ok(_) => {
                self.drop_lock(lock_id, events);
                counts(1, 0)
            }
        }
    }

    /// The holding `lock_id`, if it is held and by session `sid`.
    fn held_by(&self, lock_id: u64, sid: u64) -> Result<Holder, Outcome> {
        match self.holder(lock_id) {
            None => Err(err(
                Reason::LockNotFound,
                format!("lock {lock_id} is not held (never granted, or already released)"),
            )),
            Some(h) if h.session != sid => Err(err(
                Reason::LockNotFound,
                format!(
                    "lock {lock_id} is held by session {}, not by session {sid}",
                    h.session
                ),
            )),
            Some(h) => Ok(h.clone()),
        }
    }

    /// Removes a held lock (and an upgrade waiting on it), then grants.
    fn drop_lock(&mut self, lock_id: u64, events: &mut Vec<Event>) {
        let Some(resource) = self.locks.remove(&lock_id) else {
            return;
        };
        let res = self
            .resources
            .get_mut(&resource)
            .expect("lock's resource exists");
        let holder = res.holders.remove(&lock_id).expect("lock is held");
        let upgrade = res
            .queue
            .iter()
            .find(|w| w.upgrade_of == Some(lock_id))
            .map(|w| w.id);
        self.disown(holder.call, lock_id);
        if let Some(s) = self.sessions.get_mut(&holder.session) {
            s.locks.remove(&lock_id);
            forget_request(&mut s.requests, holder.request_id, lock_id);
        }
        if let Some(w) = upgrade {
            self.abort_waiter(
                w,
                err(
                    Reason::WaitWithdrawn,
                    format!("lock {lock_id} was released while its upgrade waited"),
                ),
                events,
            );
        }
        self.grant_waiters(&resource, events);
    }

    fn release_all(
        &mut self,
        sid: u64,
        reason: Reason,
        why: &str,
        events: &mut Vec<Event>,
    ) -> (usize, usize) {
        let Some(s) = self.sessions.get(&sid) else {
            return (0, 0);
        };
        let locks: Vec<u64> = s.locks.iter().copied().collect();
        let waits: Vec<u64> = s.waits.iter().copied().collect();
        for w in &waits {
            self.abort_waiter(*w, err(reason, format!("wait cancelled: {why}")), events);
        }
        for l in &locks {
            self.drop_lock(*l, events);
        }
        (locks.len(), waits.len())
    }

    fn end_session(&mut self, sid: u64, why: &str, events: &mut Vec<Event>) -> (usize, usize) {
        let counts = self.release_all(
            sid,
            Reason::SessionExpired,
            &format!("session {sid} {why}"),
            events,
        );
        if let Some(s) = self.sessions.remove(&sid) {
            self.opened.remove(&s.request_id);
        }
        counts
    }

    fn upgrade(
        &mut self,
        index: u64,
        c: proto::lock::v1::internal::Upgrade,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if let Err(e) = self.session_mut(c.session_id) {
            return e;
        }
        if let Err(m) = Self::check_wait(&self.limits, c.wait_timeout_ms) {
            return err(Reason::InvalidArgument, m);
        }
        if let Some(e) = self.refuse_abandoned(c.call_id) {
            return e;
        }
        let sid = c.session_id;
        let h = match self.held_by(c.lock_id, sid) {
            Ok(h) => h,
            Err(e) => return e,
        };
        match h.mode {
            Mode::Exclusive => return granted(h.lock_id, h.token, h.mode),
            Mode::Shared => {
                return err(
                    Reason::WrongMode,
                    format!(
                        "lock {} is shared; only an upgradeable lock can be upgraded",
                        c.lock_id
                    ),
                )
            }
            Mode::Upgradeable => {}
        }
        let resource = self.locks[&c.lock_id].clone();
        let now = self.now_ms;
        let res = self.resources.get_mut(&resource).expect("held resource");
        if let Some(w) = res.queue.iter().find(|w| w.upgrade_of == Some(c.lock_id)) {
            // A repeated upgrade re-attaches to the pending one (its call
            // now answers for it).
            let (id, old) = (w.id, w.call);
            self.adopt(id, old, c.call_id);
            return Outcome {
                result: Some(Res::Queued(Queued { waiter_id: id })),
            };
        }
        if res.holders.len() == 1 {
            let token = self.next_token;
            self.next_token += 1;
            let holder = res.holders.get_mut(&c.lock_id).expect("held");
            holder.mode = Mode::Exclusive;
            holder.token = token;
            self.stats.grants += 1;
            return granted(c.lock_id, token, Mode::Exclusive);
        }
        if c.wait_timeout_ms == 0 {
            self.stats.timeouts += 1;
            return err(
                Reason::LockBusy,
                format!(
                    "'{resource}' still has other holders ({}); upgrade did not wait",
                    describe_holders(res)
                ),
            );
        }
        // The upgrade goes first: it already excludes other U and X
        // requests, and waits only for the current shared holders to leave.
        res.queue.push_front(Waiter {
            id: index,
            session: sid,
            mode: Mode::Exclusive,
            since_ms: now,
            deadline_ms: now.saturating_add(c.wait_timeout_ms),
            upgrade_of: Some(c.lock_id),
            request_id: 0,
            call: c.call_id,
        });
        self.own(c.call_id, index);
        self.waiters.insert(index, resource);
        self.sessions
            .get_mut(&sid)
            .expect("checked")
            .waits
            .insert(index);
        self.queued_outcome(index, sid, events)
    }

    fn downgrade(&mut self, sid: u64, lock_id: u64, events: &mut Vec<Event>) -> Outcome {
        if let Err(e) = self.session_mut(sid) {
            return e;
        }
        let h = match self.held_by(lock_id, sid) {
            Ok(h) => h,
            Err(e) => return e,
        };
        if h.mode == Mode::Shared {
            return granted(lock_id, h.token, Mode::Shared);
        }
        let resource = self.locks[&lock_id].clone();
        let res = self.resources.get_mut(&resource).expect("held resource");
        // A pending upgrade of this lock is moot once it is shared.
        let upgrade = res
            .queue
            .iter()
            .find(|w| w.upgrade_of == Some(lock_id))
            .map(|w| w.id);
        res.holders.get_mut(&lock_id).expect("held").mode = Mode::Shared;
        if let Some(w) = upgrade {
            self.abort_waiter(
                w,
                err(
                    Reason::WaitWithdrawn,
                    format!("lock {lock_id} was downgraded while its upgrade waited"),
                ),
                events,
            );
        }
        self.grant_waiters(&resource, events);
        granted(lock_id, h.token, Mode::Shared)
    }

    /// Times out a wait; returns 1 if it was still waiting.
    fn cancel_wait(&mut self, waiter_id: u64, events: &mut Vec<Event>) -> usize {
        let Some(resource) = self.waiters.get(&waiter_id) else {
            return 0;
        };
        let w = self.resources[resource]
            .queue
            .iter()
            .find(|w| w.id == waiter_id)
            .expect("indexed waiter is queued")
            .clone();
        let waited = self.now_ms.saturating_sub(w.since_ms);
        let holders = describe_holders(&self.resources[resource]);
        let resource = resource.clone();
        self.stats.timeouts += 1;
        self.abort_waiter(
            waiter_id,
            err_with(
                Reason::WaitTimeout,
                format!("timed out after {waited} ms waiting for '{resource}' ({holders})"),
                [
                    ("resource", resource.to_string()),
                    ("waited_ms", waited.to_string()),
                ],
            ),
            events,
        );
        1
    }

    /// Expires overdue waits and breaks deadlocks; with `sessions` (the
    /// Ticks of builds that replicated keep-alives) expires sessions by
    /// their last replicated keep-alive too.
    fn tick(&mut self, refresh: bool, sessions: bool, events: &mut Vec<Event>) {
        let now = self.now_ms;
        if sessions {
            if refresh {
                let ids: Vec<u64> = self.sessions.keys().copied().collect();
                for id in ids {
                    if let Some(s) = self.sessions.get_mut(&id) {
                        s.last_seen_ms = s.last_seen_ms.max(now);
                    }
                }
            }
            let expired: Vec<u64> = self
                .sessions
                .values()
                .filter(|s| s.expires_at() <= now)
                .map(|s| s.id)
                .collect();
            for sid in expired {
                self.end_session(sid, "expired", events);
                self.expired.insert(sid, now);
                self.stats.expired_sessions += 1;
            }
            self.forget_expired();
        }
        let grace = self.limits.wait_grace_ms;
        let overdue: Vec<u64> = self
            .resources
            .values()
            .flat_map(|r| r.queue.iter())
            .filter(|w| w.deadline_ms.saturating_add(grace) <= now)
            .map(|w| w.id)
            .collect();
        for w in overdue {
            self.cancel_wait(w, events);
        }
        self.scan_deadlocks(events);
    }

    fn forget_expired(&mut self) {
        while self.expired.len() > self.limits.remembered_expired {
            let oldest = self.expired.get_min().map(|(id, _)| *id);
            if let Some(id) = oldest {
                self.expired.remove(&id);
            }
        }
    }

    /// Finds and breaks every wait-for cycle (the periodic scan).
    pub fn scan_deadlocks(&mut self, events: &mut Vec<Event>) -> usize {
        let mut broken = 0;
        while let Some(cycle) = self.find_any_cycle() {
            let (victim, message) = self.describe_cycle(&cycle);
            self.stats.deadlocks += 1;
            self.abort_waiter(victim, err(Reason::DeadlockVictim, message), events);
            broken += 1;
        }
        broken
    }

    /// Wait-for edges of session `sid`, as (blocking session, the wait of
    /// `sid` that is blocked).
    fn edges(&self, sid: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let Some(s) = self.sessions.get(&sid) else {
            return out;
        };
        for w in &s.waits {
            let Some(res) = self.waiters.get(w).and_then(|r| self.resources.get(r)) else {
                continue;
            };
            let Some(pos) = res.queue.iter().position(|q| q.id == *w) else {
                continue;
            };
            let me = &res.queue[pos];
            for h in res.holders.values() {
                let blocks = if me.upgrade_of.is_some() {
                    Some(h.lock_id) != me.upgrade_of
                } else {
                    !me.mode.compatible(h.mode)
                };
                if blocks && h.session != sid {
                    out.push((h.session, *w));
                }
            }
            for ahead in res.queue.iter().take(pos) {
                if ahead.session != sid && !me.mode.compatible(ahead.mode) {
                    out.push((ahead.session, *w));
                }
            }
        }
        out
    }

    /// A cycle through `start` in the wait-for graph, as (session, the wait
    /// by which it waits for the next session) steps. Used when `start`
    /// queues a new wait: only a cycle through it can be new.
    fn find_cycle(&self, start: u64) -> Option<Vec<(u64, u64)>> {
        let mut seen = std::collections::HashSet::new();
        self.search(start, &mut seen, |next, _| next == start)
    }

    /// Any cycle in the wait-for graph, found in one depth-first pass over
    /// every waiting session (each visited once: linear in the graph, where
    /// a search from every session would be quadratic).
    fn find_any_cycle(&self) -> Option<Vec<(u64, u64)>> {
        let mut seen = std::collections::HashSet::new();
        let waiting: Vec<u64> = self
            .sessions
            .values()
            .filter(|s| !s.waits.is_empty())
            .map(|s| s.id)
            .collect();
        for start in waiting {
            if seen.contains(&start) {
                continue;
            }
            // A session on the current path closes a cycle.
            if let Some(c) = self.search(start, &mut seen, |next, path| {
                path.iter().any(|(s, _)| *s == next)
            }) {
                return Some(c);
            }
        }
        None
    }

    /// Iterative depth-first search from `start` (no recursion: a chain of
    /// waits may be as long as the number of sessions). `closes(next, path)`
    /// says whether following an edge to `next` closes a cycle; the cycle is
    /// returned from `next` onward. Sessions in `seen` are not entered
    /// again; deterministic, as sessions and edges come in id order.
    fn search(
        &self,
        start: u64,
        seen: &mut std::collections::HashSet<u64>,
        closes: impl Fn(u64, &[(u64, u64)]) -> bool,
    ) -> Option<Vec<(u64, u64)>> {
        // The path so far, and for each session on it the edges left to try.
        let mut path: Vec<(u64, u64)> = Vec::new();
        let mut stack: Vec<(u64, std::vec::IntoIter<(u64, u64)>)> = Vec::new();
        seen.insert(start);
        stack.push((start, self.edges(start).into_iter()));
        while let Some((node, edges)) = stack.last_mut() {
            let node = *node;
            match edges.next() {
                Some((next, wait)) => {
                    path.push((node, wait));
                    if closes(next, &path) {
                        let from = path.iter().position(|(s, _)| *s == next).unwrap_or(0);
                        return Some(path.split_off(from));
                    }
                    if seen.insert(next) {
                        stack.push((next, self.edges(next).into_iter()));
                    } else {
                        path.pop();
                    }
                }
                None => {
                    stack.pop();
                    path.pop();
                }
            }
        }
        None
    }

    /// The victim (youngest wait in the cycle) and a message naming it.
    fn describe_cycle(&self, cycle: &[(u64, u64)]) -> (u64, String) {
        let resource = |w: &u64| self.waiters.get(w).map_or("?", |r| &**r);
        let victim = cycle.iter().max_by_key(|(_, w)| *w).expect("non-empty");
        let steps: Vec<String> = cycle
            .iter()
            .enumerate()
            .map(|(i, (s, w))| {
                let next = cycle[(i + 1) % cycle.len()].0;
                format!(
                    "session {s} waits for '{}' held or awaited by session {next}",
                    resource(w)
                )
            })
            .collect();
        let message = format!(
            "deadlock: {}; aborted the youngest wait (wait {} of session {} for '{}')",
            steps.join(", "),
            victim.1,
            victim.0,
            resource(&victim.1)
        );
        (victim.1, message)
    }

    /// Removes a wait, notifies its waiter with `outcome`, regrants.
    fn abort_waiter(&mut self, waiter_id: u64, outcome: Outcome, events: &mut Vec<Event>) {
        if let Some(resource) = self.remove_waiter(waiter_id) {
            events.push(Event { waiter_id, outcome });
            self.grant_waiters(&resource, events);
        }
    }

    fn remove_waiter(&mut self, waiter_id: u64) -> Option<Arc<str>> {
        let resource = self.waiters.remove(&waiter_id)?;
        let res = self
            .resources
            .get_mut(&resource)
            .expect("waiter's resource");
        let pos = res
            .queue
            .iter()
            .position(|w| w.id == waiter_id)
            .expect("queued");
        let w = res.queue.remove(pos).expect("present");
        self.disown(w.call, waiter_id);
        if let Some(s) = self.sessions.get_mut(&w.session) {
            s.waits.remove(&waiter_id);
            forget_request(&mut s.requests, w.request_id, waiter_id);
        }
        Some(resource)
    }

    /// Grants waiters from the head of the queue while they are compatible.
    fn grant_waiters(&mut self, resource: &str, events: &mut Vec<Event>) {
        let name = self.name(resource);
        let Some(res) = self.resources.get_mut(resource) else {
            return;
        };
        while let Some(head) = res.queue.front() {
            if let Some(lock_id) = head.upgrade_of {
                if res.holders.len() != 1 || !res.holders.contains_key(&lock_id) {
                    break;
                }
                let w = res.queue.pop_front().expect("head");
                let token = self.next_token;
                self.next_token += 1;
                let h = res
                    .holders
                    .get_mut(&lock_id)
                    .expect("upgrading lock is held");
                h.mode = Mode::Exclusive;
                h.token = token;
                disown(&mut self.calls, w.call, w.id);
                self.waiters.remove(&w.id);
                if let Some(s) = self.sessions.get_mut(&w.session) {
                    s.waits.remove(&w.id);
                }
                self.stats.grants += 1;
                events.push(Event {
                    waiter_id: w.id,
                    outcome: granted(lock_id, token, Mode::Exclusive),
                });
                continue;
            }
            if !res.compatible_with_holders(head.mode) {
                break;
            }
            let w = res.queue.pop_front().expect("head");
            let token = self.next_token;
            self.next_token += 1;
            // A granted wait becomes a lock with the same id.
            res.holders.insert(Holder {
                lock_id: w.id,
                session: w.session,
                mode: w.mode,
                token,
                since_ms: self.now_ms,
                call: w.call,
                request_id: w.request_id,
            });
            self.waiters.remove(&w.id);
            self.locks.insert(w.id, name.clone());
            if let Some(s) = self.sessions.get_mut(&w.session) {
                s.waits.remove(&w.id);
                s.locks.insert(w.id);
            }
            self.stats.grants += 1;
            events.push(Event {
                waiter_id: w.id,
                outcome: granted(w.id, token, w.mode),
            });
        }
        res.queue.shrink();
        self.gc_resource(resource);
    }

    /// The shared name of `resource` (the existing one if it is in use).
    fn name(&self, resource: &str) -> Arc<str> {
        match self.resources.get_key_value(resource) {
            Some((k, _)) => k.clone(),
            None => Arc::from(resource),
        }
    }

    fn gc_resource(&mut self, resource: &str) {
        if self
            .resources
            .get(resource)
            .is_some_and(|r| r.holders.is_empty() && r.queue.is_empty())
        {
            self.resources.remove(resource);
        }
    }

    /// Every held lock with its resource, ordered by lock id, after `after`.
    pub fn list_locks(&self, after: u64, session: u64, limit: usize) -> Vec<(String, Holder)> {
        self.locks
            .range(after + 1..)
            .filter_map(|(id, r)| {
                let h = self.resources.get(r)?.holders.get(id)?;
                (session == 0 || h.session == session).then(|| (r.to_string(), h.clone()))
            })
            .take(limit)
            .collect()
    }

    pub fn waiter_count(&self) -> usize {
        self.waiters.len()
    }
}

/// Forgets that `call` answers for `id` (if it still does). A free function
/// so it can be used while a resource of the state is borrowed.
fn disown(calls: &mut OrdMap<u64, u64>, call: u64, id: u64) {
    if call != 0 && calls.get(&call) == Some(&id) {
        calls.remove(&call);
    }
}

/// Forgets that `request` created `id`: by its request id when known (0:
/// it had none), else (a lock from a snapshot of an earlier build) by a
/// scan of the session's requests.
fn forget_request(requests: &mut OrdMap<u64, u64>, request: u64, id: u64) {
    match request {
        0 => {}
        UNKNOWN_REQUEST => {
            let stale: Vec<u64> = requests
                .iter()
                .filter(|(_, v)| **v == id)
                .map(|(k, _)| *k)
                .collect();
            for r in stale {
                requests.remove(&r);
            }
        }
        r => {
            if requests.get(&r) == Some(&id) {
                requests.remove(&r);
            }
        }
    }
}

fn describe_holders(res: &Resource) -> String {
    if res.holders.is_empty() {
        return format!("{} waiting ahead", res.queue.len());
    }
    let hs: Vec<String> = res
        .holders
        .values()
        .map(|h| format!("{} by session {}", h.mode.name(), h.session))
        .collect();
    format!("held {}", hs.join(", "))
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
