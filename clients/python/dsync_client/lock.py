"""The lock service client: sessions kept alive by a background thread, and
locks that carry their fencing token and release as context managers.

    client = Client(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
    with client.open_session(ttl_ms=10_000, name="billing") as session:
        with session.lock("invoice/42", mode="exclusive", wait_timeout_ms=5_000) as lock:
            storage.write(data, fence=lock.fencing_token)

Layers:

* :class:`Client` wraps one RPC per method around a
  :class:`~dsync_client.channel.LeaderChannel`, saying for each whether it is
  safe to repeat after an ambiguous failure. It returns the generated
  protobuf responses and takes plain ids, for callers managing sessions
  themselves.
* :class:`Session` owns a session id and a daemon thread sending KeepAlive
  every ttl/3 (following the leader like any call). When the service says the
  session is gone (SESSION_EXPIRED / SESSION_NOT_FOUND) the session is marked
  lost and every later use raises :class:`~dsync_client.errors.SessionExpired`.
* :class:`Lock` is one grant: lock id, fencing token, mode.
* :class:`SessionStream` carries one session's acquires and releases as
  messages on one bidirectional stream to the leader (no call per
  operation), attached again on the new leader when it breaks.

Acquire is retried across leader changes safely: each logical acquire gets a
random 64-bit ``request_id``, kept across its retries; the server returns the
same grant or re-attaches to the same wait. Its gRPC deadline is the wait plus
a margin; if that passes (or the call is cancelled) before the answer
arrives, the server withdraws the wait or releases the grant itself.
"""

from __future__ import annotations

import concurrent.futures
import copy
import enum
import logging
import queue
import secrets
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from types import TracebackType

import grpc

from . import errors
from ._proto import lock_pb2, lock_pb2_grpc
from .channel import LeaderChannel
from .errors import DsyncError, SessionExpired

log = logging.getLogger("dsync_client")


class LockMode(enum.IntEnum):
    """Mirrors ``dsync.lock.v1.LockMode``."""

    SHARED = lock_pb2.LOCK_MODE_SHARED
    EXCLUSIVE = lock_pb2.LOCK_MODE_EXCLUSIVE
    UPGRADEABLE = lock_pb2.LOCK_MODE_UPGRADEABLE

    @classmethod
    def parse(cls, mode: ModeLike) -> LockMode:
        """Accepts a LockMode, the proto enum value, or "shared" /
        "exclusive" / "upgradeable" (any case, optional LOCK_MODE_ prefix)."""
        if isinstance(mode, str):
            name = mode.strip().upper().removeprefix("LOCK_MODE_")
            try:
                return cls[name]
            except KeyError:
                raise ValueError(f"unknown lock mode {mode!r}; use shared, exclusive or upgradeable") from None
        return cls(int(mode))


ModeLike = LockMode | int | str


def _mode_or(value: int, default: LockMode) -> LockMode:
    try:
        return LockMode(value)
    except ValueError:
        return default


def new_request_id() -> int:
    """A random non-zero 64-bit id (0 means "not idempotent" to the server)."""
    return secrets.randbits(64) | 1


_OPEN_SESSION_HAS_REQUEST_ID = "request_id" in lock_pb2.OpenSessionRequest.DESCRIPTOR.fields_by_name


