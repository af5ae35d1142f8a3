"""What the async and sync clients share: channel options, request builders, event helpers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import duration_pb2
from sessiongate.v1 import session_service_pb2 as pb

from client.errors import RequestAnswered, RequestNotFound

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
)
PERMISSION_POLICIES = ("approve-all", "approve-reads", "deny-all", "ask")
ELICITATION_ACTIONS: dict[str, pb.ElicitationAction] = {
    "accept": pb.ELICITATION_ACTION_ACCEPT,
    "decline": pb.ELICITATION_ACTION_DECLINE,
    "cancel": pb.ELICITATION_ACTION_CANCEL,
}
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


def channel_options(extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    return [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1), *extra]


def duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def create_request(
    agent: str, cwd: str, request_id: str | None, labels: Mapping[str, str] | None
) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(
        agent=agent,
        cwd=cwd,
        request_id=request_id if request_id is not None else f"sdk-{uuid.uuid4().hex}",
        labels=dict(labels or {}),
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
    )


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
