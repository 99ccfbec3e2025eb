"""Typed exceptions for dsync errors.

The server explains every failure with a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer whose details hold a
``google.rpc.ErrorInfo`` (domain ``dsync.io``): a machine-readable
``reason`` (``LOCK_BUSY``, ``SESSION_EXPIRED``, …) plus string metadata
(``resource``, ``session_id``, ``leader_addr``, …).
:func:`from_rpc_error` turns a failed gRPC call into an exception:

* :class:`DsyncError` is the base of everything this package raises; it
  carries ``.code`` (``grpc.StatusCode``), ``.reason`` (``""`` when the
  status had no ErrorInfo), ``.metadata`` (dict) and ``.message``.
* One class per gRPC code (:class:`UnavailableError`,
  :class:`DeadlineExceededError`, …) catches every error of that code,
  with or without a reason — e.g. the client's own deadline passing is a
  :class:`DeadlineExceededError` with reason ``""``.
* One class per reason (:class:`LockBusy`, :class:`SessionExpired`, …),
  each a subclass of the class of the code the server contract pairs it
  with. An unknown reason falls back to the class of its code.

The reason wins over the code: a ``LOCK_BUSY`` detail always raises
:class:`LockBusy`, whatever code it came with. Parsing never raises: a
missing or undecodable trailer just means no reason.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

log = logging.getLogger("dsync_client")

#: The ErrorInfo domain dsync uses.
DOMAIN = "dsync.io"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class DsyncError(Exception):
    """A failed dsync call (or a client-side failure reported like one)."""

    #: The ErrorInfo reason a subclass stands for ("" for code classes).
    REASON = ""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        *,
        details: list[any_pb2.Any] | None = None,
        trailing_metadata: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        #: Every ``google.protobuf.Any`` of the status (ErrorInfo, LeaderHint, …).
        self.details: list[any_pb2.Any] = list(details or [])
        #: The call's raw trailing metadata (e.g. ``dsync-leader-bin``).
        self.trailing_metadata = trailing_metadata
        #: True when an earlier attempt of the same call failed in a way that
        #: may have applied it (so e.g. LOCK_NOT_FOUND from a retried Release
        #: can mean the first attempt released the lock).
        self.maybe_repeated = False

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the custom __init__
        return (type(self), (self.code, self.message, self.reason, self.metadata))

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        meta = f" {self.metadata}" if self.metadata else ""
        return f"{self.code.name}{reason}: {self.message}{meta}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r}, metadata={self.metadata!r})"
        )


# --- one class per gRPC code -------------------------------------------------


class CancelledError(DsyncError):
    """The call was cancelled (by this client)."""


class UnknownError(DsyncError):
    pass


class InvalidArgumentError(DsyncError):
    pass


class DeadlineExceededError(DsyncError):
    """A deadline passed: the client's own, a lock wait, or a server limit."""


class NotFoundError(DsyncError):
    pass


class AlreadyExistsError(DsyncError):
    pass


class PermissionDeniedError(DsyncError):
    pass


class ResourceExhaustedError(DsyncError):
    pass


class FailedPreconditionError(DsyncError):
    pass


class AbortedError(DsyncError):
    pass


class OutOfRangeError(DsyncError):
    pass


class UnimplementedError(DsyncError):
    pass


class InternalError(DsyncError):
    pass


class UnavailableError(DsyncError):
    """The replica did not serve the call (down, not the leader, no leader)."""


class DataLossError(DsyncError):
    pass


