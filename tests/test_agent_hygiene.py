"""Agents that break the rules at the edges (issue 9, cases 8-10), against a real server:
an agent answering an ACP version we do not speak, client strings that would overflow the
trailers, and an agent's grandchild that left its process group with setsid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import acp
import grpc
import pytest
from sessiongate.server.errors import FieldViolation, InvalidArgument, SessionGateError
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import GateFactory, echo_agent, eventually, expect_error, rpc_error, wait_gone

TRAILER_LIMIT = 8 * 1024  # grpc's default soft limit on received metadata (the hard one is 16 KiB)

# ---- case 8: an agent that answers `initialize` with a protocol version we do not speak ----

WRONG_VERSION_AGENT = r"""
import json, os, sys
open(sys.argv[1], "w").write(str(os.getpid()))
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    if message["method"] == "initialize":
        result = {"protocolVersion": 999, "agentCapabilities": {}, "authMethods": []}
    elif message["method"] == "session/new":
        result = {"sessionId": "s-1"}
    else:
        result = {"stopReason": "end_turn"}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + "\n")
    sys.stdout.flush()
"""


class Reaper:
    """Processes a test started outside the agents' own records, SIGKILLed at its end if still
    alive, through pidfds: one opened while the process was known to be the test's, or (for a
    PID file rewritten since) one whose command line names that test's own PID file."""

    def __init__(self) -> None:
        self.pidfds: list[int] = []
        self.pid_files: list[Path] = []

    async def read_pid(self, path: Path) -> int:
        await eventually(lambda: path.exists() and path.read_text().strip() != "", what=f"{path} written")
        self.pid_files.append(path)
        pid = int(path.read_text())
        with contextlib.suppress(ProcessLookupError):  # already gone: nothing to clean up
            self.pidfds.append(os.pidfd_open(pid))
        return pid

    def reap(self) -> None:
        for path in self.pid_files:
            with contextlib.suppress(OSError, ValueError):
                pid = int(path.read_text())
                pidfd = os.pidfd_open(pid)  # first: the command line read next is then this one's
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        ours = str(path).encode() in handle.read()
                except OSError:
                    ours = False
                if ours:
                    self.pidfds.append(pidfd)
                else:
                    os.close(pidfd)
        for pidfd in self.pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    reaper = Reaper()
    yield reaper
    reaper.reap()


async def test_an_agent_speaking_another_protocol_version_is_refused_and_ended(
    make_gate: GateFactory, tmp_path: Path, reaper: Reaper
) -> None:
    script, pid_file = tmp_path / "wrong_version_agent.py", tmp_path / "wrong-version.pid"
    script.write_text(WRONG_VERSION_AGENT)
    config = AgentConfig(
        name="v999", command=sys.executable, args=(str(script), str(pid_file)), sandbox="none"
    )
    gate = await make_gate(agents={"v999": config})

    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="v999"), timeout=30))

    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_UNAVAILABLE")
    assert "protocol version 999" in error.message, error.message
    assert f"sessiongate speaks {acp.PROTOCOL_VERSION}" in error.message, error.message
    assert error.metadata["agent_protocol_version"] == "999"
    assert error.metadata["protocol_version"] == str(acp.PROTOCOL_VERSION)
    pid = await reaper.read_pid(pid_file)
    assert not await asyncio.to_thread(wait_gone, {pid}, 10), "the agent's process was not ended"
    # The server goes on serving, and other agents are unaffected.
    session = await gate.create()
    assert (await gate.prompt(session.session_id, "hi"))[-1].HasField("result")


# ---- case 9: client strings never push a status past the trailer limits ----------------------

