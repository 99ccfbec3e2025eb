"""Error and leader-hint parsing, without a server."""

from __future__ import annotations

import gc
import threading
import time

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import dsync_client as dc
from dsync_client import errors
from dsync_client._proto import common_pb2
from dsync_client.channel import LeaderChannel, leader_hint


class FakeRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a failed unary call raises: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple = ()) -> None:
        self._code, self._message, self._trailers = code, message, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple:
        return self._trailers

    def initial_metadata(self) -> tuple:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


def status_error(code: grpc.StatusCode, message: str, *details: object, extra: tuple = ()) -> FakeRpcError:
    st = status_pb2.Status(code=code.value[0], message=message)
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)  # type: ignore[arg-type]
        st.details.append(a)
    return FakeRpcError(code, message, (("grpc-status-details-bin", st.SerializeToString()), *extra))


def info(reason: str, **md: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="dsync.io", metadata=md)


def test_reason_maps_to_its_class_with_metadata() -> None:
    e = errors.from_rpc_error(
        status_error(grpc.StatusCode.ABORTED, "busy", info("LOCK_BUSY", resource="orders/42"))
    )
    assert type(e) is dc.LockBusy
    assert isinstance(e, dc.AbortedError) and isinstance(e, dc.DsyncError)
    assert (e.code, e.reason, e.message, e.metadata) == (
        grpc.StatusCode.ABORTED,
        "LOCK_BUSY",
        "busy",
        {"resource": "orders/42"},
    )
    assert "LOCK_BUSY" in str(e)


