"""An agent's OS process and its process group: spawn, stderr, exit, terminate.

The agent runs in its own process group with a clean environment (through the launcher,
which may sandbox it). Its stdin and stdout are handed to the connection (connection.py);
its stderr is drained here, logged within a budget, its last lines kept for error messages.
`terminate()` ends the whole process group (SIGTERM, then SIGKILL after a grace), so no agent
child outlives it, and a terminate() that comes before or during the spawn still ends what
the spawn makes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from sessiongate.server.agents.transport import READ_BUFFER
from sessiongate.server.errors import AgentUnavailable
from sessiongate.server.sandbox import priority
from sessiongate.server.sandbox.descendants import Descendants
from sessiongate.server.sandbox.launcher import Launcher
from sessiongate.server.sandbox.network_proxy import SandboxNetwork
from sessiongate.server.sandbox.workdir import WorkDir
from sessiongate.server.settings import AgentConfig

log = logging.getLogger("sessiongate.agent")
stderr_log = logging.getLogger("sessiongate.agent.stderr")

# Env vars an agent inherits from the server; everything else it gets from its config.
INHERITED_ENV = ("HOME", "PATH", "USER", "LANG")
STDERR_LINE_MAX = 2000  # characters of one stderr line kept for the log
STDERR_LOG_BUDGET = 256 * 1024  # bytes of stderr logged per agent; the rest is drained, not logged
STDERR_TAIL_LINES = 20  # kept for error messages
STDERR_TAIL_CHARS = 2000  # of those, at most this much goes into a status

# What the spawn hands on: the agent's stdout (our reader, and the pipe it reads) and stdin.
Connect = Callable[[asyncio.StreamReader, asyncio.ReadTransport, asyncio.StreamWriter], None]


class AgentProcessGroup:
    """One agent's OS process and its process group, from the spawn to the last SIGKILL.

    The connection that owns it says, when it is made, what to wind down before the group is
    signalled (`wind_down`: its terminals, its ACP connection), what to kill with the group
    (`on_killed`) and whom to tell of the exit (`on_exit`).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        kill_grace: float,
        launcher: Launcher,
        workdir: WorkDir | None,
        wind_down: Callable[[], Awaitable[None]],
        on_killed: Callable[[], None],
        on_exit: Callable[[], None],
    ) -> None:
        self.config = config
        self.exit_code: int | None = None
        self._kill_grace = kill_grace
        self._launcher = launcher
        self._workdir = workdir  # the session's checked directory; open until the spawn
        self._wind_down = wind_down
        self._on_killed = on_killed
        self._on_exit = on_exit
        self._process: asyncio.subprocess.Process | None = None
        self._pidfd: int | None = None  # the leader's pidfd: tells whether its PID is still ours
        self._descendants: Descendants | None = None  # unsandboxed: finds what left the group
        self._network: SandboxNetwork | None = None  # network = "proxy": its sandbox's socket on the proxy
        self._stdout: asyncio.ReadTransport | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._background: set[asyncio.Task[None]] = set()
        self._exited = asyncio.Event()
        self._terminating: asyncio.Task[None] | None = None
        self._spawned: asyncio.Event | None = None  # set once a spawn under way has its process (or failed)
        self._hurry = asyncio.Event()  # a forced terminate() skips what is left of the SIGTERM grace

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and not self._exited.is_set()

    @property
    def descendants(self) -> Descendants | None:
        """The unsandboxed agent's marker (descendants.py); None when sandboxed or not spawned."""
        return self._descendants

    @property
    def on_host_network(self) -> bool:
        """Whether the agent reaches what the server reaches: unsandboxed, or network = "host"."""
        return not self._launcher.sandboxed(self.config) or self.config.network_mode == "host"

    @property
    def network(self) -> SandboxNetwork | None:
        """Sandboxed with network = "proxy": its socket on the gateway's proxy, once spawned (where
        its session's MCP hosts are added); None otherwise (no way out, or the host's network)."""
        return self._network

    def stderr_tail(self) -> str:
        """The last lines of stderr, at most STDERR_TAIL_CHARS (they go into statuses)."""
        return "\n".join(self._stderr_tail)[-STDERR_TAIL_CHARS:]

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code once the process has exited, or None if it is still running at `timeout`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._exited.wait()
        return self.exit_code

    # ---- the spawn ---------------------------------------------------------------------

    async def spawn(self, connect: Connect) -> None:
        """Start the process and hand its stdout and stdin to `connect`, unless terminate() came
        first: a process spawned after it would be nobody's (the terminate found nothing to
        signal and is memoized). `connect` runs before the spawn counts as done, so a
        terminate() waiting on the spawn finds the connection to wind down."""
        if self._terminating is not None:
            raise self._stopped_while_starting()
        self._spawned = spawned = asyncio.Event()
        try:
            await self._spawn_process(connect)
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

    async def _spawn_process(self, connect: Connect) -> None:
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
        self._network = spawn.network
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
        priority.lower(self._process.pid, self.config.nice, lambda: self.alive)  # the group leads
        stdout = asyncio.StreamReader(limit=READ_BUFFER)
        self._stdout, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(read_fd, "rb", buffering=0)
        )
        self._spawn_background(self._drain_stderr(self._process.stderr))
        self._spawn_background(self._watch_exit(self._process))
        connect(stdout, self._stdout, self._process.stdin)
        log.info("agent started agent=%s pid=%s", self.config.name, self._process.pid)

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

    # ---- the exit ----------------------------------------------------------------------

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
        self._on_exit()

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

    # ---- the stop ----------------------------------------------------------------------

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
            await self._wind_down()
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
            self._on_killed()
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

    async def _end_descendants(self) -> None:
        """SIGKILL the unsandboxed agent's descendants, also those outside its group (descendants.py)."""
        if self._descendants is not None:
            await self._descendants.end()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
