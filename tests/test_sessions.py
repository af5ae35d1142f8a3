"""Creating, listing, closing sessions, and agent start-up failures."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiongate.server.api import service
from sessiongate.server.sessions.session import new_session_id
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, echo_agent, eventually, expect_error, wait_gone


async def test_auth_required_agent_fails_create_with_failed_precondition(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"locked": ("--auth-required",)})
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="locked")))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "AGENT_AUTH_REQUIRED")
    assert error.metadata["auth_methods"] == "echo-login"
    health = health_pb2_grpc.HealthStub(gate.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert not await asyncio.to_thread(wait_gone, gate.agent_pids(), 5), "the refused agent was left running"


async def test_authenticate_agent_clears_auth_required_without_a_restart(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"locked": ("--auth-required",)})
    refused = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="locked")))
    assert refused.reason == "AGENT_AUTH_REQUIRED"
    unknown = await expect_error(
        gate.stub.AuthenticateAgent(pb.AuthenticateAgentRequest(agent="locked", method_id="sso"), timeout=30)
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_SUPPORTED")
    assert unknown.metadata["auth_methods"] == "echo-login"
    bad = await expect_error(
        gate.stub.AuthenticateAgent(pb.AuthenticateAgentRequest(agent="nobody", method_id=""), timeout=5)
    )
    assert set(bad.violations) == {"agent", "method_id"}
    done = await gate.stub.AuthenticateAgent(
        pb.AuthenticateAgentRequest(agent="locked", method_id="echo-login"), timeout=30
    )
    assert (done.agent, done.method_id) == ("locked", "echo-login")
    agents = await gate.stub.ListAgents(pb.ListAgentsRequest(), timeout=5)
    assert {a.name: a.auth_method for a in agents.agents}["locked"] == "echo-login"
    # Every new process of the agent now authenticates first: sessions open, and turns run.
    session = await gate.create(agent="locked")
    events = await gate.prompt(session.session_id, "/state")
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    # An agent that refuses the login: AGENT_REFUSED, and nothing changes.
    refusing = await expect_error(
        gate.stub.AuthenticateAgent(
            pb.AuthenticateAgentRequest(agent="echo", method_id="echo-login"), timeout=30
        )
    )
    assert refusing.reason == "NOT_SUPPORTED"  # the plain echo agent offers no auth method


async def test_authenticate_agent_replaces_a_configured_method_that_does_not_work(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    typo = replace(echo_agent("typo", tmp_path / "agent-state", "--auth-required"), auth_method="sso-typo")
    gate: Gate = await make_gate(agents={"typo": typo})
    broken = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="typo"), timeout=30))
    assert broken.reason == "NOT_SUPPORTED" and "sso-typo" in broken.message
    await gate.stub.AuthenticateAgent(
        pb.AuthenticateAgentRequest(agent="typo", method_id="echo-login"), timeout=30
    )
    session = await gate.create(agent="typo")
    assert session.state == pb.SESSION_STATE_IDLE


async def test_agent_that_cannot_start_is_agent_unavailable(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"missing": ("command", "/nonexistent/agent-binary")})
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="missing")))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_UNAVAILABLE")
    assert "could not be started" in error.message


async def test_agent_that_refuses_initialize_is_agent_unavailable_with_its_message(
    make_gate: GateFactory,
) -> None:
    gate: Gate = await make_gate(agents={"refuses": ("--fail-init",)})
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="refuses")))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_UNAVAILABLE")
    assert "initialize refused" in error.message


async def test_concurrent_creates_with_one_request_id_start_one_agent(gate: Gate) -> None:
    sessions = await asyncio.gather(*(gate.create(request_id="req-1", labels={"n": "1"}) for _ in range(5)))
    assert len({s.session_id for s in sessions}) == 1
    assert len(gate.agent_pids()) == 1
    retried = await gate.create(request_id="req-1")
    assert retried.session_id == sessions[0].session_id
    assert retried.request_id == "req-1"
    assert len(gate.agent_pids()) == 1


async def test_request_id_reused_for_another_cwd_is_invalid(gate: Gate) -> None:
    (gate.workdir / "sub").mkdir()
    await gate.create(request_id="req-2")
    error = await expect_error(
        gate.stub.CreateSession(pb.CreateSessionRequest(request_id="req-2", cwd="sub"))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in error.violations


async def test_get_list_paginate_filter_and_close(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"second": ()})
    first = await gate.create(labels={"team": "a"}, cwd=str(gate.workdir))
    created = [first, await gate.create(), await gate.create(agent="second")]

    got = await gate.stub.GetSession(pb.GetSessionRequest(session_id=first.session_id))
    assert (got.agent, got.cwd, dict(got.labels)) == ("echo", str(gate.workdir), {"team": "a"})
    assert got.agent_session_id.startswith("echo-") and got.create_time.seconds > 0

    page1 = await gate.stub.ListSessions(pb.ListSessionsRequest(page_size=2))
    page2 = await gate.stub.ListSessions(
        pb.ListSessionsRequest(page_size=2, page_token=page1.next_page_token)
    )
    assert [s.session_id for s in [*page1.sessions, *page2.sessions]] == [s.session_id for s in created]
    assert page1.next_page_token and not page2.next_page_token
    only_second = await gate.stub.ListSessions(pb.ListSessionsRequest(agent="second"))
    assert [s.session_id for s in only_second.sessions] == [created[2].session_id]

    pids_before = gate.agent_pids()
    closed = await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=first.session_id))
    assert closed.session.state == pb.SESSION_STATE_CLOSED
    gone = await expect_error(gate.stub.GetSession(pb.GetSessionRequest(session_id=first.session_id)))
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    left = await asyncio.to_thread(wait_gone, pids_before, 5)
    assert len(left) == 2, "closing one session must end exactly its own agent"


async def test_a_page_too_large_for_one_message_is_cut_and_continued(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions carry their agents' modes and options: a page stops short of the message limit
    (here made small), and its token goes on from the last session it holds."""
    created = [await gate.create() for _ in range(3)]
    one = (await gate.stub.GetSession(pb.GetSessionRequest(session_id=created[0].session_id))).ByteSize()
    monkeypatch.setattr(service, "MAX_LIST_BYTES", int(one * 1.5))
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await gate.stub.ListSessions(pb.ListSessionsRequest(page_size=10, page_token=token))
        assert len(page.sessions) == 1
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [s.session_id for s in created]


