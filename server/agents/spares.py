"""Warm spares: per agent, started and initialized agent processes kept ready.

A CreateSession (or a resume) that finds a spare only has to open an ACP session on it,
instead of spawning and initializing an agent. Taken spares are replaced in the background.
Spares take no session slot but have their own cap (`max_spares` over all agents), are
replaced if they die while waiting, and are ended on drain.

A spare is started for no session, so in no principal's home (sandbox.py: the server's HOME
unsandboxed, `homes/<agent>` sandboxed, or the agent's configured `home` or `user`'s). It is
handed only to a session whose agent would get that same home: one of no principal, or of an
agent whose home is shared by configuration. A principal's session whose agent has a home of
its own starts a fresh agent there; it never runs in a home another principal's agent used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from sessiongate.server.agents.connection import AgentConnection
from sessiongate.server.agents.logins import AgentLogins
from sessiongate.server.errors import AgentUnavailable
from sessiongate.server.sandbox.launcher import Launcher, home_principal
from sessiongate.server.settings import AgentConfig, ServerLimits

log = logging.getLogger("sessiongate.spares")

RETRY_AFTER_FAILURE = 5.0  # seconds before trying again to start a spare that failed to start


class SparePool:
    def __init__(
        self,
        agents: Mapping[str, AgentConfig],
        limits: ServerLimits,
        on_agent_start: Callable[[str, bool], None] | None = None,
        launcher: Launcher | None = None,
        logins: AgentLogins | None = None,
    ) -> None:
        self._limits = limits
        self._logins = logins
        self._launcher = launcher or Launcher()
        self._configs = dict(agents)
        self._on_agent_start = on_agent_start
        self._wanted: dict[str, int] = {}
        budget = limits.max_spares
        for name, config in sorted(agents.items()):
            if config.spares and self._launcher.sandboxed(config):
                # A sandbox is made for one cwd, which a spare does not know yet.
                log.warning("no spares for agent=%s: it runs in a sandbox", name)
                self._wanted[name] = 0
                continue
            self._wanted[name] = min(config.spares, budget)
            budget -= self._wanted[name]
        self._ready: dict[str, list[AgentConnection]] = {name: [] for name in agents}
        self._starting: dict[str, int] = dict.fromkeys(agents, 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        for name in self._wanted:
            self._refill(name)

    def ready(self, agent: str) -> int:
        return len(self._ready.get(agent, []))

    def take(self, agent: str) -> AgentConnection | None:
        """A ready spare of `agent`, or None; a replacement starts in the background. None for
        an agent made for a principal (sandbox.homes_of) whose home is not the spares' home."""
        ready = self._ready.get(agent, [])
        if ready and not self._same_home(self._configs[agent], home_principal()):
            return None
        while ready:
            spare = ready.pop(0)
            if spare.alive:
                spare.on_exit(lambda _: None)  # the session that takes it watches it from now on
                self._refill(agent)
                return spare
        return None

    def _same_home(self, config: AgentConfig, principal: str) -> bool:
        try:
            return self._launcher.for_principal(principal).home(config) == self._launcher.home(config)
        except AgentUnavailable:  # no such user: no spare started either
            return False

    async def close(self, force: bool = False) -> None:
        """End every spare (drain; `force`: without the SIGTERM grace); none start after this."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._limits.kill_grace * 2)
        spares = [spare for ready in self._ready.values() for spare in ready]
        self._ready = {name: [] for name in self._ready}
        await asyncio.gather(*(spare.terminate(force=force) for spare in spares), return_exceptions=True)

    async def renew(self, agent: str) -> None:
        """End `agent`'s waiting spares and start new ones (they authenticated the old way)."""
        stale, self._ready[agent] = self._ready.get(agent, []), []
        await asyncio.gather(*(spare.terminate() for spare in stale), return_exceptions=True)
        self._refill(agent)

    def _refill(self, agent: str, delay: float = 0.0) -> None:
        missing = self._wanted.get(agent, 0) - len(self._ready[agent]) - self._starting[agent]
        for _ in range(max(0, missing)):
            if self._closed:
                return
            self._starting[agent] += 1
            task = asyncio.create_task(self._start_one(agent, delay), name=f"spare-{agent}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start_one(self, agent: str, delay: float) -> None:
        config = self._configs[agent]
        spare = AgentConnection(
            config,
            request_timeout=self._limits.agent_request_timeout,
            kill_grace=self._limits.kill_grace,
            launcher=self._launcher,
            logins=self._logins,
        )
        ok = False
        try:
            await asyncio.sleep(delay)
            await spare.start(self._limits.agent_start_timeout)
            ok = True
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await spare.terminate()
            raise
        except Exception as exc:
            log.warning("could not start a spare agent=%s: %s", agent, exc)
            await spare.terminate()  # nothing of a failed start is left running
        finally:
            self._starting[agent] -= 1
        if self._on_agent_start is not None:
            self._on_agent_start(agent, ok)
        if not ok:
            self._refill(agent, delay=RETRY_AFTER_FAILURE)  # no hot loop on an agent that cannot start
            return
        if self._closed:
            await spare.terminate()
            return
        self._ready[agent].append(spare)
        spare.on_exit(lambda dead: self._lost(agent, dead))

    def _lost(self, agent: str, spare: AgentConnection) -> None:
        """A waiting spare died: replace it."""
        if spare in self._ready[agent]:
            log.warning("a spare agent exited while waiting agent=%s code=%s", agent, spare.exit_code)
            self._ready[agent].remove(spare)
            task = asyncio.create_task(spare.terminate())  # close its connection, end its group
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self._refill(agent)
