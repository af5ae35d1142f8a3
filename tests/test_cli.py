"""The `sessiongate` CLI as a user runs it: a subprocess against a real server."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path

from sessiongate.v1 import session_service_pb2 as pb

from client.render import CLEAR_LINE, DIM, LiveRenderer
from tests.conftest import Gate, eventually


async def cli(
    gate: Gate | None, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python -m client ARGS`; returns (exit code, stdout, stderr)."""
    target = ["--target", gate.target] if gate is not None else []
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client",
        *target,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_prompt_renders_the_turn_for_a_person(gate: Gate) -> None:
    code, out, err = await cli(gate, "prompt", "--label", "via=cli", "hello", "from", "the", "cli")
    assert code == 0, err
    assert err.startswith("session ")  # a session was created for the prompt
    lines = out.splitlines()
    assert lines[0] == "thinking: Reading the prompt and planning an echo."
    assert "… Reading the prompt [pending]" in lines and "✓ Reading the prompt [completed]" in lines
    assert "hello from the cli" in lines
    assert lines[-1] == "-- end_turn · 4 in / 4 out tokens"


async def test_prompt_json_prints_one_object_per_event(gate: Gate) -> None:
    session = await gate.create()
    code, out, _ = await cli(gate, "prompt", "--json", "--session", session.session_id, "json please")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["result"]["stop_reason"] == "STOP_REASON_END_TURN"


async def test_prompt_text_from_stdin_and_from_a_file(gate: Gate, tmp_path: Path) -> None:
    session = await gate.create()
    code, out, _ = await cli(gate, "prompt", "--session", session.session_id, stdin="from stdin\n")
    assert code == 0 and "from stdin" in out
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("from a file")
    code, out, _ = await cli(gate, "prompt", "--session", session.session_id, "--file", str(prompt_file))
    assert code == 0 and "from a file" in out


async def test_errors_print_status_reason_and_hint_and_set_the_exit_code(gate: Gate) -> None:
    code, _, err = await cli(gate, "prompt", "--session", "nope", "hi")
    assert code == 3
    assert "error: NOT_FOUND SESSION_NOT_FOUND" in err and "hint: see the sessions" in err

    session = await gate.create()
    turn = asyncio.create_task(gate.prompt(session.session_id, "/stall"))  # busy until cancelled
    await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)
    code, _, err = await cli(gate, "prompt", "--session", session.session_id, "again")
    assert code == 4
    assert "RESOURCE_EXHAUSTED SESSION_BUSY" in err and "--wait SECONDS" in err
    waiting = asyncio.create_task(
        cli(gate, "prompt", "--wait", "30", "--session", session.session_id, "waited")
    )
    live = gate.running.pool.get(session.session_id)
    await eventually(lambda: live.owner.waiting == 1, 30, "the CLI to wait for the session")
    await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id), timeout=5)
    code, out, _ = await waiting
    assert code == 0 and "waited" in out
    assert (await turn)[-1].result.stop_reason == pb.STOP_REASON_CANCELLED

    code, out, err = await cli(gate, "prompt", "--json", "--session", session.session_id, "")
    assert code == 2 and json.loads(out)["error"]["violations"]["text"]

    code, _, err = await cli(None, "health", env={"SESSIONGATE_TARGET": "127.0.0.1:1"})
    assert code == 6 and "is the server running at 127.0.0.1:1" in err


async def test_session_commands(gate: Gate) -> None:
    code, out, _ = await cli(gate, "create", "--label", "team=a")
    session_id = out.strip()
    assert code == 0 and len(session_id) >= 20

    code, out, _ = await cli(gate, "get", "--json", session_id)
    assert json.loads(out)["labels"] == {"team": "a"}
    code, out, _ = await cli(gate, "list", "--label", "team=a")
    assert session_id in out and "idle" in out
    code, out, _ = await cli(gate, "cancel", session_id)
    assert (code, out.strip()) == (0, "no turn was running")
    code, out, _ = await cli(gate, "agents")
    assert out.startswith("echo") and "(default)" in out
    code, out, _ = await cli(gate, "health")
    assert (code, out.strip()) == (0, "SERVING")
    code, out, _ = await cli(gate, "close", session_id)
    assert (code, out.strip()) == (0, f"closed {session_id}")
    code, _, _ = await cli(gate, "get", session_id)
    assert code == 3


async def test_the_target_comes_from_the_environment(gate: Gate) -> None:
    code, out, _ = await cli(None, "health", env={"SESSIONGATE_TARGET": gate.target})
    assert (code, out.strip()) == (0, "SERVING")


def test_on_a_terminal_tool_calls_update_in_place_and_thoughts_are_dimmed() -> None:
    out = io.StringIO()
    renderer = LiveRenderer(out, terminal=True)
    renderer.event(pb.PromptEvent(seq=1, thought_chunk=pb.ContentChunk(content=_text("thinking"))))
    renderer.event(
        pb.PromptEvent(
            seq=2, tool_call=pb.ToolCall(tool_call_id="t", title="Run", status=pb.TOOL_CALL_STATUS_PENDING)
        )
    )
    renderer.event(
        pb.PromptEvent(
            seq=3, tool_call_update=pb.ToolCallUpdate(tool_call_id="t", status=pb.TOOL_CALL_STATUS_COMPLETED)
        )
    )
    text = out.getvalue()
    assert f"{DIM}thinking" in text
    assert f"… Run [pending]{CLEAR_LINE}✓ Run [completed]" in text


def _text(value: str) -> pb.ContentBlock:
    return pb.ContentBlock(text=pb.TextContent(text=value))
