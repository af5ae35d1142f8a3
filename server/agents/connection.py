"""One agent connection: spawn, initialize, new/load, prompt, cancel, kill.

The agent runs in its own process group with a clean environment, speaking ACP over its
stdio through the agent-client-protocol SDK. Every request except the turn itself has a
timeout here; the turn is bounded by the session's watchdog. `terminate()` ends the whole
process group (SIGTERM, then SIGKILL after a grace), so no agent child outlives it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import acp
from acp import schema
from sessiongate.server.agents.logins import AgentLogins
from sessiongate.server.agents.protocol import (
    Asker,
    Decision,
    ElicitationAnswer,
    ElicitationReport,
    Handshake,
    PermissionReport,
    StateWatcher,
    TurnItem,
    UpdateSink,
    decide_by_policy,
)
from sessiongate.server.agents.state import STATE_UPDATES, TurnUsage
from sessiongate.server.agents.transport import READ_BUFFER, AgentTransport
from sessiongate.server.errors import (
    AgentAuthRequired,
    AgentError,
    AgentExited,
    AgentProtocolError,
    AgentRefused,
    AgentUnavailable,
    NotSupported,
    clip,
)
from sessiongate.server.sandbox import files as client_fs
from sessiongate.server.sandbox.descendants import Descendants
from sessiongate.server.sandbox.launcher import Launcher
from sessiongate.server.sandbox.terminals import Terminals
from sessiongate.server.sandbox.workdir import WorkDir
from sessiongate.server.settings import AgentConfig

log = logging.getLogger("sessiongate.agent")
stderr_log = logging.getLogger("sessiongate.agent.stderr")

# Env vars an agent inherits from the server; everything else it gets from its config.
INHERITED_ENV = ("HOME", "PATH", "USER", "LANG")
EOF_EXIT_GRACE = 1.0  # an agent whose stdout ended and that has not exited by then is ended
STDERR_LINE_MAX = 2000  # characters of one stderr line kept for the log
STDERR_LOG_BUDGET = 256 * 1024  # bytes of stderr logged per agent; the rest is drained, not logged
STDERR_TAIL_LINES = 20  # kept for error messages
STDERR_TAIL_CHARS = 2000  # of those, at most this much goes into a status
AUTH_REQUIRED_CODE = -32000

T = TypeVar("T")


HELD_UPDATES = 32  # state updates kept per session until it is watched (the latest)
HELD_SESSIONS = 8  # sessions whose state updates are kept until watched
STALE_ON_OPEN = ("current_mode_update", "config_option_update")  # what an open's answer supersedes


def protocol_error(agent: str, method: str, exc: ValueError) -> AgentProtocolError:
    """An agent's answer to `method` that does not fit the ACP schema (bounded description)."""
    return AgentProtocolError(
        f"agent {agent!r} answered {method} with an invalid result: {clip(str(exc))}",
        metadata={"agent": agent, "method": method, "error": clip(str(exc))},
    )


class _GatewayClient:
    """Our side of ACP: routes updates to the subscribed turn, and has the turn's policy (or,
    under `ask`, the client through questions.py) answer permission requests and elicitations.
    """

    def __init__(self, connection: AgentConnection) -> None:
        self._connection = connection

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        # Only reached by a `session/update` sent as a request (with an id): the transport
        # routes the notifications itself, in order.
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


