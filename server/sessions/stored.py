"""A session as its record keeps it, for showing while no `Session` of it runs here.

GetSession and ListSessions show a row another replica holds, or one no replica serves now
(released, or its leaseholder's lease ran out), and a retried CloseSession answers with a closed
session's tombstone: none of them needs an agent holder, a lock or questions, only what the
record says. Calls that read a session without taking it over (WatchTurn, ListTurns, GetTurn,
CancelPrompt, the answers to questions) also get this view there: it has no live turn, no
running turn to cancel and no open question. The pool makes a real `Session` from one when it
serves the session (at start, or taken over).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from sessiongate.server.agents.protocol import Handshake
from sessiongate.server.agents.state import AgentState
from sessiongate.server.security.secrets import SecretBox
from sessiongate.server.settings import AgentConfig, McpServerConfig
from sessiongate.server.state.base import SessionRecord
from sessiongate.server.turns.client_tools import SERVER_NAME, ClientToolSpec
from sessiongate.server.turns.questions import Questions
from sessiongate.server.turns.turn import Turn
from sessiongate.server.turns.turn_log import TurnLog


class State(enum.Enum):
    """A session's state, as GetSession shows it."""

    IDLE = "idle"
    BUSY = "busy"
    RECOVERING = "recovering"
    SUSPENDED = "suspended"
    CLOSED = "closed"


@dataclass(slots=True)
class StoredSession:
    """A stored session, SUSPENDED (or CLOSED: a tombstone's), as its record has it."""

    session_id: str
    config: AgentConfig  # an agent no longer configured has a stand-in: its sessions stay listed
    cwd: str
    labels: Mapping[str, str]
    request_id: str
    principal: str
    create_time: float
    last_active_time: float
    agent_session_id: str
    handshake: Handshake | None
    agent_state: AgentState
    closed: bool = False
    live_logs: dict[str, TurnLog] = field(default_factory=dict)  # none: no turn runs here
    # Operator-named MCP servers CreateSession asked for (names only: the config has the rest).
    requested_mcp_servers: tuple[str, ...] = ()
    client_mcp: ClientMcpServers = field(default_factory=lambda: ClientMcpServers())
    client_tools: tuple[ClientToolSpec, ...] = ()

    @classmethod
    def from_record(
        cls, record: SessionRecord, config: AgentConfig, *, closed: bool = False
    ) -> StoredSession:
        return cls(
            session_id=record.session_id,
            config=config,
            cwd=record.cwd,
            labels=dict(record.labels),
            request_id=record.request_id,
            principal=record.principal,
            create_time=record.create_time,
            last_active_time=record.last_active_time,
            agent_session_id=record.agent_session_id,
            handshake=handshake(record.agent_info),
            agent_state=AgentState.from_json(record.agent_state),
            closed=closed,
            requested_mcp_servers=requested_mcp_servers(record.agent_info),
            client_mcp=ClientMcpServers.from_info(record.agent_info),
            client_tools=client_tools(record.agent_info),
        )

    @property
    def mcp_servers(self) -> tuple[AttachedMcpServer, ...]:
        return attached_mcp_servers(
            self.config, self.requested_mcp_servers, self.client_mcp.shown, bool(self.client_tools)
        )

    @property
    def client_tool_specs(self) -> tuple[ClientToolSpec, ...]:
        return self.client_tools

    @property
    def state(self) -> State:
        return State.CLOSED if self.closed else State.SUSPENDED

    # What the service reads of a live session, as it is for one that runs nothing here.

    @property
    def ending(self) -> bool:
        return False

    @property
    def turn(self) -> Turn | None:
        return None

    @property
    def turn_log(self) -> TurnLog | None:
        return None

    def live_log(self, turn_id: str) -> TurnLog | None:
        return None

    def cancel(self) -> bool:
        return False

    @property
    def questions(self) -> Questions:
        """None open: an answer finds no question (as for a session with no turn running)."""
        return Questions(self.session_id)


@dataclass(frozen=True, slots=True)
class AttachedMcpServer:
    """An MCP server a session's agent is given, and why: "agent" (its config) or "request"."""

    server: McpServerConfig
    source: str


def attached_mcp_servers(
    config: AgentConfig,
    requested: tuple[str, ...],
    supplied: tuple[McpServerConfig, ...] = (),
    client_tools: bool = False,
) -> tuple[AttachedMcpServer, ...]:
    """The agent's own MCP servers, then the requested ones, as the config has them now (a name
    no longer configured is left out: `missing_mcp_servers` names it), then those the client
    `supplied` (source "request" too), then (`client_tools`) the one serving the client's tools."""
    catalog = config.mcp_catalog
    found = [AttachedMcpServer(catalog[n], "agent") for n in config.mcp_servers if n in catalog]
    found += [
        AttachedMcpServer(catalog[n], "request")
        for n in dict.fromkeys(requested)
        if n in catalog and n not in config.mcp_servers
    ]
    found += [AttachedMcpServer(server, "request") for server in supplied]
    if client_tools:
        found.append(CLIENT_TOOLS_SERVER)
    return tuple(found)


