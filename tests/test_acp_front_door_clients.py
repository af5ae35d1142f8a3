"""The ACP front door (issue 24) driven by ACP clients nobody on this project wrote: the ACP
TypeScript SDK's client, the Python ACP SDK's client and acpx, each starting
`sessiongate acp --target GATEWAY` as its agent command, against a real gateway started by the
test with the built-in agent (and Zed's example agent) behind it.

The clients and their scenarios are in tests/acp_clients.py.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.acp_clients import (
    ACPX,
    TS_CLIENT,
    TS_SDK,
    Acpx,
    front_door_command,
    methods_seen,
    reply_text,
    run_python_client,
    run_ts_client,
    stop_reason,
)
from tests.conftest import Gate, GateFactory, alive, eventually, require_installed
from tests.test_third_party_agents import ALLOWED_TEXT, EXAMPLE, TSX

Runner = Callable[..., Awaitable[list[dict[str, Any]]]]
ZED_AGENT = "zed-example"


def front_door(gate: Gate, *extra: str) -> list[str]:
    """`sessiongate acp` against `gate`, as an editor's agent command."""
    return front_door_command(gate.target, *extra)


def texts(step: dict[str, Any], kind: str) -> str:
    return "".join(update.get("text", "") for update in step["updates"] if update["kind"] == kind)


# ---- the TypeScript SDK's client and the Python SDK's ------------------------------------------


@pytest.fixture(params=["ts", "python"])
def client(request: pytest.FixtureRequest) -> Runner:
    """Each scenario runs with the TypeScript SDK's client and with the Python SDK's."""
    if request.param == "ts":
        require_installed(TS_SDK, "@agentclientprotocol/sdk (npm, tests/node)")
        require_installed(shutil.which("node"), "node")
        assert TS_CLIENT.exists()
        return run_ts_client
    return run_python_client


async def test_client_prompts_and_answers_permissions(client: Runner, gate: Gate, tmp_path: Path) -> None:
    cwd = str(gate.workdir)
    init, new, hello, allowed, rejected = await client(
        front_door(gate),
        [
            {"op": "initialize"},
            {"op": "new", "cwd": cwd, "as": "s"},
            {"op": "prompt", "session": "s", "text": "hello world"},
            {"op": "prompt", "text": "/permission", "permission": "allow_once"},
            {"op": "prompt", "text": "/permission", "permission": "reject_once"},
        ],
        workdir=tmp_path,
    )
    assert init["ok"], init
    capabilities = init["result"]["agentCapabilities"]
    assert capabilities["loadSession"] is True
    assert set(capabilities["sessionCapabilities"]) >= {"list", "resume", "close"}
    assert init["result"]["agentInfo"]["name"] == "sessiongate-acp"
    assert new["ok"], new
    session = await gate.stub.GetSession(pb.GetSessionRequest(session_id=new["sessionId"]), timeout=5)
    assert session.session_id == new["sessionId"]  # the session is the gateway's
    assert hello["stopReason"] == "end_turn"
    assert texts(hello, "agent_message_chunk") == "hello world"
    assert [u["kind"] for u in hello["updates"]][:4] == [
        "agent_thought_chunk",
        "tool_call",
        "tool_call_update",
        "plan",
    ]
    assert allowed["stopReason"] == "end_turn"
    assert [(p["toolCallId"], p["chosen"]) for p in allowed["permissions"]] == [("echo-edit", "allow_once")]
    assert texts(allowed, "agent_message_chunk") == "permission allow"
    assert [(p["toolCallId"], p["chosen"]) for p in rejected["permissions"]] == [("echo-edit", "reject_once")]
    assert texts(rejected, "agent_message_chunk") == "permission reject"
    assert [u.get("status") for u in rejected["updates"] if u["kind"] == "tool_call_update"] == ["failed"]


async def test_client_loads_an_earlier_session_with_its_history(
    client: Runner, gate: Gate, tmp_path: Path
) -> None:
    cwd = str(gate.workdir)
    _, new, first = await client(
        front_door(gate),
        [{"op": "initialize"}, {"op": "new", "cwd": cwd}, {"op": "prompt", "text": "first words"}],
        workdir=tmp_path,
    )
    assert first["stopReason"] == "end_turn", first
    # A second client process, a second front door: the session comes back from the gateway.
    _, loaded, history = await client(
        front_door(gate),
        [
            {"op": "initialize"},
            {"op": "load", "session": new["sessionId"], "cwd": cwd},
            {"op": "prompt", "text": "/history"},
        ],
        workdir=tmp_path,
    )
    assert loaded["ok"], loaded
    replayed = [u["kind"] for u in loaded["updates"]]
    # The prompt first, then the turn's events as the first client saw them, in order.
    assert replayed[0] == "user_message_chunk"
    assert texts(loaded, "user_message_chunk") == "first words"
    assert replayed[1:] == [u["kind"] for u in first["updates"]]
    assert replayed[-1] == "agent_message_chunk"
    assert texts(loaded, "agent_message_chunk") == "first words"
    assert history["stopReason"] == "end_turn"
    assert "first words" in texts(history, "agent_message_chunk")