HUGE = "k" * 100_000
BIG_ID = "s" * 6_000


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    """The status trailers' size as HPACK counts it (name + value + 32 per entry)."""
    trailers = list(error.trailing_metadata() or ())
    trailers.append(("grpc-message", error.details() or ""))
    total = 0
    for key, value in trailers:
        total += len(key) + 32 + (len(value) * 4 // 3 if isinstance(value, bytes) else len(value.encode()))
    return total


async def test_every_client_string_is_length_checked_and_never_echoed_unbounded(
    make_gate: GateFactory,
) -> None:
    gate = await make_gate()
    session = await gate.create()
    stub = gate.stub
    calls: dict[str, Any] = {
        "GetSession": lambda: stub.GetSession(pb.GetSessionRequest(session_id=BIG_ID)),
        "CancelPrompt": lambda: stub.CancelPrompt(pb.CancelPromptRequest(session_id=BIG_ID)),
        "CloseSession": lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=BIG_ID)),
        "Prompt": lambda: stub.Prompt(pb.PromptRequest(session_id=BIG_ID, text="x")),
        "Create labels": lambda: stub.CreateSession(
            pb.CreateSessionRequest(labels={f"{n}{HUGE}": HUGE for n in range(3)})
        ),
        "Create agent": lambda: stub.CreateSession(pb.CreateSessionRequest(agent=HUGE)),
        "Create cwd": lambda: stub.CreateSession(pb.CreateSessionRequest(cwd=HUGE)),
        "Create request_id": lambda: stub.CreateSession(pb.CreateSessionRequest(request_id=HUGE)),
        "List page_token": lambda: stub.ListSessions(pb.ListSessionsRequest(page_token=HUGE)),
        "List agent": lambda: stub.ListSessions(pb.ListSessionsRequest(agent=HUGE)),
        "List owner": lambda: stub.ListSessions(pb.ListSessionsRequest(owner=HUGE)),
        "List labels": lambda: stub.ListSessions(pb.ListSessionsRequest(labels={HUGE: HUGE})),
        "Prompt content": lambda: stub.Prompt(
            pb.PromptRequest(
                session_id=session.session_id,
                content=[pb.ContentBlock(resource_link=pb.ResourceLink(uri=HUGE[:50_000]))] * 3,
            )
        ),
    }
    for name, call in calls.items():
        error = await rpc_error(call())
        assert error is not None, f"{name}: an over-long string was accepted"
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
        assert len((error.details() or "").encode()) < 1000, name
        assert trailer_bytes(error) < TRAILER_LIMIT, (name, trailer_bytes(error))


def test_any_error_fits_the_trailers_whatever_went_into_it() -> None:
    """Bounded by construction: message, metadata, every violation and the quota all huge at
    once (no real error combines them all) still give trailers under grpc's 8 KiB."""
    text = "é" * 50_000  # non-ASCII: grpc-message percent-encodes it, three bytes per byte

    class Everything(SessionGateError):
        reason = "EVERYTHING"

    errors = [
        InvalidArgument([FieldViolation(f"labels[{text}{n}]", text) for n in range(50)]),
        Everything(
            text,
            metadata={f"key{n}": text for n in range(20)},
            violations=[FieldViolation(text, text) for _ in range(50)],
            quota=(text, text),
            retry_after=1.0,
        ),
    ]
    for error in errors:
        status = error.to_status()
        total = len("grpc-message") + 32 + 3 * len(status.details.encode())
        for key, value in status.trailing_metadata:
            total += len(key) + 32 + (len(value) * 4 // 3 + 4 if isinstance(value, bytes) else len(value))
        assert total < TRAILER_LIMIT, (type(error).__name__, total)
        assert error.violations[-1].field == "(more)"


# ---- case 10: a grandchild that left the agent's process group -------------------------------

# The agent's shell starts a grandchild that calls setsid (leaving the agent's session and
# process group) and records its own PID, then becomes the echo agent.
ESCAPER = (
    "import os, sys, time\n"
    "os.setsid()\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
    "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(300)\n"
)


def escaping_agent(state_dir: Path, pid_file: Path) -> AgentConfig:
    base = echo_agent("escaper", state_dir)
    shell = f'{sys.executable} -c "$1" "$2" & exec {sys.executable} -m sessiongate.echo'
    return replace(base, command="/bin/sh", args=("-c", shell, "sh", ESCAPER, str(pid_file)))


@pytest.mark.parametrize("how", ["close", "server stop", "agent crash"])
async def test_a_grandchild_that_left_the_process_group_is_ended(
    make_gate: GateFactory, tmp_path: Path, reaper: Reaper, how: str
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    gate = await make_gate(agents={"escaper": escaping_agent(tmp_path / "agent-state", pid_file)})
    session = await gate.create(agent="escaper")
    grandchild = await reaper.read_pid(pid_file)
    assert os.getpgid(grandchild) == grandchild  # it did leave the agent's group
    assert (await gate.prompt(session.session_id, "hi"))[-1].HasField("result")

    if how == "close":
        await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=30)
    elif how == "server stop":
        await gate.running.drain(0)
    else:
        # Its stderr is still open in the grandchild: the exit is seen all the same, at once.
        started = time.monotonic()
        error = await expect_error(
            gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/crash"))
        )
        assert (error.reason, error.metadata.get("exit_code")) == ("AGENT_EXITED", "3"), error
        assert time.monotonic() - started < 1.5, "the crash was seen only after the kill grace"

    left = await asyncio.to_thread(wait_gone, {grandchild}, 10)
    assert not left, f"the agent's setsid grandchild {grandchild} outlived the agent ({how})"
