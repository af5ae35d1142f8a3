"""What the async and sync clients share: channel options, request builders, event helpers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import duration_pb2
from sessiongate.client.errors import RequestAnswered, RequestNotFound, SessionGateError, transport_failure
from sessiongate.client.mcp import ClientMcpServer, proto_servers
from sessiongate.client.tools import ClientToolDeclaration, proto_tools
from sessiongate.v1 import session_service_pb2 as pb

SERVICE = "sessiongate.v1.SessionService"
UNARY_METHODS = (
    "CreateSession",
    "CancelPrompt",
    "GetSession",
    "ListSessions",
    "CloseSession",
    "ListAgents",
    "SetSessionMode",
    "SetSessionConfigOption",
    "ListTurns",
    "GetTurn",
)
PERMISSION_POLICIES = ("approve-all", "approve-reads", "deny-all", "ask")
ELICITATION_ACTIONS: dict[str, pb.ElicitationAction] = {
    "accept": pb.ELICITATION_ACTION_ACCEPT,
    "decline": pb.ELICITATION_ACTION_DECLINE,
    "cancel": pb.ELICITATION_ACTION_CANCEL,
}
ON_DISCONNECT: dict[str, pb.OnDisconnect] = {
    "cancel": pb.ON_DISCONNECT_CANCEL,
    "continue": pb.ON_DISCONNECT_CONTINUE,
}
TURN_ID_HEADER = "sessiongate-turn-id"  # Prompt's and WatchTurn's response header: the turn's id
# Re-attaching a resumable stream after a transport failure: backoff from the first to the
# last delay (doubling), within REATTACH_TIMEOUT seconds of the failure by default (see Reattach).
REATTACH_TIMEOUT = 30.0
REATTACH_FIRST_DELAY = 0.2
REATTACH_MAX_DELAY = 2.0
REATTACH_HEALTHY = 5.0  # seconds a re-attached stream stays up before a failure is a new outage
# An answer that came too late (the request expired, or the turn ended or was cancelled) is
# not an error of the turn: its `permission`/`elicitation` event says what became of it.
GONE: tuple[type[Exception], ...] = (RequestAnswered, RequestNotFound)

# What an `on_elicitation` callback returns: None (leave it unanswered), the content to
# accept with (a dict), an action ("accept", "decline", "cancel" or the enum), or both as
# an (action, content) pair. An `on_permission` callback returns an option_id or None.
ElicitationAnswer: TypeAlias = (
    Mapping[str, Any] | str | int | tuple[str | int, Mapping[str, Any] | None] | None
)
PermissionCallback: TypeAlias = Callable[[pb.PermissionRequest], str | None]
ElicitationCallback: TypeAlias = Callable[[pb.ElicitationRequest], ElicitationAnswer]
AsyncPermissionCallback: TypeAlias = Callable[[pb.PermissionRequest], str | Awaitable[str | None] | None]
AsyncElicitationCallback: TypeAlias = Callable[
    [pb.ElicitationRequest], ElicitationAnswer | Awaitable[ElicitationAnswer]
]
Answer: TypeAlias = pb.RespondPermissionRequest | pb.RespondElicitationRequest

# Transparent retries of UNAVAILABLE for unary calls. The server commits the RPC before
# errors a retry cannot fix (AGENT_UNAVAILABLE, AGENT_EXITED), so those are not repeated;
# CreateSession is made idempotent by a request_id the client fills in when none is given.
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": SERVICE, "method": method} for method in UNARY_METHODS],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

Metadata = Sequence[tuple[str, str]]


def tls_credentials(
    credentials: grpc.ChannelCredentials | None,
    tls_ca: str | Path | None,
    client_cert: str | Path | None,
    client_key: str | Path | None,
) -> grpc.ChannelCredentials | None:
    """Channel credentials from PEM files: the CA to trust, and a client certificate for mTLS."""
    if credentials is not None or not (tls_ca or client_cert):
        return credentials
    if bool(client_cert) != bool(client_key):
        raise ValueError("client_cert and client_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
    )


def bearer(token: str | None) -> Metadata:
    """The metadata that authenticates calls with `token` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def routed(metadata: Metadata, request: Any) -> Metadata:
    """The call's metadata with a `session-id` header when it is about one session: a front such
    as Envoy (deploy/envoy.yaml) hashes on it, so the call lands on the replica that owns the
    session instead of being forwarded there."""
    session_id = getattr(request, "session_id", "")
    return (*metadata, ("session-id", session_id)) if session_id else metadata


