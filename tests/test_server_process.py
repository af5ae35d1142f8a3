"""The server as users run it: signals, drain, restarts on the same database (after
SIGTERM and after kill -9), a corrupt database, reflection, configuration errors."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import StateBackend, eventually, expect_error, reply_text, wait_gone
from tests.processes import run_server, server_process


async def test_sigterm_drains_exits_zero_and_leaves_no_agent_behind(tmp_path: Path) -> None:
    async with server_process(tmp_path, drain_grace=3.0) as server:
        for service in ("", "sessiongate.v1.SessionService"):
            status = await server.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        sessions = [await server.stub.CreateSession(pb.CreateSessionRequest(), timeout=20) for _ in range(3)]
        events = [
            e
            async for e in server.stub.Prompt(pb.PromptRequest(session_id=sessions[0].session_id, text="hi"))
        ]
        assert reply_text(events) == "hi"
        starting = asyncio.create_task(
            expect_error(server.stub.CreateSession(pb.CreateSessionRequest(agent="slow")))
        )
        stalled = server.stub.Prompt(
            pb.PromptRequest(session_id=sessions[1].session_id, text="/stall"), timeout=30
        )
        short = server.stub.Prompt(pb.PromptRequest(session_id=sessions[2].session_id, text="/sleep 1 done"))
        await asyncio.wait_for(stalled.read(), 10)
        # Wait until the slow agent is spawned (it records its PID) and stuck in initialize.
        await eventually(lambda: len(server.agent_pids()) == 4, what="the fourth agent start")
        pids = server.agent_pids()

        server.process.send_signal(signal.SIGTERM)
        # At once: NOT_SERVING, and new work is refused while running turns drain.
        await eventually(lambda: "received SIGTERM" in "".join(server.log), 10, "the signal")
        assert await server.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        refused = await expect_error(
            server.stub.Prompt(pb.PromptRequest(session_id=sessions[0].session_id, text="x"))
        )
        assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        refused = await expect_error(server.stub.CreateSession(pb.CreateSessionRequest()))
        assert refused.reason == "SHUTTING_DOWN"
        # A turn that ends within the grace finishes normally; one that does not is cancelled,
        # and its stream ends UNAVAILABLE/SHUTTING_DOWN (not a CANCELLED result: nobody cancelled).
        assert reply_text([e async for e in short]) == "done"
        cut_off = await expect_error(asyncio.wait_for(drain_stream(stalled), 15))
        assert (cut_off.code, cut_off.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")

        assert await asyncio.to_thread(server.process.wait, 30) == 0
        refused_start = await starting  # a create under way is answered, not dropped
        assert (refused_start.code, refused_start.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        assert not await asyncio.to_thread(wait_gone, pids, 10), "agents outlived the server"


async def drain_stream(call: grpc.aio.UnaryStreamCall) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_restart_after_sigterm_lists_every_session_suspended_and_each_resumes(
    tmp_path: Path, state: StateBackend
) -> None:
    async with server_process(tmp_path, extra_args=state.process_args()) as first:
        created = [
            await first.stub.CreateSession(pb.CreateSessionRequest(request_id=f"r{n}", labels={"n": str(n)}))
            for n in range(3)
        ]
        for session in created:
            events = [
                e
                async for e in first.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="one"))
            ]
            assert reply_text(events) == "one"
        assert await first.stop() == 0

    async with server_process(tmp_path, extra_args=state.process_args()) as second:
        listed = (await second.stub.ListSessions(pb.ListSessionsRequest())).sessions
        assert [s.session_id for s in listed] == [s.session_id for s in created]
        assert {s.state for s in listed} == {pb.SESSION_STATE_SUSPENDED}
        assert [dict(s.labels) for s in listed] == [{"n": str(n)} for n in range(3)]
        assert all(s.agent_info.name == "sessiongate-echo" for s in listed)
        for session in created:
            request = pb.PromptRequest(session_id=session.session_id, text="two")
            events = [e async for e in second.stub.Prompt(request, timeout=30)]
            # Resumed with session/load: no context-reset notice, history kept agent-side.
            assert [e.WhichOneof("event") for e in events].count("notice") == 0
            assert reply_text(events) == "two"
            resumed = await second.stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
            assert resumed.agent_session_id == session.agent_session_id
            assert resumed.state == pb.SESSION_STATE_IDLE
        retried = await second.stub.CreateSession(pb.CreateSessionRequest(request_id="r1"))
        assert retried.session_id == created[1].session_id


async def test_restart_after_kill_9_keeps_every_session_and_request_id(
    tmp_path: Path, state: StateBackend
) -> None:
    async with server_process(tmp_path, extra_args=state.process_args()) as first:
        created = [
            await first.stub.CreateSession(pb.CreateSessionRequest(request_id=f"k{n}")) for n in range(2)
        ]
        orphans = first.agent_pids()
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        # The agents lost their stdin with the server: they end by themselves.
        assert not await asyncio.to_thread(wait_gone, orphans, 10)

    async with server_process(tmp_path, extra_args=state.process_args()) as second:
        listed = (await second.stub.ListSessions(pb.ListSessionsRequest())).sessions
        assert [s.session_id for s in listed] == [s.session_id for s in created]
        assert {s.state for s in listed} == {pb.SESSION_STATE_SUSPENDED}
        retried = await second.stub.CreateSession(pb.CreateSessionRequest(request_id="k0"))
        assert retried.session_id == created[0].session_id
        for session in created:
            request = pb.PromptRequest(session_id=session.session_id, text="after kill")
            assert reply_text([e async for e in second.stub.Prompt(request, timeout=30)]) == "after kill"


async def test_a_corrupt_database_is_moved_aside_and_the_server_starts(tmp_path: Path) -> None:
    (tmp_path / "sessions.db").write_bytes(b"this is not a sqlite database" * 100)
    async with server_process(tmp_path) as server:
        assert await server.health_status() == health_pb2.HealthCheckResponse.SERVING
        session = await server.stub.CreateSession(pb.CreateSessionRequest())
        assert session.state == pb.SESSION_STATE_IDLE
        assert any("could not be read" in line and "moved it to" in line for line in server.log)
    aside = list(tmp_path.glob("sessions.db.unreadable-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not a sqlite database")


async def test_reflection_lists_the_services_without_proto_files(tmp_path: Path) -> None:
    async with server_process(tmp_path) as server:
        stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"sessiongate.v1.SessionService", "grpc.health.v1.Health"} <= names


def test_configuration_errors_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[agents.x]\ncommand = "y"\npermission_policy = "maybe"\n')
    result = run_server("--config", str(bad), timeout=30)
    assert result.returncode == 2
    assert "permission_policy" in result.stderr and "Traceback" not in result.stderr


def test_an_unusable_database_path_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result = run_server("--listen", "127.0.0.1:0", "--state-db", str(blocker / "db.sqlite"), timeout=30)
    assert result.returncode == 1
    assert "cannot create the directory" in result.stderr and "Traceback" not in result.stderr


async def test_a_second_signal_stops_at_once_without_waiting_for_the_drain_grace(tmp_path: Path) -> None:
    async with server_process(tmp_path, drain_grace=60.0) as server:
        session = await server.stub.CreateSession(pb.CreateSessionRequest())
        call = server.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="/hang"), timeout=90)
        await asyncio.wait_for(call.read(), 10)
        pids = server.agent_pids()
        server.process.send_signal(signal.SIGTERM)
        await eventually(lambda: "received SIGTERM (1)" in "".join(server.log), 10, "the first signal")
        started = asyncio.get_running_loop().time()
        code = await server.stop(signal.SIGTERM, timeout=30)
        took = asyncio.get_running_loop().time() - started
        assert code == 0
        assert took < 15.0, f"the second signal took {took:.1f}s (drain grace is 60 s)"
        assert not await asyncio.to_thread(wait_gone, pids, 10)
        call.cancel()