class Client:
    """A client of one lock-svc replica set.

    ``endpoints`` are ``host:port`` addresses of any of its replicas (a list,
    or a comma-separated string). Calls go to the leader; see
    :mod:`dsync_client.channel` for the retry rules.

    ``request_timeout`` bounds each attempt of a call that does not wait for a
    lock; ``retry_for`` bounds how long a call keeps retrying; a waiting call
    (Acquire, Upgrade) gets ``wait + wait_margin`` per attempt.
    ``watch_leader`` keeps a leader watch on every replica so a call moves to
    a newly elected leader at once (every lock call is safe to repeat).
    """

    #: The server's default wait (AcquireRequest.wait_timeout_ms unset).
    DEFAULT_WAIT_MS = 30_000

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        request_timeout: float = 10.0,
        retry_for: float = 10.0,
        wait_margin: float = 5.0,
        max_attempts: int = 50,
        watch_leader: bool = True,
    ) -> None:
        self.conn = LeaderChannel(
            endpoints, retry_for=retry_for, max_attempts=max_attempts, watch_leader=watch_leader
        )
        self.request_timeout = request_timeout
        self.wait_margin = wait_margin

    def close(self) -> None:
        """Closes every channel (sessions' keep-alive threads stop)."""
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Blocks until the replica set serves a linearizable read (a leader
        exists); raises the last error once ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.list_sessions()
                return
            except DsyncError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def _stub(self, ch: grpc.Channel) -> lock_pb2_grpc.LockServiceStub:
        return lock_pb2_grpc.LockServiceStub(ch)

    # --- sessions --------------------------------------------------------------

    def open_session(self, ttl_ms: int = 10_000, name: str = "") -> Session:
        """Opens a session kept alive in the background until closed."""
        sent = time.monotonic()
        r = self.open_session_raw(ttl_ms, name)
        return Session(self, r.session_id, r.ttl_ms, keep_alive=True, renewed_at=sent)

    def open_session_raw(self, ttl_ms: int = 10_000, name: str = "") -> lock_pb2.OpenSessionResponse:
        """Opens a session nothing keeps alive."""
        req = lock_pb2.OpenSessionRequest(ttl_ms=ttl_ms, client_name=name)
        if _OPEN_SESSION_HAS_REQUEST_ID:  # field 3, newer servers deduplicate on it
            req.request_id = new_request_id()
        return self.conn.call(
            lambda ch, t: self._stub(ch).OpenSession.future(req, timeout=t),
            timeout=self.request_timeout,
            safe_to_repeat=_OPEN_SESSION_HAS_REQUEST_ID,
        )

    def attach_session(self, session_id: int, *, keep_alive: bool = False) -> Session:
        """A :class:`Session` for an existing id (not closed on exit unless
        ``keep_alive``, i.e. unless this object owns it and keeps it alive;
        then one KeepAlive is sent at once, which also tells its TTL)."""
        sent = time.monotonic()
        ttl_ms = self.keep_alive(session_id).ttl_ms if keep_alive else 0
        return Session(self, session_id, ttl_ms, keep_alive=keep_alive, renewed_at=sent)

    def keep_alive(
        self, session_id: int, *, timeout: float | None = None, retry_for: float | None = None
    ) -> lock_pb2.KeepAliveResponse:
        req = lock_pb2.KeepAliveRequest(session_id=session_id)
        return self.conn.call(
            lambda ch, t: self._stub(ch).KeepAlive.future(req, timeout=t),
            timeout=timeout or self.request_timeout,
            safe_to_repeat=True,
            retry_for=retry_for,
        )

    def close_session(self, session_id: int) -> lock_pb2.CloseSessionResponse:
        req = lock_pb2.CloseSessionRequest(session_id=session_id)
        return self.conn.call(
            lambda ch, t: self._stub(ch).CloseSession.future(req, timeout=t),
            timeout=self.request_timeout,
            safe_to_repeat=True,
        )

    # --- locks -----------------------------------------------------------------

    def _wait_timeout(self, wait_timeout_ms: int | None) -> float:
        ms = self.DEFAULT_WAIT_MS if wait_timeout_ms is None else wait_timeout_ms
        return ms / 1000 + self.wait_margin

    def acquire(
        self,
        session_id: int,
        resource: str,
        mode: ModeLike = LockMode.EXCLUSIVE,
        wait_timeout_ms: int | None = None,
        *,
        request_id: int | None = None,
    ) -> lock_pb2.AcquireResponse:
        """Acquires ``resource``, waiting up to ``wait_timeout_ms`` (None = the
        server default of 30 s, 0 = try-lock)."""
        req = lock_pb2.AcquireRequest(
            session_id=session_id,
            resource=resource,
            request_id=request_id or new_request_id(),
        )
        req.mode = LockMode.parse(mode).value
        if wait_timeout_ms is not None:
            req.wait_timeout_ms = wait_timeout_ms
        return self.conn.call(
            lambda ch, t: self._stub(ch).Acquire.future(req, timeout=t),
            timeout=self._wait_timeout(wait_timeout_ms),
            waits=True,
            safe_to_repeat=True,
        )

    def release(self, session_id: int, lock_id: int = 0, resource: str = "") -> None:
        """Releases by lock id, or (lock_id 0) by resource."""
        req = lock_pb2.ReleaseRequest(session_id=session_id, lock_id=lock_id, resource=resource)
        self.conn.call(
            lambda ch, t: self._stub(ch).Release.future(req, timeout=t),
            timeout=self.request_timeout,
            safe_to_repeat=True,
        )

    def release_all(self, session_id: int) -> lock_pb2.ReleaseAllResponse:
        req = lock_pb2.ReleaseAllRequest(session_id=session_id)
        return self.conn.call(
            lambda ch, t: self._stub(ch).ReleaseAll.future(req, timeout=t),
            timeout=self.request_timeout,
            safe_to_repeat=True,
        )

    def upgrade(self, session_id: int, lock_id: int, wait_timeout_ms: int | None = None) -> int:
        """Upgrades an UPGRADEABLE lock to EXCLUSIVE; returns the NEW fencing token."""
        req = lock_pb2.UpgradeRequest(session_id=session_id, lock_id=lock_id)
        if wait_timeout_ms is not None:
            req.wait_timeout_ms = wait_timeout_ms
        r = self.conn.call(
            lambda ch, t: self._stub(ch).Upgrade.future(req, timeout=t),
            timeout=self._wait_timeout(wait_timeout_ms),
            waits=True,
            # A repeat re-attaches to the pending upgrade, or answers the
            # token of a lock already EXCLUSIVE (lock.proto, RETRIES).
            safe_to_repeat=True,
        )
        return r.fencing_token

    def downgrade(self, session_id: int, lock_id: int) -> int:
        """Downgrades to SHARED; returns the fencing token (unchanged)."""
        req = lock_pb2.DowngradeRequest(session_id=session_id, lock_id=lock_id)
        r = self.conn.call(
            lambda ch, t: self._stub(ch).Downgrade.future(req, timeout=t),
            timeout=self.request_timeout,
            safe_to_repeat=True,  # a SHARED lock answers its token
        )
        return r.fencing_token

    # --- reads (linearizable on any replica) -----------------------------------

    def status(self, resource: str) -> lock_pb2.GetStatusResponse:
        """Holders and waiters of ``resource``."""
        req = lock_pb2.GetStatusRequest(resource=resource)
        return self.conn.call(
            lambda ch, t: self._stub(ch).GetStatus.future(req, timeout=t),
            timeout=self.request_timeout,
            safe_to_repeat=True,
        )

    def list_locks(
        self, session_id: int = 0, *, page_size: int = 0, max_pages: int = 1000
    ) -> list[lock_pb2.Holder]:
        """Every held lock (only ``session_id``'s when non-zero), all pages."""
        return list(self.iter_locks(session_id, page_size=page_size, max_pages=max_pages))

    def iter_locks(
        self, session_id: int = 0, *, page_size: int = 0, max_pages: int = 1000
    ) -> Iterator[lock_pb2.Holder]:
        token = ""
        for _ in range(max_pages):
            r = self._list_page(
                lock_pb2.ListLocksRequest(page_size=page_size, page_token=token, session_id=session_id)
            )
            yield from r.locks
            if not r.next_page_token or r.next_page_token == token:
                return
            token = r.next_page_token

    def _list_page(self, req: lock_pb2.ListLocksRequest) -> lock_pb2.ListLocksResponse:
        return self.conn.call(
            lambda ch, t: self._stub(ch).ListLocks.future(req, timeout=t),
            timeout=self.request_timeout,
            safe_to_repeat=True,
        )

    def stream(self, session_id: int) -> SessionStream:
        """A :class:`SessionStream` carrying session ``session_id``'s
        acquires and releases as messages on one stream to the leader."""
        return SessionStream(self, session_id)

    def list_sessions(self) -> list[lock_pb2.Session]:
        r = self.conn.call(
            lambda ch, t: self._stub(ch).ListSessions.future(lock_pb2.ListSessionsRequest(), timeout=t),
            timeout=self.request_timeout,
            safe_to_repeat=True,
        )
        return list(r.sessions)


