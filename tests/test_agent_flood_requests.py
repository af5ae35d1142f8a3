"""An agent that asks without reading its answers (issue 20, item 9) cannot run the gateway out
of memory: its requests in flight and the bytes they hold are bounded (agent_transport.py),
and an agent over either bound is ended with AGENT_PROTOCOL_ERROR; its session then starts
a fresh agent on the next prompt, as after any agent exit.

The attacker is tests/misbehaving_agent.py (`/readflood N PATH`: it stops reading its stdin,
then asks for N reads of a 10 MiB file in its directory). The gateway runs in this process,
so its memory is this process's resident set, sampled on a thread of its own while the agent
floods. On the code before the bounds, 80 such reads took the gateway over a gigabyte; should
the bound be crossed here, the agent is killed at once so the test fails without going there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from sessiongate.server.agents.transport import MAX_HELD_BYTES, MAX_REQUESTS, READ_BUFFER, AgentTransport
from sessiongate.server.sandbox.files import MAX_READ_BYTES
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, expect_error, kill_leftovers, reply_text, wait_gone

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
GROWTH_BOUND = 300 * MIB  # the gateway's resident set may grow this much during a flood (old: > 1 GiB)
SAMPLE_EVERY = 0.01  # seconds between samples of the resident set
BIG = "big.txt"  # MAX_READ_BYTES: the largest file one fs/read_text_file serves
SMALL = "small.txt"


def flood_agent(pid_file: Path) -> AgentConfig:
    return AgentConfig(
        name="flood",
        command=sys.executable,
        args=("-m", "tests.misbehaving_agent"),
        env={"PYTHONPATH": str(ROOT), "MISBEHAVING_PID_FILE": str(pid_file)},
        sandbox="none",  # unconfined: the PIDs it records must be ours to check (and kill)
        client_fs=True,
    )


def agents_started(pid_file: Path) -> list[int]:
    if not pid_file.exists():
        return []
    return [int(line.split()[1]) for line in pid_file.read_text().splitlines() if line.startswith("agent ")]


@pytest.fixture(autouse=True)
def pid_file(tmp_path: Path) -> Iterator[Path]:
    """Autouse, so set up before make_gate and torn down after its servers drained (which ends
    their agents): what is left then was left behind. Waiting while a server still ran its
    agents cost 10 s a test."""
    path = tmp_path / "flood-pids"
    yield path
    kill_leftovers(wait_gone(set(agents_started(path)), 10))


async def flood_gate(make_gate: GateFactory, pid_file: Path) -> tuple[Gate, str]:
    """A server with the flooding agent, a session of it, and the files it reads."""
    gate = await make_gate(agents={"flood": flood_agent(pid_file)})
    (gate.workdir / BIG).write_bytes(b"0123456789abcdef" * (MAX_READ_BYTES // 16))
    (gate.workdir / SMALL).write_bytes(b"x" * 4096)
    session = await gate.create(agent="flood", cwd=str(gate.workdir))
    return gate, session.session_id


def resident() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def peak_growth(pid_file: Path) -> Iterator[list[int]]:
    """The most this process's resident set grew over its size at the start, sampled on a
    thread (the loop may be busy). Past GROWTH_BOUND the flooding agents are killed: the test
    fails on the figure instead of growing on."""
    base, peak, stop = resident(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_EVERY):
            peak[0] = max(peak[0], resident() - base)
            if peak[0] > GROWTH_BOUND:
                for pid in agents_started(pid_file):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join(5)


def prompt_call(gate: Gate, session_id: str, text: str) -> Any:
    return gate.stub.Prompt(pb.PromptRequest(session_id=session_id, text=text), timeout=30)


async def assert_recovers(gate: Gate, session_id: str, pid_file: Path, ended: int) -> None:
    """The ended agent is gone, and the next prompt runs on a new one."""
    assert not await asyncio.to_thread(wait_gone, {ended}, 10), "the flooding agent was left running"
    usable = (pb.SESSION_STATE_IDLE, pb.SESSION_STATE_SUSPENDED)
    deadline = time.monotonic() + 15
    while await gate.state(session_id) not in usable:
        assert time.monotonic() < deadline, "the session never became usable again"
        await asyncio.sleep(0.05)
    events = await gate.prompt(session_id, "back to normal")
    assert reply_text(events) == "back to normal"
    assert len(agents_started(pid_file)) == 2, "the next prompt did not start a new agent"


async def test_an_agent_flooding_reads_without_reading_answers_is_ended_and_memory_stays_bounded(
    make_gate: GateFactory, pid_file: Path
) -> None:
    gate, session_id = await flood_gate(make_gate, pid_file)
    (agent,) = agents_started(pid_file)

    with peak_growth(pid_file) as peak:
        error = await expect_error(prompt_call(gate, session_id, f"/readflood 80 {BIG}"))
        await asyncio.to_thread(wait_gone, {agent}, 10)

    assert peak[0] < GROWTH_BOUND, f"the gateway grew by {peak[0] // MIB} MiB"
    assert error.reason == "AGENT_PROTOCOL_ERROR", (error.code, error.reason, error.message)
    assert re.search(rf"over {MAX_REQUESTS} requests", error.message), error.message
    await assert_recovers(gate, session_id, pid_file, agent)


async def test_answers_piling_up_unread_within_the_request_bound_end_the_agent(
    make_gate: GateFactory, pid_file: Path
) -> None:
    """Fewer requests than the bound, but their 10 MiB answers pile up unread: the bytes bound."""
    gate, session_id = await flood_gate(make_gate, pid_file)
    (agent,) = agents_started(pid_file)

    with peak_growth(pid_file) as peak:
        error = await expect_error(prompt_call(gate, session_id, f"/readflood {MAX_REQUESTS - 2} {BIG}"))

    assert peak[0] < GROWTH_BOUND, f"the gateway grew by {peak[0] // MIB} MiB"
    assert error.reason == "AGENT_PROTOCOL_ERROR", (error.code, error.reason, error.message)
    assert "MiB" in error.message, error.message
    await assert_recovers(gate, session_id, pid_file, agent)


async def test_an_agent_reading_its_answers_gets_its_parallel_reads_up_to_the_bounds(
    make_gate: GateFactory, pid_file: Path
) -> None:
    """As many small reads at once as the request bound allows, and three of the largest file:
    all answered, the agent never ended."""
    gate, session_id = await flood_gate(make_gate, pid_file)

    events = await gate.prompt(session_id, f"/reads {MAX_REQUESTS} {SMALL}")
    assert reply_text(events) == f"read {MAX_REQUESTS} of {MAX_REQUESTS}: {MAX_REQUESTS * 4096} bytes"
    events = await gate.prompt(session_id, f"/reads 3 {BIG}")
    assert reply_text(events) == f"read 3 of 3: {3 * MAX_READ_BYTES} bytes"
    assert len(agents_started(pid_file)) == 1


# ---- the transport alone: the request lines' own bytes ----------------------------------------


class Sink:
    """The agent's stdin as the transport sees it: takes every write at once."""

    def __init__(self) -> None:
        self.written = 0

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    async def drain(self) -> None:
        pass


