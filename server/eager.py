"""Starting a coroutine eagerly: its first step now, in the caller's step; the rest in a task.

Python 3.12's eager tasks do this; 3.11 has none. A task made with `create_task` first runs
one loop pass later, after whatever else is ready, so work that should leave at once (a turn's
prompt to its agent) waits for a pass of the loop. Started eagerly, the prompt is written
before the caller goes on.

Only for coroutines whose first step does not ask for its task: the first step runs as the
caller's task (`asyncio.current_task()`), so `asyncio.timeout` there would bound the caller.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start_eagerly(work: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """Run `work` up to its first suspension now; a task drives the rest (or holds its outcome).

    As with `create_task`, the work runs in a copy of the caller's context, and its outcome,
    a cancel included, is the task's: a cancel reaches the work wherever it waits, even before
    the task's first step.
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(work.send, None)
    except StopIteration as done:
        return loop.create_task(_returned(done.value), name=name, context=context)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # CancelledError included: the task ends the same way
        return loop.create_task(_raised(exc), name=name, context=context)
    return loop.create_task(_Continued(work, waiting_on), name=name, context=context)


async def _returned(value: T) -> T:
    return value


async def _raised(error: BaseException) -> Any:
    raise error


_HANDED_ON = object()


class _Continued(Coroutine[Any, Any, T]):
    """`work` after its first step, for a task to drive: the task's first `send` gets what the
    work waits on; from then on, and for anything thrown (a cancel), it is the work itself."""

    def __init__(self, work: Coroutine[Any, Any, T], waiting_on: Any) -> None:
        self._work = work
        self._waiting_on = waiting_on

    def send(self, value: Any) -> Any:
        waiting_on = self._waiting_on
        if waiting_on is not _HANDED_ON:
            self._waiting_on = _HANDED_ON
            return waiting_on
        return self._work.send(value)

    def throw(self, error: Any, *_: Any) -> Any:
        waiting_on, self._waiting_on = self._waiting_on, _HANDED_ON
        if isinstance(error, asyncio.CancelledError) and asyncio.isfuture(waiting_on):
            waiting_on.cancel()  # a task cancelled before its first step: as a task's cancel does
        return self._work.throw(error)

    def close(self) -> None:
        self._work.close()

    def __getattr__(self, name: str) -> Any:
        """The work's own attributes (`cr_frame`, `__qualname__`...): a task's repr and
        `get_stack()` show the work, not this wrapper."""
        return getattr(self._work, name)

    def __await__(self) -> Generator[Any, Any, T]:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                waiting_on = self.throw(error) if error is not None else self.send(value)
            except StopIteration as done:
                return done.value
            try:
                value, error = (yield waiting_on), None
            except BaseException as exc:
                value, error = None, exc
