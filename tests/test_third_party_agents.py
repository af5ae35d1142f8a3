"""Third-party ACP agents behind sessiongate, for real: Zed's example agent.

`@zed-industries/agent-client-protocol` (npm, installed into tests/node by `make test`) ships
the example agent `typescript/examples/agent.ts`, run here with `tsx`. It speaks ACP protocol
version 1 and ignores the prompt's text; every turn it

1. says "I'll help you with that...", starts the tool call `call_1` (read, no permission asked)
   and completes it, says "Now I understand the project structure...";
2. starts the tool call `call_2` ("Modifying critical configuration file", kind edit, pending)
   and asks session/request_permission about it with the options `allow` (allow_once,
   "Allow this change") and `reject` (reject_once, "Skip this change");
3. on `allow`: completes `call_2` and says "Perfect! I've successfully updated the
   configuration..."; on `reject`: leaves `call_2` as it is (no update) and says "I understand
   you prefer not to make that change..."; on a cancelled request: says nothing more;
4. ends the turn with `end_turn`, even after a cancelled permission request (only when
   session/cancel aborts one of its one-second pauses does it answer `cancelled`).

A test skips, saying why, only when node or the package is not installed.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import Gate, GateFactory, expect_error, kinds, reply_text, require_installed
from tests.test_permissions import Asking, second_stub, seconds

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "tests" / "node" / "node_modules"
TSX = NODE_MODULES / ".bin" / "tsx"
PACKAGE = NODE_MODULES / "@zed-industries" / "agent-client-protocol"
EXAMPLE = PACKAGE / "typescript" / "examples" / "agent.ts"
AGENT = "zed-example"
PROMPT = "change the config"  # the example ignores what it is asked

READ_TOOL, EDIT_TOOL = "call_1", "call_2"
OPTIONS = {("allow", "allow_once", "Allow this change"), ("reject", "reject_once", "Skip this change")}
ALLOWED_TEXT = "Perfect! I've successfully updated the configuration."
REJECTED_TEXT = "I understand you prefer not to make that change."


@pytest.fixture
async def gate(make_gate: GateFactory) -> Gate:
    """A server whose `zed-example` agent is Zed's example agent, run with tsx."""
    require_installed(shutil.which("node"), "node")
    tsx = require_installed(TSX, "tsx (npm, tests/node)")
    example = require_installed(
        EXAMPLE, "Zed's example agent (npm @zed-industries/agent-client-protocol, tests/node)"
    )
    config = AgentConfig(name=AGENT, command=tsx, args=(example,), sandbox="none")
    made: Gate = await make_gate(agents={AGENT: config})
    return made


def option(request: pb.PermissionRequest, kind: str) -> str:
    [option_id] = [o.option_id for o in request.options if o.kind == kind]
    return option_id


def decision(events: list[pb.PromptEvent]) -> pb.PermissionEvent:
    [permission] = [e.permission for e in events if e.HasField("permission")]
    return permission


def statuses(events: list[pb.PromptEvent], tool_call_id: str) -> list[int]:
    """The tool call's status as started, then after each update that set one."""
    started = [
        int(e.tool_call.status)
        for e in events
        if e.HasField("tool_call") and e.tool_call.tool_call_id == tool_call_id
    ]
    updated = [
        int(e.tool_call_update.status)
        for e in events
        if e.HasField("tool_call_update")
        and e.tool_call_update.tool_call_id == tool_call_id
        and e.tool_call_update.status != pb.TOOL_CALL_STATUS_UNSPECIFIED
    ]
    return started + updated


def check_request(request: pb.PermissionRequest) -> None:
    """The request as the example made it: about its pending edit, with allow and reject."""
    assert request.request_id and request.expire_time.seconds > 0
    assert request.tool_call.tool_call_id == EDIT_TOOL and request.tool_call.kind == "edit"
    assert request.tool_call.title == "Modifying critical configuration file"
    assert [loc.path for loc in request.tool_call.locations] == ["/home/user/project/config.json"]
    assert {(o.option_id, o.kind, o.name) for o in request.options} == OPTIONS