async def test_client_cancels_and_closes(client: Runner, gate: Gate, tmp_path: Path) -> None:
    started = time.monotonic()
    _, new, cancelled, closed, after = await client(
        front_door(gate),
        [
            {"op": "initialize"},
            {"op": "new", "cwd": str(gate.workdir)},
            {"op": "prompt", "text": "/sleep 60", "cancelAfterMs": 1000},
            {"op": "close"},
            {"op": "prompt", "text": "too late"},
        ],
        workdir=tmp_path,
    )
    assert cancelled["stopReason"] == "cancelled", cancelled
    assert time.monotonic() - started < 30  # well before the agent's 60 s (a loaded machine is slow)
    assert any("cancel" in line for line in gate.events_log())
    assert closed["ok"] and closed["sessionId"] == new["sessionId"], closed
    assert not after["ok"], after
    assert after["error"]["code"] == -32002 and after["error"]["message"]
    assert after["error"]["data"]["code"] == "NOT_FOUND"
    assert after["error"]["data"]["reason"]


# ---- acpx --------------------------------------------------------------------------------------


@pytest.fixture
def acpx_home(tmp_path: Path) -> Path:
    require_installed(ACPX, "acpx (npm, tests/node)")
    require_installed(shutil.which("node"), "node")
    home = tmp_path / "home"
    home.mkdir()
    return home


async def owners_gone(acpx: Acpx) -> None:
    """Wait for the queue owner (and its front door) to end, so the next invocation starts afresh."""
    owners = acpx.queue_owner_pids()
    await eventually(
        lambda: not any(alive(pid) for pid in owners), timeout=20, what="acpx's queue owner exit"
    )


async def test_acpx_prompts_lists_and_a_second_invocation_resumes(gate: Gate, acpx_home: Path) -> None:
    acpx = Acpx(front_door(gate), cwd=gate.workdir, home=acpx_home)
    try:
        session_id = await acpx.new_session()
        first = await acpx.prompt("hello there")
        assert first.code == 0, first.stderr[-2000:]
        assert reply_text(first.stdout) == "hello there"
        assert stop_reason(first.stdout) == "end_turn"
        assert methods_seen(first.stdout)[:3] == ["initialize", "session/resume", "session/prompt"]
        # acpx asks the front door (session/list), which lists the gateway's sessions.
        source, listed = await acpx.sessions()
        assert source == "agent"
        assert [s["sessionId"] for s in listed] == [session_id]
        on_gateway = await gate.stub.ListSessions(pb.ListSessionsRequest(), timeout=5)
        assert [s.session_id for s in on_gateway.sessions] == [session_id]
        await owners_gone(acpx)
        second = await acpx.prompt("/history")
        assert second.code == 0, second.stderr[-2000:]
        assert "session/resume" in methods_seen(second.stdout)
        assert "hello there" in reply_text(second.stdout)
    finally:
        acpx.close()


async def test_acpx_approve_all_and_deny_all(gate: Gate, acpx_home: Path) -> None:
    acpx = Acpx(front_door(gate), cwd=gate.workdir, home=acpx_home)
    try:
        await acpx.new_session()
        for flag, reply in (("--approve-all", "permission allow"), ("--deny-all", "permission reject")):
            decided = await acpx.prompt("/permission", flag)
            assert decided.code == 0, decided.stderr[-2000:]
            assert "session/request_permission" in methods_seen(decided.stdout)
            assert reply_text(decided.stdout) == reply
    finally:
        acpx.close()


async def test_acpx_cancels_a_running_prompt(gate: Gate, acpx_home: Path) -> None:
    acpx = Acpx(front_door(gate), cwd=gate.workdir, home=acpx_home)
    try:
        await acpx.new_session()
        lines: list[str] = []
        running = asyncio.ensure_future(acpx.prompt("/sleep 60", lines=lines))
        # Cancelled before it reaches the agent, a queued prompt is dropped unsent: wait until
        # acpx has sent it.
        sent = lambda: any('"session/prompt"' in line for line in lines)  # noqa: E731
        await eventually(sent, timeout=15, what="the prompt sent")
        started = time.monotonic()
        assert await acpx.cancel()
        finished = await running
        assert stop_reason(finished.stdout) == "cancelled"
        assert "session/cancel" in methods_seen(finished.stdout)
        assert time.monotonic() - started < 30  # well before the agent's 60 s
        assert any("cancel" in line for line in gate.events_log())
    finally:
        acpx.close()


async def test_acpx_with_zeds_example_agent_behind_the_gateway(
    make_gate: GateFactory, acpx_home: Path
) -> None:
    tsx = require_installed(TSX, "tsx (npm, tests/node)")
    example = require_installed(
        EXAMPLE, "Zed's example agent (npm @zed-industries/agent-client-protocol, tests/node)"
    )
    config = AgentConfig(name=ZED_AGENT, command=tsx, args=(example,), sandbox="none")
    gate = await make_gate(agents={ZED_AGENT: config})
    acpx = Acpx(front_door(gate, "--agent", ZED_AGENT), cwd=gate.workdir, home=acpx_home)
    try:
        await acpx.new_session()
        approved = await acpx.prompt("change the config", "--approve-all")
        assert approved.code == 0, approved.stderr[-2000:]
        assert "session/request_permission" in methods_seen(approved.stdout)
        reply = reply_text(approved.stdout)
        assert reply.startswith("I'll help you with that.")
        assert ALLOWED_TEXT in reply
        assert stop_reason(approved.stdout) == "end_turn"
    finally:
        acpx.close()
