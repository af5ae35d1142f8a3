"""The third-party ACP client harness (tests/acp_clients.py) works, against the built-in agent.

Scaffolding for issue 24: the same helpers take any agent command, so these scenarios are
meant to be pointed at `sessiongate acp --target ...` once it exists. Each client here is
one nobody on this project wrote: the ACP TypeScript SDK's, the Python ACP SDK's, acpx.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acp_clients import (
    ACPX,
    TS_CLIENT,
    TS_SDK,
    Acpx,
    echo_agent_command,
    methods_seen,
    reply_text,
    run_python_client,
    run_ts_client,
    stop_reason,
)
from tests.conftest import alive, eventually, require_installed

Runner = Callable[..., Awaitable[list[dict[str, Any]]]]


@pytest.fixture(params=["ts", "python"])
def client(request: pytest.FixtureRequest) -> Runner:
    """Each scenario runs with the TypeScript SDK's client and with the Python SDK's."""
    if request.param == "ts":
        require_installed(TS_SDK, "@agentclientprotocol/sdk (npm, tests/node)")
        require_installed(shutil.which("node"), "node")
        assert TS_CLIENT.exists()
        return run_ts_client
    return run_python_client


def texts(step: dict[str, Any], kind: str) -> str:
    return "".join(update.get("text", "") for update in step["updates"] if update["kind"] == kind)


async def test_client_prompts_and_answers_permissions(client: Runner, tmp_path: Path) -> None:
    agent = echo_agent_command(tmp_path / "state")
    init, new, hello, allowed, rejected = await client(
        agent,
        [
            {"op": "initialize"},
            {"op": "new", "cwd": str(tmp_path), "as": "s"},
            {"op": "prompt", "session": "s", "text": "hello world"},
            {"op": "prompt", "text": "/permission", "permission": "allow_once"},
            {"op": "prompt", "text": "/permission", "permission": "reject_once"},
        ],
        workdir=tmp_path,
    )
    assert init["ok"] and init["result"]["agentCapabilities"]["loadSession"] is True
    assert new["ok"] and new["sessionId"].startswith("echo-")
    assert hello["stopReason"] == "end_turn"
    assert texts(hello, "agent_message_chunk") == "hello world"
    assert [u["kind"] for u in hello["updates"]][:4] == [
        "agent_thought_chunk",
        "tool_call",
        "tool_call_update",
        "plan",
    ]
    assert allowed["permissions"][0]["chosen"] == "allow_once"
    assert allowed["permissions"][0]["toolCallId"] == "echo-edit"
    assert texts(allowed, "agent_message_chunk") == "permission allow"
    assert rejected["permissions"][0]["chosen"] == "reject_once"
    assert texts(rejected, "agent_message_chunk") == "permission reject"
    assert [u.get("status") for u in rejected["updates"] if u["kind"] == "tool_call_update"] == ["failed"]


async def test_client_loads_an_earlier_session_with_its_history(client: Runner, tmp_path: Path) -> None:
    agent = echo_agent_command(tmp_path / "state")
    _, new, _ = await client(
        agent,
        [{"op": "initialize"}, {"op": "new", "cwd": str(tmp_path)}, {"op": "prompt", "text": "first words"}],
        workdir=tmp_path,
    )
    # A second client process, a fresh agent: the session comes back from the agent's state.
    _, loaded, history = await client(
        agent,
        [
            {"op": "initialize"},
            {"op": "load", "session": new["sessionId"], "cwd": str(tmp_path)},
            {"op": "prompt", "text": "/history"},
        ],
        workdir=tmp_path,
    )
    assert loaded["ok"], loaded
    assert [(u["kind"], u.get("text")) for u in loaded["updates"]] == [
        ("user_message_chunk", "first words"),
        ("agent_message_chunk", "first words"),
    ]
    assert "first words" in texts(history, "agent_message_chunk")


async def test_client_cancels_and_closes(client: Runner, tmp_path: Path) -> None:
    agent = echo_agent_command(tmp_path / "state")
    started = time.monotonic()
    _, _, cancelled, closed, after = await client(
        agent,
        [
            {"op": "initialize"},
            {"op": "new", "cwd": str(tmp_path)},
            {"op": "prompt", "text": "/sleep 5", "cancelAfterMs": 500},
            {"op": "close"},
            {"op": "prompt", "text": "too late"},
        ],
        workdir=tmp_path,
    )
    assert cancelled["stopReason"] == "cancelled"
    assert time.monotonic() - started < 5
    assert "cancel" in (tmp_path / "state" / "events.log").read_text()
    assert closed["ok"], closed
    assert not after["ok"]
    assert after["error"]["code"] == -32602 and after["error"]["message"]
    assert "unknown session" in str(after["error"]["data"])


# ---- acpx ----------------------------------------------------------------------------------------


@pytest.fixture
def acpx_home(tmp_path: Path) -> Iterator[Path]:
    require_installed(ACPX, "acpx (npm, tests/node)")
    require_installed(shutil.which("node"), "node")
    yield tmp_path / "home"


def make_acpx(tmp_path: Path, home: Path, *agent_args: str) -> Acpx:
    (tmp_path / "work").mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    return Acpx(echo_agent_command(tmp_path / "state", *agent_args), cwd=tmp_path / "work", home=home)


async def owners_gone(acpx: Acpx) -> None:
    """Wait for the queue owner (and its agent) to end, so the next invocation starts afresh."""
    owners = acpx.queue_owner_pids()
    await eventually(
        lambda: not any(alive(pid) for pid in owners), timeout=20, what="acpx's queue owner exit"
    )


@pytest.mark.parametrize(
    ("agent_args", "reattach"), [((), "session/resume"), (("--no-resume-session",), "session/load")]
)
async def test_acpx_prompts_lists_and_a_second_invocation_resumes(
    tmp_path: Path, acpx_home: Path, agent_args: tuple[str, ...], reattach: str
) -> None:
    acpx = make_acpx(tmp_path, acpx_home, *agent_args)
    try:
        session_id = await acpx.new_session()
        first = await acpx.prompt("hello there")
        assert first.code == 0, first.stderr[-2000:]
        assert reply_text(first.stdout) == "hello there"
        assert stop_reason(first.stdout) == "end_turn"
        assert methods_seen(first.stdout)[:3] == ["initialize", reattach, "session/prompt"]
        listed = await acpx.sessions()
        assert [s.get("acpSessionId", s.get("sessionId")) for s in listed] == [session_id]
        await owners_gone(acpx)
        second = await acpx.prompt("/history")
        assert second.code == 0, second.stderr[-2000:]
        assert reattach in methods_seen(second.stdout)
        assert "hello there" in reply_text(second.stdout)
    finally:
        acpx.close()


async def test_acpx_approve_all_and_deny_all(tmp_path: Path, acpx_home: Path) -> None:
    acpx = make_acpx(tmp_path, acpx_home)
    try:
        await acpx.new_session()
        approved = await acpx.prompt("/permission", "--approve-all")
        assert approved.code == 0, approved.stderr[-2000:]
        assert "session/request_permission" in methods_seen(approved.stdout)
        assert reply_text(approved.stdout) == "permission allow"
        denied = await acpx.prompt("/permission", "--deny-all")
        assert denied.code == 0, denied.stderr[-2000:]
        assert reply_text(denied.stdout) == "permission reject"
    finally:
        acpx.close()


async def test_acpx_cancels_a_running_prompt(tmp_path: Path, acpx_home: Path) -> None:
    acpx = make_acpx(tmp_path, acpx_home)
    try:
        await acpx.new_session()
        lines: list[str] = []
        running = asyncio.ensure_future(acpx.prompt("/sleep 5", lines=lines))
        # Cancelled before it reaches the agent, a queued prompt is dropped unsent: wait until
        # acpx has sent it.
        sent = lambda: any('"session/prompt"' in line for line in lines)  # noqa: E731
        await eventually(sent, timeout=15, what="the prompt sent")
        started = time.monotonic()
        assert await acpx.cancel()
        finished = await running
        assert stop_reason(finished.stdout) == "cancelled"
        assert "session/cancel" in methods_seen(finished.stdout)
        assert time.monotonic() - started < 5
    finally:
        acpx.close()
