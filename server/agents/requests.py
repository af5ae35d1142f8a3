"""What the agent asks of us: the client side of ACP.

`session/update` (sent as a request), permission requests and elicitations go to the
session's running turn (its `Asker`, or the policy when none runs); the client file system
and terminals are served when the agent's config offers them. Each answer is reported to the
session's turn through the connection's routing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import acp
from acp import schema
from sessiongate.server.agents.protocol import (
    AgentUpdate,
    Asker,
    Decision,
    ElicitationAnswer,
    ElicitationReport,
    PermissionReport,
    decide_by_policy,
)
from sessiongate.server.errors import clip
from sessiongate.server.sandbox import files as client_fs
from sessiongate.server.sandbox.terminals import Terminals
from sessiongate.server.settings import AgentConfig


class SessionRoutes(Protocol):
    """What the agent's requests need of its connection (connection.py `AgentConnection`):
    each ACP session's turn, directory and cancel state, and where to report to."""

    config: AgentConfig
    hidden_paths: tuple[Path, ...]  # never served by the client fs
    terminals: Terminals

    def route(self, session_id: str, item: AgentUpdate) -> None: ...

    def asker(self, session_id: str) -> Asker | None: ...

    def is_cancelling(self, session_id: str) -> bool: ...

    def session_cwd(self, session_id: str) -> str | None: ...

    def __hash__(self) -> int: ...  # it is the client fs lane of its agent (files.py)


