"""One agent connection: ACP to the agent (initialize, authenticate, new/load/resume, prompt,
cancel, modes and options, close) and the routing of what it sends to each ACP session.

It composes the agent's process group (process.py: spawn, stderr, exit, terminate) and our
answers to the agent's requests (requests.py), and speaks ACP over the process's stdio
through the agent-client-protocol SDK. Every request except the turn itself has a timeout
here; the turn is bounded by the session's watchdog. `terminate()` ends the whole process
group (SIGTERM, then SIGKILL after a grace), so no agent child outlives it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import acp
from acp import schema
from sessiongate.server.agents.flood_watch import FloodWatch
from sessiongate.server.agents.logins import AgentLogins
from sessiongate.server.agents.process import INHERITED_ENV, AgentProcessGroup
from sessiongate.server.agents.protocol import (
    AgentUpdate,
    Asker,
    Handshake,
    McpServers,
    StateWatcher,
    UpdateSink,
)
from sessiongate.server.agents.requests import AgentRequests
from sessiongate.server.agents.state import STATE_UPDATES, TurnUsage
from sessiongate.server.agents.transport import AgentTransport, TextRun
from sessiongate.server.eager import start_eagerly
from sessiongate.server.errors import (
    AgentAuthRequired,
    AgentError,
    AgentExited,
    AgentProtocolError,
    AgentRefused,
    AgentUnavailable,
    McpTransportUnsupported,
    NotSupported,
    clip,
)
from sessiongate.server.sandbox.launcher import Launcher
from sessiongate.server.sandbox.network_proxy import MAX_MCP_DESTINATIONS, address_refused
from sessiongate.server.sandbox.terminals import Terminals
from sessiongate.server.sandbox.workdir import WorkDir
from sessiongate.server.settings import AgentConfig, McpServerConfig

log = logging.getLogger("sessiongate.agent")

EOF_EXIT_GRACE = 1.0  # an agent whose stdout ended and that has not exited by then is ended
AUTH_REQUIRED_CODE = -32000
PROMPT_METHOD = acp.AGENT_METHODS["session_prompt"]
HELD_UPDATES = 32  # state updates kept per session until it is watched (the latest)
HELD_SESSIONS = 8  # sessions whose state updates are kept until watched
STALE_ON_OPEN = ("current_mode_update", "config_option_update")  # what an open's answer supersedes

T = TypeVar("T")
AcpMcpServer = schema.McpServerStdio | schema.HttpMcpServer | schema.SseMcpServer


def protocol_error(agent: str, method: str, exc: ValueError) -> AgentProtocolError:
    """An agent's answer to `method` that does not fit the ACP schema (bounded description)."""
    return AgentProtocolError(
        f"agent {agent!r} answered {method} with an invalid result: {clip(str(exc))}",
        metadata={"agent": agent, "method": method, "error": clip(str(exc))},
    )


