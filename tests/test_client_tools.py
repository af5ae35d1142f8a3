"""Client tools (issue 23, part 2): tools a gRPC client serves itself.

A session created with `client_tools` gives its agent one stdio MCP server, `client_tools`; the
built-in agent calls a tool with `/mcp call client_tools TOOL JSON`, the call reaches the turn's
stream as a `tool_request` event, a RespondToolCall (here from a second connection) answers it,
a `tool_outcome` event says what became of it, and the agent's reply carries the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from sessiongate.server.sandbox.launcher import stdlib_script
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import Gate, GateFactory, echo_agent, expect_error, reply_text
from tests.test_sandbox import boxed, needs_bwrap


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


ADD = pb.ClientTool(
    name="add",
    description="adds a and b",
    input_schema=struct({"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}),
)
POST = pb.ClientTool(name="post", description="posts to the thread")
CALL_ADD = '/mcp call client_tools add {"a": 2, "b": 3}'


async def second_stub(gate: Gate) -> pb_grpc.SessionServiceStub:
    """Another connection to the same server (the same principal: no authentication here)."""
    channel = grpc.aio.insecure_channel(gate.target)
    gate.extra_channels.append(channel)
    return pb_grpc.SessionServiceStub(channel)


async def prompt_answering(
    gate: Gate, session_id: str, text: str, answer: Any, **kwargs: Any
) -> list[pb.PromptEvent]:
    """Prompt and answer each tool_request from a second connection with `answer(request)`: a
    RespondToolCallRequest's answer fields (or None: leave it unanswered)."""
    other = await second_stub(gate)
    events = []
    request = pb.PromptRequest(session_id=session_id, text=text, **kwargs)
    async for event in gate.stub.Prompt(request, timeout=60):
        events.append(event)
        if event.HasField("tool_request"):
            fields = answer(event.tool_request)
            if fields is not None:
                respond = pb.RespondToolCallRequest(
                    session_id=session_id, request_id=event.tool_request.request_id, **fields
                )
                await other.RespondToolCall(respond, timeout=10)
    return events


def the(events: list[pb.PromptEvent], kind: str) -> Any:
    found = [getattr(e, kind) for e in events if e.HasField(kind)]
    assert len(found) == 1, f"{len(found)} {kind} events in {[e.WhichOneof('event') for e in events]}"
    return found[0]


async def wait_for_request(stream: Any) -> tuple[pb.ToolRequest, list[pb.PromptEvent]]:
    events = []
    async for event in stream:
        events.append(event)
        if event.HasField("tool_request"):
            return event.tool_request, events
    raise AssertionError("the turn ended without a tool_request")


@needs_bwrap
async def test_a_sandboxed_agent_calls_a_tool_answered_from_a_second_connection(
    make_gate: GateFactory,
) -> None:
    gate = await make_gate(agents={"boxed": boxed()})
    session = await gate.create(agent="boxed", client_tools=[ADD, POST])
    assert [t.name for t in session.client_tools] == ["add", "post"]
    assert session.client_tools[0].input_schema == ADD.input_schema
    assert ("client_tools", "stdio", "client_tools") in [
        (m.name, m.transport, m.source) for m in session.mcp_servers
    ]

    def add(request: pb.ToolRequest) -> dict[str, Any]:
        assert request.tool == "add"
        total = float(request.input.fields["a"].number_value + request.input.fields["b"].number_value)
        return {"result": pb.ToolResult(text=f"sum is {total:g}", structured=struct({"sum": total}))}

    events = await prompt_answering(gate, session.session_id, CALL_ADD, add)
    request = the(events, "tool_request")
    assert dict(request.input) == {"a": 2, "b": 3}
    assert request.expire_time.seconds > 0
    outcome = the(events, "tool_outcome")
    assert (outcome.request_id, outcome.tool, outcome.is_error, outcome.decided_by) == (
        request.request_id,
        "add",
        False,
        "client",
    )
    assert "sum is 5" in reply_text(events)
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    # The agent lists exactly the declared tools, from inside its sandbox.
    assert "client_tools stdio" in reply_text(await gate.prompt(session.session_id, "/mcp list"))
    listed = reply_text(await gate.prompt(session.session_id, "/mcp tools client_tools"))
    assert "add" in listed and "post" in listed


