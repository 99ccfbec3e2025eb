"""A real three-replica lock-svc cluster for the tests.

Each replica is a ``lock-svc`` process on a free 127.0.0.1 port with its own
temporary data dir, configured only by ``DSYNC_*`` environment variables the
way ``crates/lock-svc/tests/binary.rs`` does. The binary is
``$DSYNC_LOCK_SVC_BIN``, else ``<repo>/target/debug/lock-svc``.

``cluster`` is shared by the whole session; tests that kill replicas use
``make_cluster`` for a private one. Every wait is bounded in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dsync_client import Client, DsyncError
from dsync_client._proto import admin_pb2, admin_pb2_grpc, common_pb2

REPO = Path(__file__).resolve().parents[3]
READY_TIMEOUT = 30.0


def lock_svc_bin() -> Path:
    return Path(os.environ.get("DSYNC_LOCK_SVC_BIN") or REPO / "target" / "debug" / "lock-svc")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """Three lock-svc replicas; index ``i`` is node id ``i + 1``."""

    def __init__(self, binary: Path, base: Path, n: int = 3) -> None:
        self.binary = binary
        self.base = base
        self.ports = free_ports(n)
        self.addrs = [f"127.0.0.1:{p}" for p in self.ports]
        self.peers = ",".join(f"{i + 1}={a}" for i, a in enumerate(self.addrs))
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n

    @property
    def endpoints(self) -> list[str]:
        return list(self.addrs)

    def start(self, i: int) -> None:
        assert self.procs[i] is None or self.procs[i].poll() is not None, f"replica {i + 1} is running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSYNC_")}
        env.update(
            DSYNC_NODE_ID=str(i + 1),
            DSYNC_LISTEN=self.addrs[i],
            DSYNC_PEERS=self.peers,
            DSYNC_DATA_DIR=str(self.base / f"n{i + 1}"),
            RUST_LOG="warn",
        )
        log = open(self.base / f"n{i + 1}.log", "ab")
        try:
            self.procs[i] = subprocess.Popen(
                [str(self.binary)], env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        finally:
            log.close()

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)

    def logs(self) -> str:
        out = []
        for i in range(len(self.procs)):
            f = self.base / f"n{i + 1}.log"
            if f.exists():
                out.append(f"--- n{i + 1}.log (tail) ---\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def admin_status(self, i: int, timeout: float = 2.0) -> admin_pb2.StatusResponse | None:
        """dsync.admin.v1.Admin/Status of replica ``i`` (None if it does not answer)."""
        with grpc.insecure_channel(self.addrs[i]) as ch:
            try:
                return admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=timeout)
            except grpc.RpcError:
                return None

    def wait_healthy(self, i: int, timeout: float = 30.0) -> None:
        """Until replica ``i`` says it is healthy (a member that knows a leader)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.admin_status(i, timeout=1.0)
            if st is not None and st.healthy:
                return
            time.sleep(0.2)
        raise AssertionError(f"replica {i + 1} never became healthy\n{self.logs()}")

    def leader_index(self, timeout: float = 15.0, exclude: tuple[int, ...] = ()) -> int:
        """The index of the replica that says it leads (polls, bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(len(self.addrs)):
                if i in exclude:
                    continue
                st = self.admin_status(i, timeout=1.0)
                if st is not None and any(g.role == common_pb2.RAFT_ROLE_LEADER for g in st.groups):
                    return i
            time.sleep(0.1)
        raise AssertionError(f"no leader within {timeout}s\n{self.logs()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until a leader opens (and closes) a session."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with Client(self.endpoints, request_timeout=2.0, retry_for=2.0) as c:
            while time.monotonic() < deadline:
                for i, p in enumerate(self.procs):
                    if p is not None and p.poll() is not None:
                        raise AssertionError(f"replica {i + 1} exited with {p.returncode}\n{self.logs()}")
                try:
                    s = c.open_session(ttl_ms=5000, name="readiness")
                    s.close()
                    return
                except DsyncError as e:
                    last = e
                    time.sleep(0.2)
        raise AssertionError(f"cluster not ready after {timeout}s: {last}\n{self.logs()}")


@pytest.fixture(scope="session")
def lock_svc() -> Path:
    b = lock_svc_bin()
    if not b.is_file():
        pytest.fail(f"lock-svc binary not found at {b}: build it (cargo build -p lock-svc) or set DSYNC_LOCK_SVC_BIN")
    return b


@pytest.fixture(scope="session")
def make_cluster(lock_svc: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Cluster]]:
    """Starts clusters on demand; all are killed at the end of the session
    (tests may stop theirs earlier)."""
    started: list[Cluster] = []

    def make() -> Cluster:
        c = Cluster(lock_svc, tmp_path_factory.mktemp("lock-svc"))
        started.append(c)
        for i in range(3):
            c.start(i)
        c.wait_ready()
        return c

    yield make
    for c in started:
        c.stop()


@pytest.fixture(scope="session")
def cluster(make_cluster: Callable[[], Cluster]) -> Cluster:
    return make_cluster()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.endpoints) as c:
        yield c
