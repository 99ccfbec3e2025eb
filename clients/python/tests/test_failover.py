"""Leader following and failover against real lock-svc processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from conftest import Cluster, free_ports

from dsync_client import Client, Lock


def test_client_given_only_a_follower_follows_the_leader(cluster: Cluster) -> None:
    leader = cluster.leader_index()
    follower = (leader + 1) % 3
    with Client([cluster.addrs[follower]]) as c:
        with c.open_session(name="py-follower") as s:
            with s.lock("py/follow", "exclusive", wait_timeout_ms=5_000) as lock:
                assert lock.fencing_token > 0
                # The hint taught the client the leader's address.
                assert c.conn.leader == cluster.addrs[cluster.leader_index()]
                assert cluster.addrs[leader] in c.conn.endpoints
        # Reads work from there too.
        assert list(c.status("py/follow").holders) == []


def test_dead_endpoint_first_is_skipped(cluster: Cluster) -> None:
    (dead_port,) = free_ports(1)
    with Client([f"127.0.0.1:{dead_port}", *cluster.endpoints]) as c:
        with c.open_session(name="py-dead-first") as s:
            with s.lock("py/dead-first", "exclusive", wait_timeout_ms=5_000) as lock:
                assert lock.fencing_token > 0


def test_session_and_lock_survive_leader_kill(make_cluster: Callable[[], Cluster]) -> None:
    """SIGKILL the leader while a session holds a lock and another waits for
    it: the session stays alive through the failover, the lock is still held
    with the same token, the waiter re-attaches to its wait (same
    request_id) and gets the lock when it is released. Then the killed
    replica restarts from its data dir and catches up."""
    c = make_cluster()  # private: this test kills a replica
    ttl_ms = 3_000
    try:
        leader = c.leader_index()
        with Client(c.endpoints) as client:
            holder = client.open_session(ttl_ms=ttl_ms, name="py-failover-holder")
            waiter = client.open_session(ttl_ms=ttl_ms, name="py-failover-waiter")
            lock = holder.acquire("py/failover", "exclusive", wait_timeout_ms=5_000)

            got: list[Lock] = []
            failed: list[BaseException] = []

            def wait_for_lock() -> None:
                try:
                    got.append(waiter.acquire("py/failover", "exclusive", wait_timeout_ms=30_000))
                except BaseException as e:
                    failed.append(e)

            t = threading.Thread(target=wait_for_lock, daemon=True)
            t.start()
            deadline = time.monotonic() + 10
            while not client.status("py/failover").waiters and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [w.session_id for w in client.status("py/failover").waiters] == [waiter.id]

            c.kill(leader)  # SIGKILL
            new_leader = c.leader_index(exclude=(leader,), timeout=20)
            assert new_leader != leader

            # Longer than a TTL after the failover: only keep-alives through
            # the new leader keep the sessions.
            time.sleep(ttl_ms / 1000 * 1.5)
            assert not holder.lost and not waiter.lost
            live = {s.session_id for s in client.list_sessions()}
            assert {holder.id, waiter.id} <= live

            st = client.status("py/failover")
            assert [(h.session_id, h.lock_id, h.fencing_token) for h in st.holders] == [
                (holder.id, lock.lock_id, lock.fencing_token)
            ]
            # The waiter's retry re-attached to its wait instead of queueing again.
            assert [w.session_id for w in st.waiters] == [waiter.id]
            assert t.is_alive() and not got and not failed

            # New work goes through the new leader.
            with holder.lock("py/failover-2", "exclusive", wait_timeout_ms=5_000) as other:
                assert other.fencing_token > 0

            lock.release()
            t.join(timeout=20)
            assert not t.is_alive(), "the waiter never got the lock"
            assert not failed, failed
            assert got[0].fencing_token > lock.fencing_token
            got[0].release()

            # Restart the killed replica (same port and data dir); it catches up.
            c.start(leader)
            c.wait_healthy(leader)
            with Client([c.addrs[leader]]) as direct:
                assert list(direct.status("py/failover").holders) == []
                assert {holder.id, waiter.id} <= {s.session_id for s in direct.list_sessions()}

            holder.close()
            waiter.close()
    finally:
        c.stop()


def test_session_survives_a_hung_leader(make_cluster: Callable[[], Cluster]) -> None:
    """SIGSTOP the leader (its connections stay open, nothing answers): the
    keep-alives move off it within their per-attempt deadline, the other two
    elect a leader, and the session (TTL 3 s) and its lock survive. A
    session whose keep-alives cannot get through is reported lost on the
    client's own clock once its TTL has passed."""
    import os
    import signal

    c = make_cluster()  # private: this test freezes a replica
    ttl_ms = 3_000
    try:
        leader = c.leader_index()
        with Client(c.endpoints) as client:
            s = client.open_session(ttl_ms=ttl_ms, name="py-hung-leader")
            lock = s.acquire("py/hung", "exclusive", wait_timeout_ms=5_000)
            os.kill(c.procs[leader].pid, signal.SIGSTOP)
            try:
                c.leader_index(exclude=(leader,))
                time.sleep(3 * ttl_ms / 1000)  # three TTLs on the new leader
                assert not s.lost, "the session expired although a quorum was up"
                holders = list(client.status("py/hung").holders)
                assert [(h.session_id, h.fencing_token) for h in holders] == [(s.id, lock.fencing_token)]
            finally:
                os.kill(c.procs[leader].pid, signal.SIGCONT)
            lock.release()
            s.close()

            # A session nobody keeps alive any more is lost on the clock.
            t = client.open_session(ttl_ms=1_000, name="py-clock")
            t._stop.set()  # stop its keep-alive thread, as if starved
            time.sleep(1.2)
            assert t.lost and t.expired_by_clock()
    finally:
        c.stop()
