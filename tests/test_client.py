"""The Python SDK against a real server: calls, typed errors, retries."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from google.protobuf import json_format
from sessiongate.client import (
    AgentAuthRequired,
    AgentProtocolError,
    AgentUnavailable,
    AsyncSessionClient,
    InvalidRequest,
    NotSupported,
    RequestAnswered,
    RequestNotFound,
    SessionBusy,
    SessionClient,
    SessionNotFound,
    retry,
    retry_async,
)
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory


async def test_async_client_mirrors_the_rpcs(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target, metadata=[("x-caller", "tests")]) as client:
        assert await client.health() == "SERVING"
        assert (await client.list_agents()).default_agent == "echo"
        session = await client.create_session(labels={"k": "v"})
        assert session.request_id.startswith("sdk-"), "the SDK makes creates idempotent"
        text, result = await client.reply(session.session_id, "typed events and a result")
        assert text == "typed events and a result"
        assert result.stop_reason == pb.STOP_REASON_END_TURN
        kinds = [e.WhichOneof("event") async for e in client.prompt(session.session_id, "x")]
        assert kinds[0] == "thought_chunk" and kinds[-1] == "result"
        for _ in range(2):
            await client.create_session()
        listed = [s.session_id async for s in client.list_sessions(page_size=1)]
        assert len(listed) == 3 and listed[0] == session.session_id
        assert [s.session_id async for s in client.list_sessions(labels={"k": "v"})] == [session.session_id]
        assert not await client.cancel_prompt(session.session_id)
        assert (await client.close_session(session.session_id)).state == pb.SESSION_STATE_CLOSED
        assert (await client.close_session(session.session_id)).state == pb.SESSION_STATE_CLOSED  # safe again
        with pytest.raises(SessionNotFound) as raised:
            await client.get_session(session.session_id)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert raised.value.metadata["session_id"] == session.session_id
        other = await client.create_session()
        with pytest.raises(AgentProtocolError) as broken:
            await client.reply(other.session_id, "/badresult")
        assert broken.value.metadata["method"] == "session/prompt"


async def test_errors_are_typed_with_their_decoded_details(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"locked": ("--auth-required",)})
    async with AsyncSessionClient(gate.target) as client:
        with pytest.raises(AgentAuthRequired) as auth:
            await client.create_session("locked")
        assert auth.value.metadata["auth_methods"] == "echo-login"

        with pytest.raises(InvalidRequest) as invalid:
            await client.create_session("nope")
        assert "agent" in invalid.value.violations

        session = await client.create_session()
        turn = asyncio.create_task(client.reply(session.session_id, "/sleep 1.5 first"))
        await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)
        with pytest.raises(SessionBusy) as busy:
            await client.reply(session.session_id, "second")
        assert busy.value.retry_delay == 1.0 and busy.value.reason == "SESSION_BUSY"
        assert (await turn)[0] == "first"


async def test_retry_helper_honours_retry_info_within_a_bounded_wait(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session()
        turn = asyncio.create_task(client.reply(session.session_id, "/sleep 2 first"))
        await gate.wait_state(session.session_id, pb.SESSION_STATE_BUSY)

        with pytest.raises(SessionBusy):
            await retry_async(lambda: client.reply(session.session_id, "too impatient"), max_wait=0.5)
        started = time.monotonic()
        text, _ = await retry_async(lambda: client.reply(session.session_id, "patient"), max_wait=15)
        assert text == "patient"
        assert time.monotonic() - started >= 0.5, "it must have waited for the first turn"
        await turn


async def test_agent_start_failures_are_not_retried_transparently(make_gate: GateFactory) -> None:
    """The unary retry policy retries UNAVAILABLE; the server commits AGENT_UNAVAILABLE first so
    a failing agent is started once, not once per attempt."""
    gate: Gate = await make_gate(agents={"refuses": ("--fail-init",)})
    async with AsyncSessionClient(gate.target) as client:
        with pytest.raises(AgentUnavailable):
            await client.create_session("refuses")
    assert len(gate.agent_pids()) == 1


async def test_the_blocking_client_and_retry(gate: Gate) -> None:
    def scenario() -> tuple[str, str, int]:
        with SessionClient(gate.target) as client:
            session = client.create_session()
            text, _ = client.reply(session.session_id, "blocking works")
            events = list(client.prompt(session.session_id, "again"))
            retried, _ = retry(lambda: client.reply(session.session_id, "retried"), max_wait=5)
            return text, retried, events[-1].result.stop_reason

    text, retried, stop = await asyncio.to_thread(scenario)
    assert (text, retried, stop) == ("blocking works", "retried", pb.STOP_REASON_END_TURN)


async def test_abandoning_a_prompt_iteration_cancels_the_turn_upstream(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session()
        stream = client.prompt(session.session_id, "/stall")
        first = await anext(stream)
        assert first.HasField("message_chunk")
        await stream.aclose()
        await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)
        assert any(f"cancel {session.agent_session_id}" in line for line in gate.events_log())


# ---- questions the agent asks, answered by the client ------------------------------------


async def test_on_permission_answers_each_request_while_the_stream_goes_on(gate: Gate) -> None:
    """The echo agent's /permission asks to edit notes.txt: options allow / reject."""
    asked: list[pb.PermissionRequest] = []

    async def allow(request: pb.PermissionRequest) -> str:
        asked.append(request)
        await asyncio.sleep(0)  # a coroutine callback is awaited
        return "allow"

    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session()
        events = [e async for e in client.prompt(session.session_id, "/permission", on_permission=allow)]
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds.index("permission_request") < kinds.index("permission")
        [request] = asked
        assert request.tool_call.title == "Editing notes.txt" and request.tool_call.kind == "edit"
        assert [o.option_id for o in request.options] == ["allow", "reject"]
        [decision] = [e.permission for e in events if e.HasField("permission")]
        assert decision.policy == "client" and decision.request_id == request.request_id
        assert decision.outcome == pb.PERMISSION_OUTCOME_ALLOWED
        text, result = await client.reply(session.session_id, "/permission", on_permission=allow)
        assert text == "permission allow" and result.stop_reason == pb.STOP_REASON_END_TURN
        # A plain function works too; an explicit policy wins over the implied `ask`.
        text, _ = await client.reply(session.session_id, "/permission", on_permission=lambda r: "reject")
        assert text == "permission reject"
        text, _ = await client.reply(
            session.session_id, "/permission", permission_policy="approve-all", on_permission=allow
        )
        assert text == "permission allow" and len(asked) == 2, "approve-all decided: nobody was asked"