def channel_options(extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    return [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1), *extra]


def duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def create_request(
    agent: str,
    cwd: str,
    request_id: str | None,
    labels: Mapping[str, str] | None,
    mcp_servers: Sequence[str] = (),
    client_mcp_servers: Iterable[ClientMcpServer] = (),
    client_tools: Iterable[ClientToolDeclaration] = (),
) -> pb.CreateSessionRequest:
    if isinstance(mcp_servers, str):  # one name passed bare would become its letters
        raise TypeError("mcp_servers takes a list of names, not a string")
    return pb.CreateSessionRequest(
        agent=agent,
        cwd=cwd,
        request_id=request_id if request_id is not None else f"sdk-{uuid.uuid4().hex}",
        labels=dict(labels or {}),
        mcp_servers=list(mcp_servers),
        client_mcp_servers=proto_servers(client_mcp_servers),
        client_tools=proto_tools(client_tools),
    )


def prompt_request(
    session_id: str,
    text: str,
    content: Sequence[pb.ContentBlock],
    stall_timeout: float | None,
    wait_timeout: float | None,
    permission_policy: str | None = None,
    permission_timeout: float | None = None,
    answering: bool = False,
    on_disconnect: str | int | None = None,
) -> pb.PromptRequest:
    """The PromptRequest of a turn. `answering`: the caller answers questions itself (it
    passed on_permission or on_elicitation), which means the `ask` policy unless it chose one."""
    if permission_policy is None:
        permission_policy = "ask" if answering else ""
    return pb.PromptRequest(
        session_id=session_id,
        text=text,
        content=list(content),
        stall_timeout=duration(stall_timeout),
        wait_timeout=duration(wait_timeout),
        permission_policy=permission_policy,
        permission_timeout=duration(permission_timeout),
        on_disconnect=on_disconnect_value(on_disconnect),
    )


def on_disconnect_value(value: str | int | None) -> pb.OnDisconnect:
    """An OnDisconnect from "cancel"/"continue" (any case), the enum itself, or None (unset:
    the server's default, cancel)."""
    if value is None:
        return pb.ON_DISCONNECT_UNSPECIFIED
    if isinstance(value, str):
        name = value.lower().removeprefix("on_disconnect_")
        if name not in ON_DISCONNECT:
            raise ValueError(f"on_disconnect must be cancel or continue, not {value!r}")
        return ON_DISCONNECT[name]
    if value not in (pb.ON_DISCONNECT_UNSPECIFIED, *ON_DISCONNECT.values()):
        raise ValueError(f"not an OnDisconnect value: {value!r}")
    return cast(pb.OnDisconnect, value)


def watch_request(session_id: str, after_seq: int, turn_id: str) -> pb.WatchTurnRequest:
    return pb.WatchTurnRequest(session_id=session_id, after_seq=after_seq, turn_id=turn_id)


def turn_id_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The `sessiongate-turn-id` of a call's response headers ("" when there is none)."""
    for key, value in metadata or ():
        if key == TURN_ID_HEADER:
            return value.decode() if isinstance(value, bytes) else value
    return ""


def elicitation_action(action: str | int) -> pb.ElicitationAction:
    """An ElicitationAction from "accept"/"decline"/"cancel" (any case) or the enum itself."""
    if isinstance(action, str):
        name = action.lower().removeprefix("elicitation_action_")
        if name not in ELICITATION_ACTIONS:
            raise ValueError(f"elicitation action must be accept, decline or cancel, not {action!r}")
        return ELICITATION_ACTIONS[name]
    if action not in ELICITATION_ACTIONS.values():
        raise ValueError(f"not an elicitation action: {action!r}")
    return cast(pb.ElicitationAction, action)


def respond_elicitation_request(
    session_id: str, request_id: str, action: str | int, content: Mapping[str, Any] | None
) -> pb.RespondElicitationRequest:
    request = pb.RespondElicitationRequest(
        session_id=session_id, request_id=request_id, action=elicitation_action(action)
    )
    if content is not None:
        request.content.update(dict(content))
    return request


