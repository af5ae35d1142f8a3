"""Terminals the gateway runs for an agent (`client_terminal`): ACP `terminal/create`,
`terminal/output`, `terminal/wait_for_exit`, `terminal/kill` and `terminal/release`.

A terminal's command is confined exactly like the agent that asked for it: the same
sandbox over the session's directory (or none), the same user, an environment as clean
as the agent's (plus what the request sets), stdin from /dev/null.

The variables the request sets reach the command only, never a process on the host side
of the confinement (bwrap, setpriv), which start with the agent's own fixed environment:
the command is run as `/usr/bin/env -- NAME=VALUE... COMMAND ARGS...`, so the variables
are set by `env` inside the sandbox, after the identity change, as arguments it reads and
not as an environment the host-side programs start with. An agent that asked for
LD_PRELOAD=<a library it built> used to have bwrap or setpriv (root) run it on the host.
Names a program's start-up reads to load code or files named by their value before the
program's own code runs are refused all the same (REFUSED_ENV), as is the gateway's own
marker; names and values are bounded. It starts in the
session's directory or a directory inside it, reached by descriptor without following
links (client_fs.py). It leads a process group of its own, and its stdout and stderr go
into one pipe, of which the last `outputByteLimit` bytes are kept (at most
MAX_OUTPUT_LIMIT; older output is dropped at a character boundary and the output marked
truncated, as ACP asks).

Every terminal is ended (SIGKILL to its process group) and reaped when it is released, when
its turn ends (`release_session`), and when the agent is stopped (`release_all`); a create
still under way then is refused (and no create is accepted once the agent is stopping). Its
leader is left unreaped until then, so the group's id can never be someone else's when it
is signalled. An agent holds at most MAX_TERMINALS at once.

What a command prints reaches the turn as `TerminalReport`s: at most one per
REPORT_INTERVAL per terminal, each with at most REPORT_MAX_BYTES of new output, held back
while the turn's client is not reading (the agent's output is paused then), plus one last
report when the command exits. A command printing faster than READ_RATE bytes a second is
read no faster: its pipe fills and it waits, as at a slow terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import acp
from acp import schema
from sessiongate.server.errors import SessionGateError, clip
from sessiongate.server.sandbox import files as client_fs
from sessiongate.server.sandbox import priority
from sessiongate.server.sandbox.descendants import MARKER_ENV, Descendants
from sessiongate.server.sandbox.launcher import Launcher
from sessiongate.server.sandbox.workdir import WorkDir
from sessiongate.server.settings import AgentConfig

log = logging.getLogger("sessiongate.terminals")

MAX_TERMINALS = 16  # terminals one agent holds at once (not yet released)
DEFAULT_OUTPUT_LIMIT = 1024 * 1024  # bytes of output kept when the request sets no limit
MAX_OUTPUT_LIMIT = 1024 * 1024  # a larger outputByteLimit is lowered to this
REPORT_INTERVAL = 0.1  # seconds between two reports of one terminal's output
REPORT_MAX_BYTES = 64 * 1024  # of new output in one report (the oldest part is dropped)
READ_RATE = 8 * 1024 * 1024  # bytes a second read from one terminal; then its pipe fills
EXIT_DRAIN = 0.5  # after the command exits, how long its last output may take to arrive
KILL_TIMEOUT = 5.0  # after SIGKILL to its group, how long to wait for the command to exit
MAX_ARGV_BYTES = 256 * 1024  # command and arguments together
MAX_ENV_BYTES = 256 * 1024  # the request's environment variables together
MAX_ENV_VARS = 256
MAX_ENV_NAME_BYTES = 256
MAX_ENV_VALUE_BYTES = 64 * 1024  # well under the kernel's 128 KiB for one argument
ENV_HELPER = "/usr/bin/env"  # coreutils: sets the request's variables, then execs the command
# Read at start-up by the dynamic loader and libc to load code (or files) named by the value,
# before the program's own code runs: the loader's LD_* (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT...),
# glibc's tunables (parsed by the loader; CVE-2023-4911) and iconv's module path (dlopened).
# The subset of glibc's own list for setuid programs (unsecvars.h) that loads code.
REFUSED_ENV_PREFIXES = ("LD_",)
REFUSED_ENV_NAMES = frozenset({"GCONV_PATH", "GLIBC_TUNABLES"})


@dataclass(frozen=True, slots=True)
class TerminalReport:
    """New output of a terminal (and, last, its exit), as the turn reports it."""

    terminal_id: str
    output_delta: str  # output since the previous report of this terminal
    truncated: bool  # output was dropped (beyond the byte limit, or between two reports)
    exited: bool = False
    exit_code: int | None = None
    signal: str | None = None


class _Output:
    """The output kept for `terminal/output` (the last `limit` bytes) and what the next report
    carries (the last REPORT_MAX_BYTES since the previous one)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.truncated = False
        self.pending = bytearray()
        self.pending_cut = False

    def feed(self, data: bytes) -> None:
        self.kept += data
        if len(self.kept) > self.limit:
            del self.kept[: _boundary(self.kept, len(self.kept) - self.limit)]
            self.truncated = True
        self.pending += data
        if len(self.pending) > REPORT_MAX_BYTES:
            del self.pending[: _boundary(self.pending, len(self.pending) - REPORT_MAX_BYTES)]
            self.pending_cut = True

    def take(self, final: bool) -> tuple[str, bool]:
        """The next report's text (whole characters only, unless `final`) and whether any was cut."""
        size = len(self.pending) if final else _complete(self.pending)
        text = bytes(self.pending[:size]).decode("utf-8", errors="replace")
        del self.pending[:size]
        cut, self.pending_cut = self.pending_cut, False
        return text, cut

    def text(self, final: bool) -> tuple[str, bool]:
        """The kept output as text of at most `limit` UTF-8 bytes, and whether it was truncated."""
        size = len(self.kept) if final else _complete(self.kept)
        text = bytes(self.kept[:size]).decode("utf-8", errors="replace")
        data = text.encode()
        if len(data) <= self.limit:
            return text, self.truncated
        # Undecodable bytes became U+FFFD (3 bytes each): cut again to stay within the limit.
        return data[_boundary(data, len(data) - self.limit) :].decode(), True


