"""The `sessiongate` CLI as a user runs it: a subprocess against a real server."""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import os
import pty
import select
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import sessiongate.client.cli as cli_module
from sessiongate.client.render import BOLD, CLEAR_LINE, DIM, RESET, LiveRenderer
from sessiongate.client.terminal import TerminalAsker
from sessiongate.server.errors import ShuttingDown
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import Gate, GateFactory, eventually


async def cli(
    gate: Gate | None, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python -m sessiongate.client ARGS`; returns (exit code, stdout, stderr)."""
    target = ["--target", gate.target] if gate is not None else []
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sessiongate.client",
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
    await eventually(lambda: live.lock.waiting == 1, 30, "the CLI to wait for the session")
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


def on_a_terminal(
    gate: Gate, *args: str, answers: list[tuple[str, str]], timeout: float = 90
) -> tuple[int, str]:
    """Run `python -m sessiongate.client ARGS` on a pseudo-terminal (stdin, stdout and stderr), typing
    each answer once its question's text has appeared since the previous answer. Blocking:
    call it in a thread (the server runs on the test's event loop). Returns (exit code,
    everything the terminal showed, with \\r\\n as \\n)."""
    controller, child_end = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "sessiongate.client", "--target", gate.target, *args],
        stdin=child_end,
        stdout=child_end,
        stderr=child_end,
        close_fds=True,
        start_new_session=True,  # its own session: no signal of the test run's terminal reaches it
    )
    os.close(child_end)
    shown, answered_at, pending = b"", 0, list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: every process holding the terminal closed it
                break
            if not data:
                break
            shown += data
            if pending and pending[0][0].encode() in shown[answered_at:]:
                os.write(controller, pending.pop(0)[1].encode() + b"\n")
                answered_at = len(shown)
        else:
            raise AssertionError(f"the CLI did not finish within {timeout:g}s; it showed: {shown!r}")
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    assert not pending, f"never asked {pending[0][0]!r}; the terminal showed: {shown!r}"
    return code, shown.decode(errors="replace").replace("\r\n", "\n")


# ---- permissions and questions ------------------------------------------------------------


async def test_prompt_policy_flags_decide_permission_requests(gate: Gate) -> None:
    session = await gate.create()
    sid = session.session_id
    code, out, err = await cli(gate, "prompt", "--deny-all", "--session", sid, "/permission")
    assert code == 0, err
    assert "permission reject" in out.splitlines()
    assert "permission: Editing notes.txt -> rejected (deny-all)" in out
    code, out, err = await cli(gate, "prompt", "--session", sid, "--approve-all", "/permission")
    assert code == 0 and "permission allow" in out.splitlines(), err
    code, _, err = await cli(gate, "prompt", "--approve-all", "--deny-all", "--session", sid, "/permission")
    assert code == 2 and "not allowed with argument" in err


async def test_ask_off_a_terminal_fails_clearly_unless_a_flag_decides(make_gate: GateFactory) -> None:
    gate = await make_gate(agents={"asker": ("policy", "ask")})
    session = await gate.create()
    code, out, err = await cli(gate, "prompt", "--ask", "--session", session.session_id, "/permission")
    assert code == 2 and out == ""
    assert "not a terminal" in err and "--approve-all, --approve-reads or --deny-all" in err
    code, out, _ = await cli(gate, "--json", "prompt", "--ask", "--session", session.session_id, "hi")
    assert code == 2 and json.loads(out)["error"]["code"] == "INVALID_ARGUMENT"

    # The agent's own policy is `ask`: the same, for an existing session and for a new one.
    asked = await gate.create(agent="asker")
    code, _, err = await cli(gate, "prompt", "--session", asked.session_id, "/permission")
    assert code == 2 and "--approve-all, --approve-reads or --deny-all" in err
    code, _, err = await cli(gate, "prompt", "--agent", "asker", "/permission")
    assert code == 2 and "session " not in err
    listed = await gate.stub.ListSessions(pb.ListSessionsRequest(), timeout=5)
    assert len(listed.sessions) == 2, "no session is created for a turn that cannot run"
    code, out, err = await cli(gate, "prompt", "--approve-all", "--session", asked.session_id, "/permission")
    assert code == 0 and "permission allow" in out.splitlines(), err
    # A policy that never asks needs no terminal.
    code, out, err = await cli(gate, "prompt", "--session", session.session_id, "/permission")
    assert code == 0 and "permission reject" in out.splitlines(), err


async def test_on_a_terminal_the_cli_asks_and_answers(gate: Gate) -> None:
    session = await gate.create()
    code, shown = await asyncio.to_thread(
        on_a_terminal,
        gate,
        "prompt",
        "--ask",
        "--session",
        session.session_id,
        "/permission",
        answers=[("choose 1-2", "1")],
    )
    assert code == 0, shown
    assert "? permission requested: Editing notes.txt [edit]" in shown
    assert "1) Allow once (allow_once)" in shown and "2) Reject (reject_once)" in shown
    assert "permission allow" in shown
    assert "-> allowed (client)" in shown


async def test_on_a_terminal_the_cli_asks_for_an_elicitation_s_fields(gate: Gate) -> None:
    session = await gate.create()
    code, shown = await asyncio.to_thread(
        on_a_terminal,
        gate,
        "prompt",
        "--ask",
        "--session",
        session.session_id,
        "/elicit",
        answers=[("answer? [y]es", "y"), ("name", "Ada")],
    )
    assert code == 0, shown
    assert "? input requested:" in shown
    assert 'elicitation accept {"name": "Ada"}' in shown
    code, shown = await asyncio.to_thread(
        on_a_terminal,
        gate,
        "--json",
        "prompt",
        "--ask",
        "--session",
        session.session_id,
        "/elicit",
        answers=[("answer? [y]es", "n")],
    )
    assert code == 0, shown
    assert "elicitation decline" in shown and "ELICITATION_ACTION_DECLINE" in shown


def test_the_terminal_asker_reads_choices_and_typed_values() -> None:
    out = io.StringIO()
    asker = TerminalAsker(io.StringIO("3\nreject\n"), out, show_question=True)
    request = pb.PermissionRequest(
        request_id="r",
        tool_call=pb.ToolCallUpdate(tool_call_id="t", title="Run tests", kind="execute"),
        options=[
            pb.PermissionOption(option_id="allow", name="Allow", kind="allow_once"),
            pb.PermissionOption(option_id="reject", name="Reject", kind="reject_once"),
        ],
    )
    assert asker.permission(request) == "reject"  # "3" is out of range: asked again
    assert "? permission requested: Run tests [execute]" in out.getvalue()
    assert "answer with a number from 1 to 2" in out.getvalue()
    assert TerminalAsker(io.StringIO(""), io.StringIO()).permission(request) == "reject", "EOF rejects"

    elicitation = pb.ElicitationRequest(request_id="e", message="Your details", mode="form")
    elicitation.requested_schema.update(
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "tea": {"type": "boolean"},
                "size": {"type": "string", "enum": ["s", "m", "l"]},
                "note": {"type": "string"},
            },
            "required": ["name", "age"],
        }
    )
    # Required first (name, age), then the rest by name (note, size, tea).
    typed = TerminalAsker(io.StringIO("y\nAda\nforty\n40\n\n2\nyes\n"), io.StringIO())
    assert typed.elicitation(elicitation) == {"name": "Ada", "age": 40, "tea": True, "size": "m"}
    assert TerminalAsker(io.StringIO("n\n"), io.StringIO()).elicitation(elicitation) == "decline"
    assert TerminalAsker(io.StringIO("y\n"), io.StringIO()).elicitation(elicitation) == "cancel", "EOF"


def test_agent_strings_reach_the_terminal_without_control_characters() -> None:
    """Titles, option names, messages and schema texts are the agent's: an escape sequence or
    carriage return in one must not redraw the question (fake options, hide the real ones)."""
    nasty = "\x1b[2J\x1b[H\r\n\x07\x00\x7f\x9b1A"
    request = pb.PermissionRequest(
        request_id="r",
        tool_call=pb.ToolCallUpdate(
            tool_call_id="t",
            title=f"Run {nasty}",
            kind=f"execute{nasty}",
            locations=[pb.ToolCallLocation(path=f"/w/{nasty}")],
        ),
        options=[
            pb.PermissionOption(option_id="allow", name=f"Allow {nasty}", kind=f"allow_once{nasty}"),
            pb.PermissionOption(option_id=f"reject{nasty}", kind="reject_once"),
        ],
    )
    elicitation = pb.ElicitationRequest(request_id="e", message=f"Details {nasty}", mode="form")
    elicitation.requested_schema.update(
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "title": f"Name {nasty}", "description": f"who {nasty}"},
                "size": {"type": "string", "enum": ["s", f"m{nasty}"], "enumNames": ["S", f"M {nasty}"]},
                "tea": {"type": "string", "oneOf": [{"const": "y", "title": f"Yes {nasty}"}]},
            },
        }
    )
    url = pb.ElicitationRequest(
        request_id="u", message=f"Sign in {nasty}", mode="url", url=f"https://x/{nasty}"
    )
    out = io.StringIO()
    asker = TerminalAsker(io.StringIO("9\n1\ny\nAda\n1\n1\ny\n"), out, show_question=True)
    assert asker.permission(request) == "allow"
    assert asker.elicitation(elicitation) == {"name": "Ada", "size": "s", "tea": "y"}
    assert asker.elicitation(url) == "accept"
    eof = io.StringIO()
    assert TerminalAsker(io.StringIO(""), eof).permission(request) == f"reject{nasty}"  # its id says so
    shown = out.getvalue() + eof.getvalue()
    safe = "?[2J?[H??????1A"  # each control character one "?"
    for seen in ("Run ", "[execute", "/w/", "Allow ", "allow_once", "reject", "Details ", "Name ", "who "):
        assert seen + safe in shown, seen
    for seen in ("M ", "Yes ", "Sign in ", "https://x/"):
        assert seen + safe in shown, seen
    lines = [line for line in shown.split("\n") if line]
    assert not any(c in line for line in lines for c in "\x1b\r\x07\x00\x7f\x9b")

    rendered = io.StringIO()
    renderer = LiveRenderer(rendered, terminal=True)
    for seq, event in enumerate(
        [
            pb.PromptEvent(tool_call=pb.ToolCall(tool_call_id="t", title=f"Edit {nasty}")),
            pb.PromptEvent(permission_request=request),
            pb.PromptEvent(elicitation_request=elicitation),
            pb.PromptEvent(elicitation_request=url),
            pb.PromptEvent(notice=pb.Notice(kind="k", message=f"note {nasty}")),
            pb.PromptEvent(session_info=pb.SessionInfo(title=f"Title {nasty}")),
            pb.PromptEvent(mode_update=pb.ModeUpdate(current_mode_id=f"code{nasty}")),
        ],
        1,
    ):
        event.seq = seq
        renderer.event(event)
    ours = {DIM, BOLD, RESET}  # the renderer's own styling is the only escape left
    text = rendered.getvalue()
    for code in ours:
        text = text.replace(code, "")
    assert "\x1b" not in text and "\r" not in text and "\x9b" not in text
    assert text.count("\n") == 7  # one line each: no newline of the agent's got through


# ---- shared options, modes and config -----------------------------------------------------


async def test_shared_options_go_before_or_after_the_command(gate: Gate) -> None:
    session = await gate.create(labels={"where": "json"})
    for args in (("--json", "list"), ("list", "--json"), ("--json", "list", "--label", "where=json")):
        code, out, err = await cli(gate, *args)
        assert code == 0, err
        assert [json.loads(line)["session_id"] for line in out.splitlines()] == [session.session_id]
    code, out, _ = await cli(gate, "--json", "get", session.session_id)
    assert json.loads(out)["session_id"] == session.session_id
    code, out, _ = await cli(None, "health", "--json", "--target", gate.target)
    assert (code, json.loads(out)) == (0, {"status": "SERVING"})
    code, out, _ = await cli(None, "--target", gate.target, "health")
    assert (code, out.strip()) == (0, "SERVING")
    code, out, _ = await cli(gate, "--json", "prompt", "--session", session.session_id, "json first")
    assert code == 0 and json.loads(out.splitlines()[-1])["result"]["stop_reason"] == "STOP_REASON_END_TURN"


async def test_mode_config_and_get_show_and_change_the_session_state(gate: Gate) -> None:
    session = await gate.create()
    sid = session.session_id
    code, out, err = await cli(gate, "get", sid)
    assert code == 0, err
    lines = out.splitlines()
    assert "modes" in lines and "config options" in lines
    assert any(line.startswith("  * code") for line in lines), out  # the current mode is marked
    assert any(line.startswith("    ask") for line in lines), out
    model = next(line for line in lines if line.strip().startswith("model "))
    assert model.split()[1] == "echo-small" and "[echo-small, echo-large]" in model

    code, out, err = await cli(gate, "mode", sid, "ask")
    assert (code, out.strip()) == (0, "mode ask"), err
    code, out, err = await cli(gate, "config", sid, "model", "echo-large")
    assert (code, out.strip()) == (0, "model = echo-large"), err
    code, out, err = await cli(gate, "config", sid, "verbose", "true")
    assert (code, out.strip()) == (0, "verbose = true"), err
    code, out, _ = await cli(gate, "prompt", "--session", sid, "/title", "Fix the flaky test")
    assert code == 0 and "title: Fix the flaky test" in out.splitlines()
    code, out, _ = await cli(gate, "prompt", "--session", sid, "/usage", "1200", "200000")
    assert code == 0 and "usage: context 1200/200000 tokens · cost 0.01 USD" in out.splitlines()
    code, out, _ = await cli(gate, "prompt", "--session", sid, "/commands")
    assert code == 0 and any(line.startswith("commands: /") for line in out.splitlines()), out
    code, out, _ = await cli(gate, "get", sid)
    lines = out.splitlines()
    assert "commands" in lines and any(line.split()[:1] == ["/state"] for line in lines), out
    assert any(line.startswith("  * ask") for line in lines), out
    assert next(line for line in lines if line.strip().startswith("model ")).split()[1] == "echo-large"
    assert any(line.split() == ["title", "Fix", "the", "flaky", "test"] for line in lines), out
    assert any(line.startswith("usage") and "1200/200000" in line for line in lines), out
    code, out, _ = await cli(gate, "prompt", "--session", sid, "/state")
    assert "mode=ask model=echo-large verbose=true" in out.splitlines()
    # A title with a terminal escape (from the agent) is shown with it neutralised.
    await gate.prompt(sid, "/title \x1b[2Jgotcha")
    code, out, _ = await cli(gate, "get", sid)
    assert code == 0 and "\x1b" not in out and "?[2Jgotcha" in out, out

    code, out, _ = await cli(gate, "--json", "mode", sid, "code")
    assert code == 0 and json.loads(out)["modes"]["current_mode_id"] == "code"
    code, _, err = await cli(gate, "mode", sid, "no-such-mode")
    assert code == 2 and "INVALID_ARGUMENT" in err
    code, _, err = await cli(gate, "config", sid, "model", "echo-huge")
    assert code == 2 and "INVALID_ARGUMENT" in err
    code, _, err = await cli(gate, "mode", "no-such-session", "code")
    assert code == 3


async def test_auth_logs_an_agent_in(make_gate: GateFactory) -> None:
    gate = await make_gate(agents={"locked": ("--auth-required",)})
    code, _, err = await cli(gate, "create", "--agent", "locked")
    assert code == 7 and "sessiongate auth AGENT METHOD" in err
    code, _, err = await cli(gate, "auth", "locked", "no-such-method")
    assert code == 7 and "NOT_SUPPORTED" in err and "hint:" in err
    code, out, err = await cli(gate, "auth", "locked", "echo-login")
    assert code == 0 and out.startswith("agent locked authenticated with echo-login"), err
    code, out, err = await cli(gate, "create", "--agent", "locked")
    assert code == 0, err
    code, out, _ = await cli(gate, "agents")
    assert "(auth: echo-login)" in next(line for line in out.splitlines() if line.startswith("locked"))


def test_new_events_render_readably() -> None:
    out = io.StringIO()
    renderer = LiveRenderer(out, terminal=False)
    request = pb.PermissionRequest(
        request_id="r1",
        tool_call=pb.ToolCallUpdate(tool_call_id="t", title="Editing notes.txt", kind="edit"),
        options=[pb.PermissionOption(option_id="allow", name="Allow once", kind="allow_once")],
    )
    config = pb.ConfigOption(id="model", current_value="echo-large")
    usage = pb.SessionUsage(context_used=1200, context_size=200000, cost_amount=0.5, cost_currency="USD")
    for seq, event in enumerate(
        [
            pb.PromptEvent(permission_request=request),
            pb.PromptEvent(elicitation_request=pb.ElicitationRequest(request_id="e", message="Your name?")),
            pb.PromptEvent(
                elicitation=pb.ElicitationEvent(
                    request_id="e", action=pb.ELICITATION_ACTION_DECLINE, policy="timeout"
                )
            ),
            pb.PromptEvent(mode_update=pb.ModeUpdate(current_mode_id="code")),
            pb.PromptEvent(config_update=pb.ConfigUpdate(config_options=[config])),
            pb.PromptEvent(
                commands_update=pb.CommandsUpdate(available_commands=[pb.AvailableCommand(name="state")])
            ),
            pb.PromptEvent(session_info=pb.SessionInfo(title="Fix the flaky test")),
            pb.PromptEvent(usage_update=usage),
            pb.PromptEvent(file_write=pb.FileWrite(path="/w/notes.txt", bytes=4, created=True)),
            pb.PromptEvent(terminal_output=pb.TerminalOutput(terminal_id="term", output="ok\n")),
            pb.PromptEvent(terminal_output=pb.TerminalOutput(terminal_id="term", exited=True, exit_code=0)),
        ],
        1,
    ):
        event.seq = seq
        renderer.event(event)
    assert out.getvalue().splitlines() == [
        "? permission requested: Editing notes.txt [edit] · Allow once",
        "? input requested: Your name?",
        "input: declined (timeout)",
        "mode: code",
        "config: model=echo-large",
        "commands: /state",
        "title: Fix the flaky test",
        "usage: context 1200/200000 tokens · cost 0.5 USD",
        "wrote /w/notes.txt (4 bytes, new file)",
        "ok",
        "[terminal term exited, code 0]",
    ]


def _text(value: str) -> pb.ContentBlock:
    return pb.ContentBlock(text=pb.TextContent(text=value))


async def cli_in(directory: Path, gate: Gate, *args: str) -> tuple[int, str, str]:
    """`cli`, run from `directory` (the CLI's own current directory)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sessiongate.client",
        "--target",
        gate.target,
        *args,
        cwd=directory,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_relative_cwd_is_taken_from_where_the_cli_runs(gate: Gate) -> None:
    sub = gate.workdir / "project" / "src"
    sub.mkdir(parents=True)
    code, out, err = await cli_in(sub, gate, "create", "--json", "--cwd", ".")
    assert code == 0, err
    assert json.loads(out)["cwd"] == str(sub.resolve())  # not the server's own directory
    code, out, err = await cli_in(sub.parent, gate, "create", "--json", "--cwd", "src")
    assert code == 0, err
    assert json.loads(out)["cwd"] == str(sub.resolve())


async def test_a_missing_cwd_is_said_not_to_exist_once(gate: Gate) -> None:
    missing = gate.workdir / "no-such-dir"
    code, _, err = await cli(gate, "create", "--cwd", str(missing))
    assert code == 2
    assert f"cwd: '{missing}' does not exist" in err
    assert err.count("does not exist") == 1, err  # the violation is printed once, not twice
    assert "error: INVALID_ARGUMENT: invalid request\n" in err
    # Outside the roots the server keeps its roots message (existence there is not the caller's
    # to learn), printed once; this machine says what it knows.
    code, _, err = await cli(gate, "create", "--cwd", "/no-such-dir-sessiongate")
    assert code == 2
    assert err.count("outside the allowed roots") == 1, err
    assert "hint: /no-such-dir-sessiongate does not exist on this machine" in err
    (gate.workdir / "a-file").write_text("")
    code, _, err = await cli(gate, "create", "--cwd", str(gate.workdir / "a-file"))
    assert code == 2 and "is not a directory" in err


async def test_list_and_history_print_no_header_before_failing(gate: Gate) -> None:
    env = {"SESSIONGATE_TARGET": "127.0.0.1:1"}
    code, out, err = await cli(None, "list", env=env)
    assert (code, out) == (6, "") and "is the server running" in err
    code, out, err = await cli(None, "history", "some-session", env=env)
    assert (code, out) == (6, "") and "is the server running" in err
    code, out, _ = await cli(gate, "list")  # with no sessions: the header alone
    assert code == 0 and out.startswith("SESSION")


async def test_a_wrong_flag_of_a_command_prints_that_command_s_usage() -> None:
    code, out, err = await cli(None, "create", "--bogus")
    assert (code, out) == (2, "")
    assert err.startswith("usage: sessiongate create"), err
    assert "unrecognized arguments: --bogus" in err


async def test_mtls_without_a_client_certificate_says_so(make_gate: GateFactory, tmp_path: Path) -> None:
    from tests.pki import Pki

    pki = Pki.make(tmp_path, "one")
    cert, key = pki.issue("server", ip="127.0.0.1")
    gate: Gate = await make_gate(
        settings={"tls_cert": cert, "tls_key": key, "tls_client_ca": pki.path("ca.pem")}
    )
    code, out, err = await cli(gate, "--tls-ca", str(pki.path("ca.pem")), "agents")
    assert (code, out) == (6, "")
    assert "is the server running" not in err, err
    assert "it asks for a client certificate (mTLS)? pass --tls-cert and --tls-key" in err, err


async def test_version_names_the_installed_distribution(monkeypatch: Any) -> None:
    code, out, _ = await cli(None, "--version")
    assert (code, out) == (0, f"sessiongate {importlib.metadata.version('sessiongate')}\n")

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert "not installed" in cli_module.version()


def complete_in_bash(script: Path, *words: str, cwd: Path | None = None) -> list[str]:
    """What the completion `script` offers for the last of `words` (sorted), in a real bash (in `cwd`)."""
    line = " ".join(words)
    program = (
        f"source {shlex.quote(str(script))}; COMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); "
        f"COMP_CWORD={len(words) - 1}; COMP_LINE={shlex.quote(line)}; COMP_POINT={len(line)}; "
        '_shtab_sessiongate; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, timeout=30, check=True, cwd=cwd
    )
    return sorted(done.stdout.split())


async def test_completion_scripts_complete_commands_and_their_flags(tmp_path: Path) -> None:
    code, out, err = await cli(None, "completion", "bash")
    assert code == 0, err
    script = tmp_path / "sessiongate.bash"
    script.write_text(out)
    assert complete_in_bash(script, "sessiongate", "cr") == ["create"]
    assert complete_in_bash(script, "sessiongate", "co") == ["completion", "config"]
    assert complete_in_bash(script, "sessiongate", "prompt", "--de") == ["--deny-all", "--detach"]
    assert complete_in_bash(script, "sessiongate", "create", "--m") == ["--mcp", "--mcp-config"]
    assert complete_in_bash(script, "sessiongate", "completion", "") == ["bash", "tcsh", "zsh"]
    (tmp_path / "project").mkdir()
    (tmp_path / "prompt.txt").write_text("")
    words = ("sessiongate", "create", "--cwd", "pro")
    assert complete_in_bash(script, *words, cwd=tmp_path) == ["project"]  # directories only
    words = ("sessiongate", "prompt", "--file", "pro")
    assert complete_in_bash(script, *words, cwd=tmp_path) == ["project", "prompt.txt"]
    code, out, _ = await cli(None, "completion", "zsh")
    assert code == 0 and out.startswith("#compdef sessiongate") and "--detach" in out
    code, out, _ = await cli(None, "completion", "tcsh")
    assert code == 0 and "complete sessiongate" in out
    code, _, err = await cli(None, "completion", "cmd.exe")
    assert code == 2 and "invalid choice" in err


async def test_get_and_list_print_labels_as_pairs(gate: Gate) -> None:
    labels = {"team": "a", "note": "two words", "csv": "a,b", "esc": "\x1b[2J\x9b"}
    session = await gate.create(labels=labels)
    code, out, _ = await cli(gate, "get", session.session_id)
    shown = 'csv="a,b",esc="\\u001b[2J\\u009b",note="two words",team=a'  # sorted, quoted when needed
    assert code == 0 and f"labels             {shown}\n" in out, out
    assert "{" not in out  # no Python dict, agent_info neither
    code, out, _ = await cli(gate, "get", "--json", session.session_id)
    assert json.loads(out)["labels"] == labels
    code, out, _ = await cli(gate, "list")
    assert code == 0 and out.splitlines()[1].endswith(shown), out


async def test_history_shows_a_cancelled_turn_as_cancelled(gate: Gate) -> None:
    session = await gate.create()
    sid = session.session_id
    turn = asyncio.create_task(gate.prompt(sid, "/sleep 30"))  # ended by CancelPrompt
    await gate.wait_state(sid, pb.SESSION_STATE_BUSY)
    code, out, _ = await cli(gate, "cancel", sid)
    assert (code, out) == (0, "cancelled\n")
    assert (await turn)[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
    left = gate.stub.Prompt(pb.PromptRequest(session_id=sid, text="/sleep 30"))  # ended by its client
    await gate.wait_state(sid, pb.SESSION_STATE_BUSY)
    left.cancel()
    await gate.wait_state(sid, pb.SESSION_STATE_IDLE)
    await gate.prompt(sid, "done")
    code, out, err = await cli(gate, "history", sid)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(row[1], row[6]) for row in rows] == [
        ("completed", "end_turn"),
        ("cancelled", "cancelled"),
        ("cancelled", "cancelled"),
    ], out
    code, out, _ = await cli(gate, "history", sid, out.splitlines()[2].split()[0])
    assert code == 0 and " · cancelled · " in out.splitlines()[0], out
    assert out.splitlines()[-1].startswith("-- cancelled")


async def test_a_turn_cut_off_by_a_server_shutdown_is_an_error_not_a_cancel(gate: Gate) -> None:
    session = await gate.create()
    prompt = asyncio.create_task(cli(gate, "prompt", "--session", session.session_id, "/sleep 30"))
    await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)
    await gate.running.stop_now()
    code, out, err = await prompt
    assert code == 6 and "-- cancelled" not in out, (out, err)
    assert "error: UNAVAILABLE SHUTTING_DOWN" in err
    assert "hint: the server is draining" in err


class Hangup(pb_grpc.SessionServiceServicer):
    """A server whose Prompt streams end as a server's can while it goes away."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code

    async def Prompt(self, request: pb.PromptRequest, context: Any) -> AsyncIterator[pb.PromptEvent]:
        yield pb.PromptEvent(seq=1, message_chunk=pb.ContentChunk(content=_text("partial ")))
        if self.code == grpc.StatusCode.UNAVAILABLE:
            await context.abort_with_status(ShuttingDown("the server is shutting down").to_status())
        await context.abort(self.code, "Received RST_STREAM with error code 8")


async def hangup_server(code: grpc.StatusCode) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(Hangup(code), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_a_stream_the_server_cancels_is_not_shown_as_the_user_s_cancel() -> None:
    for code, says in (
        (grpc.StatusCode.UNAVAILABLE, "error: UNAVAILABLE SHUTTING_DOWN"),
        (grpc.StatusCode.CANCELLED, "hint: the server ended the call before it was done"),
    ):
        server, target = await hangup_server(code)
        try:
            status, out, err = await cli(
                None, "--target", target, "prompt", "--deny-all", "--session", "s", "hi"
            )
        finally:
            await server.stop(0)
        assert (status, out) == (6, "partial \n"), (code, out, err)
        assert says in err and "cancelled" not in out, err