def _session_gone(e: DsyncError) -> bool:
    return isinstance(e, (errors.SessionExpired, errors.SessionNotFound))


class Session:
    """A lock-service session; see the module docstring.

    Usable as a context manager: ``with client.open_session() as s: ...``
    closes it (releasing its locks) on exit.
    """

    def __init__(
        self,
        client: Client,
        session_id: int,
        ttl_ms: int,
        *,
        keep_alive: bool,
        renewed_at: float | None = None,
    ) -> None:
        self.client = client
        self.id = session_id
        self.ttl_ms = ttl_ms
        self._owned = keep_alive
        self._lost: DsyncError | None = None
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When the last acknowledged KeepAlive (or the open) was *sent*: the
        # server's TTL runs from no earlier than that.
        self._renewed_at = time.monotonic() if renewed_at is None else renewed_at
        if keep_alive and ttl_ms > 0:
            self._thread = threading.Thread(
                target=Session._keep_alive_loop,
                args=(weakref.ref(self), client, session_id, ttl_ms, self._stop),
                name=f"dsync-keepalive-{session_id}",
                daemon=True,
            )
            self._thread.start()

    def __repr__(self) -> str:
        state = "lost" if self._lost else "closed" if self._closed else "open"
        return f"Session(id={self.id}, ttl_ms={self.ttl_ms}, {state})"

    @property
    def lost(self) -> bool:
        """True once the service said this session expired or does not exist,
        or once a TTL has passed on this client's clock since the last
        acknowledged keep-alive was sent (its locks may be gone: stop acting
        on them)."""
        if self._lost is None and self._thread is not None and self.expired_by_clock():
            self._mark_lost(
                SessionExpired(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"session {self.id}: no keep-alive acknowledged within its TTL of {self.ttl_ms} ms",
                    "SESSION_EXPIRED",
                    {"session_id": str(self.id)},
                )
            )
        return self._lost is not None

    def valid_until(self) -> float:
        """``time.monotonic()`` before which the session certainly has not
        expired: the last acknowledged keep-alive's send time plus the TTL."""
        return self._renewed_at + self.ttl_ms / 1000

    def expired_by_clock(self) -> bool:
        return self.ttl_ms > 0 and time.monotonic() >= self.valid_until()

    def _mark_lost(self, e: DsyncError) -> None:
        if self._lost is None:
            log.warning("dsync session %d lost: %s", self.id, e)
            self._lost = e
            self._stop.set()

    def check(self) -> None:
        """Raises :class:`SessionExpired` if the session is lost or closed."""
        if self.lost:
            raise SessionExpired(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {self.id} is lost: {self._lost.message}",
                "SESSION_EXPIRED",
                {"session_id": str(self.id)},
            ) from self._lost
        if self._closed:
            raise SessionExpired(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {self.id} was closed",
                "SESSION_EXPIRED",
                {"session_id": str(self.id)},
            )

    @staticmethod
    def _keep_alive_loop(ref: weakref.ref[Session], client: Client, session_id: int, ttl_ms: int,
                         stop: threading.Event) -> None:
        """Runs in the keep-alive thread. Holds the Session only weakly: a
        Session nobody references any more (no Lock of it either) stops
        being kept alive and expires after its TTL."""
        interval = ttl_ms / 3000
        delay = interval
        while not stop.wait(delay):
            if client.conn.closed or ref() is None:
                return
            sent = time.monotonic()
            try:
                # A round (attempts of at most half an interval each, moving
                # off a hung replica) ends within a third of the TTL, and the
                # next starts a third of the TTL after this one was sent.
                client.keep_alive(session_id, timeout=interval / 2, retry_for=interval / 2)
                session = ref()
                if session is not None:
                    session._renewed_at = max(session._renewed_at, sent)
                delay = max(0.0, sent + interval - time.monotonic())
            except DsyncError as e:
                # The only "no" KeepAlive can get is "no such session"; treat
                # the bare codes the same for servers without reasons.
                if _session_gone(e) or (
                    not e.reason and e.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
                ):
                    session = ref()
                    if session is not None:
                        session._mark_lost(e)
                    return
                if client.conn.closed:
                    return
                log.debug("keep-alive of session %d failed, retrying: %s", session_id, e)
                delay = min(interval, 0.2)
            except Exception:  # never let the thread die silently
                log.exception("keep-alive of session %d crashed", session_id)
                delay = min(interval, 0.2)

    def _call(self, fn, *args, **kw):  # type: ignore[no-untyped-def]
        self.check()
        try:
            return fn(self.id, *args, **kw)
        except DsyncError as e:
            if _session_gone(e):
                self._mark_lost(e)
            raise

    def acquire(
        self,
        resource: str,
        mode: ModeLike = LockMode.EXCLUSIVE,
        wait_timeout_ms: int | None = None,
        *,
        request_id: int | None = None,
    ) -> Lock:
        """Acquires ``resource`` (None = the server's default wait of 30 s,
        0 = try-lock) and returns the held :class:`Lock`. Pass your own
        ``request_id`` (see :func:`new_request_id`) to be able to learn the
        outcome of an acquire you gave up on: repeating it with the same id
        answers the same grant, or re-attaches to the same wait."""
        m = LockMode.parse(mode)
        r = self._call(self.client.acquire, resource, m, wait_timeout_ms, request_id=request_id)
        return Lock(self, resource, r.lock_id, r.fencing_token, _mode_or(r.mode, m))

    def lock(
        self,
        resource: str,
        mode: ModeLike = LockMode.EXCLUSIVE,
        wait_timeout_ms: int | None = None,
    ) -> Lock:
        """Like :meth:`acquire`; meant for ``with session.lock(...) as lock:``
        (the lock is acquired when this is called, released on exit)."""
        return self.acquire(resource, mode, wait_timeout_ms)

    def release_all(self) -> lock_pb2.ReleaseAllResponse:
        return self._call(self.client.release_all)

    def stream(self) -> SessionStream:
        """A :class:`SessionStream` for this session."""
        self.check()
        return self.client.stream(self.id)

    def locks(self) -> list[lock_pb2.Holder]:
        """The locks this session holds."""
        self.check()
        return self.client.list_locks(self.id)

    def close(self) -> lock_pb2.CloseSessionResponse | None:
        """Stops the keep-alive and closes the session (its locks are
        released). Idempotent; returns None when already closed or lost."""
        self._stop.set()
        if self._closed or self._lost is not None:
            return None
        try:
            r = self.client.close_session(self.id)
        except DsyncError as e:
            if _session_gone(e):
                self._closed = True
                return None
            raise  # not closed yet: close() may be called again
        self._closed = True
        return r

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._owned:
            self._stop.set()
            return
        try:
            self.close()
        except DsyncError:
            if exc is None:
                raise
            log.warning("closing session %d failed", self.id, exc_info=True)


