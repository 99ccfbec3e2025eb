"""Session streams against real lock-svc processes: operations as messages
on one stream, typed errors that leave the stream open, and the stream
attached again on the new leader, with its wait, after a SIGKILL."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

import pytest
from conftest import Cluster

from dsync_client import (
    AlreadyHeld,
    CancelledError,
    Client,
    LockBusy,
    LockNotFound,
    SessionNotFound,
    WaitTimeout,
)


def _until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_stream_carries_acquires_and_releases(client: Client) -> None:
    other = client.open_session(ttl_ms=10_000, name="py-stream-other")
    me = client.open_session(ttl_ms=10_000, name="py-stream")
    with me.stream() as s:
        a = s.acquire("py/stream/a", "exclusive", wait_timeout_ms=0)
        assert a.fencing_token > 0
        held = other.acquire("py/stream/b", "exclusive", wait_timeout_ms=0)
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(s.acquire("py/stream/b", "exclusive", 10_000)))
        t.start()
        _until(lambda: len(client.status("py/stream/b").waiters) == 1, 5, "never queued")
        # A wait does not hold up the stream's other operations.
        c = s.acquire("py/stream/c", "shared", wait_timeout_ms=0)
        s.release(c.lock_id)
        held.release()
        t.join(10)
        (b,) = got
        assert b.fencing_token > held.fencing_token  # type: ignore[attr-defined]
        # Errors are the unary calls' typed errors; the stream goes on.
        with pytest.raises(AlreadyHeld):
            s.acquire("py/stream/a", "exclusive", wait_timeout_ms=0)
        with pytest.raises(LockNotFound):
            s.release(987_654)
        other.acquire("py/stream/d", "exclusive", wait_timeout_ms=0)
        with pytest.raises(LockBusy):
            s.acquire("py/stream/d", "exclusive", wait_timeout_ms=0)
        with pytest.raises(WaitTimeout):
            s.acquire("py/stream/d", "exclusive", wait_timeout_ms=200)
        s.release(a.lock_id)
        s.release(b.lock_id)  # type: ignore[attr-defined]
    for r in ("py/stream/a", "py/stream/b", "py/stream/c"):
        assert list(client.status(r).holders) == []
    me.close()
    other.close()


def test_a_stream_moves_to_the_new_leader_with_its_wait(make_cluster: Callable[[], Cluster]) -> None:
    c = make_cluster()  # private: this test kills a replica
    try:
        leader = c.leader_index()
        with Client(c.endpoints) as client:
            holder = client.open_session(ttl_ms=5_000, name="py-stream-holder")
            me = client.open_session(ttl_ms=5_000, name="py-stream-waiter")
            held = holder.acquire("py/stream/failover", "exclusive", wait_timeout_ms=0)
            s = me.stream()
            mine = s.acquire("py/stream/mine", "exclusive", wait_timeout_ms=0)
            got: list[object] = []
            failed: list[BaseException] = []

            def wait() -> None:
                try:
                    got.append(s.acquire("py/stream/failover", "exclusive", 30_000))
                except BaseException as e:  # noqa: BLE001 - reported below
                    failed.append(e)

            t = threading.Thread(target=wait, daemon=True)
            t.start()
            _until(lambda: len(client.status("py/stream/failover").waiters) == 1, 5, "never queued")
            c.kill(leader)
            # The holder lets go on the new leader: the wait, sent again on
            # the stream attached there, is the one granted.
            held.release()
            t.join(30)
            assert not failed, failed
            (got_lock,) = got
            assert got_lock.fencing_token > held.fencing_token  # type: ignore[attr-defined]
            holders = client.status("py/stream/failover").holders
            assert [h.session_id for h in holders] == [me.id]
            assert s._link.addr not in ("", c.addrs[leader]), "the stream never moved"
            # The lock taken before the failover is still the session's,
            # and the stream goes on.
            assert [h.session_id for h in client.status("py/stream/mine").holders] == [me.id]
            s.release(mine.lock_id)
            s.release(got_lock.lock_id)  # type: ignore[attr-defined]
            again = s.acquire("py/stream/mine", "exclusive", wait_timeout_ms=0)
            assert again.fencing_token > mine.fencing_token
            s.release(again.lock_id)
            s.close()
            me.close()
            holder.close()
    finally:
        c.stop()


def test_closing_a_stream_fails_its_operations_and_ends_its_thread(client: Client) -> None:
    holder = client.open_session(ttl_ms=10_000, name="py-stream-close-holder")
    me = client.open_session(ttl_ms=10_000, name="py-stream-close")
    held = holder.acquire("py/stream/close", "exclusive", wait_timeout_ms=0)
    s = me.stream()
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            s.acquire("py/stream/close", "exclusive", 30_000)
        except BaseException as e:  # noqa: BLE001 - checked below
            failed.append(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    _until(lambda: len(client.status("py/stream/close").waiters) == 1, 5, "never queued")
    s.close()
    t.join(5)
    (e,) = failed
    assert isinstance(e, CancelledError), e
    s._reader.join(5)
    assert not s._reader.is_alive()
    with pytest.raises(CancelledError):
        s.acquire("py/stream/other", "exclusive", wait_timeout_ms=0)
    # The server withdraws the wait of the closed stream (after its grace
    # for a client re-attaching).
    _until(lambda: len(client.status("py/stream/close").waiters) == 0, 10, "wait never withdrawn")
    held.release()
    holder.close()
    me.close()


def test_a_stream_ends_with_its_session(client: Client) -> None:
    me = client.open_session_raw(ttl_ms=10_000, name="py-stream-gone")
    s = client.stream(me.session_id)
    s.acquire("py/stream/gone", "exclusive", wait_timeout_ms=0)
    client.close_session(me.session_id)
    for _ in range(2):
        with pytest.raises(SessionNotFound):
            s.acquire("py/stream/gone-2", "exclusive", wait_timeout_ms=0)
    assert s.closed
    s._reader.join(5)
    assert not s._reader.is_alive()


def test_a_stream_nobody_closed_ends_once_collected(client: Client) -> None:
    me = client.open_session(ttl_ms=10_000, name="py-stream-dropped")
    s = me.stream()
    s.acquire("py/stream/dropped", "exclusive", wait_timeout_ms=0)
    reader = s._reader
    del s
    gc.collect()
    reader.join(5)
    assert not reader.is_alive(), "the reader outlived its stream"
    me.close()