class AgentConnection:
    """One running agent process and its ACP connection."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        request_timeout: float,
        kill_grace: float,
        launcher: Launcher | None = None,
        workdir: WorkDir | None = None,
        logins: AgentLogins | None = None,
    ) -> None:
        self.config = config
        self._logins = logins  # the auth method this agent's processes authenticate with
        self._launcher = launcher or Launcher()
        self._workdir = workdir  # the session's checked directory; open until the spawn
        self.handshake: Handshake | None = None
        self.exit_code: int | None = None
        self._request_timeout = request_timeout
        self._kill_grace = kill_grace
        self._process: asyncio.subprocess.Process | None = None
        self._pidfd: int | None = None  # the leader's pidfd: tells whether its PID is still ours
        self._descendants: Descendants | None = None  # unsandboxed: finds what left the group
        self._conn: Any = None  # acp's ClientSideConnection
        self._sinks: dict[str, UpdateSink] = {}
        self._watchers: dict[str, StateWatcher] = {}  # per ACP session, turn or not (agent_state.py)
        self._held: dict[str, collections.deque[Any]] = {}  # state updates of unwatched sessions
        self._askers: dict[str, Asker] = {}  # the running turn's questions, per ACP session
        self._cancelling: set[str] = set()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._background: set[asyncio.Task[None]] = set()
        self._exited = asyncio.Event()
        self._on_exit: Callable[[AgentConnection], None] | None = None
        self._stdout: asyncio.ReadTransport | None = None
        self._terminating: asyncio.Task[None] | None = None
        self._spawned: asyncio.Event | None = None  # set once a spawn under way has its process (or failed)
        self._hurry = asyncio.Event()  # a forced terminate() skips what is left of the SIGTERM grace
        self._ending: asyncio.Task[None] | None = None  # ending the agent after a protocol violation
        self.broken: AgentProtocolError | None = None  # why its connection became unusable
        self._transport: AgentTransport | None = None
        self.reading_paused = False
        self._cwds: dict[str, str] = {}  # each ACP session's directory, as opened (client fs, terminals)
        self.hidden_paths = self._launcher.hidden  # never served by the client fs, wherever they are
        self.terminals = Terminals(  # client_terminal: commands the agent runs through us
            config,
            self._launcher,
            self.route,
            inherited=INHERITED_ENV,
            descendants=lambda: self._descendants,
            held_back=lambda: self.reading_paused,
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and not self._exited.is_set()

    def stderr_tail(self) -> str:
        """The last lines of stderr, at most STDERR_TAIL_CHARS (they go into statuses)."""
        return "\n".join(self._stderr_tail)[-STDERR_TAIL_CHARS:]

    def on_exit(self, callback: Callable[[AgentConnection], None]) -> None:
        """Call `callback` once when the agent process exits (for whatever reason)."""
        self._on_exit = callback

    async def start(self, timeout: float, login: bool = True) -> Handshake:
        """Spawn and `initialize` within `timeout`, then `authenticate` with the agent's auth
        method, if it has one (not with `login=False`: AuthenticateAgent tries a new method).
        On failure the caller terminates the agent."""
        async with self._bounded(timeout, "finish starting"):
            await self._spawn()
            handshake = await self._initialize()
            method = self._logins.method(self.config.name) if self._logins is not None else ""
            if method and login:
                await self.authenticate(method)
            return handshake

    async def authenticate(self, method_id: str) -> None:
        """ACP `authenticate` within the request timeout. A method the agent did not advertise
        is NotSupported; an error answer is AgentRefused."""
        name = self.config.name
        methods = self.handshake.auth_methods if self.handshake is not None else ()
        if method_id not in methods:
            raise NotSupported(
                f"agent {name!r} offers no auth method {clip(method_id, 100)!r}"
                f" (it offers: {clip(', '.join(methods)) or 'none'})",
                metadata={"agent": name, "auth_methods": ",".join(methods)},
            )
        try:
            await self._call(self._connection().authenticate(method_id=method_id), "authenticate")
        except (AgentUnavailable, AgentAuthRequired) as exc:
            if not self.alive:
                raise
            raise AgentRefused(
                f"agent {name!r} refused authenticate with {clip(method_id, 100)!r}: {exc.message}",
                metadata={"agent": name, "method_id": clip(method_id, 100)},
            ) from None

    async def load(self, cwd: str, session_id: str, timeout: float) -> schema.LoadSessionResponse:
        """Resume an ACP session with `session/load` within `timeout`; returns the agent's
        answer (its modes and config options).

        The history the agent replays while loading reaches no sink (nobody subscribed yet),
        so it is not re-sent to any client; modes and options it replays are superseded by
        the answer.
        """
        async with self._bounded(timeout, "load the session"):
            response: schema.LoadSessionResponse = await self._call(
                self._connection().load_session(cwd=cwd, session_id=session_id, mcp_servers=[]),
                "session/load",
            )
        self._cwds[session_id] = cwd
        self._drop_held(session_id, STALE_ON_OPEN)
        return response

    async def resume(self, cwd: str, session_id: str, timeout: float) -> schema.ResumeSessionResponse:
        """Resume an ACP session with `session/resume` (no history replayed) within `timeout`;
        returns the agent's answer (its modes and config options)."""
        async with self._bounded(timeout, "resume the session"):
            response: schema.ResumeSessionResponse = await self._call(
                self._connection().resume_session(cwd=cwd, session_id=session_id, mcp_servers=[]),
                "session/resume",
            )
        self._cwds[session_id] = cwd
        self._drop_held(session_id, STALE_ON_OPEN)
        return response

    async def set_mode(self, session_id: str, mode_id: str) -> None:
        """`session/set_mode` within the request timeout; an error answer is AgentRefused."""
        await self._call(
            self._refusable(
                self._connection().set_session_mode(session_id=session_id, mode_id=mode_id),
                "session/set_mode",
            ),
            "session/set_mode",
        )

    async def set_config_option(
        self, session_id: str, config_id: str, value: str | bool
    ) -> schema.SetSessionConfigOptionResponse:
        """`session/set_config_option` within the request timeout; returns every option with its
        value now. An error answer is AgentRefused."""
        response: schema.SetSessionConfigOptionResponse = await self._call(
            self._refusable(
                self._connection().set_config_option(config_id=config_id, session_id=session_id, value=value),
                "session/set_config_option",
            ),
            "session/set_config_option",
        )
        return response

    async def _refusable(self, request: Awaitable[T], method: str) -> T:
        """A request the agent may refuse (not a failure of the agent): its JSON-RPC error
        answer is AgentRefused, with the agent's message (clipped)."""
        try:
            return await request
        except acp.RequestError as exc:
            if self.auth_required(exc) is not None:
                raise  # _call makes it AGENT_AUTH_REQUIRED
            name = self.config.name
            raise AgentRefused(
                f"agent {name!r} refused {method}: {clip(str(exc))}",
                metadata={"agent": name, "method": method, "code": exc.code, "message": clip(str(exc))},
            ) from None

    async def close_session(self, session_id: str, timeout: float) -> None:
        """`session/close` within `timeout`: the agent may free (and forget) what it kept for it."""
        async with self._bounded(timeout, "close the session"):
            await self._call(self._connection().close_session(session_id=session_id), "session/close")

    async def new_session(self, cwd: str, timeout: float) -> schema.NewSessionResponse:
        """Open a new ACP session within `timeout`; returns the agent's answer (its id, modes
        and config options)."""
        async with self._bounded(timeout, "open a session"):
            response: schema.NewSessionResponse = await self._call(
                self._connection().new_session(cwd=cwd, mcp_servers=[]), "session/new"
            )
            self._cwds[response.session_id] = cwd
            return response

    def session_cwd(self, session_id: str) -> str | None:
        """The directory the ACP session was opened in (new, load or resume), or None."""
        return self._cwds.get(session_id)

    async def end_terminals(self, session_id: str) -> None:
        """End (SIGKILL to each group) and release every terminal of `session_id`: the turn
        ended or the session closes. Bounded (terminals.KILL_TIMEOUT); never raises."""
        try:
            await self.terminals.release_session(session_id)
        except Exception:
            log.exception("ending the terminals of session=%s failed", session_id)

    @contextlib.asynccontextmanager
    async def _bounded(self, timeout: float, what: str) -> AsyncIterator[None]:
        """Within `timeout`, or AgentUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:
            raise AgentUnavailable(
                f"agent {self.config.name!r} did not {what} within {timeout:g}s",
                metadata={"agent": self.config.name, "stderr": self.stderr_tail()},
            ) from None

    async def _spawn(self) -> None:
        """Start the process, unless terminate() came first: a process spawned after it would be
        nobody's (the terminate found nothing to signal and is memoized)."""
        if self._terminating is not None:
            raise self._stopped_while_starting()
        self._spawned = spawned = asyncio.Event()
        try:
            await self._spawn_process()
        finally:
            spawned.set()
        if self._terminating is not None:  # it came while we spawned: _terminate waits for this
            # spawn, bounded; should it have gone on without the process, the group still ends.
            self._signal_group(signal.SIGKILL)
            raise self._stopped_while_starting()

    def _stopped_while_starting(self) -> AgentUnavailable:
        return AgentUnavailable(
            f"agent {self.config.name!r} was stopped while it was starting",
            metadata={"agent": self.config.name},
        )

    async def _spawn_process(self) -> None:
        if not self.config.command:
            raise AgentUnavailable(
                f"agent {self.config.name!r} is not configured on this server",
                metadata={"agent": self.config.name},
            )
        # Clean environment: the basics, the variables this agent may see, its own settings.
        env = {k: os.environ[k] for k in (*INHERITED_ENV, *self.config.pass_env) if k in os.environ}
        env.update(self.config.env)
        if not self._launcher.sandboxed(self.config):  # a sandbox's PID namespace ends them instead
            self._descendants = Descendants()
            self._descendants.mark(env)  # so what leaves the process group is still found
        spawn = self._launcher.spawn(self.config, env, self._workdir)
        # Our own stdout pipe, outside the process transport: its reader gets READ_BUFFER as
        # its limit, and terminate() closes our end itself, whoever still holds the other.
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:  # out of file descriptors
            raise AgentUnavailable(
                f"agent {self.config.name!r} could not be started: {exc.strerror or exc}",
                metadata={"agent": self.config.name},
            ) from exc
        try:
            self._process = await asyncio.create_subprocess_exec(
                *spawn.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=write_fd,
                stderr=asyncio.subprocess.PIPE,
                env=spawn.env,
                cwd=spawn.cwd,
                pass_fds=spawn.pass_fds,
                start_new_session=True,  # own process group: terminate() ends the agent's children too
            )
        except OSError as exc:
            os.close(read_fd)
            raise AgentUnavailable(
                f"agent {self.config.name!r} could not be started: {exc.strerror or exc}",
                metadata={"agent": self.config.name, "command": self.config.command},
            ) from exc
        finally:
            os.close(write_fd)
        assert self._process.stdin and self._process.stderr
        with contextlib.suppress(AttributeError, OSError):  # no pidfds: fall back on returncode
            self._pidfd = os.pidfd_open(self._process.pid)
        stdout = asyncio.StreamReader(limit=READ_BUFFER)
        self._stdout, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(read_fd, "rb", buffering=0)
        )
        self._spawn_background(self._drain_stderr(self._process.stderr))
        self._spawn_background(self._watch_exit(self._process))
        client = cast(acp.Client, _GatewayClient(self))
        self._transport = AgentTransport(
            self.config.name, stdout, self._process.stdin, self._connection_ended, self.route
        )
        # ACP 1.21 has elicitation/create stable; this SDK still routes it only as "unstable".
        self._conn = acp.connect_to_agent(client, self._transport, use_unstable_protocol=True)
        log.info("agent started agent=%s pid=%s", self.config.name, self._process.pid)

    async def _initialize(self) -> Handshake:
        response: schema.InitializeResponse = await self._call(
            self._connection().initialize(
                protocol_version=acp.PROTOCOL_VERSION,
                client_capabilities=schema.ClientCapabilities(
                    fs=schema.FileSystemCapabilities(
                        read_text_file=self.config.client_fs, write_text_file=self.config.client_fs
                    ),
                    terminal=self.config.client_terminal,
                    # Answered under `ask` by the client, otherwise declined (questions.py).
                    elicitation=schema.ElicitationCapabilities(form=schema.ElicitationFormCapabilities()),
                ),
                client_info=schema.Implementation(name="sessiongate", version="0.1.0"),
            ),
            "initialize",
        )
        if response.protocol_version != acp.PROTOCOL_VERSION:
            # ACP version negotiation: the agent answers the version it chose; a client that
            # does not support it closes the connection (the caller then ends the process).
            name = self.config.name
            raise AgentUnavailable(
                f"agent {name!r} speaks ACP protocol version {response.protocol_version}; "
                f"sessiongate speaks {acp.PROTOCOL_VERSION}",
                metadata={
                    "agent": name,
                    "agent_protocol_version": response.protocol_version,
                    "protocol_version": acp.PROTOCOL_VERSION,
                },
            )
        info = response.agent_info
        capabilities = response.agent_capabilities or schema.AgentCapabilities()
        self.handshake = Handshake(
            name=info.name if info else self.config.name,
            version=info.version if info else "",
            title=(info.title or "") if info else "",
            load_session=bool(capabilities.load_session),
            auth_methods=tuple(m.id for m in (response.auth_methods or [])),
            close_session=bool(
                capabilities.session_capabilities and capabilities.session_capabilities.close is not None
            ),
            resume_session=bool(
                capabilities.session_capabilities and capabilities.session_capabilities.resume is not None
            ),
        )
        return self.handshake

    async def prompt(self, session_id: str, blocks: list[Any]) -> schema.PromptResponse:
        """Run one turn upstream. Unbounded here on purpose: the turn's runner bounds it.

        Raises AgentError (a JSON-RPC error answer), AgentAuthRequired, AgentExited (the
        connection broke) or AgentProtocolError (an answer that is not a valid result).
        """
        self._cancelling.discard(session_id)
        name = self.config.name
        try:
            response: schema.PromptResponse = await self._connection().prompt(
                session_id=session_id, prompt=blocks
            )
        except acp.RequestError as exc:
            auth = self.auth_required(exc)
            if auth is not None:
                raise auth from exc
            data = clip(str(exc.data)) if exc.data else ""
            raise AgentError(
                f"agent {name!r} failed the turn: {clip(str(exc))}" + (f" ({data})" if data else ""),
                metadata={"agent": name, "code": exc.code, "message": clip(str(exc)), "data": data},
            ) from exc
        except (ConnectionError, OSError) as exc:
            code, tail = await self.exit_info()
            if self.broken is not None:
                raise self.broken from None
            raise AgentExited(
                f"agent {name!r} exited during the turn (exit code {code})",
                metadata={"agent": name, "exit_code": code, "stderr": tail},
            ) from exc
        except ValueError as exc:  # pydantic's ValidationError: the answer is not a PromptResponse
            raise protocol_error(name, "session/prompt", exc) from None
        if response.usage is not None:
            self._to_watcher(session_id, TurnUsage(response.usage))
        return response

    async def cancel(self, session_id: str) -> None:
        """Send `session/cancel` (a notification: nothing to wait for but the write). Never raises."""
        self._cancelling.add(session_id)
        with contextlib.suppress(ConnectionError, TimeoutError, OSError, AgentUnavailable):
            async with asyncio.timeout(self._request_timeout):
                await self._connection().cancel(session_id=session_id)

    def is_cancelling(self, session_id: str) -> bool:
        return session_id in self._cancelling

    def pause_reading(self) -> None:
        """Stop reading the agent's output: its pipe fills and blocks the agent, not our loop."""
        if self._transport is not None:
            self._transport.pause()
        self.reading_paused = True

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume()
        self.reading_paused = False

    def subscribe(self, session_id: str, sink: UpdateSink | None) -> None:
        """Route `session_id`'s updates to `sink`; None drops them (e.g. history replayed on load)."""
        if sink is None:
            self._sinks.pop(session_id, None)
        else:
            self._sinks[session_id] = sink

    def watch(self, session_id: str, watcher: StateWatcher | None) -> None:
        """Hand `session_id`'s state updates (modes, options, commands, title, usage), turn or
        not, to `watcher`, starting with those that came while nobody watched; None stops."""
        if watcher is None:
            self._watchers.pop(session_id, None)
            return
        self._watchers[session_id] = watcher
        for item in self._held.pop(session_id, ()):
            watcher(item)

    def ask_with(self, session_id: str, asker: Asker | None) -> None:
        """Questions the agent asks about `session_id` go to `asker` (the running turn's)."""
        if asker is None:
            self._askers.pop(session_id, None)
        else:
            self._askers[session_id] = asker

    def asker(self, session_id: str) -> Asker | None:
        return self._askers.get(session_id)

    def route(self, session_id: str, item: TurnItem) -> None:
        sink = self._sinks.get(session_id)
        if sink is not None:
            sink(item)
        if getattr(item, "session_update", None) in STATE_UPDATES:
            self._to_watcher(session_id, item)

    def _to_watcher(self, session_id: str, item: Any) -> None:
        """To the session's watcher; kept (the latest few) while it has none, e.g. the commands
        an agent announces right after answering session/new, before the session watches."""
        watcher = self._watchers.get(session_id)
        if watcher is not None:
            watcher(item)
            return
        held = self._held.get(session_id)
        if held is None:
            if len(self._held) >= HELD_SESSIONS:
                del self._held[next(iter(self._held))]
            held = self._held[session_id] = collections.deque(maxlen=HELD_UPDATES)
        held.append(item)

    def _drop_held(self, session_id: str, kinds: tuple[str, ...]) -> None:
        held = self._held.get(session_id)
        if held is not None:
            self._held[session_id] = collections.deque(
                (i for i in held if getattr(i, "session_update", None) not in kinds), maxlen=HELD_UPDATES
            )

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code once the process has exited, or None if it is still running at `timeout`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._exited.wait()
        return self.exit_code

    async def terminate(self, force: bool = False) -> None:
        """End the whole process group: SIGTERM, then SIGKILL after the grace (at once if `force`).

        Idempotent, and safe to cancel: the work runs in a task of its own that every caller
        shares, so a caller that goes away never leaves the group half-stopped.
        """
        if force:
            self._hurry.set()
        if self._terminating is None:
            self._terminating = asyncio.get_running_loop().create_task(
                self._terminate(), name=f"terminate-{self.config.name}-{self.pid}"
            )
        await asyncio.shield(self._terminating)

    async def _terminate(self) -> None:
        process = self._process
        swept = False
        try:
            spawned = self._spawned
            if spawned is not None and not spawned.is_set():  # the process being spawned is ours to end
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._kill_grace):
                        await spawned.wait()
                process = self._process
            with contextlib.suppress(Exception):  # own groups (unsandboxed): ending the agent's misses them
                await self.terminals.release_all()
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self._kill_grace):
                        await self._conn.close()
            if process is not None:
                self._signal_group(signal.SIGTERM)
                if not await self._exit_or_hurry(self._kill_grace):
                    log.warning(
                        "agent ignored SIGTERM, killing agent=%s pid=%s", self.config.name, process.pid
                    )
                # Children may outlive the leader: the group gets SIGKILL whatever the leader did.
                self._signal_group(signal.SIGKILL)
                await self.wait_exit(self._kill_grace)
                # Then what left the group (setsid), unless the exit watch did already. No await
                # before the scan is handed to its thread: it completes even if we are cancelled.
                swept = True
                if not self._exited.is_set():
                    await self._end_descendants()
        finally:
            # Reached even when this task is cancelled (shutdown): the group never outlives us.
            self._signal_group(signal.SIGKILL)
            self.terminals.kill_all()
            if not swept and process is not None and self._descendants is not None:
                self._descendants.end_in_background()
            self._close_pidfd()
            if self._stdout is not None:
                self._stdout.close()
            for task in list(self._background):
                task.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=self._kill_grace)

    async def _exit_or_hurry(self, timeout: float) -> bool:
        """Wait up to `timeout` for the process to exit or a forced terminate; True if it exited."""
        if not self._hurry.is_set():
            waits = [asyncio.ensure_future(self._exited.wait()), asyncio.ensure_future(self._hurry.wait())]
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        return self._exited.is_set()

    def _leader_unreaped(self) -> bool:
        """True while the leader's PID is still ours: running, or exited but not yet reaped."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, 0)
                return True
            except ProcessLookupError:
                return False
            except OSError:
                pass
        return self._process is not None and self._process.returncode is None

    def _signal_group(self, signum: signal.Signals) -> None:
        """Signal the agent's process group, but only while its id is provably ours.

        The group id is the leader's PID. While the leader is unreaped that PID cannot be
        reused, so the group is ours. Once it is reaped, a later signal could hit whoever got
        the PID next (PID space here can be as small as 32768): the group was killed the
        moment the leader was reaped (`_watch_exit`) and is never signalled again.
        """
        process = self._process
        if process is not None and self._leader_unreaped():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signum)

    def _connection(self) -> Any:
        if self._conn is None:
            raise AgentUnavailable(f"agent {self.config.name!r} is not running")
        return self._conn

    async def _call(self, request: Awaitable[T], what: str) -> T:
        """Await an ACP request within the request timeout, translating failures into our errors."""
        timeout = self._request_timeout
        try:
            async with asyncio.timeout(timeout):
                return await request
        except TimeoutError:
            raise AgentUnavailable(
                f"agent {self.config.name!r} did not answer {what} within {timeout:g}s",
                metadata={"agent": self.config.name, "method": what},
            ) from None
        except acp.RequestError as exc:
            auth = self.auth_required(exc)
            if auth is not None:
                raise auth from exc
            raise AgentUnavailable(
                f"agent {self.config.name!r} failed {what}: {clip(str(exc))}",
                metadata={"agent": self.config.name, "method": what, "code": exc.code},
            ) from exc
        except (ConnectionError, OSError) as exc:
            code, tail = await self.exit_info()
            if self.broken is not None:
                raise AgentUnavailable(self.broken.message, metadata=self.broken.metadata) from None
            raise AgentUnavailable(
                f"agent {self.config.name!r} exited during {what} (exit code {code})"
                + (f": {tail.splitlines()[-1]}" if tail else ""),
                metadata={"agent": self.config.name, "method": what, "exit_code": code, "stderr": tail},
            ) from exc
        except ValueError as exc:  # pydantic's ValidationError: not a valid answer to `what`
            error = protocol_error(self.config.name, what, exc)
            raise AgentUnavailable(error.message, metadata=error.metadata) from None

    def auth_required(self, error: acp.RequestError) -> AgentAuthRequired | None:
        """The AGENT_AUTH_REQUIRED error for an ACP auth-required answer, else None."""
        if error.code != AUTH_REQUIRED_CODE:
            return None
        methods = self.handshake.auth_methods if self.handshake else ()
        return AgentAuthRequired(
            f"agent {self.config.name!r} requires authentication: {clip(str(error))}",
            metadata={"agent": self.config.name, "auth_methods": ",".join(methods)},
        )

    async def exit_info(self) -> tuple[int | None, str]:
        """After the connection broke: exit code (None if still running after the grace), stderr tail."""
        return await self.wait_exit(self._kill_grace), self.stderr_tail()

    def _connection_ended(self, why: str, eof: bool) -> None:
        """The transport will read no more: a violation ends the agent at once; an end of
        output does if the process has not exited by itself shortly (a crash is no violation)."""
        if self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(self._end_broken(why, eof))

    async def _end_broken(self, why: str, eof: bool) -> None:
        if eof and await self.wait_exit(EOF_EXIT_GRACE) is not None:
            return  # it exited: reported as an exit, not as a violation
        name = self.config.name
        self.broken = AgentProtocolError(
            f"agent {name!r} {why}: its connection cannot be used any more, so it was ended",
            metadata={"agent": name, "error": why},
        )
        log.warning("agent=%s pid=%s %s; ending it", name, self.pid, why)
        await self.terminate()

    def _spawn_background(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        """Log the agent's stderr within a byte budget; always keep reading so the agent never blocks."""
        budget = STDERR_LOG_BUDGET
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line beyond the stream limit: skip it
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()[:STDERR_LINE_MAX]
            self._stderr_tail.append(text)
            if budget > 0:
                budget -= len(text)
                stderr_log.info("agent=%s pid=%s | %s", self.config.name, self.pid, text)
                if budget <= 0:
                    stderr_log.warning(
                        "agent=%s stderr log budget spent; further lines dropped", self.config.name
                    )

    async def _watch_exit(self, process: asyncio.subprocess.Process) -> None:
        # `process.wait()` returns only once the agent's pipes are closed as well: a descendant
        # holding its stderr (one that left the group with setsid) would put that off for ever.
        # So the leader's exit is seen on its pidfd, what it left is ended, then the pipes close.
        await self._leader_exit(process)
        # The leader is gone; children it left in its group (tool runs, shells) go with it.
        # Until its reap, and right after it, the id is still ours: members keep a group id
        # reserved, and an empty group's id could only be reused after the PID space wrapped.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await self._end_descendants()  # and those that left the group (setsid)
        with contextlib.suppress(TimeoutError):  # a holder that escaped: the reap gives the code
            async with asyncio.timeout(self._kill_grace):
                await process.wait()
        self.exit_code = process.returncode
        self._exited.set()
        self._close_pidfd()
        log.info("agent exited agent=%s pid=%s code=%s", self.config.name, process.pid, self.exit_code)
        if self._on_exit is not None:
            self._on_exit(self)

    async def _leader_exit(self, process: asyncio.subprocess.Process) -> None:
        """Until the agent's leader has exited (reaped or not): its pidfd becomes readable."""
        try:
            pidfd = os.dup(self._pidfd) if self._pidfd is not None else None  # ours to close
        except OSError:
            pidfd = None
        if pidfd is None:  # no pidfds here: the exit shows once the pipes are closed too
            await process.wait()
            return
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:  # called again while it stays readable, until removed
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    async def _end_descendants(self) -> None:
        """SIGKILL the unsandboxed agent's descendants, also those outside its group (descendants.py)."""
        if self._descendants is not None:
            await self._descendants.end()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