class Lock:
    """A held lock. ``with`` releases it on exit; so does :meth:`release`.
    A Lock dropped without either stays held until its session ends (it
    keeps its Session, and so the keep-alive, referenced)."""

    def __init__(self, session: Session, resource: str, lock_id: int, fencing_token: int, mode: LockMode) -> None:
        self.session = session
        self.resource = resource
        self.lock_id = lock_id
        #: Pass it to the storage you protect; it must refuse smaller tokens.
        self.fencing_token = fencing_token
        self.mode = mode
        self.released = False

    def __repr__(self) -> str:
        return (
            f"Lock(resource={self.resource!r}, lock_id={self.lock_id}, "
            f"fencing_token={self.fencing_token}, mode={self.mode.name}, released={self.released})"
        )

    def upgrade(self, wait_timeout_ms: int | None = None) -> int:
        """UPGRADEABLE → EXCLUSIVE, waiting for shared holders to leave.
        The lock gets a NEW (larger) fencing token, which is returned."""
        self.fencing_token = self.session._call(self.session.client.upgrade, self.lock_id, wait_timeout_ms)
        self.mode = LockMode.EXCLUSIVE
        return self.fencing_token

    def downgrade(self) -> int:
        """EXCLUSIVE → SHARED; the fencing token stays the same."""
        self.fencing_token = self.session._call(self.session.client.downgrade, self.lock_id)
        self.mode = LockMode.SHARED
        return self.fencing_token

    def release(self) -> None:
        """Releases the lock (by lock id). Idempotent."""
        if self.released:
            return
        try:
            self.session._call(self.session.client.release, self.lock_id)
        except errors.LockNotFound as e:
            # A retry after an ambiguous failure: the first attempt released it.
            if not e.maybe_repeated:
                raise
        self.released = True

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except DsyncError:
            # Don't let a failed release hide the body's own exception.
            if exc is None:
                raise
            log.warning("releasing %r failed", self, exc_info=True)


