"""The bug class sessiongate exists to fix: one stuck agent must never stall other sessions."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, eventually, expect_error, reply_text


async def test_create_whose_agent_never_initializes_does_not_delay_other_sessions(
    make_gate: GateFactory,
) -> None:
    # The start timeout leaves room for three agent starts (about a second each here) meanwhile.
    gate: Gate = await make_gate(agents={"stuck": ("--init-delay", "3600")}, agent_start_timeout=8.0)
    started = time.monotonic()
    stuck = asyncio.create_task(expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="stuck"))))
    await eventually(lambda: len(gate.agent_pids()) == 1, what="the stuck agent's spawn")

    for n in range(3):
        t0 = time.monotonic()
        session = await gate.create()
        events = await gate.prompt(session.session_id, f"turn {n}", timeout=5)
        assert reply_text(events) == f"turn {n}"
        assert time.monotonic() - t0 < 3.0, "another session was slowed by the stuck start"
    assert not stuck.done(), "the stuck create should still be starting"

    error = await stuck
    took = time.monotonic() - started
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_UNAVAILABLE")
    assert "within 8s" in error.message
    assert 8.0 <= took < 11.0, f"the stuck create ended after {took:.2f}s"


async def test_map_lock_is_never_held_across_agent_start_up(make_gate: GateFactory) -> None:
    """Agent starts that never finish must not delay any pool operation of other sessions.

    If the pool held its map lock across spawn/initialize, every create, get, list and close
    below would queue behind starts that only end at the 15 s start timeout.
    """
    gate: Gate = await make_gate(agents={"slow": ("--init-delay", "3600")}, agent_start_timeout=15.0)
    existing = await gate.create()
    slow = [asyncio.create_task(gate.create(agent="slow")) for _ in range(3)]
    await eventually(lambda: len(gate.agent_pids()) == 4, what="the slow agents' spawn")

    async def worker(n: int) -> float:
        t0 = time.monotonic()
        session = await gate.create(labels={"worker": str(n)})
        await gate.stub.GetSession(pb.GetSessionRequest(session_id=existing.session_id), timeout=5)
        await gate.stub.ListSessions(pb.ListSessionsRequest(), timeout=5)
        events = await gate.prompt(session.session_id, "quick", timeout=5)
        assert reply_text(events) == "quick"
        await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=5)
        return time.monotonic() - t0

    durations = await asyncio.gather(*(worker(n) for n in range(4)))
    assert not any(task.done() for task in slow), "slow starts finished: the test proves nothing"
    # Generous: start-ups of 7 Python agents share 2 cores. A held lock would mean >= 15 s.
    assert max(durations) < 10.0, f"pool operations waited behind slow starts: {durations}"
    # Abandoning a start (client cancels) must not leave its agent behind: the fixture checks PIDs.
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    listed = await gate.stub.ListSessions(pb.ListSessionsRequest(agent="slow"), timeout=5)
    assert not listed.sessions


async def test_a_busy_session_never_blocks_get_list_or_cancel_of_itself_or_others(gate: Gate) -> None:
    busy = await gate.create()
    other = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=busy.session_id, text="/stall"), timeout=30)
    await asyncio.wait_for(call.read(), 10)

    t0 = time.monotonic()
    got = await gate.stub.GetSession(pb.GetSessionRequest(session_id=busy.session_id), timeout=2)
    listed = await gate.stub.ListSessions(pb.ListSessionsRequest(), timeout=2)
    assert reply_text(await gate.prompt(other.session_id, "free", timeout=5)) == "free"
    assert time.monotonic() - t0 < 2.0
    assert got.state == pb.SESSION_STATE_BUSY
    assert got.HasField("turn_start_time") and got.HasField("last_event_time")
    assert {s.session_id for s in listed.sessions} == {busy.session_id, other.session_id}
    assert (
        await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=busy.session_id), timeout=2)
    ).cancelled
    call.cancel()


async def test_flooding_agents_never_starve_the_server(gate: Gate) -> None:
    """Agents that produce faster than clients read are held back on their own pipes
    (backpressure), so the server keeps answering everyone else. Without it, a unary call
    behind four floods took up to 10 s."""
    quiet = await gate.create()
    floods = [await gate.create() for _ in range(4)]
    calls = [
        gate.stub.Prompt(pb.PromptRequest(session_id=s.session_id, text="/flood 100000000 64"), timeout=60)
        for s in floods
    ]
    for call in calls:
        await asyncio.wait_for(call.read(), 10)
    worst = 0.0
    for _ in range(10):
        t0 = time.monotonic()
        await gate.stub.GetSession(pb.GetSessionRequest(session_id=quiet.session_id), timeout=30)
        assert reply_text(await gate.prompt(quiet.session_id, "still served", timeout=30)) == "still served"
        worst = max(worst, time.monotonic() - t0)
    for call in calls:
        call.cancel()
    assert worst < 2.0, f"a get and a prompt took {worst:.2f}s beside four floods"


async def test_a_client_that_stops_reading_holds_back_its_agent_not_server_memory(gate: Gate) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=session.session_id, text="/flood 200000 64"), timeout=60
    )
    await asyncio.wait_for(call.read(), 10)  # then never read again
    turn = gate.running.pool.get(session.session_id).turn
    assert turn is not None

    def held_back() -> bool:
        """Paused, and nothing read from the agent for a second: the transport's windows are
        full (until then the handler still drains the buffer and reading resumes now and then)."""
        return turn.agent is not None and turn.agent.reading_paused and turn.since_last_event() > 1.0

    await eventually(held_back, 30, "the agent to be held back")
    # Without backpressure the whole flood would pile up here; with it, the queue stays near
    # the high-water mark (plus what was already read from the pipe when reading paused).
    assert turn.buffered() < 2000, f"{turn.buffered()} events queued for a client that stopped reading"
    call.cancel()
    await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)


async def test_a_slow_file_system_under_a_requested_cwd_never_stalls_the_server(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking a cwd touches the file system (resolve, stat): on a hung mount that can take
    seconds. It runs off the event loop, so every other call is answered meanwhile."""
    slow = gate.workdir / "slowfs"
    slow.mkdir()
    real_is_dir = Path.is_dir
    checking = threading.Event()

    def hanging_is_dir(path: Path) -> bool:
        if path.name == "slowfs":
            checking.set()
            time.sleep(3)  # a stat that hangs on an unresponsive mount
        return real_is_dir(path)

    monkeypatch.setattr(Path, "is_dir", hanging_is_dir)
    creating = asyncio.create_task(gate.create(cwd="slowfs"))
    await eventually(checking.is_set, 5, "the cwd check to begin")
    t0 = time.monotonic()
    agents = await gate.stub.ListAgents(pb.ListAgentsRequest(), timeout=5)
    answered_in = time.monotonic() - t0

    assert agents.default_agent == "echo"
    assert answered_in < 1.5, f"ListAgents waited {answered_in:.2f}s behind a cwd check"
    assert not creating.done()
    assert (await creating).cwd == str(slow)
