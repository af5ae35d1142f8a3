"""Client tools from the clients' side (issue 23, part 2): the SDK's `Tool(name, handler, ...)`
given to `create_session(client_tools=[...])` and answered for you by the sync and the asyncio
client's streams (a handler's str, dict or exception), `respond_tool_call` by hand from a
second connection, and the CLI: `--client-tools FILE`, the `? tool` line, `respond-tool` from a
second process while the first streams, and `get`'s `client_tools` line.

The server and the agent are real: the built-in agent's `/mcp call client_tools TOOL JSON`
calls the tool through the session's `client_tools` MCP server, and replies with its result.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from sessiongate.client import AsyncSessionClient, RequestAnswered, RequestNotFound, SessionClient, Tool
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import GateFactory, kinds
from tests.test_cli import cli

ADD = '/mcp call client_tools add {"a": 2, "b": 3}'
SCHEMA = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}


def call(tool: str, arguments: dict[str, Any]) -> str:
    return f"/mcp call client_tools {tool} {json.dumps(arguments)}"


def outcomes(events: list[pb.PromptEvent]) -> list[tuple[str, bool, str]]:
    return [
        (e.tool_outcome.tool, e.tool_outcome.is_error, e.tool_outcome.decided_by)
        for e in events
        if e.WhichOneof("event") == "tool_outcome"
    ]


def reply_of(events: list[pb.PromptEvent]) -> str:
    return "".join(
        e.message_chunk.content.text.text for e in events if e.WhichOneof("event") == "message_chunk"
    )


# ---- SDK: answered for you -------------------------------------------------------------------


async def test_the_async_client_answers_calls_with_its_handlers(make_gate: GateFactory) -> None:
    gate = await make_gate()
    seen: list[dict[str, Any]] = []

    async def add(arguments: dict[str, Any]) -> str:  # a coroutine function: awaited
        seen.append(arguments)
        return str(arguments["a"] + arguments["b"])

    def ticket(arguments: dict[str, Any]) -> dict[str, Any]:  # a plain one: run in a thread
        return {"id": arguments["id"], "title": "Fix the build"}

    def broken(arguments: dict[str, Any]) -> str:
        raise LookupError("no such ticket: " + "x" * 5000)

    tools = [
        Tool("add", add, "adds two numbers", SCHEMA),
        Tool("ticket", ticket, "reads a ticket"),
        Tool("broken", broken),
        Tool("huge", lambda arguments: "x" * (1024 * 1024 + 1)),  # over what the gateway takes
    ]
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session(client_tools=tools)
        assert [t.name for t in session.client_tools] == ["add", "ticket", "broken", "huge"]
        assert session.client_tools[0].input_schema["type"] == "object"

        events = [event async for event in client.prompt(session.session_id, ADD, timeout=60)]
        assert reply_of(events) == "5"
        assert seen == [{"a": 2, "b": 3}]  # whole numbers as ints, not 2.0
        requests = [e.tool_request for e in events if e.WhichOneof("event") == "tool_request"]
        assert [r.tool for r in requests] == ["add"]  # the events are still yielded
        assert outcomes(events) == [("add", False, "client")]

        text, _ = await client.reply(session.session_id, call("ticket", {"id": 7}), timeout=60)
        assert json.loads(text) == {"id": 7, "title": "Fix the build"}  # a dict: its JSON text

        # A handler that raises: the agent gets "TypeName: message" (clipped), the stream goes on.
        events = [e async for e in client.prompt(session.session_id, call("broken", {}), timeout=60)]
        assert "LookupError: no such ticket: xxx" in reply_of(events)
        assert len(reply_of(events)) < 3000
        assert outcomes(events) == [("broken", True, "client")]
        assert events[-1].WhichOneof("event") == "result"
        text, _ = await client.reply(session.session_id, ADD, timeout=60)
        assert text == "5"  # the session goes on too

        # A result the gateway refuses (over 1 MiB): the agent gets an error, not silence.
        events = [e async for e in client.prompt(session.session_id, call("huge", {}), timeout=60)]
        assert "the tool's result was refused" in reply_of(events)
        assert outcomes(events) == [("huge", True, "client")]


async def test_the_blocking_client_answers_calls_with_its_handlers(make_gate: GateFactory) -> None:
    gate = await make_gate()

    def blocking() -> tuple[str, str, list[tuple[str, bool, str]]]:
        with SessionClient(gate.target) as client:
            tools = [
                Tool("add", lambda arguments: arguments["a"] + arguments["b"]),  # 5: its JSON text
                Tool("broken", lambda arguments: 1 / 0),
            ]
            session = client.create_session(client_tools=tools)
            added, _ = client.reply(session.session_id, ADD, timeout=60)
            events = list(client.prompt(session.session_id, call("broken", {}), timeout=60))
            return added, reply_of(events), outcomes(events)

    added, failed, told = await asyncio.to_thread(blocking)
    assert added == "5"
    assert "ZeroDivisionError: division by zero" in failed
    assert told == [("broken", True, "client")]


async def test_a_watching_client_answers_a_call_the_prompting_one_leaves(make_gate: GateFactory) -> None:
    gate = await make_gate()
    calls: list[dict[str, Any]] = []

    def add(arguments: dict[str, Any]) -> str:
        calls.append(arguments)
        return str(arguments["a"] + arguments["b"])

    async with AsyncSessionClient(gate.target) as owner, AsyncSessionClient(gate.target) as prompter:
        sid = (await owner.create_session(client_tools=[Tool("add", add)])).session_id
        events = prompter.prompt(sid, ADD, timeout=60)  # this client serves no tool: it leaves the call
        seen = [await events.__anext__()]
        while seen[-1].WhichOneof("event") != "tool_request":
            seen.append(await events.__anext__())
        watched = [e async for e in owner.watch_turn(sid, 0, events.turn_id, timeout=60)]
        seen += [e async for e in events]
    assert calls == [{"a": 2, "b": 3}]  # answered once, by the watcher's handler
    assert reply_of(seen) == reply_of(watched) == "5"
    assert outcomes(seen) == [("add", False, "client")]


# ---- SDK: answered by hand -------------------------------------------------------------------


async def test_respond_tool_call_answers_from_a_second_connection(make_gate: GateFactory) -> None:
    gate = await make_gate()
    async with AsyncSessionClient(gate.target) as first, AsyncSessionClient(gate.target) as second:
        # `first` declares the tool without a handler: it leaves the call to another connection.
        session = await first.create_session(client_tools=[Tool("ticket", description="reads a ticket")])
        sid = session.session_id
        events: list[pb.PromptEvent] = []
        async for event in first.prompt(sid, call("ticket", {"id": 7}), timeout=60):
            events.append(event)
            if event.WhichOneof("event") == "tool_request":
                request = event.tool_request
                assert (request.tool, dict(request.input)) == ("ticket", {"id": 7.0})
                assert request.HasField("expire_time")
                await second.respond_tool_call(sid, request.request_id, {"title": "Fix the build"})
        assert json.loads(reply_of(events)) == {"title": "Fix the build"}
        assert outcomes(events) == [("ticket", False, "client")]
        assert "tool_request" in kinds(events)

        with pytest.raises(RequestAnswered):
            await second.respond_tool_call(sid, request.request_id, "again")
        with pytest.raises(RequestNotFound):
            await second.respond_tool_call(sid, "no-such-request", error="nope")
        with pytest.raises(ValueError, match="not both"):
            await second.respond_tool_call(sid, request.request_id, "text", error="and an error")

        # An error answered by hand reaches the agent as the tool's failure.
        events = []
        async for event in first.prompt(sid, call("ticket", {"id": 8}), timeout=60):
            events.append(event)
            if event.WhichOneof("event") == "tool_request":
                await second.respond_tool_call(
                    sid, event.tool_request.request_id, error="ticket 8 is private"
                )
        assert "ticket 8 is private" in reply_of(events)
        assert outcomes(events) == [("ticket", True, "client")]


# ---- CLI -------------------------------------------------------------------------------------


async def test_cli_declares_tools_renders_a_call_and_respond_tool_answers_it(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await make_gate()
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([{"name": "add", "description": "adds", "input_schema": SCHEMA}]))
    code, out, err = await cli(gate, "create", "--client-tools", str(tools_file))
    assert code == 0, err
    sid = out.strip()
    code, out, err = await cli(gate, "get", sid)
    assert code == 0 and "client_tools       add\n" in out, out

    streaming = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sessiongate.client",
        "--target",
        gate.target,
        "prompt",
        "--session",
        sid,
        ADD,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        assert streaming.stdout is not None
        lines: list[str] = []
        while not any(line.startswith("? tool add ") for line in lines):
            line = await asyncio.wait_for(streaming.stdout.readline(), 30)
            assert line, f"the prompt ended before the tool call: {lines}"
            lines.append(line.decode())
        asked = lines[-1]
        assert '{"a": 2, "b": 3}' in asked and f"sessiongate respond-tool {sid} " in asked, asked
        match = re.search(r"\(request (\S+);", asked)
        assert match, asked
        request_id = match.group(1)

        code, out, err = await cli(gate, "respond-tool", sid, request_id, "--result", "5")
        assert (code, out) == (0, f"answered {request_id}\n"), err
        rest, tail = await asyncio.wait_for(streaming.communicate(), 30)
    finally:
        if streaming.returncode is None:
            streaming.kill()
            await streaming.wait()
    assert streaming.returncode == 0, tail.decode()
    shown = rest.decode().splitlines()
    assert "5" in shown and "tool add: answered (client)" in shown, shown

    code, _, err = await cli(gate, "respond-tool", sid, request_id, "--result", "6")
    assert code == 7 and "REQUEST_ANSWERED" in err, err
    assert "hint: that tool call was already answered, expired or cancelled" in err
    code, _, err = await cli(gate, "respond-tool", sid, "no-such-request", "--error", "nope")
    assert code == 3 and "REQUEST_NOT_FOUND" in err and "no such tool call" in err, err
    code, _, err = await cli(gate, "respond-tool", sid, request_id, "--result-json", "[1]")
    assert code == 2 and "--result-json takes a JSON object" in err, err
    code, _, err = await cli(gate, "respond-tool", sid, request_id)
    assert code == 2 and "one of the arguments --result --result-json --error is required" in err, err


async def test_cli_refuses_a_bad_tools_file_and_tools_for_an_existing_session(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await make_gate()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "add", "secret_key": "s3cr3t-value"}]))
    code, _, err = await cli(gate, "create", "--client-tools", str(bad))
    assert code == 2 and "tool [0]: unknown keys 'secret_key'" in err, err
    assert "s3cr3t-value" not in err and "hint: --client-tools takes a JSON file" in err
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"name": "add"}]))
    session = await gate.create()
    code, _, err = await cli(
        gate, "prompt", "--session", session.session_id, "--client-tools", str(good), "hi"
    )
    assert code == 2 and "--client-tools gives client tools to the session this command creates" in err, err