async def test_an_error_answer_reaches_the_agent_as_a_failed_call(gate: Gate) -> None:
    session = await gate.create(client_tools=[POST])
    events = await prompt_answering(
        gate,
        session.session_id,
        '/mcp call client_tools post {"text": "hi"}',
        lambda _: {"error": "the thread is locked"},
    )
    outcome = the(events, "tool_outcome")
    assert outcome.is_error and outcome.decided_by == "client"
    assert "the thread is locked" in reply_text(events)
    # The session goes on: the next call is answered.
    events = await prompt_answering(
        gate,
        session.session_id,
        '/mcp call client_tools post {"text": "again"}',
        lambda _: {"result": pb.ToolResult(text="posted")},
    )
    assert "posted" in reply_text(events)


async def test_an_unanswered_call_times_out_and_a_late_answer_hears_so(gate: Gate) -> None:
    session = await gate.create(client_tools=[ADD])
    events = await prompt_answering(
        gate, session.session_id, CALL_ADD, lambda _: None, permission_timeout=Duration(seconds=1)
    )
    outcome = the(events, "tool_outcome")
    assert outcome.is_error and outcome.decided_by == "timeout"
    assert "did not answer within 1s" in reply_text(events)
    late = pb.RespondToolCallRequest(
        session_id=session.session_id, request_id=outcome.request_id, result=pb.ToolResult(text="late")
    )
    error = await expect_error(gate.stub.RespondToolCall(late, timeout=10))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ANSWERED")
    assert "expired" in error.message


async def test_cancel_prompt_cancels_a_pending_call(gate: Gate) -> None:
    session = await gate.create(client_tools=[ADD])
    stream = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text=CALL_ADD), timeout=60)
    request, events = await wait_for_request(stream)
    await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id), timeout=10)
    events += [event async for event in stream]
    outcome = the(events, "tool_outcome")
    assert outcome.is_error and outcome.decided_by == "cancelled"
    assert events[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
    answer = pb.RespondToolCallRequest(
        session_id=session.session_id, request_id=request.request_id, error="x"
    )
    error = await expect_error(gate.stub.RespondToolCall(answer, timeout=10))
    assert error.reason == "REQUEST_ANSWERED" and "cancelled" in error.message


async def test_the_client_leaving_cancels_a_pending_call(gate: Gate) -> None:
    session = await gate.create(client_tools=[ADD])
    stream = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text=CALL_ADD), timeout=60)
    request, _ = await wait_for_request(stream)
    stream.cancel()  # ON_DISCONNECT_CANCEL (the default): the turn is cancelled, and its question
    answer = pb.RespondToolCallRequest(
        session_id=session.session_id, request_id=request.request_id, error="x"
    )
    for _ in range(100):
        found = await expect_error(gate.stub.RespondToolCall(answer, timeout=10))
        if found.reason == "REQUEST_ANSWERED":
            break
        await asyncio.sleep(0.1)
    assert found.reason == "REQUEST_ANSWERED" and "cancelled" in found.message
    await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)


async def test_close_session_cancels_a_pending_call_and_removes_its_socket(gate: Gate) -> None:
    session = await gate.create(client_tools=[ADD])
    path = Path(gate.running.pool.get(session.session_id).client_tools.socket_path)  # type: ignore[union-attr]
    assert path.is_socket()
    stream = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text=CALL_ADD), timeout=60)
    request, events = await wait_for_request(stream)
    await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=30)
    with contextlib.suppress(grpc.aio.AioRpcError):  # it may end with the session's status
        events += [event async for event in stream]
    answer = pb.RespondToolCallRequest(
        session_id=session.session_id, request_id=request.request_id, error="x"
    )
    error = await expect_error(gate.stub.RespondToolCall(answer, timeout=10))
    assert error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
    assert not path.exists()


async def test_a_session_resumed_after_a_restart_keeps_its_tools(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    state_db = tmp_path / "kept.db"
    gate = await make_gate(state_db=state_db)
    session = await gate.create(client_tools=[ADD])
    await gate.running.drain(1.0)
    again = await make_gate(state_db=state_db)
    fetched = await again.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id), timeout=10)
    assert [t.name for t in fetched.client_tools] == ["add"]
    assert fetched.client_tools[0].input_schema == ADD.input_schema
    events = await prompt_answering(
        again, session.session_id, CALL_ADD, lambda _: {"result": pb.ToolResult(text="still five")}
    )
    assert "still five" in reply_text(events)


