"""One keeper of the server's background tasks (the pattern of the ACP SDK's TaskSupervisor).

Work that must not be cut in half by a client going away (a turn, a close, stopping an
agent, a create that others may join) runs in a task of its own, started here. Callers
await it through `asyncio.shield`, so their cancellation never reaches the work. Every task
is tracked until it ends, its failure is logged once (never "exception was never
retrieved"), and `shutdown` ends them all within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from sessiongate.server.errors import SessionGateError

log = logging.getLogger("sessiongate.supervisor")

T = TypeVar("T")


class Supervisor:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, whether or not anybody awaits the task
        if exc is not None and not isinstance(exc, SessionGateError):
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def shutdown(self, timeout: float) -> None:
        """Cancel every task still running, and those their cleanups start, for up to `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks and loop.time() < deadline:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        for task in self._tasks:
            log.error("background task %s did not end within %gs of shutdown", task.get_name(), timeout)


async def joined(task: asyncio.Task[T]) -> T:
    """Await `task` without letting the caller's cancellation cancel it."""
    return await asyncio.shield(task)