async def test_respond_permission_from_a_second_client(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target) as client, AsyncSessionClient(gate.target) as other:
        session = await client.create_session()
        sid = session.session_id
        stream = client.prompt(sid, "/permission", on_permission=lambda request: None)  # leaves it open
        events = []
        async for event in stream:
            events.append(event)
            if event.HasField("permission_request"):
                request_id = event.permission_request.request_id
                with pytest.raises(RequestNotFound):
                    await other.respond_permission(sid, "no-such-request", "allow")
                with pytest.raises(InvalidRequest) as invalid:
                    await other.respond_permission(sid, request_id, "maybe")
                assert "option_id" in invalid.value.violations
                outcome = await other.respond_permission(sid, request_id, "allow")
                assert outcome == pb.PERMISSION_OUTCOME_ALLOWED
                with pytest.raises(RequestAnswered) as answered:
                    await other.respond_permission(sid, request_id, "reject")
                assert answered.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "".join(e.message_chunk.content.text.text for e in events) == "permission allow"

        # The blocking client answers from another thread the same way.
        def answer_blocking(request_id: str) -> int:
            with SessionClient(gate.target) as blocking:
                return blocking.respond_permission(sid, request_id, "reject")

        async for event in client.prompt(sid, "/permission", permission_policy="ask"):
            if event.HasField("permission_request"):
                outcome = await asyncio.to_thread(answer_blocking, event.permission_request.request_id)
                assert outcome == pb.PERMISSION_OUTCOME_REJECTED
            if event.HasField("message_chunk"):
                assert event.message_chunk.content.text.text == "permission reject"


async def test_a_bad_answer_ends_the_turn_at_once_with_a_typed_error(gate: Gate) -> None:
    """The agent would wait for a valid answer until the permission timeout; the SDK does not."""
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session()
        started = time.monotonic()
        with pytest.raises(InvalidRequest):
            await client.reply(session.session_id, "/permission", on_permission=lambda r: "maybe")
        assert time.monotonic() - started < 20
        await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)

        def broken(request: pb.PermissionRequest) -> str:
            raise RuntimeError("the callback broke")

        with pytest.raises(RuntimeError, match="the callback broke"):
            await client.reply(session.session_id, "/permission", on_permission=broken)
        await gate.wait_state(session.session_id, pb.SESSION_STATE_IDLE)
        text, _ = await client.reply(session.session_id, "usable again")
        assert text == "usable again"


async def test_the_blocking_client_answers_with_a_plain_function(gate: Gate) -> None:
    def scenario() -> tuple[str, str, list[str]]:
        with SessionClient(gate.target) as client:
            session = client.create_session()
            asked: list[str] = []

            def choose(request: pb.PermissionRequest) -> str:
                asked.append(request.tool_call.title)
                return "allow" if len(asked) == 1 else "reject"

            first, _ = client.reply(session.session_id, "/permission", on_permission=choose)
            events = list(client.prompt(session.session_id, "/permission", on_permission=choose))
            second = "".join(e.message_chunk.content.text.text for e in events)
            return first, second, asked

    first, second, asked = await asyncio.to_thread(scenario)
    assert (first, second) == ("permission allow", "permission reject")
    assert asked == ["Editing notes.txt", "Editing notes.txt"]


