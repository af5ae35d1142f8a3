"""What the async and sync clients share: channel options, request builders, event helpers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from sessiongate.v1 import session_service_pb2 as pb

SERVICE = "sessiongate.v1.SessionService"
UNARY_METHODS = ("CreateSession", "CancelPrompt", "GetSession", "ListSessions", "CloseSession", "ListAgents")

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
) -> pb.PromptRequest:
    return pb.PromptRequest(
        session_id=session_id,
        text=text,
        content=list(content),
        stall_timeout=duration(stall_timeout),
        wait_timeout=duration(wait_timeout),
    )


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
