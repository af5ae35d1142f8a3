"""server/eager.py: a coroutine's first step in the caller's step, the rest in a task, with
create_task's outcome, cancellation and context."""

from __future__ import annotations

import asyncio
import contextvars

import pytest
from sessiongate.server.eager import start_eagerly

seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


async def test_the_first_step_runs_before_it_returns_and_the_rest_in_its_task() -> None:
    steps: list[str] = []
    go_on = asyncio.get_running_loop().create_future()

    async def work() -> str:
        steps.append("first")
        value = await go_on
        steps.append("rest")
        return f"done {value}"

    task = start_eagerly(work(), name="eager-test")
    assert steps == ["first"]  # nothing awaited yet
    assert task.get_name() == "eager-test" and not task.done()
    assert "work" in repr(task) and task.get_stack()  # the work's own name and frame, not a wrapper's
    go_on.set_result(1)
    assert await asyncio.wait_for(task, 5) == "done 1"
    assert steps == ["first", "rest"]


async def test_work_that_ends_or_fails_in_its_first_step_is_its_tasks_outcome() -> None:
    async def returns() -> int:
        return 7

    async def fails() -> int:
        raise ValueError("no")

    assert await asyncio.wait_for(start_eagerly(returns()), 5) == 7
    failing = start_eagerly(fails())
    with pytest.raises(ValueError, match="no"):
        await asyncio.wait_for(failing, 5)


async def test_a_failure_after_the_first_step_is_the_tasks() -> None:
    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    with pytest.raises(KeyError, match="later"):
        await asyncio.wait_for(start_eagerly(fails_later()), 5)


@pytest.mark.parametrize("when", ["before its task's first step", "after it"])
async def test_a_cancel_reaches_the_work_where_it_waits(when: str) -> None:
    waits = asyncio.get_running_loop().create_future()
    outcome: list[str] = []

    async def work() -> None:
        try:
            await waits
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        finally:
            outcome.append("cleaned up")

    task = start_eagerly(work())
    if when == "after it":
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.cancelled()
    assert outcome == ["cancelled", "cleaned up"]
    assert waits.cancelled()  # what the work waited on was cancelled with it, as create_task does


async def test_the_work_runs_in_a_copy_of_the_callers_context() -> None:
    seen.set("caller")

    async def work() -> str:
        before = seen.get()
        seen.set("work")
        await asyncio.sleep(0)
        return f"{before}/{seen.get()}"

    task = start_eagerly(work())
    assert seen.get() == "caller"  # the work's first step set it in its own copy
    assert await asyncio.wait_for(task, 5) == "caller/work"