def missing_mcp_servers(config: AgentConfig, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The requested MCP servers the config no longer has (removed since the session was made)."""
    return tuple(n for n in dict.fromkeys(requested) if n not in config.mcp_catalog)


MCP_SERVERS_KEY = "mcp_servers"  # in a record's agent_info: the requested names (never secrets)
CLIENT_TOOLS_KEY = "client_tools"  # in a record's agent_info: the client tools' declarations
# How GetSession shows the MCP server that serves a session's client tools.
CLIENT_TOOLS_SERVER = AttachedMcpServer(McpServerConfig(SERVER_NAME, "stdio"), "client_tools")


def client_tools(info: Mapping[str, object]) -> tuple[ClientToolSpec, ...]:
    """The client tools a record keeps (`agent_info`), ignoring anything not one."""
    kept = info.get(CLIENT_TOOLS_KEY)
    if not isinstance(kept, list):
        return ()
    return tuple(spec for spec in map(ClientToolSpec.from_info, kept) if spec is not None)


def requested_mcp_servers(info: Mapping[str, object]) -> tuple[str, ...]:
    """The MCP server names a record keeps (`agent_info`), ignoring anything not a string."""
    names = info.get(MCP_SERVERS_KEY)
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


def handshake(info: Mapping[str, object]) -> Handshake | None:
    """The agent's handshake as a record keeps it (`agent_info`; no name: never started)."""
    if "name" not in info:
        return None
    return Handshake(
        name=str(info.get("name", "")),
        version=str(info.get("version", "")),
        title=str(info.get("title", "")),
        load_session=bool(info.get("load_session", False)),
        auth_methods=(),
        close_session=bool(info.get("close_session", False)),
        resume_session=bool(info.get("resume_session", False)),
        mcp_http=bool(info.get("mcp_http", False)),
        mcp_sse=bool(info.get("mcp_sse", False)),
    )


CLIENT_MCP_KEY = "client_mcp_servers"  # in agent_info: each client-supplied server's name and transport
CLIENT_MCP_SEALED_KEY = "client_mcp_sealed"  # in agent_info: their whole definitions, one Fernet token


@dataclass(frozen=True, slots=True)
class ClientMcpServers:
    """A session's client-supplied MCP servers as it keeps them: `shown`, each one's name and
    transport only (what GetSession shows, readable without the key); `sealed`, the whole
    definitions (env and header values too) encrypted by the server's SecretBox, opened at each
    agent start. Never the values in the clear, in memory between starts or in the record."""

    shown: tuple[McpServerConfig, ...] = ()
    sealed: str = ""

    @classmethod
    def seal(cls, box: SecretBox, servers: tuple[McpServerConfig, ...]) -> ClientMcpServers:
        if not servers:
            return cls()
        data = json.dumps([_definition(s) for s in servers]).encode()
        return cls(tuple(McpServerConfig(s.name, s.transport) for s in servers), box.seal(data))

    def open(self, box: SecretBox) -> tuple[McpServerConfig, ...]:
        """The whole definitions (SecretUnreadable: not sealed with this box's key, or altered)."""
        if not self.sealed:
            return ()
        return tuple(_from_definition(d) for d in json.loads(box.open(self.sealed)))

    def to_info(self) -> dict[str, object]:
        if not self.shown:
            return {}
        shown = [{"name": s.name, "transport": s.transport} for s in self.shown]
        return {CLIENT_MCP_KEY: shown, CLIENT_MCP_SEALED_KEY: self.sealed}

    @classmethod
    def from_info(cls, info: Mapping[str, object]) -> ClientMcpServers:
        shown, sealed = info.get(CLIENT_MCP_KEY), info.get(CLIENT_MCP_SEALED_KEY)
        if not isinstance(shown, list) or not isinstance(sealed, str):
            return cls()
        servers = tuple(
            McpServerConfig(str(s.get("name", "")), str(s.get("transport", "")))
            for s in shown
            if isinstance(s, dict)
        )
        return cls(servers, sealed)


def _definition(server: McpServerConfig) -> dict[str, object]:
    return {
        "name": server.name,
        "transport": server.transport,
        "command": server.command,
        "args": list(server.args),
        "env": dict(server.env),
        "url": server.url,
        "headers": dict(server.headers),
    }


def _from_definition(found: dict[str, object]) -> McpServerConfig:
    args, env, headers = found.get("args"), found.get("env"), found.get("headers")
    return McpServerConfig(
        name=str(found.get("name", "")),
        transport=str(found.get("transport", "")),
        command=str(found.get("command", "")),
        args=tuple(str(a) for a in args) if isinstance(args, list) else (),
        env={str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
        url=str(found.get("url", "")),
        headers={str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {},
    )