class UnauthenticatedError(DsyncError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[DsyncError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


# --- one class per dsync reason (the server contract) -------------------------


class NotLeader(UnavailableError):
    """This replica is not the leader (metadata leader_id, leader_addr,
    group_id, term). The client follows it; raised only when retries ran out."""

    REASON = "NOT_LEADER"


class NoLeader(UnavailableError):
    """An election is in progress; retried after a backoff."""

    REASON = "NO_LEADER"


class NotApplied(UnavailableError):
    """The request was dropped without being applied; retrying is safe."""

    REASON = "NOT_APPLIED"


class OutcomeUnknown(UnavailableError):
    """Timed out before commit: it may or may not have been applied. Retried
    only for calls that are safe to repeat (same request_id)."""

    REASON = "OUTCOME_UNKNOWN"


class ReplicaStopping(UnavailableError):
    """The replica is shutting down; retry on another one (an Acquire with the
    same request_id resumes its wait)."""

    REASON = "REPLICA_STOPPING"


class Overloaded(ResourceExhaustedError):
    """Load shedding; retried with backoff."""

    REASON = "OVERLOADED"


class RequestTooLarge(ResourceExhaustedError):
    """metadata: limit_bytes."""

    REASON = "REQUEST_TOO_LARGE"


class ServerTimeout(DeadlineExceededError):
    """The server's per-method limit passed (metadata limit_ms)."""

    REASON = "SERVER_TIMEOUT"


class ClientDeadline(DeadlineExceededError):
    """The call's own deadline (grpc-timeout) passed at the server (metadata
    limit_ms). When it passes at the client first, the status has no details
    and is a plain :class:`DeadlineExceededError`."""

    REASON = "CLIENT_DEADLINE"


class InvalidArgument(InvalidArgumentError):
    """A field is invalid (metadata field)."""

    REASON = "INVALID_ARGUMENT"


class MalformedRequest(InvalidArgumentError):
    """The request protobuf could not be decoded."""

    REASON = "MALFORMED_REQUEST"


class SessionNotFound(NotFoundError):
    """No such session id (metadata session_id)."""

    REASON = "SESSION_NOT_FOUND"


class SessionExpired(FailedPreconditionError):
    """The session expired or was closed; its locks are gone. Open a new one
    (metadata session_id)."""

    REASON = "SESSION_EXPIRED"


class LockNotFound(NotFoundError):
    """No such lock held by this session (metadata lock_id or resource)."""

    REASON = "LOCK_NOT_FOUND"


class AlreadyHeld(FailedPreconditionError):
    """This session already holds the resource (metadata resource, lock_id)."""

    REASON = "ALREADY_HELD"


class AlreadyWaiting(FailedPreconditionError):
    REASON = "ALREADY_WAITING"


class WrongMode(FailedPreconditionError):
    """E.g. upgrading a lock that is not UPGRADEABLE."""

    REASON = "WRONG_MODE"


class LockBusy(AbortedError):
    """A try-lock (wait_timeout_ms=0) found the resource held (metadata resource)."""

    REASON = "LOCK_BUSY"


class WaitTimeout(DeadlineExceededError):
    """Waited wait_timeout_ms without a grant (metadata resource, waited_ms)."""

    REASON = "WAIT_TIMEOUT"


class DeadlockVictim(AbortedError):
    """This wait closed a wait-for cycle (metadata cycle)."""

    REASON = "DEADLOCK_VICTIM"


class Superseded(AbortedError):
    """A retry of this Acquire (same request_id) took its wait over; the
    retry answers."""

    REASON = "SUPERSEDED"


class WaitWithdrawn(FailedPreconditionError):
    """The wait was withdrawn by a ReleaseAll / Release of the resource by the
    same session."""

    REASON = "WAIT_WITHDRAWN"


class LimitReached(ResourceExhaustedError):
    """A server limit (max locks, sessions, waiters…; metadata limit)."""

    REASON = "LIMIT_REACHED"


class Internal(InternalError):
    REASON = "INTERNAL"


class StorageFailure(InternalError):
    """A replica's disk failed; it stops its group rather than go on."""

    REASON = "STORAGE_FAILURE"


_BY_REASON: dict[str, type[DsyncError]] = {
    c.REASON: c
    for c in (
        NotLeader,
        NoLeader,
        NotApplied,
        OutcomeUnknown,
        ReplicaStopping,
        Overloaded,
        RequestTooLarge,
        ServerTimeout,
        ClientDeadline,
        InvalidArgument,
        MalformedRequest,
        SessionNotFound,
        SessionExpired,
        LockNotFound,
        AlreadyHeld,
        AlreadyWaiting,
        WrongMode,
        LockBusy,
        WaitTimeout,
        DeadlockVictim,
        Superseded,
        WaitWithdrawn,
        LimitReached,
        Internal,
        StorageFailure,
    )
}


def error_class(code: grpc.StatusCode, reason: str) -> type[DsyncError]:
    """The exception class for a code and (possibly empty) reason."""
    return _BY_REASON.get(reason) or _BY_CODE.get(code, DsyncError)


def make_error(
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    metadata: dict[str, str] | None = None,
    **kw: Any,
) -> DsyncError:
    return error_class(code, reason)(code, message, reason, metadata, **kw)


# --- parsing ------------------------------------------------------------------


def status_details(call: Any) -> list[any_pb2.Any]:
    """The ``google.rpc.Status`` details of a finished call ([] when absent or
    undecodable)."""
    try:
        from grpc_status import rpc_status

        st = rpc_status.from_call(call)
        return list(st.details) if st is not None else []
    except ValueError:
        # from_call insists the Status' code/message match the call's; a
        # proxy may rewrite the message. The details are still good.
        pass
    except Exception:  # pragma: no cover - never let parsing mask the error
        log.debug("unreadable status details", exc_info=True)
        return []
    for key, value in _trailers(call):
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return list(status_pb2.Status.FromString(value).details)
            except Exception:
                return []
    return []


def error_info(details: list[any_pb2.Any]) -> error_details_pb2.ErrorInfo | None:
    """The first ErrorInfo among ``details`` (preferring domain dsync.io)."""
    found = None
    for d in details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            if d.Unpack(info):
                if info.domain == DOMAIN:
                    return info
                found = found or info
    return found


def _trailers(call: Any) -> tuple[tuple[str, Any], ...]:
    try:
        return tuple(call.trailing_metadata() or ())
    except Exception:
        return ()


def from_rpc_error(e: grpc.RpcError) -> DsyncError:
    """Translates a failed gRPC call into the matching :class:`DsyncError`."""
    try:
        code = e.code()  # type: ignore[attr-defined]
        message = e.details() or ""  # type: ignore[attr-defined]
    except Exception:
        code, message = grpc.StatusCode.UNKNOWN, str(e)
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = status_details(e)
    info = error_info(details)
    reason = info.reason if info is not None else ""
    metadata = dict(info.metadata) if info is not None else {}
    err = make_error(
        code,
        message,
        reason,
        metadata,
        details=details,
        trailing_metadata=_trailers(e),
    )
    err.__cause__ = e
    return err
