"""What the agents package and the turns above it both speak: the shapes of an agent as the
session core drives it, and what flows between an agent and its turn.

Agents never import turns: a turn hands the agent connection an `Asker` and a sink for its
updates, and the connection reports back with the items defined here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from acp import schema
from sessiongate.server.agents.transport import RawUpdate, TextRun
from sessiongate.server.sandbox.files import FileWriteReport
from sessiongate.server.sandbox.terminals import TerminalReport
from sessiongate.server.settings import AgentConfig, McpServerConfig

# A session's MCP servers, given to the agent at session/new, /load and /resume alike.
McpServers = tuple[McpServerConfig, ...]
READ_KINDS = frozenset({"read", "search", "think"})


@dataclass(frozen=True, slots=True)
class PermissionReport:
    """A permission request the agent made during a turn, and what the policy decided."""

    tool_call_id: str
    title: str
    options: tuple[schema.PermissionOption, ...]
    outcome: str  # "allowed", "rejected" or "cancelled"
    selected_option_id: str
    policy: str  # who decided: a policy name, "client", "timeout" or "cancelled"
    request_id: str = ""  # the question's id when the client was asked


StateWatcher = Callable[[Any], None]  # gets a session's STATE_UPDATES items and TurnUsage


@dataclass(frozen=True, slots=True)
class Handshake:
    """What `initialize` told us about the agent."""

    name: str
    version: str
    title: str
    load_session: bool
    auth_methods: tuple[str, ...]
    close_session: bool = False  # it advertised `session/close`
    resume_session: bool = False  # it advertised `session/resume`
    mcp_http: bool = False  # mcpCapabilities.http: it connects to MCP servers over streamable HTTP
    mcp_sse: bool = False  # mcpCapabilities.sse

    def takes_mcp_transport(self, transport: str) -> bool:
        """Whether the agent connects to an MCP server over `transport` (stdio: every agent)."""
        return (
            transport == "stdio"
            or (transport == "http" and self.mcp_http)
            or (transport == "sse" and self.mcp_sse)
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """What a permission request got: outcome ("allowed", "rejected", "cancelled"), the
    option selected, who decided (a policy name, "client", "timeout" or "cancelled")."""

    outcome: str
    option_id: str
    decided_by: str
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class ElicitationReport:
    """Turn item: what became of an elicitation."""

    request_id: str
    action: str  # accept, decline, cancel
    decided_by: str


@dataclass(frozen=True, slots=True)
class ElicitationAnswer:
    action: str
    content: dict[str, Any] | None
    decided_by: str
    request_id: str = ""


# What an agent connection routes to a session's turn: the ACP updates the SDK parsed (the
# members of `schema.SessionNotification.update`, which the SDK does not name), an update of a
# kind it does not know, and our reports of what the agent asked of us.
AgentUpdate = (
    schema.UserMessageChunk
    | schema.AgentMessageChunk
    | schema.AgentThoughtChunk
    | schema.ToolCallStart
    | schema.ToolCallProgress
    | schema.AgentPlanUpdate
    | schema.AgentPlanContentUpdate
    | schema.AgentPlanRemovedUpdate
    | schema.AvailableCommandsUpdate
    | schema.CurrentModeUpdate
    | schema.ConfigOptionUpdate
    | schema.SessionInfoUpdate
    | schema.UsageUpdate
    | RawUpdate
    | TextRun
    | PermissionReport
    | ElicitationReport
    | FileWriteReport
    | TerminalReport
)
# What flows through a turn: stays Any. The turn's buffer (turns/turn.py) holds AgentUpdate and
# its own items (Notice, TextRun, the questions' PermissionAsk and ElicitationAsk, TurnEnd) and
# reads them by duck typing (`getattr(item, "session_update", None)`, then `.message_id`), and
# tests push stand-ins: with a Union mypy rejects 23 of those lines in turns/ and tests/.
TurnItem = Any
UpdateSink = Callable[[TurnItem], None]


def decide_by_policy(policy: str, kind: str | None, options: list[schema.PermissionOption]) -> Decision:
    """A decision under a fixed policy; "cancelled" when no offered option fits it."""
    allow = policy == "approve-all" or (policy == "approve-reads" and kind in READ_KINDS)
    wanted = ("allow_once", "allow_always") if allow else ("reject_once", "reject_always")
    option_id = first_of_kind(options, wanted)
    if option_id is None:
        return Decision("cancelled", "", policy)
    return Decision("allowed" if allow else "rejected", option_id, policy)


def first_of_kind(options: list[schema.PermissionOption], kinds: tuple[str, ...]) -> str | None:
    for wanted in kinds:
        for option in options:
            if option.kind == wanted:
                return option.option_id
    return None


class Asker(Protocol):
    """The running turn's questions, as the agent connection asks them (turns/questions.py
    `TurnAsker` is the real one): the policy, and the client's answers where it is "ask"."""

    def policy(self, default: str) -> str: ...

    def waiting(self) -> contextlib.AbstractContextManager[None]: ...

    async def permission(
        self, tool_call: schema.ToolCallUpdate, options: list[schema.PermissionOption], default: str
    ) -> Decision: ...

    async def elicitation(self, message: str, mode: Any, default: str) -> ElicitationAnswer: ...


class AgentProcess(Protocol):
    """An agent process and its ACP connection, as the session core uses it.

    `AgentConnection` is the real one; tests drive the core with fakes of this shape.
    """

    config: AgentConfig
    handshake: Handshake | None
    reading_paused: bool

    @property
    def pid(self) -> int | None: ...

    @property
    def exit_code(self) -> int | None: ...

    @property
    def alive(self) -> bool: ...

    def on_exit(self, callback: Callable[[Any], None]) -> None: ...

    async def start(self, timeout: float, login: bool = True) -> Handshake: ...

    async def authenticate(self, method_id: str) -> None: ...

    async def load(self, cwd: str, session_id: str, timeout: float, mcp_servers: McpServers = ()) -> Any: ...

    async def resume(
        self, cwd: str, session_id: str, timeout: float, mcp_servers: McpServers = ()
    ) -> Any: ...

    async def new_session(
        self, cwd: str, timeout: float, mcp_servers: McpServers = ()
    ) -> schema.NewSessionResponse: ...

    async def set_mode(self, session_id: str, mode_id: str) -> None: ...

    async def set_config_option(
        self, session_id: str, config_id: str, value: str | bool
    ) -> schema.SetSessionConfigOptionResponse: ...

    async def close_session(self, session_id: str, timeout: float) -> None: ...

    async def prompt(self, session_id: str, blocks: list[Any]) -> schema.PromptResponse: ...

    async def cancel(self, session_id: str) -> None: ...

    def subscribe(self, session_id: str, sink: UpdateSink | None) -> None: ...

    def watch(self, session_id: str, watcher: StateWatcher | None) -> None: ...

    def ask_with(self, session_id: str, asker: Asker | None) -> None: ...

    async def end_terminals(self, session_id: str) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    async def terminate(self, force: bool = False) -> None: ...
