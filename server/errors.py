"""Domain errors and their one mapping to a gRPC status with rich details.

Every failure a client can see is one of these classes. Each class fixes its status code
and `ErrorInfo.reason`; the instance carries the message and the details. `to_status()`
is the only place that builds `google.rpc.Status`: the status table of docs/reference/errors.md
lives here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "sessiongate"
# A status travels in HTTP/2 trailers, which peers cap (8 KiB by default): the message goes
# out twice (grpc-message, percent-encoded, and inside the details), so every part is bounded
# in bytes here, whatever an agent or a client put into it.
CLIP = 300  # bytes of one client's or agent's string quoted in a message or detail
MAX_MESSAGE_BYTES = 400
MAX_METADATA_BYTES = 1500  # all ErrorInfo metadata values together
MAX_VIOLATIONS = 10
MAX_FIELD_BYTES = 100  # of one violation's field name (it may quote a client's label key)
MAX_VIOLATION_BYTES = 1500  # all field violations together (field names and descriptions)
TAIL_KEYS = frozenset({"stderr"})  # metadata whose end matters more than its start


def clip(text: str, limit: int = CLIP) -> str:
    """`text` cut to `limit` UTF-8 bytes (marked): agents and clients never size our statuses."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore") + f"… ({len(data) - limit} more bytes)"


def clip_tail(text: str, limit: int) -> str:
    """The last `limit` UTF-8 bytes of `text` (marked), for logs and stderr tails."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return f"({len(data) - limit} bytes before) …" + data[-limit:].decode(errors="ignore")


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class SessionGateError(Exception):
    """Base of all errors that reach clients as a status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str | None = None
    # False for UNAVAILABLE errors that a blind retry would only repeat (an agent that failed to
    # start): the service commits the RPC first so clients' transparent retries skip them.
    transparently_retryable = True

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, object] | None = None,
        retry_after: float | None = None,
        violations: Iterable[FieldViolation] = (),
        quota: tuple[str, str] | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        self.metadata = _bounded_metadata(metadata or {})
        self.retry_after = retry_after
        self.violations = _bounded_violations(tuple(violations))
        self.quota = quota  # (subject, description) of a QuotaFailure

    def to_status(self) -> grpc.Status:
        """The status with ErrorInfo, RetryInfo and BadRequest details as they apply."""
        details: list[any_pb2.Any] = []
        if self.reason is not None:
            details.append(
                _pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata))
            )
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(1, round(self.retry_after * 1000)))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        if self.quota is not None:
            subject, description = self.quota
            violation = error_details_pb2.QuotaFailure.Violation(
                subject=clip(subject, 200), description=clip(description)
            )
            details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(bad_request))
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(status)


def _bounded_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """ErrorInfo metadata as strings (the wire type), within MAX_METADATA_BYTES in all."""
    out: dict[str, str] = {}
    budget = MAX_METADATA_BYTES
    for key, value in metadata.items():
        limit = max(0, min(budget, 1000))
        text = str(value)
        out[key] = clip_tail(text, limit) if key in TAIL_KEYS else clip(text, limit)
        budget -= len(out[key].encode())
    return out