async def test_close_during_a_turn_cancels_the_turn_and_ends_the_agent(gate: Gate) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/hang"), timeout=30)
    await asyncio.wait_for(call.read(), 10)
    await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=15)
    last = None
    while (event := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
        last = event
    assert last is not None and last.result.stop_reason == pb.STOP_REASON_CANCELLED
    assert not await asyncio.to_thread(wait_gone, gate.agent_pids(), 5)


async def test_list_agents_names_every_agent_and_the_default(make_gate: GateFactory) -> None:
    gate: Gate = await make_gate(agents={"other": ("policy", "deny-all")})
    response = await gate.stub.ListAgents(pb.ListAgentsRequest())
    assert response.default_agent == "echo"
    by_name = {a.name: a for a in response.agents}
    assert set(by_name) == {"echo", "other"}
    assert by_name["echo"].is_default and not by_name["other"].is_default
    assert by_name["other"].permission_policy == "deny-all"
    assert os.path.basename(by_name["echo"].command).startswith("python")


async def test_a_prompt_waiting_on_a_session_that_gets_closed_is_not_found_and_starts_no_agent(
    gate: Gate,
) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/stall"), timeout=30)
    await asyncio.wait_for(call.read(), 10)
    waiting = asyncio.create_task(
        expect_error(
            gate.stub.Prompt(
                pb.PromptRequest(
                    session_id=session.session_id, text="late", wait_timeout=Duration(seconds=20)
                )
            )
        )
    )
    live = gate.running.pool.get(session.session_id)
    await eventually(lambda: live.lock.waiting == 1, what="the late prompt to queue for the session")
    await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id), timeout=15)
    error = await asyncio.wait_for(waiting, 15)
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert len(gate.agent_pids()) == 1, "the closed session's waiting prompt respawned an agent"
    call.cancel()


def test_session_ids_are_unguessable_and_never_read_as_command_line_options() -> None:
    ids = {new_session_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert not any(i.startswith("-") for i in ids)  # 1 in 64 would, drawn plainly
    assert all(len(i) == 24 for i in ids)
