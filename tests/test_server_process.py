"""The server as users run it: `python -m server` in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import eventually, expect_error, kill_leftovers, reply_text, wait_gone

CONFIG = """
[server]
stall_timeout = 5
drain_grace = 1

[agents.slow]
command = "{python}"
args = ["-m", "server.echo_agent", "--init-delay", "3600"]
env = {{ ECHO_AGENT_STATE_DIR = "{state}" }}

[agents.echo]
command = "{python}"
args = ["-m", "server.echo_agent"]
env = {{ ECHO_AGENT_STATE_DIR = "{state}" }}
"""


class ServerProcess:
    def __init__(self, process: subprocess.Popen[str], port: int, state_dir: Path) -> None:
        self.process = process
        self.port = port
        self.state_dir = state_dir

    def agent_pids(self) -> set[int]:
        pid_dir = self.state_dir / "pids"
        return {int(p.name) for p in pid_dir.iterdir()} if pid_dir.exists() else set()


async def read_port(process: subprocess.Popen[str], timeout: float = 20) -> int:
    assert process.stderr is not None

    def scan() -> int:
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"serving on .* \(port (\d+)\)", line)
            if match:
                return int(match.group(1))
        raise AssertionError("server exited before serving")

    return await asyncio.wait_for(asyncio.to_thread(scan), timeout)


@pytest.fixture
async def server_process(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    state = tmp_path / "agent-state"
    config = tmp_path / "sessiongate.toml"
    config.write_text(CONFIG.format(python=sys.executable, state=state))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--workdir",
            str(tmp_path),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        port = await read_port(process)
        # Keep draining the log so the server never blocks on a full pipe.
        drain = asyncio.create_task(asyncio.to_thread(lambda: process.stderr and process.stderr.read()))
        yield ServerProcess(process, port, state)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        kill_leftovers(wait_gone(ServerProcess(process, 0, state).agent_pids(), 0))
    await drain


async def test_sigterm_drains_exits_zero_and_leaves_no_agent_behind(server_process: ServerProcess) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server_process.port}")
    stub = pb_grpc.SessionServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        for service in ("", "sessiongate.v1.SessionService"):
            status = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        sessions = [await stub.CreateSession(pb.CreateSessionRequest(), timeout=20) for _ in range(2)]
        events = [
            e async for e in stub.Prompt(pb.PromptRequest(session_id=sessions[0].session_id, text="hi"))
        ]
        assert reply_text(events) == "hi"
        starting = asyncio.create_task(
            expect_error(stub.CreateSession(pb.CreateSessionRequest(agent="slow")))
        )
        stalled = stub.Prompt(pb.PromptRequest(session_id=sessions[1].session_id, text="/stall"), timeout=30)
        await asyncio.wait_for(stalled.read(), 10)
        # Wait until the slow agent is spawned (it records its PID) and stuck in initialize.
        await eventually(lambda: len(server_process.agent_pids()) == 3, what="the third agent start")
        pids = server_process.agent_pids()

        server_process.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server_process.process.wait, 20)

        assert code == 0
        last = None
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (event := await asyncio.wait_for(stalled.read(), 10)) is not grpc.aio.EOF:
                last = event
        assert last is not None and last.result.stop_reason == pb.STOP_REASON_CANCELLED
        assert (await starting).code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert not await asyncio.to_thread(wait_gone, pids, 10), "agents outlived the server"
    finally:
        await channel.close()


async def test_reflection_lists_the_services_without_proto_files(server_process: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_process.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"sessiongate.v1.SessionService", "grpc.health.v1.Health"} <= names


def test_configuration_errors_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[agents.x]\ncommand = "y"\npermission_policy = "maybe"\n')
    result = subprocess.run(
        [sys.executable, "-m", "server", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "permission_policy" in result.stderr and "Traceback" not in result.stderr
