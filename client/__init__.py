"""The sessiongate Python SDK.

    from sessiongate.client import AsyncSessionClient, SessionClient, SessionBusy, retry_async

`AsyncSessionClient` (asyncio) and `SessionClient` (blocking) mirror the RPCs; failures
raise the classes in `client.errors`, one per ErrorInfo reason, with decoded details.
`prompt` and `watch_turn` return `AsyncTurnEvents` / `TurnEvents`: a turn's events, with the
turn's id and the last seq read, re-attaching by themselves after a transport failure when
the turn continues on disconnect. `McpStdioServer`, `McpHttpServer` and `McpSseServer`
(or `load_mcp_config(path)`, an editor's `mcpServers` file) are `create_session`'s
`client_mcp_servers`. `Tool(name, handler, description, input_schema)` declares a function of
yours the agent may call (`create_session(client_tools=[...])`): the client's streams answer
its calls for you (or answer by hand with `respond_tool_call`).
"""

from sessiongate.client.aio import AsyncSessionClient, AsyncTurnEvents
from sessiongate.client.errors import (
    AgentAuthRequired,
    AgentError,
    AgentExited,
    AgentNotAllowed,
    AgentProtocolError,
    AgentRefused,
    AgentUnavailable,
    CwdNotAllowed,
    InvalidRequest,
    McpServerNotAllowed,
    McpTransportUnsupported,
    NotSupported,
    PoolExhausted,
    QuotaExceeded,
    RequestAnswered,
    RequestNotFound,
    SeqNotKept,
    SessionBusy,
    SessionGateError,
    SessionNotFound,
    ShuttingDown,
    StoreUnavailable,
    StreamStalled,
    TurnInterrupted,
    TurnNotFound,
    TurnTimeout,
    Unauthenticated,
)
from sessiongate.client.mcp import (
    McpConfigError,
    McpHttpServer,
    McpSseServer,
    McpStdioServer,
    load_mcp_config,
)
from sessiongate.client.retry import retry, retry_async
from sessiongate.client.sync import SessionClient, TurnEvents
from sessiongate.client.tools import Tool, ToolsFileError, load_tools

__all__ = [
    "AgentAuthRequired",
    "AgentError",
    "AgentExited",
    "AgentNotAllowed",
    "AgentProtocolError",
    "AgentRefused",
    "AgentUnavailable",
    "AsyncSessionClient",
    "AsyncTurnEvents",
    "CwdNotAllowed",
    "InvalidRequest",
    "McpConfigError",
    "McpHttpServer",
    "McpServerNotAllowed",
    "McpSseServer",
    "McpStdioServer",
    "McpTransportUnsupported",
    "NotSupported",
    "PoolExhausted",
    "QuotaExceeded",
    "RequestAnswered",
    "RequestNotFound",
    "SeqNotKept",
    "SessionBusy",
    "SessionClient",
    "SessionGateError",
    "SessionNotFound",
    "ShuttingDown",
    "StoreUnavailable",
    "StreamStalled",
    "Tool",
    "ToolsFileError",
    "TurnEvents",
    "TurnInterrupted",
    "TurnNotFound",
    "TurnTimeout",
    "Unauthenticated",
    "load_mcp_config",
    "load_tools",
    "retry",
    "retry_async",
]