def _bounded_violations(violations: tuple[FieldViolation, ...]) -> tuple[FieldViolation, ...]:
    """At most MAX_VIOLATIONS, each clipped, all within MAX_VIOLATION_BYTES; a last "(more)"
    entry counts what was left out. The first always fits (one is at most ~450 bytes)."""
    kept: list[FieldViolation] = []
    used = 0
    for violation in violations:
        clipped = FieldViolation(clip(violation.field, MAX_FIELD_BYTES), clip(violation.description))
        cost = len(clipped.field.encode()) + len(clipped.description.encode())
        room_left = len(kept) < (MAX_VIOLATIONS if len(violations) <= MAX_VIOLATIONS else MAX_VIOLATIONS - 1)
        if kept and (not room_left or used + cost > MAX_VIOLATION_BYTES):
            break
        kept.append(clipped)
        used += cost
    if len(kept) < len(violations):
        kept.append(FieldViolation("(more)", f"{len(violations) - len(kept)} more violations"))
    return tuple(kept)


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class InvalidArgument(SessionGateError):
    """Malformed request; always carries field violations."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        violations = tuple(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}", violations=violations)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class SessionBusy(SessionGateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "SESSION_BUSY"


class PoolExhausted(SessionGateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "POOL_EXHAUSTED"


class StreamStalled(SessionGateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "STREAM_STALLED"


class TurnTimeout(SessionGateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "TURN_TIMEOUT"


class SessionNotFound(SessionGateError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "SESSION_NOT_FOUND"


class AgentUnavailable(SessionGateError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "AGENT_UNAVAILABLE"
    transparently_retryable = False


class AgentAuthRequired(SessionGateError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "AGENT_AUTH_REQUIRED"


class AgentExited(SessionGateError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "AGENT_EXITED"
    transparently_retryable = False


class AgentError(SessionGateError):
    code = grpc.StatusCode.INTERNAL
    reason = "AGENT_ERROR"


class AgentProtocolError(SessionGateError):
    """The agent answered with something that is not valid ACP (e.g. an unknown stop reason)."""

    code = grpc.StatusCode.INTERNAL
    reason = "AGENT_PROTOCOL_ERROR"


class Unauthenticated(SessionGateError):
    """No usable credentials; deliberately says nothing about which part was wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class AgentNotAllowed(SessionGateError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "AGENT_NOT_ALLOWED"


class QuotaExceeded(SessionGateError):
    """A principal's (or the server's) quota is used up; QuotaFailure names which."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUOTA_EXCEEDED"


class CwdNotAllowed(SessionGateError):
    """The session's directory is no longer one it may use: outside the roots in force now (a
    symlink swapped in, roots narrowed before a restart), or gone. The session stays listed."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CWD_NOT_ALLOWED"


class StoreUnavailable(SessionGateError):
    """The session database could not be written in time (disk full, I/O error, stuck disk)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"
    transparently_retryable = False


class RequestIdTaken(SessionGateError):
    """Another replica stored a session for this request id first (two creates raced): a retry
    returns that session."""

    code = grpc.StatusCode.ABORTED
    reason = "REQUEST_ID_RACE"


class OwnerLost(SessionGateError):
    """This replica no longer owns the session (its lease ran out, or another replica took it
    over): whatever it was doing for the session stopped; a retry reaches the new leaseholder."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "OWNER_LOST"


class ShuttingDown(SessionGateError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"


class RequestNotFound(SessionGateError):
    """RespondPermission/RespondElicitation: no such request on this session."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "REQUEST_NOT_FOUND"


class RequestAnswered(SessionGateError):
    """RespondPermission/RespondElicitation: the request was answered, expired or cancelled."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "REQUEST_ANSWERED"


class AgentRefused(SessionGateError):
    """The agent answered a mode, config option or authenticate call with an error."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "AGENT_REFUSED"


class NotSupported(SessionGateError):
    """The agent does not offer what was asked (no modes, no such config option, no auth method)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NOT_SUPPORTED"


class McpServerNotAllowed(SessionGateError):
    """CreateSession named an operator's MCP server the caller's principal may not use."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "MCP_SERVER_NOT_ALLOWED"


class McpTransportUnsupported(SessionGateError):
    """A session's MCP server uses a transport (http, sse) the agent does not advertise."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MCP_TRANSPORT_UNSUPPORTED"


class TurnNotFound(SessionGateError):
    """WatchTurn/GetTurn: no such turn on the session (or no turn yet)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "TURN_NOT_FOUND"


class SeqNotKept(SessionGateError):
    """WatchTurn/GetTurn: the seq asked for is no longer kept, or not reached yet."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "SEQ_NOT_KEPT"


class TurnInterrupted(SessionGateError):
    """The server stopped while the watched turn ran: what was stored is all there is."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "TURN_INTERRUPTED"
    transparently_retryable = False


class ReplayedFailure(SessionGateError):
    """A stored turn's failure, replayed to a watcher exactly as its Prompt stream ended."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.status)


def failure_status(error: SessionGateError) -> status_pb2.Status:
    """The google.rpc.Status a failed turn's readers get (to store and replay it)."""
    status = status_pb2.Status()
    if isinstance(error, ReplayedFailure):
        status.CopyFrom(error.status)
        return status
    details = error.to_status().trailing_metadata
    for key, value in details:
        if key == "grpc-status-details-bin":
            status.ParseFromString(value)
    return status
