"""The sessiongate Python SDK.

    from client import AsyncSessionClient, SessionClient, SessionBusy, retry_async

`AsyncSessionClient` (asyncio) and `SessionClient` (blocking) mirror the RPCs; failures
raise the classes in `client.errors`, one per ErrorInfo reason, with decoded details.
"""

from client.aio import AsyncSessionClient
from client.errors import (
    AgentAuthRequired,
    AgentError,
    AgentExited,
    AgentNotAllowed,
    AgentProtocolError,
    AgentRefused,
    AgentUnavailable,
    CwdNotAllowed,
    InvalidRequest,
    NotSupported,
    PoolExhausted,
    QuotaExceeded,
    RequestAnswered,
    RequestNotFound,
    SessionBusy,
    SessionGateError,
    SessionNotFound,
    ShuttingDown,
    StoreUnavailable,
    StreamStalled,
    TurnTimeout,
    Unauthenticated,
)
from client.retry import retry, retry_async
from client.sync import SessionClient

__all__ = [
    "AgentAuthRequired",
    "AgentError",
    "AgentExited",
    "AgentNotAllowed",
    "AgentProtocolError",
    "AgentRefused",
    "AgentUnavailable",
    "AsyncSessionClient",
    "CwdNotAllowed",
    "InvalidRequest",
    "NotSupported",
    "PoolExhausted",
    "QuotaExceeded",
    "RequestAnswered",
    "RequestNotFound",
    "SessionBusy",
    "SessionClient",
    "SessionGateError",
    "SessionNotFound",
    "ShuttingDown",
    "StoreUnavailable",
    "StreamStalled",
    "TurnTimeout",
    "Unauthenticated",
    "retry",
    "retry_async",
]