@pytest.mark.parametrize(
    "reason,code,cls",
    [
        ("NOT_LEADER", grpc.StatusCode.UNAVAILABLE, dc.NotLeader),
        ("NO_LEADER", grpc.StatusCode.UNAVAILABLE, dc.NoLeader),
        ("NOT_APPLIED", grpc.StatusCode.UNAVAILABLE, dc.NotApplied),
        ("OUTCOME_UNKNOWN", grpc.StatusCode.UNAVAILABLE, dc.OutcomeUnknown),
        ("REPLICA_STOPPING", grpc.StatusCode.UNAVAILABLE, dc.ReplicaStopping),
        ("OVERLOADED", grpc.StatusCode.RESOURCE_EXHAUSTED, dc.Overloaded),
        ("REQUEST_TOO_LARGE", grpc.StatusCode.RESOURCE_EXHAUSTED, dc.RequestTooLarge),
        ("SERVER_TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED, dc.ServerTimeout),
        ("CLIENT_DEADLINE", grpc.StatusCode.DEADLINE_EXCEEDED, dc.ClientDeadline),
        ("INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT, dc.InvalidArgument),
        ("MALFORMED_REQUEST", grpc.StatusCode.INVALID_ARGUMENT, dc.MalformedRequest),
        ("SESSION_NOT_FOUND", grpc.StatusCode.NOT_FOUND, dc.SessionNotFound),
        ("SESSION_EXPIRED", grpc.StatusCode.FAILED_PRECONDITION, dc.SessionExpired),
        ("LOCK_NOT_FOUND", grpc.StatusCode.NOT_FOUND, dc.LockNotFound),
        ("ALREADY_HELD", grpc.StatusCode.FAILED_PRECONDITION, dc.AlreadyHeld),
        ("ALREADY_WAITING", grpc.StatusCode.FAILED_PRECONDITION, dc.AlreadyWaiting),
        ("WRONG_MODE", grpc.StatusCode.FAILED_PRECONDITION, dc.WrongMode),
        ("LOCK_BUSY", grpc.StatusCode.ABORTED, dc.LockBusy),
        ("WAIT_TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED, dc.WaitTimeout),
        ("DEADLOCK_VICTIM", grpc.StatusCode.ABORTED, dc.DeadlockVictim),
        ("SUPERSEDED", grpc.StatusCode.ABORTED, dc.Superseded),
        ("WAIT_WITHDRAWN", grpc.StatusCode.FAILED_PRECONDITION, dc.WaitWithdrawn),
        ("LIMIT_REACHED", grpc.StatusCode.RESOURCE_EXHAUSTED, dc.LimitReached),
        ("INTERNAL", grpc.StatusCode.INTERNAL, dc.Internal),
        ("STORAGE_FAILURE", grpc.StatusCode.INTERNAL, dc.StorageFailure),
    ],
)
def test_every_contract_reason(reason: str, code: grpc.StatusCode, cls: type) -> None:
    e = errors.from_rpc_error(status_error(code, "x", info(reason)))
    assert type(e) is cls and e.reason == reason
    # ... and the class is a subclass of its code's class.
    assert isinstance(e, errors.error_class(code, ""))


def test_errors_pickle() -> None:
    import pickle

    e = errors.make_error(grpc.StatusCode.ABORTED, "busy", "LOCK_BUSY", {"resource": "r"})
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is dc.LockBusy and back.metadata == {"resource": "r"} and back.message == "busy"


def test_unknown_reason_and_no_details_fall_back_to_the_code_class() -> None:
    e = errors.from_rpc_error(status_error(grpc.StatusCode.ABORTED, "new", info("SOMETHING_NEW")))
    assert type(e) is dc.AbortedError and e.reason == "SOMETHING_NEW"
    bare = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert type(bare) is dc.DeadlineExceededError and bare.reason == "" and bare.metadata == {}


def test_garbage_and_mismatched_trailers_never_crash() -> None:
    junk = FakeRpcError(grpc.StatusCode.INTERNAL, "boom", (("grpc-status-details-bin", b"\xff\x00garbage"),))
    assert type(errors.from_rpc_error(junk)) is dc.InternalError
    # A Status whose message differs from the call's (from_call refuses it):
    # the details are still used.
    st = status_pb2.Status(code=code_pb2.ABORTED, message="other text")
    a = any_pb2.Any()
    a.Pack(info("LOCK_BUSY"))
    st.details.append(a)
    e = errors.from_rpc_error(
        FakeRpcError(grpc.StatusCode.ABORTED, "busy", (("grpc-status-details-bin", st.SerializeToString()),))
    )
    assert type(e) is dc.LockBusy


def test_leader_hint_sources_in_order() -> None:
    hint = common_pb2.LeaderHint(leader_id=2, leader_addr="10.0.0.2:7001", group_id=1, term=7)
    trailer_hint = common_pb2.LeaderHint(leader_id=3, leader_addr="10.0.0.3:7001", group_id=1, term=7)
    trailer = (("dsync-leader-bin", trailer_hint.SerializeToString()),)
    not_leader = info("NOT_LEADER", leader_id="4", leader_addr="10.0.0.4:7001", group_id="1", term="8")

    # (1) a LeaderHint detail wins over ErrorInfo and the trailer.
    e = errors.from_rpc_error(status_error(grpc.StatusCode.UNAVAILABLE, "nl", not_leader, hint, extra=trailer))
    assert leader_hint(e) == hint
    # (2) ErrorInfo NOT_LEADER metadata.
    e = errors.from_rpc_error(status_error(grpc.StatusCode.UNAVAILABLE, "nl", not_leader, extra=trailer))
    assert leader_hint(e) == common_pb2.LeaderHint(leader_id=4, leader_addr="10.0.0.4:7001", group_id=1, term=8)
    # (3) the dsync-leader-bin trailer alone (what servers without details send).
    e = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "nl", trailer))
    assert leader_hint(e) == trailer_hint
    assert leader_hint(errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down"))) is None


def test_stale_and_empty_hints_are_not_followed() -> None:
    ch = LeaderChannel(["a:1", "b:1"])
    try:
        assert ch._follow(common_pb2.LeaderHint(leader_id=2, leader_addr="b:1", term=5))
        assert ch.leader == "b:1"
        # Older term: ignored.
        assert not ch._follow(common_pb2.LeaderHint(leader_id=1, leader_addr="a:1", term=4))
        assert ch.leader == "b:1"
        # No leader known (in term 6) ...
        assert not ch._follow(common_pb2.LeaderHint(leader_id=0, leader_addr="", term=6))
        # ... so a later hint of term 5 names a deposed leader.
        assert not ch._follow(common_pb2.LeaderHint(leader_id=2, leader_addr="b:1", term=5))
        # Newer term, new address: learned.
        assert ch._follow(common_pb2.LeaderHint(leader_id=3, leader_addr="c:1", term=6))
        assert ch.leader == "c:1" and ch.endpoints == ["a:1", "b:1", "c:1"]
        # Term 0 (a server that does not know it): followed.
        assert ch._follow(common_pb2.LeaderHint(leader_id=1, leader_addr="a:1", term=0))
    finally:
        ch.close()


def test_retry_rules() -> None:
    ch = LeaderChannel(["a:1", "b:1"])
    U = grpc.StatusCode.UNAVAILABLE

    def decide(e: FakeRpcError, safe: bool) -> tuple[bool, bool]:
        v = ch._decide("a:1", errors.from_rpc_error(e), safe)
        return v.retry, v.pause

    try:
        broken = FakeRpcError(U, "Socket closed")
        assert decide(broken, True) == (True, True)
        assert decide(broken, False) == (False, True)  # may have been applied
        refused = FakeRpcError(U, "failed to connect to all addresses; last error: Connection refused")
        assert decide(refused, False) == (True, True)  # never sent
        unknown = status_error(U, "?", info("OUTCOME_UNKNOWN"))
        assert decide(unknown, True)[0] and not decide(unknown, False)[0]
        assert decide(status_error(U, "x", info("NOT_APPLIED")), False)[0]
        assert decide(status_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", info("OVERLOADED")), False)[0]
        assert not decide(status_error(grpc.StatusCode.ABORTED, "x", info("LOCK_BUSY")), True)[0]
        # An attempt's own deadline: retried elsewhere when safe, unless the
        # call waits for a lock (its deadline is the caller's choice).
        late = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        assert decide(late, True)[0] and not decide(late, False)[0]
        assert not ch._decide("a:1", errors.from_rpc_error(late), True, waits=True).retry
        # A hint to another replica: retried at once there, for any call.
        hinted = status_error(U, "nl", info("NOT_LEADER", leader_id="2", leader_addr="b:1", term="3"))
        assert decide(hinted, False) == (True, False) and ch.leader == "b:1"
    finally:
        ch.close()


class PendingFuture(grpc.Future):  # type: ignore[misc]
    """An attempt in flight on a replica that never answers."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self._callbacks: list = []

    def cancel(self) -> bool:
        self._cancelled.set()
        for cb in self._callbacks:
            cb(self)
        return True

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def running(self) -> bool:
        return not self.done()

    def done(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> object:
        raise grpc.FutureCancelledError()

    def exception(self, timeout: float | None = None) -> None:
        return None

    def traceback(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn) -> None:  # type: ignore[no-untyped-def]
        self._callbacks.append(fn)


def test_a_watch_moves_a_call_in_flight_to_a_newer_leader() -> None:
    # Endpoints nothing listens on: the watch threads only retry quietly.
    ch = LeaderChannel(["127.0.0.1:9", "127.0.0.1:7"], watch_leader=True)
    hung = PendingFuture()
    tried: list[str] = []

    def invoke(channel: grpc.Channel, timeout: float) -> object:
        tried.append(ch.current())
        return hung if len(tried) == 1 else "served"

    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(ch.call(invoke, timeout=60, safe_to_repeat=True)))
    try:
        t.start()
        deadline = time.monotonic() + 10
        while not ch._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ch._waiting, "the attempt never started"
        # A stale or leaderless report moves nothing.
        ch._learn("127.0.0.1:7", 2, common_pb2.LeaderHint(leader_id=0, term=9))
        time.sleep(0.1)
        assert t.is_alive() and not hung.cancelled()
        # Node 2 (dialed at 127.0.0.1:7) reports itself elected in term 9,
        # and so does the replica the attempt is on: it is alive and in
        # touch, so it keeps the call (a leadership transfer).
        ch._learn("127.0.0.1:9", 1, common_pb2.LeaderHint(leader_id=2, leader_addr="elsewhere:1", term=9))
        ch._learn("127.0.0.1:7", 2, common_pb2.LeaderHint(leader_id=2, leader_addr="elsewhere:1", term=9))
        assert ch.leader == "127.0.0.1:7"
        time.sleep(0.5)
        assert t.is_alive() and not hung.cancelled()
        # Term 10, and 127.0.0.1:9 says nothing of it (dead or cut off): the
        # attempt there is cancelled and the call retried at the leader.
        ch._learn("127.0.0.1:7", 2, common_pb2.LeaderHint(leader_id=2, leader_addr="elsewhere:1", term=10))
        t.join(10)
        assert out == ["served"] and hung.cancelled()
        assert tried == ["127.0.0.1:9", "127.0.0.1:7"]
        assert ch.leader == "127.0.0.1:7"
        # An older term reported later changes nothing.
        ch._learn("127.0.0.1:9", 1, common_pb2.LeaderHint(leader_id=1, leader_addr="127.0.0.1:9", term=8))
        assert ch.leader == "127.0.0.1:7"
    finally:
        ch.close()


def test_an_unclosed_channel_ends_its_watches_once_collected() -> None:
    def watches() -> int:
        return sum(t.name.startswith("dsync-watch-127.0.0.1:5") for t in threading.enumerate())

    ch = LeaderChannel(["127.0.0.1:5"], watch_leader=True)
    ch._start_watches()
    assert watches() == 1
    del ch
    gc.collect()
    deadline = time.monotonic() + 10
    while watches() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watches() == 0