async def test_declarations_are_checked(gate: Gate) -> None:
    bad = [
        pb.ClientTool(name="1st"),
        pb.ClientTool(name="add"),
        pb.ClientTool(name="add"),
        pb.ClientTool(name="long", description="x" * 5000),
        pb.ClientTool(name="typed", input_schema=struct({"type": "string"})),
    ]
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(client_tools=bad), timeout=10))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.violations) == {
        "client_tools[0].name",
        "client_tools[2].name",
        "client_tools[3].description",
        "client_tools[4].input_schema",
    }
    many = [pb.ClientTool(name=f"t{i}") for i in range(65)]
    error = await expect_error(
        gate.stub.CreateSession(pb.CreateSessionRequest(client_tools=many), timeout=10)
    )
    assert error.violations == {"client_tools": "at most 64 tools"}


async def test_answers_are_checked(gate: Gate) -> None:
    session = await gate.create(client_tools=[ADD])
    sid = session.session_id
    cases = [
        (pb.RespondToolCallRequest(session_id=sid, request_id="r1"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.RespondToolCallRequest(session_id=sid, error="x"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.RespondToolCallRequest(session_id=sid, request_id="r1", error="x" * (1024 * 1024 + 1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.RespondToolCallRequest(session_id=sid, request_id="r1", error="x"), grpc.StatusCode.NOT_FOUND),
    ]
    for request, code in cases:
        assert (await expect_error(gate.stub.RespondToolCall(request, timeout=10))).code == code


async def test_a_hostile_caller_on_the_socket_costs_bounded_work(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    """What comes through the socket is the agent's: garbage gets JSON-RPC errors, a call outside
    a turn gets a tool error, a line over the bound ends only that connection; the session works."""
    gate = await make_gate(agents={"quiet": echo_agent("quiet", tmp_path / "quiet")})
    session = await gate.create(agent="quiet", client_tools=[ADD])
    path = gate.running.pool.get(session.session_id).client_tools.socket_path  # type: ignore[union-attr]

    def talk() -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect(path)
            stream = raw.makefile("rwb")
            lines = [
                b"not json at all\n",
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "initialize",
                        "params": {
                            "protocolVersion": "2025-06-18",
                            "capabilities": {},
                            "clientInfo": {"name": "attacker", "version": "0"},
                        },
                    }
                ).encode()
                + b"\n",
                b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n',
                json.dumps(
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "add"}}
                ).encode()
                + b"\n",
            ]
            for line in lines:
                stream.write(line)
            stream.flush()
            answers: list[dict[str, Any]] = []
            while len([a for a in answers if a.get("id") in (1, 2)]) < 2:
                answers.append(json.loads(stream.readline()))
            return answers

    answers = await asyncio.to_thread(talk)
    called = next(a for a in answers if a.get("id") == 2)
    assert called["result"]["isError"] is True
    assert "no turn is running" in called["result"]["content"][0]["text"]

    def flood() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect(path)
            try:
                raw.sendall(b"x" * (3 * 1024 * 1024))
            except OSError:
                return b""  # closed on us mid-flood: what we wanted
            return raw.recv(100)  # b"": closed

    assert await asyncio.to_thread(flood) == b""
    events = await prompt_answering(
        gate, session.session_id, CALL_ADD, lambda _: {"result": pb.ToolResult(text="fine")}
    )
    assert "fine" in reply_text(events)


async def test_no_other_mcp_server_may_take_their_servers_name(gate: Gate) -> None:
    server = pb.McpServer(name="client_tools", stdio=pb.McpStdio(command="/bin/true"))
    request = pb.CreateSessionRequest(client_tools=[ADD], client_mcp_servers=[server])
    error = await expect_error(gate.stub.CreateSession(request, timeout=10))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "client_tools" in error.violations


@needs_bwrap
async def test_another_sessions_sandboxed_agent_cannot_reach_the_socket(make_gate: GateFactory) -> None:
    """Session B's agent starts our own relay pointed at session A's socket (a client-supplied
    stdio MCP server, run inside B's sandbox): A's socket is not there, so B reaches no tool of A."""
    gate = await make_gate(agents={"boxed": boxed()})
    victim = await gate.create(agent="boxed", client_tools=[ADD])
    path = gate.running.pool.get(victim.session_id).client_tools.socket_path  # type: ignore[union-attr]
    command, *args = stdlib_script(sys.executable, "tools_relay.py", path)
    thief = pb.McpServer(name="stolen", stdio=pb.McpStdio(command=command, args=args))
    attacker = await gate.create(agent="boxed", client_mcp_servers=[thief])
    reply = reply_text(await gate.prompt(attacker.session_id, "/mcp tools stolen"))
    assert reply.startswith("mcp error"), reply
    assert "add" not in reply  # (unsandboxed, the same relay lists "add": checked by hand)
