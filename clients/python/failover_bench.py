"""Failover as a Python client sees it: the pause in lock grants after the
leader of three real ``lock-svc`` processes is killed (SIGKILL: its
connections are reset) or hung (SIGSTOP: they stay open and go silent, as a
machine that vanished would leave them).

``cargo xtask bench failover [--rounds N] [--workers N]`` builds the release
binary and runs this. Workers each hold a client and acquire + release their
own lock in a loop; each round stops the leader, records the time from the
signal to the first grant after it (and the longest gap between grants in
the 10 s after it), then brings the replica back and waits for it to be
healthy again. Prints every pause and the p50 / max per signal.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

from conftest import Cluster, lock_svc_bin  # noqa: E402

from dsync_client import Client, DsyncError  # noqa: E402


def worker(endpoints: list[str], name: str, grants: list[float], stop: threading.Event) -> None:
    with Client(endpoints, retry_for=30.0) as client:
        s = client.open_session(ttl_ms=5_000, name=name)
        while not stop.is_set():
            try:
                lock = s.acquire(f"failover/{name}", "exclusive", wait_timeout_ms=10_000)
                grants.append(time.monotonic())
                lock.release()
            except DsyncError as e:
                print(f"{name}: {e}", file=sys.stderr)
                time.sleep(0.05)
        s.close()


def pause_after(grants: list[float], at: float) -> tuple[float, float]:
    """(time to the first grant after ``at``, longest gap within 10 s after)."""
    after = sorted(t for t in list(grants) if at < t <= at + 10)
    if not after:
        return float("inf"), float("inf")
    first = after[0] - at
    gaps = [b - a for a, b in zip(after, after[1:])]
    return first, max([first, *gaps])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="faults per signal")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as base:
        c = Cluster(lock_svc_bin(), Path(base))
        for i in range(3):
            c.start(i)
        try:
            c.wait_ready()
            grants: list[float] = []
            stop = threading.Event()
            threads = [
                threading.Thread(target=worker, args=(c.endpoints, f"w{w}", grants, stop), daemon=True)
                for w in range(args.workers)
            ]
            for t in threads:
                t.start()
            results: dict[str, list[tuple[float, float]]] = {"SIGKILL": [], "SIGSTOP": []}
            for r in range(args.rounds):
                for sig in (signal.SIGKILL, signal.SIGSTOP):
                    time.sleep(1.0)
                    leader = c.leader_index()
                    at = time.monotonic()
                    c.procs[leader].send_signal(sig)
                    time.sleep(3.0)
                    if sig == signal.SIGKILL:
                        c.procs[leader].wait(timeout=10)
                        c.start(leader)
                    else:
                        c.procs[leader].send_signal(signal.SIGCONT)
                    first, longest = pause_after(grants, at)
                    results[sig.name].append((first, longest))
                    print(
                        f"round {r + 1} {sig.name} of node {leader + 1}: first grant after "
                        f"{first * 1000:.0f} ms, longest gap {longest * 1000:.0f} ms",
                        flush=True,
                    )
                    c.wait_healthy(leader)
            stop.set()
            for t in threads:
                t.join(timeout=20)
            for name, rows in results.items():
                firsts = sorted(f for f, _ in rows)
                longest = sorted(g for _, g in rows)
                print(
                    f"{name}: {len(rows)} faults, first grant after p50 {firsts[len(firsts) // 2] * 1000:.0f} ms "
                    f"max {firsts[-1] * 1000:.0f} ms; longest gap p50 {longest[len(longest) // 2] * 1000:.0f} ms "
                    f"max {longest[-1] * 1000:.0f} ms"
                )
        finally:
            c.stop()


if __name__ == "__main__":
    main()
