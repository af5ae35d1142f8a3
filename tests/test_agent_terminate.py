"""terminate() of a real agent that ignores SIGTERM and its stdin's end: the stop must hold when
the task doing it, or a caller waiting on it, is cancelled (a shutdown, a client gone)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sessiongate.server.agents.connection import AgentConnection
from sessiongate.server.eager import start_eagerly
from sessiongate.server.errors import AgentExited

from tests.conftest import alive, echo_agent, kill_leftovers, wait_gone

STUBBORN = ("--ignore-sigterm", "--ignore-stdin-eof")  # only SIGKILL ends it


async def started_stubborn(tmp_path: Path, kill_grace: float) -> AgentConnection:
    agent = AgentConnection(
        echo_agent("stubborn", tmp_path / "state", *STUBBORN), request_timeout=5, kill_grace=kill_grace
    )
    await agent.start(15)
    assert agent.pid is not None
    return agent


@pytest.fixture
async def stubborn(tmp_path: Path) -> AsyncIterator[AgentConnection]:
    agent = await started_stubborn(tmp_path, kill_grace=30)
    assert agent.pid is not None
    yield agent
    kill_leftovers({agent.pid})


async def test_a_terminate_whose_own_task_is_cancelled_still_kills_the_group(
    stubborn: AgentConnection,
) -> None:
    """Shutdown cancels every task, also the one terminating an agent, mid-way through its 30 s
    SIGTERM grace. Its cleanup must SIGKILL the group. The descendants sweep is left out, as
    for a sandboxed agent (its PID namespace ends the rest): the group's SIGKILL alone ends it."""
    stubborn.group._descendants = None
    pid = stubborn.pid
    assert pid is not None
    stopping = asyncio.create_task(stubborn.terminate())
    await asyncio.sleep(0.5)  # into the grace: SIGTERM sent and ignored
    assert stubborn.group._terminating is not None and alive(pid)

    stubborn.group._terminating.cancel()
    await asyncio.gather(stopping, return_exceptions=True)

    assert not await asyncio.to_thread(wait_gone, {pid}, 5), "the agent outlived its cancelled terminate"


async def test_a_caller_cancelled_while_waiting_on_terminate_does_not_cut_the_stop_short(
    tmp_path: Path,
) -> None:
    """A caller that goes away (a close whose client left) must not cancel the shared stop:
    a later caller still waits for the same stop, which ends the group after its grace."""
    agent = await started_stubborn(tmp_path, kill_grace=1)
    pid = agent.pid
    assert pid is not None
    try:
        first = asyncio.create_task(agent.terminate())
        await asyncio.sleep(0.2)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)

        assert agent.group._terminating is not None and not agent.group._terminating.cancelled()
        await asyncio.wait_for(agent.terminate(), 10)  # the same stop, not a CancelledError
        assert not await asyncio.to_thread(wait_gone, {pid}, 5)
    finally:
        kill_leftovers({pid})


async def test_a_prompt_on_a_broken_connection_waits_for_the_exit_in_its_own_task(tmp_path: Path) -> None:
    """A turn's prompt starts in its caller's step (eager.py). When the agent's input is already
    gone, the prompt's error path waits up to the kill grace for the agent to exit, bounded by
    `asyncio.timeout`: that bound belongs to the prompt's own task. Were it the caller's, the
    caller (a Prompt handler) would be cancelled when the grace ran out."""
    agent = await started_stubborn(tmp_path, kill_grace=1)
    pid = agent.pid
    assert pid is not None
    try:
        session_id = (await agent.new_session(str(tmp_path), 5)).session_id
        transport = agent._transport
        assert transport is not None
        transport._writer.close()  # its input is gone; the process runs on
        prompt = start_eagerly(agent.prompt(session_id, [{"type": "text", "text": "hi"}]))
        await asyncio.sleep(2.5)  # well past the 1 s grace: not cancelled by it
        with pytest.raises(AgentExited, match="exited during the turn"):
            await asyncio.wait_for(prompt, 10)
        await asyncio.wait_for(agent.terminate(force=True), 10)
    finally:
        kill_leftovers({pid})
