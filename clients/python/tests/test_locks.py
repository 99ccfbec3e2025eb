"""Sessions, locks, fencing tokens and typed errors against a real cluster.

Tests marked ``contract`` check the ``google.rpc.ErrorInfo`` reasons of the
server contract; they need a server that sends error details.
"""

from __future__ import annotations

import gc
import threading
import time

import grpc
import pytest
from conftest import Cluster

import dsync_client as dc
from dsync_client import Client, LockMode


def _holders(client: Client, resource: str) -> list:
    return list(client.status(resource).holders)


def test_session_acquire_status_release(client: Client) -> None:
    session = client.open_session(ttl_ms=10_000, name="py-basic")
    try:
        assert session.id > 0 and session.ttl_ms == 10_000
        lock = session.acquire("py/basic", mode="exclusive", wait_timeout_ms=5_000)
        assert lock.fencing_token > 0 and lock.lock_id > 0
        assert lock.mode is LockMode.EXCLUSIVE
        st = client.status("py/basic")
        assert st.mode == LockMode.EXCLUSIVE
        assert [(h.session_id, h.lock_id, h.fencing_token) for h in st.holders] == [
            (session.id, lock.lock_id, lock.fencing_token)
        ]
        assert st.holders[0].client_name == "py-basic"
        assert any(h.lock_id == lock.lock_id for h in client.list_locks(session.id))
        lock.release()
        lock.release()  # idempotent
        assert _holders(client, "py/basic") == []
    finally:
        session.close()


def test_context_managers(client: Client) -> None:
    with client.open_session(ttl_ms=5_000, name="py-ctx") as session:
        with session.lock("py/ctx", mode=LockMode.SHARED, wait_timeout_ms=5_000) as lock:
            assert lock.mode is LockMode.SHARED and lock.fencing_token > 0
            assert [h.lock_id for h in _holders(client, "py/ctx")] == [lock.lock_id]
        assert lock.released and _holders(client, "py/ctx") == []
        # Left held on purpose: closing the session releases it.
        kept = session.acquire("py/ctx-kept", "exclusive", 5_000)
        assert _holders(client, "py/ctx-kept")[0].lock_id == kept.lock_id
    assert _holders(client, "py/ctx-kept") == []
    assert session.id not in {s.session_id for s in client.list_sessions()}


def test_list_locks_pages(client: Client) -> None:
    with client.open_session(name="py-list") as session:
        held = [session.acquire(f"py/list/{i}", "shared", 5_000) for i in range(5)]
        mine = client.list_locks(session.id, page_size=2)
        assert sorted(h.lock_id for h in mine) == sorted(lk.lock_id for lk in held)
        assert {h.resource for h in mine} == {f"py/list/{i}" for i in range(5)}


def test_mutual_exclusion_and_increasing_tokens(cluster: Cluster) -> None:
    threads_n, rounds = 4, 5
    resource = "py/mutex"
    guard = threading.Lock()
    inside: list[int] = []  # who is in the critical section
    tokens: list[int] = []  # in the order the critical sections ran
    overlaps: list[tuple[int, list[int]]] = []
    failures: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with Client(cluster.endpoints) as c, c.open_session(ttl_ms=10_000, name=f"py-mutex-{n}") as s:
                for _ in range(rounds):
                    with s.lock(resource, "exclusive", wait_timeout_ms=20_000) as lock:
                        with guard:
                            if inside:
                                overlaps.append((n, list(inside)))
                            inside.append(n)
                            tokens.append(lock.fencing_token)
                        time.sleep(0.005)
                        with guard:
                            inside.remove(n)
        except BaseException as e:  # reported below
            failures.append(e)

    ts = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads_n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in ts), "workers did not finish in time"
    assert not failures, failures
    assert not overlaps, f"critical sections overlapped: {overlaps}"
    assert len(tokens) == threads_n * rounds
    assert all(a < b for a, b in zip(tokens, tokens[1:])), f"tokens not strictly increasing: {tokens}"


def test_upgrade_issues_a_new_token_downgrade_keeps_it(client: Client) -> None:
    with client.open_session(name="py-upgrade") as session:
        lock = session.acquire("py/upgrade", "upgradeable", 5_000)
        assert lock.mode is LockMode.UPGRADEABLE
        first = lock.fencing_token
        new = lock.upgrade(wait_timeout_ms=5_000)
        assert new == lock.fencing_token and new > first
        assert lock.mode is LockMode.EXCLUSIVE
        assert client.status("py/upgrade").mode == LockMode.EXCLUSIVE
        kept = lock.downgrade()
        assert kept == new == lock.fencing_token
        assert lock.mode is LockMode.SHARED
        st = client.status("py/upgrade")
        assert st.mode == LockMode.SHARED and st.holders[0].fencing_token == new
        lock.release()