async def test_large_requests_unanswered_count_toward_the_bytes_bound_until_answered() -> None:
    """Large requests waiting for their answers (e.g. writes behind a slow disk) hold their
    lines: past MAX_HELD_BYTES the agent is ended, and each answer written frees its share."""
    reader = asyncio.StreamReader(limit=READ_BUFFER)
    broken: list[str] = []
    transport = AgentTransport(
        "t", reader, cast(asyncio.StreamWriter, Sink()), lambda why, _eof: broken.append(why), lambda *_: None
    )
    content = "x" * (MAX_HELD_BYTES // 3)

    def request(request_id: int) -> None:
        params = {"sessionId": "s", "path": "a.txt", "content": content}
        message = {"jsonrpc": "2.0", "id": request_id, "method": "fs/write_text_file", "params": params}
        reader.feed_data(json.dumps(message).encode() + b"\n")

    for request_id in (1, 2):
        request(request_id)
        assert (await transport.receive() or {}).get("id") == request_id
    await transport.send({"jsonrpc": "2.0", "id": 1, "result": {}})  # answered: its line is let go
    request(3)
    assert (await transport.receive() or {}).get("id") == 3, broken
    assert not broken
    request(4)  # with 2 and 3 unanswered: over the bound
    assert await transport.receive() is None
    assert broken and "MiB" in broken[0], broken