def check_turn_start(events: list[pb.PromptEvent]) -> None:
    """Before it asks: text, the read tool call completed, more text, the edit tool call pending."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert reply_text(events).startswith("I'll help you with that.")
    assert "Now I understand the project structure." in reply_text(events)
    assert statuses(events, READ_TOOL) == [pb.TOOL_CALL_STATUS_PENDING, pb.TOOL_CALL_STATUS_COMPLETED]
    [edit] = [
        e.tool_call for e in events if e.HasField("tool_call") and e.tool_call.tool_call_id == EDIT_TOOL
    ]
    assert edit.kind == "edit" and edit.status == pb.TOOL_CALL_STATUS_PENDING


async def answer(
    stub: pb_grpc.SessionServiceStub, session_id: str, request: pb.PermissionRequest, option_id: str
) -> int:
    response = await stub.RespondPermission(
        pb.RespondPermissionRequest(
            session_id=session_id, request_id=request.request_id, option_id=option_id
        ),
        timeout=5,
    )
    outcome: int = response.outcome
    return outcome


async def test_the_example_agent_runs_under_the_agents_default_policy(gate: Gate) -> None:
    """approve-reads (the default) rejects its edit, and nobody is asked."""
    session = await gate.create(agent=AGENT)
    assert session.state == pb.SESSION_STATE_IDLE and session.agent == AGENT

    events = await gate.prompt(session.session_id, "change the config")
    check_turn_start(events)
    rejected = decision(events)
    assert (rejected.policy, rejected.outcome) == ("approve-reads", pb.PERMISSION_OUTCOME_REJECTED)
    assert rejected.selected_option_id == "reject" and not rejected.request_id
    assert rejected.tool_call_id == EDIT_TOOL and rejected.title == "Modifying critical configuration file"
    assert {(o.option_id, o.kind, o.name) for o in rejected.options} == OPTIONS
    assert REJECTED_TEXT in reply_text(events) and ALLOWED_TEXT not in reply_text(events)
    assert statuses(events, EDIT_TOOL) == [pb.TOOL_CALL_STATUS_PENDING]  # the example leaves it so
    assert "permission_request" not in kinds(events)  # nobody is asked
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    # (approve-all per prompt: after the cancel test's CancelPrompt, where the turn runs once more)


async def test_ask_the_client_allows_from_another_connection_and_the_edit_completes(gate: Gate) -> None:
    session = await gate.create(agent=AGENT)
    asking = Asking(gate, session.session_id, PROMPT)
    request = (await asking.question()).permission_request
    check_request(request)
    check_turn_start(asking.events)
    other = second_stub(gate)
    outcome = await answer(other, session.session_id, request, option(request, "allow_once"))
    assert outcome == pb.PERMISSION_OUTCOME_ALLOWED
    events = await asking.finish()
    permission = decision(events)
    assert (permission.policy, permission.request_id) == ("client", request.request_id)
    assert permission.outcome == pb.PERMISSION_OUTCOME_ALLOWED and permission.selected_option_id == "allow"
    assert kinds(events).index("permission_request") < kinds(events).index("permission")
    assert statuses(events, EDIT_TOOL) == [pb.TOOL_CALL_STATUS_PENDING, pb.TOOL_CALL_STATUS_COMPLETED]
    assert ALLOWED_TEXT in reply_text(events)
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    again = await expect_error(answer(other, session.session_id, request, "allow"))
    assert (again.code, again.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ANSWERED")


async def test_ask_the_client_rejects_and_the_example_skips_its_edit(gate: Gate) -> None:
    session = await gate.create(agent=AGENT)
    asking = Asking(gate, session.session_id, PROMPT)
    request = (await asking.question()).permission_request
    check_request(request)
    outcome = await answer(second_stub(gate), session.session_id, request, option(request, "reject_once"))
    assert outcome == pb.PERMISSION_OUTCOME_REJECTED
    events = await asking.finish()
    permission = decision(events)
    assert (permission.policy, permission.request_id) == ("client", request.request_id)
    assert permission.outcome == pb.PERMISSION_OUTCOME_REJECTED and permission.selected_option_id == "reject"
    # The example does not fail its tool call on a rejection: it leaves it pending and says so.
    assert statuses(events, EDIT_TOOL) == [pb.TOOL_CALL_STATUS_PENDING]
    assert REJECTED_TEXT in reply_text(events) and ALLOWED_TEXT not in reply_text(events)
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN


async def test_ask_nobody_answers_and_the_request_times_out_rejected(gate: Gate) -> None:
    session = await gate.create(agent=AGENT)
    asking = Asking(gate, session.session_id, PROMPT, permission_timeout=seconds(2))
    request = (await asking.question()).permission_request
    check_request(request)
    waited = asyncio.get_running_loop().time()
    events = await asking.finish()
    assert asyncio.get_running_loop().time() - waited >= 1.5
    permission = decision(events)
    assert (permission.policy, permission.request_id) == ("timeout", request.request_id)
    assert permission.outcome == pb.PERMISSION_OUTCOME_REJECTED and permission.selected_option_id == "reject"
    assert REJECTED_TEXT in reply_text(events)
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    late = await expect_error(answer(gate.stub, session.session_id, request, "allow"))
    assert late.reason == "REQUEST_ANSWERED" and late.metadata["state"] == "expired"


async def test_cancel_prompt_while_the_example_waits_for_an_answer(gate: Gate) -> None:
    session = await gate.create(agent=AGENT)
    asking = Asking(gate, session.session_id, PROMPT)
    request = (await asking.question()).permission_request
    cancelled = await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id), timeout=5)
    assert cancelled.cancelled
    events = await asyncio.wait_for(asking.finish(), 15)
    permission = decision(events)
    assert (permission.policy, permission.outcome) == ("cancelled", pb.PERMISSION_OUTCOME_CANCELLED)
    assert permission.request_id == request.request_id and not permission.selected_option_id
    assert ALLOWED_TEXT not in reply_text(events) and REJECTED_TEXT not in reply_text(events)
    # The example answers `end_turn` after a cancelled permission request (ACP asks an agent for
    # `cancelled` after session/cancel): the turn was cancelled, and CancelPrompt says so.
    assert events[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
    # The session and its agent work on, here with approve-all for this prompt: no one is asked.
    events = await gate.prompt(session.session_id, "again", permission_policy="approve-all")
    allowed = decision(events)
    assert (allowed.policy, allowed.outcome) == ("approve-all", pb.PERMISSION_OUTCOME_ALLOWED)
    assert allowed.selected_option_id == "allow" and ALLOWED_TEXT in reply_text(events)
    assert statuses(events, EDIT_TOOL) == [pb.TOOL_CALL_STATUS_PENDING, pb.TOOL_CALL_STATUS_COMPLETED]
    assert "permission_request" not in kinds(events)
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
