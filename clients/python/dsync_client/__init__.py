"""Python client for the dsync lock service.

    from dsync_client import Client

    client = Client(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
    with client.open_session(ttl_ms=10_000, name="worker") as session:
        with session.lock("orders/42", mode="exclusive", wait_timeout_ms=5_000) as lock:
            print(lock.fencing_token)

Modules:

* :mod:`dsync_client.lock` — :class:`Client`, :class:`Session`, :class:`Lock`
* :mod:`dsync_client.channel` — leader following and retries
* :mod:`dsync_client.errors` — typed exceptions built from google.rpc.ErrorInfo
* :mod:`dsync_client.codegen` — generates the protobuf stubs into ``_gen/``

The public names are loaded lazily (PEP 562), so ``python -m
dsync_client.codegen`` works before any stub exists; the first access to one
of them generates the stubs if they are missing (see :mod:`.codegen`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .channel import LeaderChannel
    from .errors import *  # noqa: F403
    from .lock import Client, Lock, LockMode, Session, SessionStream

__all__ = [  # resolved by __getattr__
    "Client",
    "Session",
    "SessionStream",
    "Lock",
    "LockMode",
    "LeaderChannel",
    "DsyncError",
    # ... and every exception class of dsync_client.errors (see dir()).
]

_LOCK_NAMES = ("Client", "Session", "SessionStream", "Lock", "LockMode", "new_request_id")
_CHANNEL_NAMES = ("LeaderChannel", "leader_hint")


def __getattr__(name: str) -> Any:
    if name in _LOCK_NAMES:
        return getattr(importlib.import_module(".lock", __name__), name)
    if name in _CHANNEL_NAMES:
        return getattr(importlib.import_module(".channel", __name__), name)
    err = _errors().get(name)
    if err is not None:
        return err
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LOCK_NAMES, *_CHANNEL_NAMES, *_errors()})


def _errors() -> dict[str, type]:
    """The exception classes of :mod:`.errors` (they need no stubs)."""
    errors = importlib.import_module(".errors", __name__)
    base = errors.DsyncError
    return {n: v for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, base)}
