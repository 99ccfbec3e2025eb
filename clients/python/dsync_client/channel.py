"""A leader-following connection to one dsync replica set.

:class:`LeaderChannel` keeps one gRPC channel per replica address (the
configured endpoints plus any address learned from a leader hint) and runs
each call against the replica it believes leads. When a call fails it
decides, from the error, whether to retry and where:

* **not the leader** — the replica names the leader in a
  ``dsync.common.v1.LeaderHint``; the call is retried there at once. The hint
  is read from, in order: a LeaderHint detail of the ``google.rpc.Status``
  trailer, an ErrorInfo ``NOT_LEADER`` detail's metadata, the binary
  ``dsync-leader-bin`` trailer. A hint whose ``term`` is lower than one
  already seen names a deposed leader and is ignored (term 0 = unknown).
* **no leader** (``NO_LEADER``, a hint with ``leader_id`` 0) — the call was
  not served: back off briefly and try the next endpoint.
* **not applied / overloaded** — refused before taking effect: back off and
  retry.
* **ambiguous** — the connection broke mid-call (``UNAVAILABLE`` without
  details), the attempt's own deadline passed (a hung or cut-off replica,
  which is then no longer preferred), ``OUTCOME_UNKNOWN``,
  ``REPLICA_STOPPING``: the call may have
  taken effect, so it is retried (on another replica) only when the caller
  says it is safe to repeat. Acquire and OpenSession carry a request id the
  server deduplicates on; KeepAlive, Release, ReleaseAll, CloseSession,
  Upgrade, Downgrade and reads are safe to repeat (lock.proto, RETRIES).
* anything else is the service's answer and is raised as is.

Retries are bounded by an attempt count and an overall deadline; backoff
doubles from 20 ms to 100 ms (an election takes 150–300 ms: polling at most
100 ms apart finds the new leader soon after it is elected).

With ``watch_leader`` (on for the lock :class:`~dsync_client.Client`) the
channel keeps an admin ``WatchLeader`` stream open to every replica, in a
daemon thread each. When any replica reports a leader of a newer term, calls
go there; a call in flight on another replica (one started with
``.future()``) whose replica does not report that term itself within
``MOVE_GRACE`` (it is dead, hung or cut off) is cancelled and retried there
at once: a leader that died without closing its connections costs the
election, not the connection's keep-alive timeout.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import grpc

from . import errors
from ._proto import admin_pb2, admin_pb2_grpc, common_pb2
from .errors import DsyncError

log = logging.getLogger("dsync_client")

T = TypeVar("T")

LEADER_HINT_METADATA = "dsync-leader-bin"
_LEADER_HINT_TYPE = "dsync.common.v1.LeaderHint"

# gRPC channel options: notice dead peers quickly (HTTP/2 pings while a call
# is in flight: an idle client costs the replicas nothing) and
# reconnect to a restarted replica quickly (default backoff reaches 120 s).
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 250),
    ("grpc.keepalive_timeout_ms", 500),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# A leader watch's own channel: slow pings (replacing the call channels').
WATCH_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
]

# Substrings of UNAVAILABLE messages that grpc-core produces when it never
# got a connection, so the request was certainly not sent.
# How long the replica an attempt is on gets to show, on its own watch, that
# it follows a newer leader reported elsewhere before the attempt moves: a
# live former leader (a leadership transfer) still answers its calls.
MOVE_GRACE = 0.1

_NOT_SENT = ("failed to connect to all addresses", "connection refused", "dns resolution failed")


class Verdict(NamedTuple):
    """The retry decision for one failed attempt."""

    retry: bool
    #: Back off before retrying (False: follow a redirect at once).
    pause: bool
    #: The attempt may have taken effect on the server.
    maybe_applied: bool = False


def leader_hint(err: DsyncError) -> common_pb2.LeaderHint | None:
    """The leader hint an error carries, from the first source present."""
    # (1) a LeaderHint detail in the google.rpc.Status trailer.
    for d in err.details:
        if d.type_url.rsplit("/", 1)[-1] == _LEADER_HINT_TYPE:
            hint = common_pb2.LeaderHint()
            try:
                hint.ParseFromString(d.value)
                return hint
            except Exception:
                log.debug("undecodable LeaderHint detail", exc_info=True)
    # (2) ErrorInfo NOT_LEADER (or NO_LEADER) metadata.
    if err.reason in ("NOT_LEADER", "NO_LEADER"):
        md = err.metadata

        def num(key: str) -> int:
            try:
                return int(md.get(key, "0") or 0)
            except ValueError:
                return 0

        return common_pb2.LeaderHint(
            leader_id=num("leader_id"),
            leader_addr=md.get("leader_addr", ""),
            group_id=num("group_id"),
            term=num("term"),
        )
    # (3) the binary dsync-leader-bin trailer.
    for key, value in err.trailing_metadata:
        if key == LEADER_HINT_METADATA and isinstance(value, bytes):
            try:
                return common_pb2.LeaderHint.FromString(value)
            except Exception:
                log.debug("undecodable %s trailer", LEADER_HINT_METADATA, exc_info=True)
    return None


class _Moved(Exception):
    """A watch reported a newer leader while an attempt ran elsewhere."""


def _not_sent(err: DsyncError) -> bool:
    msg = err.message.lower()
    return any(s in msg for s in _NOT_SENT)


class LeaderChannel:
    """Channels to a replica set, routing calls to the believed leader.

    Thread-safe: sessions' keep-alive threads and user threads share it.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        retry_for: float = 10.0,
        max_attempts: int = 50,
        options: Sequence[tuple[str, int]] = (),
        watch_leader: bool = False,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        if not endpoints:
            raise ValueError("no endpoints given")
        self.retry_for = retry_for
        self.max_attempts = max_attempts
        self._options = [*CHANNEL_OPTIONS, *options]
        self._lock = threading.Lock()
        self._endpoints: list[str] = list(dict.fromkeys(endpoints))
        self._channels: dict[str, grpc.Channel] = {}
        self._leader: str | None = None
        self._term = 0  # highest term of a hint followed
        self._next = 0  # endpoint to try when no leader is known
        self._closed = False
        self._closing = threading.Event()
        # Leader watches (see the module docstring).
        self._watch = watch_leader
        self._watched: set[str] = set()
        self._streams: set[grpc.Future] = set()
        self._nodes: dict[int, str] = {}  # node id -> the endpoint we dial it at
        self._watch_term = 0  # newest term a watch reported a leader of
        self._watch_leader = 0  # ... and that leader's node id
        self._terms: dict[str, int] = {}  # newest term each endpoint's watch reported
        self._moves = 0  # bumped at each such report
        self._waiting: set[threading.Event] = set()  # attempts in flight
        # A channel nobody closed still ends its watches once collected
        # (the watch threads hold it only weakly).
        weakref.finalize(self, _end_watches, self._closing, self._streams)

    # --- routing state -------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        with self._lock:
            return list(self._endpoints)

    @property
    def leader(self) -> str | None:
        """The address calls go to first (None until a call succeeded or a
        hint named one)."""
        with self._lock:
            return self._leader

    def current(self) -> str:
        return self._route()[0]

    def channel(self, addr: str) -> grpc.Channel:
        """The cached channel to ``addr`` (created on first use)."""
        with self._lock:
            if self._closed:
                raise errors.make_error(grpc.StatusCode.CANCELLED, "client is closed")
            ch = self._channels.get(addr)
            if ch is None:
                ch = grpc.insecure_channel(addr, options=self._options)
                self._channels[addr] = ch
            return ch

    def _follow(self, hint: common_pb2.LeaderHint) -> bool:
        """Makes the hinted leader current; False when the hint is unusable
        (no leader known, or older than a term already seen)."""
        with self._lock:
            if hint.term and hint.term < self._term:
                log.debug("ignoring stale leader hint %r (term %d < %d)", hint.leader_addr, hint.term, self._term)
                return False
            # Remember the newest term even from a "no leader" hint: a hint
            # of an older term that arrives later names a deposed leader.
            self._term = max(self._term, hint.term)
            if not hint.leader_addr or hint.leader_id == 0:
                return False
            if hint.leader_addr not in self._endpoints:
                self._endpoints.append(hint.leader_addr)
            self._leader = hint.leader_addr
            return True

    def _forget(self, addr: str) -> None:
        """``addr`` is not (or no longer) the leader: next time try the next
        endpoint."""
        with self._lock:
            if self._leader == addr:
                self._leader = None
            if self._endpoints[self._next % len(self._endpoints)] == addr:
                self._next += 1

    def _route(self) -> tuple[str, int]:
        """Where the next attempt goes, and how many moves the watches had
        reported then."""
        with self._lock:
            addr = self._leader or self._endpoints[self._next % len(self._endpoints)]
            return addr, self._moves

    def _served(self, addr: str, moves: int) -> None:
        """``addr`` answered: it leads, unless a watch reported a newer
        leader since the attempt started (a former leader answering after
        a transfer)."""
        with self._lock:
            if self._moves == moves or self._leader is None:
                self._leader = addr

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        _end_watches(self._closing, self._streams)
        for ch in channels:
            ch.close()

    # --- leader watches --------------------------------------------------------

    def _start_watches(self) -> None:
        """Starts a watch thread for every endpoint not watched yet."""
        if not self._watch:
            return
        with self._lock:
            if self._closed:
                return
            new = [e for e in self._endpoints if e not in self._watched]
            self._watched.update(new)
        for addr in new:
            args = (weakref.ref(self), addr, self._closing, self._streams, self._lock, self._options)
            threading.Thread(target=_watch_loop, args=args, name=f"dsync-watch-{addr}", daemon=True).start()

    def _learn(self, addr: str, node_id: int, hint: common_pb2.LeaderHint) -> None:
        """What the watch on ``addr`` (node ``node_id``) said: a leader of a
        newer term than any reported becomes where calls go, and attempts in
        flight elsewhere are told."""
        with self._lock:
            if node_id:
                self._nodes[node_id] = addr
            self._terms[addr] = max(self._terms.get(addr, 0), hint.term)
            if not hint.leader_id:
                return
            # Call the leader where we dialed it, if a watch told us which
            # endpoint it is; else at the address the replicas know it by.
            dialed = self._nodes.get(hint.leader_id)
            target = dialed or hint.leader_addr
            if not target:
                return
            if hint.term == self._watch_term and hint.leader_id == self._watch_leader:
                # The same leader, now perhaps known at an endpoint we dialed.
                if dialed and self._leader == hint.leader_addr:
                    self._leader = dialed
                return
            if hint.term < self._watch_term:
                return
            self._watch_term, self._watch_leader = hint.term, hint.leader_id
            self._term = max(self._term, hint.term)
            if target not in self._endpoints:
                self._endpoints.append(target)
            self._leader = target
            self._moves += 1
            waiting = list(self._waiting)
        for ev in waiting:
            ev.set()
        self._start_watches()

    def _result(self, addr: str, fut: grpc.Future, moves: int) -> object:
        """Waits for an attempt started with ``.future()``; raises
        :class:`_Moved` (having cancelled it) when a watch reports a newer
        leader than ``addr`` meanwhile and ``addr``'s own watch does not show
        that term within ``MOVE_GRACE``."""
        if not self._watch:
            return fut.result()
        wake = threading.Event()
        with self._lock:
            self._waiting.add(wake)
        wake.set()  # a move may have come since the attempt was routed
        fut.add_done_callback(lambda _: wake.set())
        try:
            while True:
                wake.wait()
                wake.clear()
                if fut.done():
                    return fut.result()
                with self._lock:
                    moved = self._moves != moves and self._leader != addr
                    moves, term = self._moves, self._watch_term
                if not moved:
                    continue
                # A replica that follows the new leader too is alive: it
                # answers the calls it has.
                time.sleep(MOVE_GRACE)
                with self._lock:
                    # A replica whose watch never reported (not connected
                    # yet, or an alias of the leader) is left to the call's
                    # own failure: only one that went quiet is taken for gone.
                    seen = self._terms.get(addr)
                    alive = seen is None or seen >= term
                if not alive and fut.cancel():
                    raise _Moved()
                wake.set()  # look at the future (and newer moves) again
        finally:
            with self._lock:
                self._waiting.discard(wake)

    @property
    def closed(self) -> bool:
        return self._closed

    # --- calls ---------------------------------------------------------------

    def call(
        self,
        invoke: Callable[..., T],
        *,
        timeout: float,
        safe_to_repeat: bool,
        retry_for: float | None = None,
        waits: bool = False,
        tell_addr: bool = False,
    ) -> T:
        """Runs ``invoke(channel, attempt_timeout)`` on the leader, following
        hints and retrying as the module docstring describes.

        ``invoke`` may return the call's result, or a ``grpc.Future`` (from
        ``stub.Method.future(...)``), which a leader watch can cancel to move
        the call to a newly elected leader.

        ``timeout`` bounds each attempt; attempts start until ``retry_for``
        (default: the channel's) has passed, so a call lasts at most about
        ``retry_for + timeout``. With ``tell_addr``, ``invoke`` is also given
        the address the attempt goes to (a third argument).
        Raises :class:`~dsync_client.errors.DsyncError`.
        """
        self._start_watches()
        start = time.monotonic()
        deadline = start + (self.retry_for if retry_for is None else retry_for) + timeout
        backoff = 0.02
        attempt = 0
        redirected = False
        maybe_applied = False  # an earlier attempt may have taken effect
        while True:
            attempt += 1
            addr, moves = self._route()
            remaining = deadline - time.monotonic()
            try:
                attempt_timeout = max(0.001, min(timeout, remaining))
                if tell_addr:
                    result = invoke(self.channel(addr), attempt_timeout, addr)  # type: ignore[call-arg]
                else:
                    result = invoke(self.channel(addr), attempt_timeout)
                if isinstance(result, grpc.Future):
                    result = self._result(addr, result, moves)
            except _Moved:
                log.debug("attempt %d on %s moved to a newly elected leader", attempt, addr)
                maybe_applied = True  # the cancelled attempt may have applied
                if attempt >= self.max_attempts or time.monotonic() >= deadline:
                    raise errors.make_error(
                        grpc.StatusCode.UNAVAILABLE, f"{addr} stopped leading and no retry is left"
                    ) from None
                continue
            except grpc.RpcError as e:
                err = errors.from_rpc_error(e)
            except ValueError as e:  # grpc raises ValueError on a closed channel
                if self._closed:
                    raise errors.make_error(grpc.StatusCode.CANCELLED, "client is closed") from e
                raise
            else:
                self._served(addr, moves)
                return result

            v = self._decide(addr, err, safe_to_repeat, waits)
            err.maybe_repeated = maybe_applied
            maybe_applied = maybe_applied or v.maybe_applied
            # Follow a redirect at once, but not two in a row: replicas can
            # briefly point at each other while an election settles.
            pause = v.pause or redirected
            redirected = v.retry and not v.pause
            wait = backoff * random.uniform(0.5, 1.0) if pause else 0.0
            if not v.retry or attempt >= self.max_attempts or time.monotonic() + wait >= deadline:
                raise err
            log.debug("attempt %d on %s failed (%s); retrying in %.3fs", attempt, addr, err, wait)
            if pause:
                time.sleep(wait)
                backoff = min(backoff * 2, 0.1)

    def _decide(self, addr: str, err: DsyncError, safe_to_repeat: bool, waits: bool = False) -> Verdict:
        """What to do after a failed attempt on ``addr``."""
        hint = leader_hint(err) if err.code == grpc.StatusCode.UNAVAILABLE else None
        if hint is not None or err.reason in ("NOT_LEADER", "NO_LEADER"):
            # The replica refused without doing anything: always retryable.
            if hint is not None and hint.leader_addr != addr and self._follow(hint):
                return Verdict(retry=True, pause=False)
            self._forget(addr)
            return Verdict(retry=True, pause=True)
        if err.reason in ("NOT_APPLIED", "OVERLOADED", "SESSION_EXPIRING"):
            return Verdict(retry=True, pause=True)
        if err.reason == "OUTCOME_UNKNOWN":
            return Verdict(retry=safe_to_repeat, pause=True, maybe_applied=True)
        if err.reason == "REPLICA_STOPPING":
            self._forget(addr)
            return Verdict(retry=safe_to_repeat, pause=True, maybe_applied=True)
        if err.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.reason in ("", "CLIENT_DEADLINE"):
            # This attempt's own deadline passed: the replica may be hung or
            # cut off, so stop preferring it. A call that waits for a lock
            # chose its deadline (the wait plus a margin): that is final.
            # Others are retried elsewhere if safe (they may have applied).
            self._forget(addr)
            return Verdict(retry=safe_to_repeat and not waits, pause=True, maybe_applied=True)
        if err.code == grpc.StatusCode.UNAVAILABLE and not err.reason:
            # A replica that is down or unreachable, or a connection that
            # broke mid-call. If it never connected, nothing was sent.
            self._forget(addr)
            if _not_sent(err):
                return Verdict(retry=True, pause=True)
            return Verdict(retry=safe_to_repeat, pause=True, maybe_applied=True)
        return Verdict(retry=False, pause=False)