def test_client_deadline_is_a_deadline_error_and_the_wait_is_withdrawn(cluster: Cluster) -> None:
    """The call's own deadline passing is a DeadlineExceededError: bare
    (reason "", no trailer to parse) when the client notices first, or
    CLIENT_DEADLINE when the server answers first. Either way the server
    withdraws the abandoned wait by itself."""
    with Client(cluster.endpoints) as c, c.open_session(name="py-holder") as holder:
        holder.acquire("py/deadline", "exclusive", 5_000)
        # wait_margin < 0: the gRPC deadline passes 1.5 s before the lock wait would.
        with Client(cluster.endpoints, wait_margin=-1.5) as impatient, impatient.open_session(name="py-impatient") as s:
            t0 = time.monotonic()
            with pytest.raises(dc.DeadlineExceededError) as ei:
                s.acquire("py/deadline", "exclusive", wait_timeout_ms=2_000)
            assert time.monotonic() - t0 < 1.5
            assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert (type(ei.value), ei.value.reason) in {
                (dc.DeadlineExceededError, ""),
                (dc.ClientDeadline, "CLIENT_DEADLINE"),
            }
            deadline = time.monotonic() + 10
            while c.status("py/deadline").waiters and time.monotonic() < deadline:
                time.sleep(0.1)
            assert list(c.status("py/deadline").waiters) == []


def test_lost_session_raises_session_expired(client: Client) -> None:
    session = client.open_session(ttl_ms=1_000, name="py-lost")
    client.close_session(session.id)  # behind the Session's back
    deadline = time.monotonic() + 10
    while not session.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session.lost, "the keep-alive thread did not notice the closed session"
    with pytest.raises(dc.SessionExpired) as ei:
        session.acquire("py/lost", "exclusive", 0)
    assert ei.value.reason == "SESSION_EXPIRED"
    session.close()  # no-op on a lost session


def test_dropped_session_stops_being_kept_alive(client: Client) -> None:
    session = client.open_session(ttl_ms=1_000, name="py-dropped")
    sid = session.id
    del session
    gc.collect()
    deadline = time.monotonic() + 15
    while sid in {s.session_id for s in client.list_sessions()} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sid not in {s.session_id for s in client.list_sessions()}


def test_invalid_mode_is_rejected_locally(client: Client) -> None:
    with pytest.raises(ValueError):
        LockMode.parse("sideways")


# --- typed errors from ErrorInfo (the server contract) -------------------------


@pytest.mark.contract
def test_try_lock_on_held_resource_raises_lock_busy(client: Client) -> None:
    with client.open_session(name="py-busy-a") as a, client.open_session(name="py-busy-b") as b:
        a.acquire("py/busy", "exclusive", 5_000)
        with pytest.raises(dc.LockBusy) as ei:
            b.acquire("py/busy", "exclusive", wait_timeout_ms=0)
        e = ei.value
        assert e.reason == "LOCK_BUSY" and e.code == grpc.StatusCode.ABORTED
        assert e.metadata.get("resource") == "py/busy"
        assert isinstance(e, dc.AbortedError) and isinstance(e, dc.DsyncError)


@pytest.mark.contract
def test_wait_timeout_raises_wait_timeout(client: Client) -> None:
    with client.open_session(name="py-wt-a") as a, client.open_session(name="py-wt-b") as b:
        a.acquire("py/wait-timeout", "exclusive", 5_000)
        t0 = time.monotonic()
        with pytest.raises(dc.WaitTimeout) as ei:
            b.acquire("py/wait-timeout", "exclusive", wait_timeout_ms=300)
        assert time.monotonic() - t0 >= 0.25
        e = ei.value
        assert e.reason == "WAIT_TIMEOUT" and e.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert e.metadata.get("resource") == "py/wait-timeout"
        assert isinstance(e, dc.DeadlineExceededError)


@pytest.mark.contract
def test_bogus_session_raises_session_not_found(client: Client) -> None:
    bogus = client.attach_session(987_654_321)
    with pytest.raises(dc.SessionNotFound) as ei:
        bogus.acquire("py/bogus", "exclusive", 0)
    e = ei.value
    assert e.reason == "SESSION_NOT_FOUND" and e.code == grpc.StatusCode.NOT_FOUND
    assert e.metadata.get("session_id") == "987654321"
    assert bogus.lost  # a session the server does not know is unusable


@pytest.mark.contract
def test_empty_resource_raises_invalid_argument(client: Client) -> None:
    with client.open_session(name="py-invalid") as s:
        with pytest.raises(dc.InvalidArgument) as ei:
            s.acquire("", "exclusive", 0)
    e = ei.value
    assert e.reason == "INVALID_ARGUMENT" and e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "field" in e.metadata


@pytest.mark.contract
def test_lock_misuse_reasons(client: Client) -> None:
    with client.open_session(name="py-misuse") as s:
        s.acquire("py/misuse", "exclusive", 5_000)
        with pytest.raises(dc.AlreadyHeld) as held:
            s.acquire("py/misuse", "shared", 0)
        assert held.value.code == grpc.StatusCode.FAILED_PRECONDITION
        shared = s.acquire("py/misuse-shared", "shared", 5_000)
        with pytest.raises(dc.WrongMode) as wrong:
            shared.upgrade(wait_timeout_ms=0)  # only UPGRADEABLE locks upgrade
        assert wrong.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(dc.LockNotFound) as missing:
            client.release(s.id, lock_id=987_654_321)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_repeating_an_acquire_with_its_request_id_answers_the_same_grant(client: Client) -> None:
    """The contract's recovery step for a caller that gave up on an Acquire:
    the same request_id answers the grant it got (and takes it over)."""
    from dsync_client import new_request_id

    with client.open_session(name="py-request-id") as s:
        rid = new_request_id()
        first = s.acquire("py/request-id", "exclusive", wait_timeout_ms=0, request_id=rid)
        again = s.acquire("py/request-id", "exclusive", wait_timeout_ms=0, request_id=rid)
        assert (again.lock_id, again.fencing_token) == (first.lock_id, first.fencing_token)
        again.release()