def mcp_destination(url: str) -> tuple[str, int]:
    """The (host, port) an http/sse MCP server's `url` names; ValueError when it names none."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL with a host")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def unreachable_literal(host: str, allow_private: bool) -> str | None:
    """Why a sandbox behind the proxy cannot reach `host` when it is an address (or localhost):
    "loopback" (inside, its loopback is its own), "link-local", "reserved", "private"; else None
    (a name: the proxy checks what it resolves to at each connection)."""
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return address_refused(host, allow_private)


def acp_mcp_server(server: McpServerConfig, environ: Mapping[str, str]) -> AcpMcpServer:
    """One MCP server as ACP passes it, its env and header values resolved from `environ`."""
    if server.transport == "stdio":
        env = [schema.EnvVariable(name=k, value=v) for k, v in server.resolved_env(environ).items()]
        return schema.McpServerStdio(
            name=server.name, command=server.command, args=list(server.args), env=env
        )
    headers = [schema.HttpHeader(name=k, value=v) for k, v in server.resolved_headers(environ).items()]
    if server.transport == "sse":
        return schema.SseMcpServer(name=server.name, url=server.url, headers=headers, type="sse")
    return schema.HttpMcpServer(name=server.name, url=server.url, headers=headers, type="http")


class AgentConnection:
    """One agent: its process group (`group`), the ACP connection to it, and the routing of
    what it sends to each ACP session's turn and watcher. `AgentProcess` is its shape as the
    session core sees it."""

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
        launcher = launcher or Launcher()
        self.handshake: Handshake | None = None
        self._request_timeout = request_timeout
        self._kill_grace = kill_grace
        self.group = AgentProcessGroup(
            config,
            kill_grace=kill_grace,
            launcher=launcher,
            workdir=workdir,
            wind_down=self._wind_down,
            on_killed=self._kill_terminals,
            on_exit=self._exited,
        )
        self._conn: Any = None  # acp's ClientSideConnection
        self._sinks: dict[str, UpdateSink] = {}
        self._watchers: dict[str, StateWatcher] = {}  # per ACP session, turn or not (agent_state.py)
        self._held: dict[str, collections.deque[Any]] = {}  # state updates of unwatched sessions
        self._askers: dict[str, Asker] = {}  # the running turn's questions, per ACP session
        self._cancelling: set[str] = set()
        self._on_exit: Callable[[AgentConnection], None] | None = None
        self._ending: asyncio.Task[None] | None = None  # ending the agent after a protocol violation
        self.broken: AgentProtocolError | None = None  # why its connection became unusable
        self._transport: AgentTransport | None = None
        self.reading_paused = False
        self._cwds: dict[str, str] = {}  # each ACP session's directory, as opened (client fs, terminals)
        self.hidden_paths = launcher.hidden  # never served by the client fs, wherever they are
        self._floods = FloodWatch(
            config.name, lambda: self.group.pid, lambda: self.group.alive, launcher.idle
        )
        self.terminals = Terminals(  # client_terminal: commands the agent runs through us
            config,
            launcher,
            self.route,
            inherited=INHERITED_ENV,
            descendants=lambda: self.group.descendants,
            held_back=lambda: self.reading_paused,
        )

    @property
    def pid(self) -> int | None:
        return self.group.pid

    @property
    def alive(self) -> bool:
        return self.group.alive

    @property
    def exit_code(self) -> int | None:
        return self.group.exit_code

    def stderr_tail(self) -> str:
        """The last lines of stderr, at most STDERR_TAIL_CHARS (they go into statuses)."""
        return self.group.stderr_tail()

    def on_exit(self, callback: Callable[[AgentConnection], None]) -> None:
        """Call `callback` once when the agent process exits (for whatever reason)."""
        self._on_exit = callback

    def _exited(self) -> None:
        if self._on_exit is not None:
            self._on_exit(self)

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

    async def load(
        self,
        cwd: str,
        session_id: str,
        timeout: float,
        mcp_servers: McpServers = (),
    ) -> schema.LoadSessionResponse:
        """Resume an ACP session with `session/load` within `timeout`; returns the agent's
        answer (its modes and config options).

        The history the agent replays while loading reaches no sink (nobody subscribed yet),
        so it is not re-sent to any client; modes and options it replays are superseded by
        the answer.
        """
        async with self._bounded(timeout, "load the session"):
            response: schema.LoadSessionResponse = await self._call(
                self._connection().load_session(
                    cwd=cwd, session_id=session_id, mcp_servers=self._mcp_servers(mcp_servers)
                ),
                "session/load",
            )
        self._cwds[session_id] = cwd
        self._drop_held(session_id, STALE_ON_OPEN)
        return response

    async def resume(
        self,
        cwd: str,
        session_id: str,
        timeout: float,
        mcp_servers: McpServers = (),
    ) -> schema.ResumeSessionResponse:
        """Resume an ACP session with `session/resume` (no history replayed) within `timeout`;
        returns the agent's answer (its modes and config options)."""
        async with self._bounded(timeout, "resume the session"):
            response: schema.ResumeSessionResponse = await self._call(
                self._connection().resume_session(
                    cwd=cwd, session_id=session_id, mcp_servers=self._mcp_servers(mcp_servers)
                ),
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

    async def new_session(
        self, cwd: str, timeout: float, mcp_servers: McpServers = ()
    ) -> schema.NewSessionResponse:
        """Open a new ACP session within `timeout`; returns the agent's answer (its id, modes
        and config options). `mcp_servers` (new, load and resume alike) are given to the
        agent, their secret values read from the server's environment now."""
        async with self._bounded(timeout, "open a session"):
            response: schema.NewSessionResponse = await self._call(
                self._connection().new_session(cwd=cwd, mcp_servers=self._mcp_servers(mcp_servers)),
                "session/new",
            )
            self._cwds[response.session_id] = cwd
            return response

    def _mcp_servers(self, servers: McpServers) -> list[AcpMcpServer]:
        """The ACP form of a session's MCP servers; one over a transport the agent did not
        advertise is McpTransportUnsupported (before anything is sent)."""
        handshake = self.handshake or Handshake("", "", "", False, ())
        for server in servers:
            if not handshake.takes_mcp_transport(server.transport):
                agent = self.config.name
                raise McpTransportUnsupported(
                    f"MCP server {server.name!r} uses {server.transport}, which agent {agent!r} "
                    "does not advertise (its mcpCapabilities)",
                    metadata={"agent": agent, "server": server.name, "transport": server.transport},
                )
        self._reach_mcp_hosts([server for server in servers if server.transport != "stdio"])
        return [acp_mcp_server(server, os.environ) for server in servers]

    def _reach_mcp_hosts(self, servers: list[McpServerConfig]) -> None:
        """Let this agent's sandbox reach its session's http/sse MCP servers, exactly their
        host:port, before the session is opened (a stdio server is the agent's child: inside its
        sandbox, under its network rules already). The proxy box is this agent process's own, and
        the process is this session's, so no other session gains them. One it cannot reach is
        McpTransportUnsupported: network "none", or an address the proxy refuses. An
        operator-named server may be at a private address (that one, not the range); a
        client-supplied one only with allow_private_destinations, like allowed_domains."""
        if not servers or self.group.on_host_network:
            return
        agent, network = self.config.name, self.group.network
        if network is None:
            first = servers[0]
            raise McpTransportUnsupported(
                f"MCP server {first.name!r} uses {first.transport}, and agent {agent!r} runs "
                'with network = "none": its sandbox reaches no host',
                metadata={"agent": agent, "server": first.name, "network": "none"},
            )
        destinations: list[tuple[str, int, bool]] = []
        for server in servers:
            metadata = {"agent": agent, "server": server.name, "transport": server.transport}
            named = self.config.mcp_catalog.get(server.name) == server  # by the operator
            try:
                host, port = mcp_destination(server.url)
            except ValueError:
                raise McpTransportUnsupported(
                    f"MCP server {server.name!r} has no host in its url", metadata=metadata
                ) from None
            why = unreachable_literal(host, named or self.config.allow_private_destinations)
            if why is not None:
                hint = ": its loopback is its own, give the server another address" * (why == "loopback")
                raise McpTransportUnsupported(
                    f"MCP server {server.name!r} is at a {why} address ({clip(host, 100)}), which agent "
                    f'{agent!r} cannot reach from its sandbox (network = "proxy"){hint}',
                    metadata={**metadata, "address": why},
                )
            destinations.append((host, port, named))
        try:
            network.allow_mcp(destinations)
        except ValueError:
            raise McpTransportUnsupported(
                f"agent {agent!r} cannot reach more than {MAX_MCP_DESTINATIONS} MCP hosts",
                metadata={"agent": agent},
            ) from None

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
        """Start the agent's process group and connect ACP to its stdio; a terminate() that
        came first, or during the spawn, ends it (AgentProcessGroup.spawn)."""
        await self.group.spawn(self._connect)

    def _connect(
        self, stdout: asyncio.StreamReader, pipe: asyncio.ReadTransport, stdin: asyncio.StreamWriter
    ) -> None:
        client = cast(acp.Client, AgentRequests(self))
        self._transport = AgentTransport(
            self.config.name,
            stdout,
            stdin,
            self._connection_ended,
            self.route,
            pipe=pipe,
            on_dropped=self._floods.count,
        )
        # ACP 1.21 has elicitation/create stable; this SDK still routes it only as "unstable".
        self._conn = acp.connect_to_agent(client, self._transport, use_unstable_protocol=True)

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
            mcp_http=bool(capabilities.mcp_capabilities and capabilities.mcp_capabilities.http),
            mcp_sse=bool(capabilities.mcp_capabilities and capabilities.mcp_capabilities.sse),
        )
        return self.handshake

    async def prompt(self, session_id: str, blocks: list[dict[str, Any]]) -> schema.PromptResponse:
        """Run one turn upstream. Unbounded here on purpose: the turn's runner bounds it.

        Raises AgentError (a JSON-RPC error answer), AgentAuthRequired, AgentExited (the
        connection broke) or AgentProtocolError (an answer that is not a valid result).
        """
        self._cancelling.discard(session_id)
        name = self.config.name
        try:
            response = schema.PromptResponse.model_validate(await self._send_prompt(session_id, blocks))
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

    def _send_prompt(self, session_id: str, blocks: list[dict[str, Any]]) -> Awaitable[Any]:
        """`session/prompt` with its params as JSON already (translate.prompt_json): the SDK's
        `prompt()` would build a PromptRequest model and dump it again on the first event's path
        (about 0.1 ms of it on a busy 2-core machine). The SDK's connection still does the
        JSON-RPC: the id, the answer or the error. It also skips the SDK's wait for its own
        session/update tasks, which never run: the transport hands every update on itself.
        `_conn` is the SDK's own attribute (its acp.connection.Connection), not its API: the SDK
        is pinned below 0.13 in pyproject.toml, and every prompt in the tests goes this way.

        The request is written now, in the caller's step (eager.py), and answered in a task of
        its own: `prompt()`'s first step (in which its runner sends it, eagerly too) always ends
        waiting on that task, so its error handling, bounded by `asyncio.timeout`, runs in the
        prompt's own task, never in its caller's."""
        connection = self._connection()._conn
        return start_eagerly(
            connection.send_request(PROMPT_METHOD, {"sessionId": session_id, "prompt": blocks}),
            name=f"prompt-{session_id}",
        )

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

    def route(self, session_id: str, item: AgentUpdate) -> None:
        sink = self._sinks.get(session_id)
        if sink is not None:
            sink(item)
            if type(item) is TextRun:
                self._floods.count(len(item.text))
        if type(item) is not TextRun and getattr(item, "session_update", None) in STATE_UPDATES:
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
        return await self.group.wait_exit(timeout)

    async def terminate(self, force: bool = False) -> None:
        """End the whole process group: SIGTERM, then SIGKILL after the grace (at once if `force`).

        Idempotent, and safe to cancel: the work runs in a task of its own that every caller
        shares, so a caller that goes away never leaves the group half-stopped.
        """
        await self.group.terminate(force)

    async def _wind_down(self) -> None:
        """Before the group is signalled: release the terminals, close the ACP connection."""
        with contextlib.suppress(Exception):  # own groups (unsandboxed): ending the agent's misses them
            await self.terminals.release_all()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._kill_grace):
                    await self._conn.close()

    def _kill_terminals(self) -> None:
        """With the group's last SIGKILL, even when the terminate is cancelled."""
        self.terminals.kill_all()

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