def _end_watches(closing: threading.Event, streams: set[grpc.Future]) -> None:
    """Stops a channel's watch threads (at close, or once it is collected).
    Takes no lock: it may run in the garbage collector on any thread."""
    closing.set()
    for st in list(streams):
        st.cancel()


def _watch_loop(
    owner: weakref.ref[LeaderChannel],
    addr: str,
    closing: threading.Event,
    streams: set[grpc.Future],
    lock: threading.Lock,
    options: list[tuple[str, int]],
) -> None:
    """Keeps a WatchLeader stream open to ``addr`` while its channel lives
    and is not closed, reopening it after failures (backing off from 0.2 to
    5 s). Holds the channel only while handing it a message. The stream has
    a connection of its own with slow pings: a watch that goes quiet costs
    nothing (the other replicas' watches report the next leader), so only
    calls need fast ones."""
    slow = dict(WATCH_OPTIONS)
    watch_options = [o for o in options if o[0] not in slow] + WATCH_OPTIONS
    pause = 0.2
    while not closing.is_set():
        heard = False
        stream = None
        ch = grpc.insecure_channel(addr, options=watch_options)
        try:
            stream = admin_pb2_grpc.AdminStub(ch).WatchLeader(admin_pb2.WatchLeaderRequest())
            with lock:
                if closing.is_set():
                    stream.cancel()
                    return
                streams.add(stream)
            for ev in stream:
                heard = True
                chan = owner()
                if chan is None:
                    return
                chan._learn(addr, ev.node_id, ev.leader)
                del chan
        except grpc.RpcError as e:
            # A build without the watch will not grow one soon.
            if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                pause = 30.0
        except Exception:
            log.warning("leader watch on %s failed; reopening it", addr, exc_info=True)
        finally:
            if stream is not None:
                with lock:
                    streams.discard(stream)
            ch.close()
        if heard:
            pause = 0.2
        closing.wait(pause)
        pause = min(pause * 2, 5.0)