def _boundary(data: bytes | bytearray, start: int) -> int:
    """`start`, moved forward past UTF-8 continuation bytes: where a character begins."""
    while start < len(data) and data[start] & 0xC0 == 0x80:
        start += 1
    return start


def _complete(data: bytes | bytearray) -> int:
    """The length of `data` without a last character that has not fully arrived yet."""
    end = len(data)
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # the last character's first byte
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return end if back >= need or byte >> 3 == 0b11111 else end - back
    return end


@dataclass(eq=False)
class _Terminal:
    id: str
    session_id: str
    process: subprocess.Popen[bytes]
    output: _Output
    pidfd: int | None = None
    transport: asyncio.ReadTransport | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    signal: str | None = None
    released: bool = False
    reaped: bool = False
    watch: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    last_report: float = 0.0
    window_start: float = 0.0
    window_bytes: int = 0
    reported_exit: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the whole group, while its id is ours: the leader is unreaped until we reap it."""
        if not self.reaped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def reap(self) -> None:
        """Collect the leader once it has exited; from then on the group is never signalled."""
        if not self.reaped and self.exited.is_set() and self.process.poll() is not None:
            self.reaped = True
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()


class _Pipe(asyncio.Protocol):
    """Reads the command's merged stdout and stderr into its terminal."""

    def __init__(self, feed: Callable[[bytes], None], ended: Callable[[], None]) -> None:
        self._feed = feed
        self._ended = ended

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()


Route = Callable[[str, Any], None]


