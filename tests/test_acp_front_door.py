"""The ACP front door (issue 24): `sessiongate acp` driven by the Python ACP SDK's client, over
its stdin/stdout, against a real gateway and its built-in agent."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import acp
import pytest
from acp import schema
from acp.exceptions import RequestError
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, eventually
from tests.processes import server_process
from tests.test_auth import TOKENS, as_, tokens_file
from tests.test_durable_client import Proxy
from tests.test_misbehaving_agents import bad_agent

LINE_LIMIT = 16 * 1024 * 1024


class Editor:
    """The client side of ACP, as an editor: collects updates, answers permission requests."""

    def __init__(self, permission: str = "allow_once") -> None:
        self.updates: list[tuple[str, Any]] = []
        self.permission = permission  # the option kind chosen, or "cancelled"
        self.asked: list[Any] = []

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        self.updates.append((session_id, update))

    async def request_permission(self, options: list[Any], tool_call: Any, **_: Any) -> Any:
        self.asked.append(tool_call)
        chosen = next((o for o in options if o.kind == self.permission), None)
        if chosen is None:
            return schema.RequestPermissionResponse(outcome=schema.DeniedOutcome(outcome="cancelled"))
        return schema.RequestPermissionResponse(
            outcome=schema.AllowedOutcome(outcome="selected", option_id=chosen.option_id)
        )

    async def create_elicitation(self, message: str, mode: Any, **_: Any) -> Any:
        self.asked.append(message)
        return schema.AcceptElicitationResponse(action="accept", content={"name": "Ada"})

    def text(self, kind: str = "agent_message_chunk") -> str:
        return "".join(u.content.text for _, u in self.updates if getattr(u, "session_update", "") == kind)

    def kinds(self) -> list[str]:
        return [getattr(u, "session_update", "") for _, u in self.updates]


@contextlib.asynccontextmanager
async def front_door(
    target: str, *extra: str, editor: Editor | None = None
) -> AsyncIterator[tuple[Any, Editor]]:
    """`sessiongate acp --target TARGET` in its own process group, connected to an editor."""
    editor = editor or Editor()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sessiongate.client",
        "acp",
        "--target",
        target,
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=LINE_LIMIT,
    )
    assert process.stdin and process.stdout
    client: Any = editor
    conn: Any = acp.connect_to_agent(client, process.stdin, process.stdout, use_unstable_protocol=True)
    try:
        yield conn, editor
    finally:
        await conn.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def _contains(read: Any, wanted: str) -> bool:
    return wanted in read()


def text(value: str) -> list[Any]:
    return [schema.TextContentBlock(type="text", text=value)]


async def test_a_prompt_through_the_front_door(gate: Gate, tmp_path: Path) -> None:
    async with front_door(gate.target) as (conn, editor):
        hello = await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        assert hello.agent_capabilities.load_session
        assert hello.agent_info.name == "sessiongate-acp"
        new = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
        response = await conn.prompt(session_id=new.session_id, prompt=text("hello through the door"))
        assert response.stop_reason == "end_turn"
        await eventually(lambda: "hello through the door" in editor.text(), 5, "the reply")
        assert {"agent_thought_chunk", "tool_call", "tool_call_update", "plan"} <= set(editor.kinds())
        listed = await conn.list_sessions()
        assert new.session_id in [s.session_id for s in listed.sessions]

    # A second editor loads the session: its history is replayed, prompt first.
    async with front_door(gate.target) as (conn, editor):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        await conn.load_session(cwd=str(gate.workdir), session_id=new.session_id, mcp_servers=[])
        await eventually(lambda: "hello through the door" in editor.text(), 5, "the replay")
        assert editor.text("user_message_chunk") == "hello through the door"
        assert editor.kinds().index("user_message_chunk") < editor.kinds().index("agent_message_chunk")
        await conn.close_session(session_id=new.session_id)
        with pytest.raises(RequestError) as refused:
            await conn.prompt(session_id=new.session_id, prompt=text("again"))
        assert (refused.value.data or {}).get("code") == "NOT_FOUND"


async def test_permission_requests_reach_the_editor(gate: Gate) -> None:
    for kind, expected in (("allow_once", "permission allow"), ("reject_once", "permission reject")):
        async with front_door(gate.target, editor=Editor(kind)) as (conn, editor):
            await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
            new = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
            response = await conn.prompt(session_id=new.session_id, prompt=text("/permission"))
            assert response.stop_reason == "end_turn"
            assert editor.asked, "the editor was not asked"
            reply = editor.text
            await eventually(functools.partial(_contains, reply, expected), 5, f"the agent's {expected!r}")


async def test_cancel_ends_the_turn_cancelled(gate: Gate) -> None:
    async with front_door(gate.target) as (conn, editor):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        new = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
        words = " ".join(f"w{i}" for i in range(40))  # 20 s at one word per 0.5 s, unless cancelled
        turn = asyncio.ensure_future(
            conn.prompt(session_id=new.session_id, prompt=text(f"/pace 500 {words}"))
        )
        # Cancelled once the turn is under way (its first word came back), not after a guess.
        await eventually(lambda: editor.text().startswith("w0"), 15, "the turn's first word")
        await conn.cancel(session_id=new.session_id)
        response = await asyncio.wait_for(turn, 15)
        assert response.stop_reason == "cancelled"


async def test_a_gateway_that_is_down_is_a_clear_error_at_initialize() -> None:
    async with front_door("127.0.0.1:9") as (conn, _):
        with pytest.raises(RequestError) as refused:
            await asyncio.wait_for(conn.initialize(protocol_version=acp.PROTOCOL_VERSION), 30)
        assert "cannot be reached" in str(refused.value)
        assert (refused.value.data or {}).get("code") in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


async def test_mode_and_config_option(make_gate: GateFactory) -> None:
    gate = await make_gate()
    async with front_door(gate.target) as (conn, editor):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        new = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
        assert new.modes is not None and new.modes.current_mode_id == "code"
        await conn.set_session_mode(session_id=new.session_id, mode_id="ask")
        changed = await conn.set_config_option(
            session_id=new.session_id, config_id="model", value="echo-large"
        )
        assert any(o.current_value == "echo-large" for o in changed.config_options if o.id == "model")
        await conn.prompt(session_id=new.session_id, prompt=text("/state"))
        await eventually(lambda: "mode=ask model=echo-large" in editor.text(), 5, "the agent's state")


async def test_a_second_editor_loading_the_session_sees_the_running_turn(gate: Gate) -> None:
    async with (
        front_door(gate.target) as (first, first_editor),
        front_door(gate.target) as (second, second_editor),
    ):
        await first.initialize(protocol_version=acp.PROTOCOL_VERSION)
        await second.initialize(protocol_version=acp.PROTOCOL_VERSION)
        new = await first.new_session(cwd=str(gate.workdir), mcp_servers=[])
        words = " ".join(f"w{i}" for i in range(12))
        turn = asyncio.ensure_future(
            first.prompt(session_id=new.session_id, prompt=text(f"/pace 200 {words}"))
        )
        await eventually(lambda: "w1" in first_editor.text(), 10, "the first words")
        await second.load_session(cwd=str(gate.workdir), session_id=new.session_id, mcp_servers=[])
        assert (await asyncio.wait_for(turn, 30)).stop_reason == "end_turn"
        # The second editor saw what was said before its load (replayed) and the rest live.
        await eventually(lambda: "w11" in second_editor.text(), 10, "the live rest in the second editor")
        assert second_editor.text().replace(" ", "") == first_editor.text().replace(" ", "")


async def test_a_gateway_restart_mid_turn_ends_the_turn_as_reported_and_the_next_prompt_works(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = f"127.0.0.1:{port}"
    async with front_door(target) as (conn, editor):
        async with server_process(tmp_path, extra_args=("--listen", target)) as server:
            await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
            new = await conn.new_session(cwd=str(tmp_path), mcp_servers=[])
            words = " ".join(f"w{i}" for i in range(60))  # 30 s at one word per 0.5 s
            turn = asyncio.ensure_future(
                conn.prompt(session_id=new.session_id, prompt=text(f"/pace 500 {words}"))
            )
            await eventually(lambda: editor.text().startswith("w0"), 15, "the turn's first word")
            assert await server.stop(signal.SIGTERM) == 0
            with pytest.raises(RequestError) as ended:
                await asyncio.wait_for(turn, 30)
            assert (ended.value.data or {}).get("reason") == "SHUTTING_DOWN"
        async with server_process(tmp_path, extra_args=("--listen", target)):
            response = await asyncio.wait_for(
                conn.prompt(session_id=new.session_id, prompt=text("back again")), 60
            )
            assert response.stop_reason == "end_turn"
            await eventually(lambda: "back again" in editor.text(), 5, "the reply after the restart")


async def test_a_broken_grpc_stream_mid_turn_reattaches_with_no_gap_and_no_duplicate(gate: Gate) -> None:
    async with Proxy(gate.running.port) as proxy, front_door(proxy.target) as (conn, editor):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        new = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
        words = [f"w{i}" for i in range(12)]
        turn = asyncio.ensure_future(
            conn.prompt(session_id=new.session_id, prompt=text(f"/pace 200 {' '.join(words)}"))
        )
        await eventually(lambda: "w2" in editor.text(), 10, "the first words")
        proxy.cut()  # the front door's stream fails UNAVAILABLE: it re-attaches with WatchTurn
        assert (await asyncio.wait_for(turn, 30)).stop_reason == "end_turn"
        assert editor.text().split() == words
        assert proxy.accepted >= 2, "the front door did not reconnect"


async def test_an_update_of_a_kind_no_sdk_knows_is_passed_on_unchanged(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    """Read off the wire (no SDK between): the agent's `future_update_kind` reaches the editor as
    the agent sent it."""
    gate = await make_gate(agents={"bad": bad_agent(tmp_path / "pids")})
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sessiongate.client", "acp", "--target", gate.target, "--agent", "bad"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=LINE_LIMIT,
    )
    assert process.stdin and process.stdout
    stdin, stdout = process.stdin, process.stdout

    async def call(
        number: int, method: str, params: dict[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        stdin.write(
            json.dumps({"jsonrpc": "2.0", "id": number, "method": method, "params": params}).encode() + b"\n"
        )
        await stdin.drain()
        notes: list[dict[str, Any]] = []
        while True:
            message = json.loads(await asyncio.wait_for(stdout.readline(), 30))
            if message.get("id") == number:
                return message, notes
            notes.append(message)

    try:
        await call(1, "initialize", {"protocolVersion": 1, "clientCapabilities": {}})
        created, _ = await call(2, "session/new", {"cwd": str(gate.workdir), "mcpServers": []})
        session_id = created["result"]["sessionId"]
        prompt = {"sessionId": session_id, "prompt": [{"type": "text", "text": "/unknown"}]}
        answered, notes = await call(3, "session/prompt", prompt)
        assert answered["result"]["stopReason"] == "end_turn"
        updates = [n["params"]["update"] for n in notes if n.get("method") == "session/update"]
        assert {
            "sessionUpdate": "future_update_kind",
            "answer": 42,
            "detail": {"nested": ["x", "y"]},
        } in updates
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()  # the bad agent itself ends with the gateway's drain (make_gate)


async def test_an_elicitation_reaches_an_editor_that_answers_them(gate: Gate) -> None:
    elicitation = schema.ElicitationCapabilities(form=schema.ElicitationFormCapabilities())
    capabilities = schema.ClientCapabilities(elicitation=elicitation)
    async with front_door(gate.target) as (conn, editor):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION, client_capabilities=capabilities)
        new = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
        await conn.prompt(session_id=new.session_id, prompt=text("/elicit"))
        await eventually(lambda: "elicitation accept" in editor.text(), 5, "the agent's answer")
        assert '"Ada"' in editor.text() and editor.asked == ["What is your name?"]
    # An editor that does not say it answers elicitations is not asked: the gateway declines.
    async with front_door(gate.target) as (conn, editor):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        new = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
        await conn.prompt(session_id=new.session_id, prompt=text("/elicit"))
        await eventually(lambda: "elicitation decline" in editor.text(), 5, "the agent's answer")
        assert editor.asked == []


def test_a_front_door_without_a_pipe_on_stdin_says_so_and_exits() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessiongate.client", "acp", "--target", "127.0.0.1:9"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "an editor or ACP client starts it" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


async def test_a_token_makes_the_front_door_its_principal_and_lists_only_its_sessions(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate = await make_gate(auth_tokens_file=tokens_file(tmp_path / "tokens.toml"))
    bobs = await gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("bob"), timeout=30)
    async with front_door(gate.target, "--token", TOKENS["alice"]) as (conn, _):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        mine = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
        listed = [s.session_id for s in (await conn.list_sessions()).sessions]
        assert listed == [mine.session_id]
        with pytest.raises(RequestError) as refused:  # bob's session is not alice's to load
            await conn.load_session(cwd=str(gate.workdir), session_id=bobs.session_id, mcp_servers=[])
        assert (refused.value.data or {}).get("code") == "NOT_FOUND"
    owner = await gate.stub.GetSession(
        pb.GetSessionRequest(session_id=mine.session_id), metadata=as_("alice")
    )
    assert owner.owner == "alice"
    async with front_door(gate.target, "--token", "not-a-token") as (conn, _):
        with pytest.raises(RequestError) as unknown:
            await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        assert (unknown.value.data or {}).get("code") == "UNAUTHENTICATED"


async def test_a_decision_the_gateway_made_by_policy_is_reported_not_asked(gate: Gate) -> None:
    async with front_door(gate.target, "--permission-policy", "deny-all") as (conn, editor):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        new = await conn.new_session(cwd=str(gate.workdir), mcp_servers=[])
        await conn.prompt(session_id=new.session_id, prompt=text("/permission"))
        await eventually(lambda: "permission reject" in editor.text(), 5, "the agent's reply")
        assert editor.asked == []
        reports = [
            u.field_meta["sessiongate"]
            for _, u in editor.updates
            if getattr(u, "session_update", "") == "tool_call_update" and u.field_meta
        ]
        assert reports == [{"permission": "rejected", "decidedBy": "deny-all"}]