async def test_on_elicitation_accepts_declines_or_cancels(gate: Gate) -> None:
    """The echo agent's /elicit asks for a form with a `name` string."""
    asked: list[pb.ElicitationRequest] = []

    def fill_in(request: pb.ElicitationRequest) -> dict[str, str]:
        asked.append(request)
        return {"name": "Ada"}

    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session()
        sid = session.session_id
        text, _ = await client.reply(sid, "/elicit", on_elicitation=fill_in)
        assert text.startswith("elicitation accept ")
        assert json.loads(text.removeprefix("elicitation accept ")) == {"name": "Ada"}
        [request] = asked
        assert request.mode == "form"
        assert "name" in json_format.MessageToDict(request.requested_schema)["properties"]
        text, _ = await client.reply(sid, "/elicit", on_elicitation=lambda r: "decline")
        assert text == "elicitation decline"
        text, _ = await client.reply(sid, "/elicit", on_elicitation=lambda r: pb.ELICITATION_ACTION_CANCEL)
        assert text == "elicitation cancel"

        # Answered by hand: respond_elicitation with an action string and content.
        async for event in client.prompt(sid, "/elicit", permission_policy="ask"):
            if event.HasField("elicitation_request"):
                request_id = event.elicitation_request.request_id
                await client.respond_elicitation(sid, request_id, "accept", {"name": "Grace"})
                with pytest.raises(RequestAnswered):
                    await client.respond_elicitation(sid, request_id, "decline")
            if event.HasField("elicitation"):
                assert event.elicitation.action == pb.ELICITATION_ACTION_ACCEPT
                assert event.elicitation.policy == "client"
        with pytest.raises(ValueError):
            await client.respond_elicitation(sid, "any", "maybe")


# ---- session state: modes, config options; agent authentication --------------------------


async def test_set_mode_and_set_config_option(gate: Gate) -> None:
    """The echo agent's modes: ask, code (default); options: model (echo-small, echo-large), verbose."""
    async with AsyncSessionClient(gate.target) as client:
        session = await client.create_session()
        sid = session.session_id
        assert session.modes.current_mode_id == "code"
        assert {m.id for m in session.modes.available_modes} == {"ask", "code"}
        model = next(o for o in session.config_options if o.id == "model")
        assert {v.value for v in model.values} == {"echo-small", "echo-large"}

        updated = await client.set_mode(sid, "ask")
        assert updated.modes.current_mode_id == "ask"
        updated = await client.set_config_option(sid, "model", "echo-large")
        assert next(o for o in updated.config_options if o.id == "model").current_value == "echo-large"
        updated = await client.set_config_option(sid, "verbose", True)  # a bool goes as "true"
        assert next(o for o in updated.config_options if o.id == "verbose").current_value == "true"
        text, _ = await client.reply(sid, "/state")
        assert text == "mode=ask model=echo-large verbose=true"
        assert (await client.get_session(sid)).modes.current_mode_id == "ask"

        with pytest.raises(InvalidRequest):
            await client.set_mode(sid, "no-such-mode")
        with pytest.raises(InvalidRequest):
            await client.set_config_option(sid, "model", "echo-huge")
        with pytest.raises(SessionNotFound):
            await client.set_mode("no-such-session", "ask")

    def blocking() -> tuple[str, str]:
        with SessionClient(gate.target) as sync_client:
            mode = sync_client.set_mode(sid, "code").modes.current_mode_id
            options = sync_client.set_config_option(sid, "verbose", False).config_options
            return mode, next(o for o in options if o.id == "verbose").current_value

    assert await asyncio.to_thread(blocking) == ("code", "false")


async def test_authenticate_agent(make_gate: GateFactory) -> None:
    """The echo agent under --auth-required logs in with `echo-login`."""
    gate: Gate = await make_gate(agents={"locked": ("--auth-required",)})
    async with AsyncSessionClient(gate.target) as client:
        with pytest.raises(AgentAuthRequired):
            await client.create_session("locked")
        with pytest.raises(NotSupported) as unsupported:
            await client.authenticate_agent("locked", "no-such-method")
        assert unsupported.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(InvalidRequest) as invalid:
            await client.authenticate_agent("nope", "echo-login")
        assert "agent" in invalid.value.violations
        response = await client.authenticate_agent("locked", "echo-login")
        assert (response.agent, response.method_id) == ("locked", "echo-login")
        session = await client.create_session("locked")
        assert session.agent == "locked"
        assert {a.name: a.auth_method for a in (await client.list_agents()).agents}["locked"] == "echo-login"