class Terminals:
    """One agent's terminals. Methods raise `acp.RequestError`, which the agent gets as the answer."""

    def __init__(
        self,
        config: AgentConfig,
        launcher: Launcher,
        route: Route,
        inherited: Iterable[str] = (),
        descendants: Callable[[], Descendants | None] = lambda: None,
        held_back: Callable[[], bool] = lambda: False,
    ) -> None:
        self._config = config
        self._launcher = launcher
        self._route = route  # (ACP session id, TerminalReport) to the session's running turn
        self._inherited = tuple(inherited)  # server env vars every agent gets (agent.INHERITED_ENV)
        self._descendants = descendants  # the unsandboxed agent's marker: its sweep ends ours too
        self._held_back = held_back  # the turn's client is not reading: hold reports back
        self._terminals: dict[str, _Terminal] = {}
        # Creates under way (they count against MAX_TERMINALS), each with its session. Each such
        # session has an epoch, bumped by release_session: a create that sees its session's
        # epoch moved while it awaited is refused (else it would outlive the clean-up).
        self._starting: dict[object, str] = {}
        self._epochs: dict[str, int] = {}  # only of sessions with creates under way
        self._closed = False  # release_all or kill_all ran (the agent is being stopped): no more

    def __len__(self) -> int:
        return len(self._terminals)

    # ---- ACP terminal/* ----------------------------------------------------------------------

    async def create(
        self,
        session_id: str,
        session_cwd: str | None,
        command: str,
        args: list[str] | None = None,
        env: list[schema.EnvVariable] | None = None,
        cwd: str | None = None,
        output_byte_limit: int | None = None,
    ) -> str:
        """Start `command` with `args` in `cwd` (inside the session's directory, default that
        directory); returns the terminal's id."""
        if session_cwd is None:
            raise _invalid(f"unknown session {clip(session_id, 100)!r}")
        if self._closed:
            raise _stopping()
        if len(self._terminals) + len(self._starting) >= MAX_TERMINALS:
            raise acp.RequestError(
                -32603, f"too many terminals: at most {MAX_TERMINALS} at once per agent; release one first"
            )
        argv = [command, *(args or [])]
        if not command:
            raise _invalid("the command is empty")
        if any("\0" in a for a in argv) or sum(len(a.encode()) for a in argv) > MAX_ARGV_BYTES:
            raise _invalid(
                f"the command and arguments must hold no NUL and be at most {MAX_ARGV_BYTES} bytes"
            )
        variables = _requested(env or [])
        if variables and "=" in command:  # `env` would take it for one more variable
            raise _invalid("a command whose name holds '=' cannot be given environment variables")
        limit = (
            DEFAULT_OUTPUT_LIMIT if output_byte_limit is None else min(output_byte_limit, MAX_OUTPUT_LIMIT)
        )
        hidden = self._launcher.hidden
        token = object()
        self._starting[token] = session_id
        epoch = self._epochs.setdefault(session_id, 0)
        try:
            # On this agent's share of the client fs threads (self: one Terminals per agent).
            root_path, root_fd = await client_fs.open_directory_async(session_cwd, "", hidden, self)
            try:
                start_path, start_fd = await client_fs.open_directory_async(
                    session_cwd, cwd or "", hidden, self
                )
                try:
                    # A clean-up that ran during the awaits did not see this terminal: refuse it
                    # now, before anything starts (from here to its registration nothing awaits).
                    if self._closed:
                        raise _stopping()
                    if self._epochs.get(session_id) != epoch:
                        raise acp.RequestError(
                            -32603, "the terminal was not started: the session's turn ended meanwhile"
                        )
                    root, start = WorkDir(root_path, root_fd), WorkDir(start_path, start_fd)
                    return self._start(session_id, argv, variables, root, start, limit)
                finally:
                    os.close(start_fd)
            finally:
                os.close(root_fd)
        finally:
            del self._starting[token]
            if session_id not in self._starting.values():
                self._epochs.pop(session_id, None)

    def output(self, session_id: str, terminal_id: str) -> schema.TerminalOutputResponse:
        terminal = self._get(session_id, terminal_id)
        text, truncated = terminal.output.text(final=terminal.exited.is_set())
        status = None
        if terminal.exited.is_set():
            status = schema.TerminalExitStatus(exit_code=terminal.exit_code, signal=terminal.signal)
        return schema.TerminalOutputResponse(output=text, truncated=truncated, exit_status=status)

    async def wait_for_exit(self, session_id: str, terminal_id: str) -> schema.WaitForTerminalExitResponse:
        """Until the command exits. Unbounded here: the turn's own bounds end the wait."""
        terminal = self._get(session_id, terminal_id)
        await terminal.exited.wait()
        return schema.WaitForTerminalExitResponse(exit_code=terminal.exit_code, signal=terminal.signal)

    def kill(self, session_id: str, terminal_id: str) -> None:
        """End the command; the terminal stays until released (its output can still be read)."""
        self._get(session_id, terminal_id).kill()

    async def release(self, session_id: str, terminal_id: str) -> None:
        """End the command if it still runs, and forget the terminal."""
        terminal = self._get(session_id, terminal_id)
        del self._terminals[terminal.id]
        await self._end(terminal)

    # ---- the gateway's own clean-ups ----------------------------------------------------------

    async def release_session(self, session_id: str) -> None:
        """Release every terminal of `session_id` (its turn ended, or it closed), and refuse
        the creates of `session_id` under way."""
        if session_id in self._epochs:
            self._epochs[session_id] += 1
        await self._end_all([t for t in self._terminals.values() if t.session_id == session_id])

    async def release_all(self) -> None:
        """Release every terminal (the agent is being stopped) and refuse every create from now
        on, those under way too. Bounded by KILL_TIMEOUT."""
        self._closed = True
        await self._end_all(list(self._terminals.values()))

    def kill_all(self) -> None:
        """SIGKILL every terminal's group now, without waiting (for paths that cannot wait), and
        refuse every create from now on, those under way too."""
        self._closed = True
        for terminal in self._terminals.values():
            terminal.released = True
            terminal.kill()

    # ---- inside --------------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        """The agent's clean environment and its marker: all a host-side process starts with."""
        variables = {k: os.environ[k] for k in (*self._inherited, *self._config.pass_env) if k in os.environ}
        variables.update(self._config.env)
        descendants = self._descendants()
        if descendants is not None:
            descendants.mark(variables)
        return variables

    def _start(
        self,
        session_id: str,
        argv: list[str],
        variables: Mapping[str, str],
        workdir: WorkDir,
        cwd: WorkDir,
        limit: int,
    ) -> str:
        # The request's variables are set by `env`, the first program run inside the confinement.
        command = (
            [ENV_HELPER, "--", *(f"{k}={v}" for k, v in variables.items()), *argv] if variables else argv
        )
        try:
            spawn = self._launcher.wrap(self._config, command, self._environment(), workdir, cwd)
        except SessionGateError as exc:
            raise acp.RequestError(-32603, clip(exc.message)) from None
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:  # out of file descriptors
            raise acp.RequestError(-32603, f"the terminal cannot be started: {exc.strerror or exc}") from None
        try:
            process = subprocess.Popen(
                spawn.argv,
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                env=dict(spawn.env),
                cwd=spawn.cwd,
                pass_fds=spawn.pass_fds,
                start_new_session=True,  # its own group: ending it ends what it started
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            os.close(read_fd)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise _invalid(f"{clip(argv[0], 100)!r} cannot be started: {clip(why, 200)}") from None
        finally:
            os.close(write_fd)
        priority.lower(process.pid, self._config.nice, lambda: process.returncode is None)  # unreaped
        terminal = _Terminal(f"term-{secrets.token_urlsafe(12)}", session_id, process, _Output(limit))
        with contextlib.suppress(AttributeError, OSError):  # no pidfds: exits are polled for
            terminal.pidfd = os.pidfd_open(process.pid)
        self._terminals[terminal.id] = terminal
        loop = asyncio.get_running_loop()
        terminal.window_start = terminal.last_report = loop.time() - REPORT_INTERVAL
        pipe = _Pipe(lambda data: self._feed(terminal, data), terminal.eof.set)
        reader = os.fdopen(read_fd, "rb", buffering=0)
        terminal.watch = loop.create_task(self._watch(terminal, reader, pipe), name=f"terminal-{process.pid}")
        log.info(
            "terminal started agent=%s session=%s terminal=%s pid=%s",
            self._config.name,
            session_id,
            terminal.id,
            process.pid,
        )
        return terminal.id

    def _get(self, session_id: str, terminal_id: str) -> _Terminal:
        terminal = self._terminals.get(terminal_id)
        if terminal is None or terminal.session_id != session_id:
            raise _invalid(f"no terminal {clip(terminal_id, 100)!r} in this session")
        return terminal

    async def _end_all(self, terminals: list[_Terminal]) -> None:
        for terminal in terminals:
            self._terminals.pop(terminal.id, None)
        if terminals:
            await asyncio.gather(*(self._end(t) for t in terminals))

    async def _end(self, terminal: _Terminal) -> None:
        """SIGKILL the group, wait (bounded) for the leader's exit, reap it, close the pipe."""
        terminal.released = True
        terminal.kill()
        try:
            async with asyncio.timeout(KILL_TIMEOUT):
                await terminal.exited.wait()
        except TimeoutError:
            log.warning("terminal pid=%s did not exit within %gs of SIGKILL", terminal.pid, KILL_TIMEOUT)
        finally:
            terminal.reap()  # else the watch reaps it once it exits
            terminal.close()

    async def _watch(self, terminal: _Terminal, reader: Any, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_read_pipe(lambda: pipe, reader)
        except BaseException:
            reader.close()
            terminal.eof.set()
        else:
            terminal.transport = transport
            if terminal.released:
                transport.close()
        try:
            await self._leader_exit(terminal)
            terminal.exit_code, terminal.signal = _status(terminal.pid)
            with contextlib.suppress(TimeoutError):  # a child it left may hold the pipe open
                async with asyncio.timeout(EXIT_DRAIN):
                    await terminal.eof.wait()
        finally:
            terminal.exited.set()
            self._report(terminal, final=True)
            if terminal.released:
                terminal.reap()
                terminal.close()
            log.info(
                "terminal exited terminal=%s pid=%s code=%s signal=%s",
                terminal.id,
                terminal.pid,
                terminal.exit_code,
                terminal.signal,
            )

    async def _leader_exit(self, terminal: _Terminal) -> None:
        """Until the leader has exited (it stays unreaped): its pidfd turns readable."""
        if terminal.pidfd is None:
            while not _exited(terminal.pid):  # noqa: ASYNC110 (nothing to wait on without pidfds)
                await asyncio.sleep(0.05)
            return
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(terminal.pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(terminal.pidfd)

    def _feed(self, terminal: _Terminal, data: bytes) -> None:
        terminal.output.feed(data)
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - terminal.window_start >= REPORT_INTERVAL:
            terminal.window_start, terminal.window_bytes = now, 0
        terminal.window_bytes += len(data)
        transport = terminal.transport
        if transport is not None and terminal.window_bytes >= READ_RATE * REPORT_INTERVAL:
            transport.pause_reading()  # its pipe fills and the command waits, not our loop
            loop.call_later(terminal.window_start + REPORT_INTERVAL - now, _resume, transport)
        if terminal.timer is None and not terminal.reported_exit:
            delay = max(0.0, terminal.last_report + REPORT_INTERVAL - now)
            terminal.timer = loop.call_later(delay, self._flush, terminal)

    def _flush(self, terminal: _Terminal) -> None:
        terminal.timer = None
        if not terminal.output.pending or terminal.reported_exit:
            return
        if self._held_back():  # the client is behind: keep coalescing (bounded) until it reads
            terminal.timer = asyncio.get_running_loop().call_later(REPORT_INTERVAL, self._flush, terminal)
            return
        self._report(terminal, final=False)

    def _report(self, terminal: _Terminal, final: bool) -> None:
        if terminal.reported_exit:
            return
        if terminal.timer is not None and final:
            terminal.timer.cancel()
            terminal.timer = None
        text, cut = terminal.output.take(final)
        if not text and not cut and not final:
            return
        terminal.last_report = asyncio.get_running_loop().time()
        terminal.reported_exit = final
        report = TerminalReport(
            terminal_id=terminal.id,
            output_delta=text,
            truncated=cut or terminal.output.truncated,
            exited=final,
            exit_code=terminal.exit_code if final else None,
            signal=terminal.signal if final else None,
        )
        try:
            self._route(terminal.session_id, report)
        except Exception:  # a sink's failure is not the terminal's
            log.exception("routing a terminal report failed terminal=%s", terminal.id)


def _resume(transport: asyncio.ReadTransport) -> None:
    if not transport.is_closing():
        transport.resume_reading()


def _exited(pid: int) -> bool:
    """Whether our child `pid` has exited (it is not reaped)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _status(pid: int) -> tuple[int | None, str | None]:
    """The exited leader's exit code, or the name of the signal that ended it; read without
    reaping it (its group's id stays ours until we reap it)."""
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped by someone else: the status is lost
        return None, None
    if result is None:
        return None, None
    if result.si_code == os.CLD_EXITED:
        return result.si_status, None
    try:
        return None, signal.Signals(result.si_status).name
    except ValueError:
        return None, str(result.si_status)


def _requested(env: list[schema.EnvVariable]) -> dict[str, str]:
    """The request's variables, checked: bounded, well-formed, none that loads code at start-up."""
    if len(env) > MAX_ENV_VARS:
        raise _invalid(f"at most {MAX_ENV_VARS} environment variables")
    variables: dict[str, str] = {}
    size = 0
    for entry in env:
        name, value = entry.name, entry.value
        shown = clip(name, 100)
        if not name or "=" in name or "\0" in name or len(name.encode()) > MAX_ENV_NAME_BYTES:
            raise _invalid(
                f"bad environment variable name {shown!r}: it must be non-empty, without '=' or NUL, "
                f"at most {MAX_ENV_NAME_BYTES} bytes"
            )
        if "\0" in value or len(value.encode()) > MAX_ENV_VALUE_BYTES:
            raise _invalid(
                f"bad value of environment variable {shown!r}: "
                f"it must hold no NUL and be at most {MAX_ENV_VALUE_BYTES} bytes"
            )
        if name.startswith(REFUSED_ENV_PREFIXES) or name in REFUSED_ENV_NAMES:
            raise _invalid(
                f"environment variable {shown!r} is refused: names the dynamic loader or libc read to "
                "load code (LD_*, GCONV_PATH, GLIBC_TUNABLES) cannot be set for a terminal"
            )
        if name == MARKER_ENV:
            raise _invalid(f"environment variable {MARKER_ENV} is the gateway's own")
        size += len(name.encode()) + len(value.encode())
        variables[name] = value
    if size > MAX_ENV_BYTES:
        raise _invalid(f"the environment variables must be at most {MAX_ENV_BYTES} bytes")
    return variables


def _stopping() -> acp.RequestError:
    return acp.RequestError(-32603, "the terminal was not started: the agent is being stopped")


def _invalid(message: str) -> acp.RequestError:
    return acp.RequestError(-32602, clip(message, 400))
