"""Warm spares: started, initialized agents kept ready so CreateSession only opens a session."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, echo_agent, eventually, reply_text


def warm(tmp_path: Path, spares: int) -> dict[str, object]:
    return {"warm": replace(echo_agent("warm", tmp_path / "agent-state"), spares=spares)}


async def test_create_takes_a_ready_spare_and_a_replacement_starts(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate: Gate = await make_gate(agents=warm(tmp_path, 2))
    spares = gate.running.pool._spares
    assert spares is not None
    await eventually(lambda: spares.ready("warm") == 2, 20, "two ready spares")
    prestarted = gate.agent_pids()

    session = await gate.create(agent="warm")

    agent = gate.running.pool.get(session.session_id).agent
    assert agent is not None and agent.pid in prestarted, "the session must run on a pre-started agent"
    assert reply_text(await gate.prompt(session.session_id, "warm start")) == "warm start"
    await eventually(lambda: spares.ready("warm") == 2, 20, "the spare to be replaced")
    assert len(gate.agent_pids()) == 3


async def test_a_spare_that_dies_while_waiting_is_replaced(make_gate: GateFactory, tmp_path: Path) -> None:
    gate: Gate = await make_gate(agents=warm(tmp_path, 1))
    spares = gate.running.pool._spares
    assert spares is not None
    await eventually(lambda: spares.ready("warm") == 1, 20, "a ready spare")
    (first,) = gate.agent_pids()
    os.kill(first, signal.SIGKILL)
    await eventually(lambda: len(gate.agent_pids()) == 2 and spares.ready("warm") == 1, 20, "a replacement")
    session = await gate.create(agent="warm")
    agent = gate.running.pool.get(session.session_id).agent
    assert agent is not None and agent.pid != first


async def test_spares_take_no_session_slot(make_gate: GateFactory, tmp_path: Path) -> None:
    gate: Gate = await make_gate(agents=warm(tmp_path, 2), max_sessions=1)
    spares = gate.running.pool._spares
    assert spares is not None
    await eventually(lambda: spares.ready("warm") == 2, 20, "two ready spares")
    session = await gate.create(agent="warm")
    assert session.state == pb.SESSION_STATE_IDLE
    # The one slot is the session's; a second create suspends it rather than fail.
    await gate.create(agent="warm")
    assert await gate.state(session.session_id) == pb.SESSION_STATE_SUSPENDED