class AgentRequests:
    """Our side of ACP (the SDK's `Client`): routes updates to the subscribed turn, has the
    turn's policy (or, under `ask`, the client through the turn's `Asker`) answer permission
    requests and elicitations, and serves the client file system and terminals.
    """

    def __init__(self, connection: SessionRoutes) -> None:
        self._connection = connection

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        # Not reached: the transport routes every session/update notification itself, in order,
        # and the SDK's router answers one sent as a request (with an id) "method not found".
        # The SDK's Client protocol has it, so it stays, routing as the transport does.
        self._connection.route(session_id, update)

    async def request_permission(
        self,
        session_id: str,
        tool_call: schema.ToolCallUpdate,
        options: list[schema.PermissionOption],
        **_: Any,
    ) -> schema.RequestPermissionResponse:
        connection = self._connection
        default = connection.config.permission_policy
        asker = connection.asker(session_id)
        if connection.is_cancelling(session_id):
            decision = Decision("cancelled", "", "cancelled")
        elif asker is not None:
            decision = await asker.permission(tool_call, options, default)
        elif default == "ask":  # no turn runs: nobody could answer
            decision = Decision("cancelled", "", "cancelled")
        else:
            decision = decide_by_policy(default, tool_call.kind, options)
        connection.route(
            session_id,
            PermissionReport(
                tool_call_id=tool_call.tool_call_id,
                title=tool_call.title or "",
                options=tuple(options),
                outcome=decision.outcome,
                selected_option_id=decision.option_id,
                policy=decision.decided_by,
                request_id=decision.request_id,
            ),
        )
        if decision.outcome == "cancelled":
            return schema.RequestPermissionResponse(outcome=schema.DeniedOutcome(outcome="cancelled"))
        return schema.RequestPermissionResponse(
            outcome=schema.AllowedOutcome(outcome="selected", option_id=decision.option_id)
        )

    async def create_elicitation(self, message: str, mode: Any, **_: Any) -> Any:
        """`elicitation/create`: under `ask` the client answers; otherwise it is declined."""
        connection = self._connection
        session_id = getattr(mode, "session_id", None) or ""
        asker = connection.asker(session_id) if session_id else None
        if connection.is_cancelling(session_id):
            answer = ElicitationAnswer("cancel", None, "cancelled")
        elif asker is not None:
            answer = await asker.elicitation(message, mode, connection.config.permission_policy)
        else:  # not tied to a running turn's session: nobody could answer
            answer = ElicitationAnswer("decline", None, connection.config.permission_policy)
        if session_id:
            connection.route(
                session_id, ElicitationReport(answer.request_id, answer.action, answer.decided_by)
            )
        if answer.action == "accept":
            return schema.AcceptElicitationResponse(action="accept", content=answer.content or {})
        if answer.action == "cancel":
            return schema.CancelElicitationResponse(action="cancel")
        return schema.DeclineElicitationResponse(action="decline")

    async def complete_elicitation(self, elicitation_id: str, **_: Any) -> None:
        """A URL-mode elicitation finished on the agent's side: nothing waits on it here."""

    # The client file system and terminals, when the agent's config offers them (client_fs,
    # client_terminal); otherwise refused as JSON-RPC "method not found" (-32601), where the
    # SDK would answer the terminal methods with empty successes.
    async def read_text_file(
        self, session_id: str, path: str, line: int | None = None, limit: int | None = None, **_: Any
    ) -> schema.ReadTextFileResponse:
        cwd = self._fs_cwd(session_id, "fs/read_text_file")
        hidden = self._connection.hidden_paths
        # lane: this agent's share of the client fs threads (a hung mount starves only it)
        content = await client_fs.read(cwd, path, line, limit, hidden, lane=self._connection)
        return schema.ReadTextFileResponse(content=content)

    async def write_text_file(
        self, session_id: str, path: str, content: str, **_: Any
    ) -> schema.WriteTextFileResponse:
        cwd = self._fs_cwd(session_id, "fs/write_text_file")
        hidden = self._connection.hidden_paths
        report = await client_fs.write(cwd, path, content, hidden, lane=self._connection)
        self._connection.route(session_id, report)
        return schema.WriteTextFileResponse()

    async def create_terminal(
        self,
        session_id: str,
        command: str,
        args: list[str] | None = None,
        env: list[schema.EnvVariable] | None = None,
        cwd: str | None = None,
        output_byte_limit: int | None = None,
        **_: Any,
    ) -> schema.CreateTerminalResponse:
        session_cwd = self._connection.session_cwd(session_id)
        terminal_id = await self._terminals("terminal/create").create(
            session_id, session_cwd, command, args, env, cwd, output_byte_limit
        )
        return schema.CreateTerminalResponse(terminal_id=terminal_id)

    async def terminal_output(
        self, session_id: str, terminal_id: str, **_: Any
    ) -> schema.TerminalOutputResponse:
        return self._terminals("terminal/output").output(session_id, terminal_id)

    async def release_terminal(
        self, session_id: str, terminal_id: str, **_: Any
    ) -> schema.ReleaseTerminalResponse:
        await self._terminals("terminal/release").release(session_id, terminal_id)
        return schema.ReleaseTerminalResponse()

    async def wait_for_terminal_exit(
        self, session_id: str, terminal_id: str, **_: Any
    ) -> schema.WaitForTerminalExitResponse:
        terminals = self._terminals("terminal/wait_for_exit")
        asker = self._connection.asker(session_id)
        if asker is None:
            return await terminals.wait_for_exit(session_id, terminal_id)
        with asker.waiting():  # the agent waits on a command we run: that is not silence
            return await terminals.wait_for_exit(session_id, terminal_id)

    async def kill_terminal(self, session_id: str, terminal_id: str, **_: Any) -> schema.KillTerminalResponse:
        self._terminals("terminal/kill").kill(session_id, terminal_id)
        return schema.KillTerminalResponse()

    def _fs_cwd(self, session_id: str, method: str) -> str:
        """The session's directory, when the agent is offered the client file system."""
        if not self._connection.config.client_fs:
            raise acp.RequestError.method_not_found(method)
        cwd = self._connection.session_cwd(session_id)
        if cwd is None:
            raise acp.RequestError(-32602, f"unknown session {clip(session_id, 100)!r}")
        return cwd

    def _terminals(self, method: str) -> Terminals:
        if not self._connection.config.client_terminal:
            raise acp.RequestError.method_not_found(method)
        return self._connection.terminals