def config_value(value: bool | str) -> str:
    """A config option's value on the wire: a boolean as "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def question(
    event: pb.PromptEvent, on_permission: Callable[..., Any] | None, on_elicitation: Callable[..., Any] | None
) -> tuple[Callable[..., Any], pb.PermissionRequest | pb.ElicitationRequest] | None:
    """The callback that answers `event` and what it is called with; None when the event is
    no question, or no callback answers its kind."""
    kind = event.WhichOneof("event")
    if kind == "permission_request" and on_permission is not None:
        return on_permission, event.permission_request
    if kind == "elicitation_request" and on_elicitation is not None:
        return on_elicitation, event.elicitation_request
    return None


def answer_request(
    session_id: str, asked: pb.PermissionRequest | pb.ElicitationRequest, result: Any
) -> Answer | None:
    """The RespondPermission/RespondElicitation request for a callback's return value
    (None: the callback leaves the question unanswered)."""
    if result is None:
        return None
    if isinstance(asked, pb.PermissionRequest):
        if not isinstance(result, str):
            raise TypeError(f"on_permission must return an option_id (str) or None, not {result!r}")
        return pb.RespondPermissionRequest(
            session_id=session_id, request_id=asked.request_id, option_id=result
        )
    if isinstance(result, Mapping):
        action, content = "accept", result
    elif isinstance(result, tuple):
        action, content = result
    else:
        action, content = result, None
    return respond_elicitation_request(session_id, asked.request_id, action, content)


def list_request(
    agent: str, labels: Mapping[str, str] | None, page_size: int, token: str
) -> pb.ListSessionsRequest:
    return pb.ListSessionsRequest(
        agent=agent, labels=dict(labels or {}), page_size=page_size, page_token=token
    )


class Reattach:
    """When a resumable stream re-attaches after a transport failure (UNAVAILABLE with no
    sessiongate reason): after a backoff from REATTACH_FIRST_DELAY doubling up to
    REATTACH_MAX_DELAY, within `budget` seconds of the failure that began the outage (and
    before the call's own deadline, if any). An outage ends when an event comes, or when a
    re-attached stream stays up REATTACH_HEALTHY seconds: a connection that keeps breaking
    at once, with nothing read, is given up after `budget`. A budget of 0 never re-attaches."""

    def __init__(
        self, budget: float, deadline: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._budget = budget
        self._deadline = deadline  # time.monotonic() of the caller's whole-stream deadline
        self._delay = REATTACH_FIRST_DELAY
        self._since: float | None = None  # when the current outage began
        self._attached_at: float | None = None  # when the current call's headers came

    def attached(self) -> None:
        """The current call reached the server (its headers came)."""
        self._attached_at = self._clock()

    def progressed(self) -> None:
        """An event came: whatever failed before is over."""
        self._since = None

    def delay(self, error: SessionGateError, turn_id: str) -> float | None:
        """Seconds to wait before re-attaching after `error`, or None: raise it."""
        if self._budget <= 0 or not turn_id or not transport_failure(error):
            return None
        now = self._clock()
        healthy = self._attached_at is not None and now - self._attached_at >= REATTACH_HEALTHY
        if self._since is None or healthy:  # a new outage
            self._since, self._delay = now, REATTACH_FIRST_DELAY
        self._attached_at = None
        delay = self._delay
        self._delay = min(self._delay * 2, REATTACH_MAX_DELAY)
        if now + delay > self._since + self._budget:
            return None
        if self._deadline is not None and now + delay >= self._deadline:
            return None
        return delay

    def remaining(self) -> float | None:
        """The timeout of the next call: what is left of the caller's deadline (None: none)."""
        return None if self._deadline is None else max(self._deadline - self._clock(), 0.0)


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class Reply:
    """Collects one turn's reply text and result, event by event (for `reply()`)."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.result = pb.TurnResult()

    def add(self, event: pb.PromptEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "message_chunk":
            self._parts.append(event.message_chunk.content.text.text)
        elif kind == "result":
            self.result = event.result

    @property
    def text(self) -> str:
        return "".join(self._parts)
