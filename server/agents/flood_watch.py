"""Whether an agent floods its output, and what flooding costs it.

An agent whose output (text streamed into turns, or lines the gateway drops) runs past
FLOOD_CHARS within FLOOD_WINDOW floods: a model streaming an answer writes a few KiB a second.
It then drops to nice 19 (sandbox/priority.py), once and for good (raising it back would need
privilege), and while it floods it runs in its server's idle cgroup, if there is one
(sandbox/idle_cgroup.py): only when no other task wants the core. Once its output falls under
half that rate it leaves the idle cgroup, so an agent that floods now and then, or one of many
sessions that all stream (where idle scheduling only slows them all), is not starved between
floods. The moves run in a thread: each scans /proc for the agent's process group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from sessiongate.server.sandbox import priority
from sessiongate.server.sandbox.idle_cgroup import IdleCgroup
from sessiongate.server.settings import MAX_NICE

log = logging.getLogger("sessiongate.agent")

FLOOD_CHARS = 128 * 1024  # of output within FLOOD_WINDOW: a flood
FLOOD_WINDOW = 1.0  # seconds; also how often a flood is checked for having ended


class FloodWatch:
    """One agent's output rate, and its place (nice, idle cgroup) while and after it floods."""

    def __init__(
        self, name: str, pid: Callable[[], int | None], alive: Callable[[], bool], idle: IdleCgroup | None
    ) -> None:
        self._name = name
        self._pid = pid  # the agent's process group (None before it starts)
        self._alive = alive
        self._idle = idle
        self._since = 0.0  # when the current FLOOD_WINDOW began (monotonic)
        self._chars = 0  # output within it
        self._checked = 0  # output since the last check of a flood (one per FLOOD_WINDOW)
        self._lowered = False  # nice 19 already
        self.flooding = False  # in the idle cgroup (or would be), until its output slows down
        self._moves = asyncio.Lock()  # the cgroup moves, in the order they were decided
        self._pending: set[asyncio.Task[None]] = set()

    def count(self, size: int) -> None:
        """`size` characters (or bytes) of the agent's output: for every text chunk, so cheap."""
        now = time.monotonic()
        if now - self._since > FLOOD_WINDOW:
            self._since, self._chars = now, 0
        self._chars += size
        self._checked += size
        if self._chars > FLOOD_CHARS and not self.flooding:
            self._start()

    def _start(self) -> None:
        pid = self._pid()
        if pid is None:
            return
        self.flooding = True
        if not self._lowered:
            self._lowered = True
            priority.lower(pid, MAX_NICE, self._alive)
            log.info("agent=%s pid=%s floods its output: lowest CPU priority now", self._name, pid)
        if self._idle is not None and self._idle.home is not None:  # (one it could not leave: nice alone)
            self._move(self._idle.adopt, pid)
            self._checked = 0
            asyncio.get_running_loop().call_later(FLOOD_WINDOW, self._check)

    def _check(self) -> None:
        """A window after the flood began (and each one after): still flooding, or out it goes."""
        pid = self._pid()
        if pid is None or not self._alive():
            return
        output, self._checked = self._checked, 0
        if output >= FLOOD_CHARS / 2:
            asyncio.get_running_loop().call_later(FLOOD_WINDOW, self._check)
            return
        self.flooding = False
        assert self._idle is not None
        self._move(self._idle.release, pid)
        log.debug("agent=%s pid=%s no longer floods: out of the idle cgroup", self._name, pid)

    def _move(self, move: Callable[[int, Callable[[], bool]], int], pid: int) -> None:
        async def moving() -> None:
            async with self._moves:
                await asyncio.to_thread(move, pid, self._alive)

        task = asyncio.get_running_loop().create_task(moving())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