# --- session streams -----------------------------------------------------------

#: google.rpc.Code number -> grpc.StatusCode (an OpError carries the number).
_CODES = {c.value[0]: c for c in grpc.StatusCode}

#: Ends a stream's request iterator.
_END = object()

#: Refusals that say the operation was not applied.
_REFUSED = ("NOT_LEADER", "NO_LEADER", "NOT_APPLIED", "SESSION_EXPIRING")


def _op_error(e: lock_pb2.OpError) -> DsyncError:
    """A stream operation's error as the unary call would have raised it."""
    code = _CODES.get(e.code, grpc.StatusCode.UNKNOWN)
    return errors.make_error(code, e.message, e.reason, dict(e.metadata))


class _AttachFailed(grpc.RpcError):
    """An attach that got no answer: a failed attempt the channel's retry
    rules judge like a call's (its replica is forgotten, another tried)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _Owed:
    """An operation the stream owes an answer for: kept until answered, and
    sent again on the next stream if this one breaks first."""

    __slots__ = ("request", "future", "repeated", "since", "backoff")

    def __init__(self, request: lock_pb2.SessionRequest, future: concurrent.futures.Future[object]) -> None:
        self.request = request
        self.future = future
        # Sent where it may have applied without its answer reaching us.
        self.repeated = False
        self.since = time.monotonic()  # retried for the client's retry_for
        self.backoff = 0.02  # before it is sent again after a refusal

    def fail(self, err: DsyncError) -> None:
        if self.future.set_running_or_notify_cancel():
            err = copy.copy(err)  # one error may end many operations
            err.maybe_repeated = self.repeated
            self.future.set_exception(err)


class _Link:
    """One Session stream attached on one replica: its outbox (a ping goes
    out whenever nothing else did for a third of the TTL) and its call."""

    def __init__(self, addr: str) -> None:
        self.outbox: queue.Queue[object] = queue.Queue()
        self.ping_every = 1.0  # until the attach tells the TTL
        self.call: grpc.Call | None = None
        self.addr = addr

    def requests(self) -> Iterator[lock_pb2.SessionRequest]:
        while True:
            try:
                item = self.outbox.get(timeout=self.ping_every)
            except queue.Empty:
                yield lock_pb2.SessionRequest(ping=lock_pb2.Ping())
                continue
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self.outbox.put(_END)
        if self.call is not None:
            self.call.cancel()


class SessionStream:
    """One session's acquires and releases as messages on one bidirectional
    ``Session`` stream to the leader (:meth:`Client.stream`): no call per
    operation, and the stream keeps the session alive. Thread-safe: many
    threads may have operations in flight at once, each answered by its
    own sequence number.

    When the stream breaks (the leader changes, dies or is cut off — a dead
    or hung replica is noticed by the channel's keep-alive pings within
    about a second), it is attached again on the new leader and every
    operation still unanswered is sent again: an acquire with its own
    request id (the leader takes over the grant or wait it already has), a
    release by lock id taking LOCK_NOT_FOUND as done. An operation the
    replica refuses without deciding it (no leader for a moment) is sent
    again after a pause. Operations fail when that lasts past the client's
    ``retry_for``, or on an error that is the service's answer; when the
    session is gone, every later operation raises that too. An acquire
    whose caller stopped waiting is released when its grant arrives.
    :meth:`close` it (or use it as a context manager): the session itself
    stays open, and an unclosed stream keeps it alive until the stream is
    collected.
    """

    def __init__(self, client: Client, session_id: int) -> None:
        self._client = client
        self.session_id = session_id
        self._lock = threading.Lock()
        self._owed: dict[int, _Owed] = {}
        self._next = 1
        self._ended: DsyncError | None = None
        self._attaching: _Link | None = None  # closed by close() mid-attach
        self._fruitless_since: float | None = None  # streams broken before any answer
        self._pause = 0.0
        # The current stream, in a list the finalizer shares: the reader
        # holds this object only weakly while it waits for answers, and the
        # current stream is closed once it is collected (a SessionStream
        # nobody closed does not keep its session forever).
        self._live = [self._attach()]
        weakref.finalize(self, _close_live, self._live)
        self._reader = threading.Thread(
            target=_stream_reader, args=(weakref.ref(self), self._link), name=f"dsync-stream-{session_id}", daemon=True
        )
        self._reader.start()

    @property
    def _link(self) -> _Link:
        return self._live[0]

    def __repr__(self) -> str:
        return f"SessionStream(session_id={self.session_id}, on={self._link.addr!r})"

    def __enter__(self) -> SessionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- operations --------------------------------------------------------------

    def acquire(
        self,
        resource: str,
        mode: ModeLike = LockMode.EXCLUSIVE,
        wait_timeout_ms: int | None = None,
    ) -> lock_pb2.AcquireResponse:
        """As :meth:`Client.acquire`, on the stream."""
        req = lock_pb2.AcquireRequest(session_id=self.session_id, resource=resource, request_id=new_request_id())
        req.mode = LockMode.parse(mode).value
        if wait_timeout_ms is not None:
            req.wait_timeout_ms = wait_timeout_ms
        patience = self._client._wait_timeout(wait_timeout_ms) + self._client.conn.retry_for
        return self._op(lock_pb2.SessionRequest(acquire=req), patience)  # type: ignore[return-value]

    def release(self, lock_id: int = 0, resource: str = "") -> None:
        """Releases by lock id, or (lock_id 0) by resource (not sent again
        after a broken stream: the session may hold the resource anew)."""
        req = lock_pb2.ReleaseRequest(session_id=self.session_id, lock_id=lock_id, resource=resource)
        self._op(lock_pb2.SessionRequest(release=req), self._client.request_timeout + self._client.conn.retry_for)

    def close(self) -> None:
        """Ends the stream; operations in flight raise CANCELLED (the server
        withdraws their waits). Idempotent."""
        self._end(errors.make_error(grpc.StatusCode.CANCELLED, "the session stream was closed"))

    @property
    def closed(self) -> bool:
        return self._ended is not None

    # --- machinery ---------------------------------------------------------------

    def _op(self, request: lock_pb2.SessionRequest, patience: float) -> object:
        fut: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._send(request, fut)
        try:
            return fut.result(timeout=patience)
        except concurrent.futures.TimeoutError:
            if not fut.cancel():  # answered meanwhile
                return fut.result()
            raise errors.make_error(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer on the session stream within {patience:.1f} s",
                "CLIENT_DEADLINE",
            ) from None

    def _send(self, request: lock_pb2.SessionRequest, fut: concurrent.futures.Future[object]) -> None:
        # Owed and put on the current link under one lock: a re-attach
        # either sees it owed (and sends it again) or installs its link first.
        with self._lock:
            if self._ended is not None:
                raise self._ended
            request.seq = self._next
            self._next += 1
            self._owed[request.seq] = _Owed(request, fut)
            self._link.outbox.put(request)

    def _attach(self) -> _Link:
        """A stream for this session on the leader (following hints and
        retrying as calls do), attached within the client's request timeout
        per attempt."""

        def invoke(ch: grpc.Channel, timeout: float, addr: str) -> _Link:
            link = _Link(addr)
            with self._lock:
                if self._ended is not None:
                    raise self._ended
                self._attaching = link
            link.outbox.put(lock_pb2.SessionRequest(attach=lock_pb2.AttachSession(session_id=self.session_id)))
            link.call = self._client._stub(ch).Session(link.requests())
            timer = threading.Timer(timeout, link.call.cancel)
            timer.daemon = True
            timer.start()
            try:
                first = next(link.call)  # type: ignore[call-overload]
            except StopIteration:
                link.close()
                raise _AttachFailed(grpc.StatusCode.UNAVAILABLE, "the session stream ended before its attach") from None
            except grpc.RpcError as e:
                link.close()
                if e.code() == grpc.StatusCode.CANCELLED and not self.closed:  # type: ignore[attr-defined]
                    raise _AttachFailed(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer to the attach within {timeout:.1f} s"
                    ) from None
                raise
            finally:
                timer.cancel()
                with self._lock:
                    self._attaching = None
            if first.WhichOneof("result") == "error":
                link.close()
                raise _op_error(first.error)
            link.ping_every = max(first.attached_ttl_ms, 3) / 3000
            return link

        return self._client.conn.call(
            invoke, timeout=self._client.request_timeout, safe_to_repeat=True, tell_addr=True
        )

    def _fail_internally(self, e: BaseException) -> None:
        log.error("session stream %d failed", self.session_id, exc_info=e)
        self._end(errors.make_error(grpc.StatusCode.INTERNAL, f"the session stream failed: {e!r}"))

    def _reattach(self, link: _Link, broke: DsyncError, answered: bool) -> _Link | None:
        """After ``link`` broke with ``broke``: the next stream, attached on
        the leader with every owed operation sent again; None when the
        stream ended for good."""
        with self._lock:
            if self._ended is not None:
                return None
        if broke.code != grpc.StatusCode.UNAVAILABLE:
            self._end(broke)
            return None
        # Follow a hint, or stop preferring that replica.
        self._client.conn._decide(link.addr, broke, safe_to_repeat=True)
        log.debug("session stream %d broke (%s): attaching again", self.session_id, broke)
        if answered:
            self._fruitless_since, self._pause = None, 0.0
        if self._fruitless_since is None:
            self._fruitless_since = time.monotonic()
        if time.monotonic() - self._fruitless_since >= self._client.conn.retry_for:
            self._end(broke)
            return None
        time.sleep(self._pause)
        self._pause = min(max(self._pause * 2, 0.02), 0.1)
        with self._lock:
            by_resource = []
            for seq, o in self._owed.items():
                o.repeated = True
                if o.request.WhichOneof("op") == "release" and not o.request.release.lock_id:
                    by_resource.append(seq)
            gone = [self._owed.pop(seq) for seq in by_resource]
        for o in gone:
            o.fail(broke)
        try:
            new = self._attach()
        except DsyncError as e:
            self._end(e)
            return None
        with self._lock:
            if self._ended is not None:
                new.close()
                return None
            self._live[0] = new
            for seq in sorted(self._owed):
                new.outbox.put(self._owed[seq].request)
        return new

    def _answer(self, r: lock_pb2.SessionResponse, link: _Link) -> DsyncError | None:
        """Settles the operation ``r`` answers. A refusal that says the
        replica did not decide it sends it again on this stream after a
        pause, for the client's ``retry_for``; a replica that is stopping
        breaks the stream (returned), and the next one sends it; an answer
        that the session is gone is the operation's and ends the stream."""
        kind = r.WhichOneof("result")
        result: object = None
        with self._lock:
            o = self._owed.get(r.seq)
            if kind is None or o is None:
                return None
            if kind == "error":
                err = _op_error(r.error)
                if err.reason == "REPLICA_STOPPING":
                    return err
                if err.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - o.since < self._client.conn.retry_for:
                    o.repeated = o.repeated or err.reason not in _REFUSED
                    again = threading.Timer(o.backoff, link.outbox.put, args=(o.request,))
                    again.daemon = True
                    again.start()
                    o.backoff = min(o.backoff * 2, 0.1)
                    return None
                if o.repeated and o.request.WhichOneof("op") == "release" and err.reason == "LOCK_NOT_FOUND":
                    # A release sent again finds the lock its first send released.
                    result = lock_pb2.ReleaseResponse()
                else:
                    result = err
            else:
                result = getattr(r, kind)
            del self._owed[r.seq]
        if isinstance(result, DsyncError):
            o.fail(result)
            if _session_gone(result):
                self._end(result)
            return None
        if o.future.set_running_or_notify_cancel():
            o.future.set_result(result)
        elif kind == "acquired":
            # Nobody waits for this grant any more: release it (owed like
            # any operation, so a broken stream sends it again).
            release = lock_pb2.ReleaseRequest(session_id=self.session_id, lock_id=r.acquired.lock_id)
            try:
                self._send(lock_pb2.SessionRequest(release=release), concurrent.futures.Future())
            except DsyncError:
                pass  # the stream ended: the session's end releases it
        return None

    def _end(self, why: DsyncError) -> None:
        """Ends the stream for good: every owed and later operation raises ``why``."""
        with self._lock:
            if self._ended is not None:
                return
            self._ended = why
            owed, self._owed = self._owed, {}
            links = [self._link]
            if self._attaching is not None:
                links.append(self._attaching)
        for link in links:
            link.close()
        for o in owed.values():
            o.fail(why)


def _close_live(live: list[_Link]) -> None:
    """Closes a collected SessionStream's current stream."""
    live[0].close()


def _stream_reader(ref: weakref.ref[SessionStream], link: _Link) -> None:
    """A SessionStream's reader thread: hands out the answers of its stream
    and attaches the next one when it breaks, holding the SessionStream
    only weakly while it waits (see ``SessionStream.__init__``)."""
    answered = False
    while True:
        r: lock_pb2.SessionResponse | None = None
        broke: DsyncError | None = None
        try:
            r = next(link.call)  # type: ignore[call-overload]
        except StopIteration:
            broke = errors.make_error(grpc.StatusCode.UNAVAILABLE, "the session stream ended")
        except grpc.RpcError as e:
            broke = errors.from_rpc_error(e)
        stream = ref()
        if stream is None:
            link.close()
            return
        try:
            if r is not None:
                answered = True
                broke = stream._answer(r, link)
            if broke is not None:
                link.close()
                next_link = stream._reattach(link, broke, answered)
                if next_link is None:
                    return
                link, answered = next_link, False
        except BaseException as e:  # noqa: BLE001 - the stream must end, not hang
            stream._fail_internally(e)
            return
        finally:
            del stream
