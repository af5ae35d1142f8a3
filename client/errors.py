"""Exceptions raised by the sessiongate client, one class per `ErrorInfo.reason`.

Every exception carries the gRPC status code, the server's message and the decoded rich
details: `reason` and `metadata` (ErrorInfo), `retry_delay` (RetryInfo, seconds) and
`violations` (BadRequest: field -> description).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "sessiongate"


class SessionGateError(Exception):
    """A failed call. Subclasses name the server's `ErrorInfo.reason`."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_delay: float | None = None,
        violations: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}{f' {reason}' if reason else ''}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.retry_delay = retry_delay
        self.violations = violations or {}


class SessionBusy(SessionGateError):
    """RESOURCE_EXHAUSTED: a turn is already running on the session (retry after `retry_delay`)."""


class PoolExhausted(SessionGateError):
    """RESOURCE_EXHAUSTED: every agent slot is busy (retry after `retry_delay`)."""


class StreamStalled(SessionGateError):
    """DEADLINE_EXCEEDED: the agent sent nothing within the stall timeout; the turn was cancelled."""


class TurnTimeout(SessionGateError):
    """DEADLINE_EXCEEDED: the turn ran past the server's maximum turn duration."""


class SessionNotFound(SessionGateError):
    """NOT_FOUND: unknown or closed session."""


class InvalidRequest(SessionGateError):
    """INVALID_ARGUMENT: see `violations` for each bad field."""


class AgentUnavailable(SessionGateError):
    """UNAVAILABLE: the agent failed to start, initialize or open a session."""


class AgentAuthRequired(SessionGateError):
    """FAILED_PRECONDITION: the agent needs credentials (`metadata['auth_methods']`)."""


class AgentExited(SessionGateError):
    """UNAVAILABLE: the agent process exited during the turn (`metadata['exit_code']`)."""


class AgentError(SessionGateError):
    """INTERNAL: the agent answered the turn with a JSON-RPC error (`metadata['code']`)."""


class AgentProtocolError(SessionGateError):
    """INTERNAL: the agent answered with something that is not valid ACP (`metadata['method']`)."""


class Unauthenticated(SessionGateError):
    """UNAUTHENTICATED: missing or invalid credentials (pass `token=`)."""


class AgentNotAllowed(SessionGateError):
    """PERMISSION_DENIED: the caller's principal may not use this agent."""


class QuotaExceeded(SessionGateError):
    """RESOURCE_EXHAUSTED: a quota is used up (`metadata` names it; `retry_delay` if waiting helps)."""


class CwdNotAllowed(SessionGateError):
    """FAILED_PRECONDITION: the session's directory is outside the allowed roots now, or gone."""


class StoreUnavailable(SessionGateError):
    """UNAVAILABLE: the server could not write its session database in time."""


class ShuttingDown(SessionGateError):
    """UNAVAILABLE: the server is draining."""


class RequestNotFound(SessionGateError):
    """NOT_FOUND: no such permission request or elicitation on this session."""


class RequestAnswered(SessionGateError):
    """FAILED_PRECONDITION: the request was already answered, expired or cancelled
    (`metadata['state']`)."""


class AgentRefused(SessionGateError):
    """FAILED_PRECONDITION: the agent refused a mode, config option or authenticate call."""


class NotSupported(SessionGateError):
    """FAILED_PRECONDITION: the agent does not offer what was asked (no modes, no such auth method)."""


class McpServerNotAllowed(SessionGateError):
    """PERMISSION_DENIED: the caller's principal may not use that MCP server (`metadata['server']`)."""


class McpTransportUnsupported(SessionGateError):
    """FAILED_PRECONDITION: a session's MCP server uses a transport the agent does not advertise."""


class TurnNotFound(SessionGateError):
    """NOT_FOUND: the session has no such turn (or no turn yet) (`metadata['turn_id']`)."""


class SeqNotKept(SessionGateError):
    """OUT_OF_RANGE: `after_seq` is older than the turn's kept events, or past its last one; also
    a watcher that fell that far behind (`metadata['oldest_kept_seq']`, `metadata['last_seq']`)."""


class TurnInterrupted(SessionGateError):
    """UNAVAILABLE: the server stopped while the turn ran; its stored events were replayed
    (`metadata['last_seq']`). Not a transport failure: re-attaching cannot help."""


BY_REASON: dict[str, type[SessionGateError]] = {
    "SESSION_BUSY": SessionBusy,
    "POOL_EXHAUSTED": PoolExhausted,
    "STREAM_STALLED": StreamStalled,
    "TURN_TIMEOUT": TurnTimeout,
    "SESSION_NOT_FOUND": SessionNotFound,
    "AGENT_UNAVAILABLE": AgentUnavailable,
    "AGENT_AUTH_REQUIRED": AgentAuthRequired,
    "AGENT_EXITED": AgentExited,
    "AGENT_ERROR": AgentError,
    "AGENT_PROTOCOL_ERROR": AgentProtocolError,
    "STORE_UNAVAILABLE": StoreUnavailable,
    "QUOTA_EXCEEDED": QuotaExceeded,
    "UNAUTHENTICATED": Unauthenticated,
    "AGENT_NOT_ALLOWED": AgentNotAllowed,
    "CWD_NOT_ALLOWED": CwdNotAllowed,
    "SHUTTING_DOWN": ShuttingDown,
    "REQUEST_NOT_FOUND": RequestNotFound,
    "REQUEST_ANSWERED": RequestAnswered,
    "AGENT_REFUSED": AgentRefused,
    "NOT_SUPPORTED": NotSupported,
    "MCP_SERVER_NOT_ALLOWED": McpServerNotAllowed,
    "MCP_TRANSPORT_UNSUPPORTED": McpTransportUnsupported,
    "TURN_NOT_FOUND": TurnNotFound,
    "SEQ_NOT_KEPT": SeqNotKept,
    "TURN_INTERRUPTED": TurnInterrupted,
}


def transport_failure(error: SessionGateError) -> bool:
    """UNAVAILABLE without a sessiongate reason: the connection dropped or could not be made
    (server restarting, network, a proxy), not an answer of the server. What a resumable
    stream re-attaches after."""
    return error.code == grpc.StatusCode.UNAVAILABLE and not error.reason


def from_rpc_error(error: grpc.RpcError) -> SessionGateError:
    """Decode a failed call's status and `grpc-status-details-bin` into our exception classes."""
    call: Any = error
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    reason, metadata, retry_delay, violations = "", {}, None, {}
    status = rpc_status.from_call(call)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
    cls = BY_REASON.get(reason) or (
        InvalidRequest if code == grpc.StatusCode.INVALID_ARGUMENT else SessionGateError
    )
    return cls(
        code, message, reason=reason, metadata=metadata, retry_delay=retry_delay, violations=violations
    )
