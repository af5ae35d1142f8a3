"""Starting `python -m sessiongate.server` as users run it: its own process group, its own state.

Each server gets its own state database and agent state dir under the test's tmp_path, its
log is collected line by line, and on exit whatever is left of it and its agents is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import eventually, kill_leftovers, wait_gone

CONFIG = """
[server]
stall_timeout = 5
drain_grace = {drain_grace}

[agents.slow]
command = "{python}"
args = ["-m", "sessiongate.echo", "--init-delay", "3600"]
env = {{ ECHO_AGENT_STATE_DIR = "{state}" }}
sandbox = "none"

[agents.echo]
command = "{python}"
args = ["-m", "sessiongate.echo"]
env = {{ ECHO_AGENT_STATE_DIR = "{state}" }}
sandbox = "none"
"""


class ServerProcess:
    """One `python -m sessiongate.server` process and a channel to it."""

    def __init__(self, process: subprocess.Popen[str], port: int, state_dir: Path, log: list[str]) -> None:
        self.process = process
        self.port = port
        self.state_dir = state_dir
        self.log = log
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.SessionServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def log_has(self, text: str) -> bool:
        return any(text in line for line in self.log)

    def agent_pids(self) -> set[int]:
        pid_dir = self.state_dir / "pids"
        return {int(p.name) for p in pid_dir.iterdir()} if pid_dir.exists() else set()

    async def health_status(self) -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return response.status

    async def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(signum)
        return await asyncio.to_thread(self.process.wait, timeout)


@contextlib.asynccontextmanager
async def server_process(
    tmp_path: Path,
    drain_grace: float = 1.0,
    extra_args: tuple[str, ...] = (),
    shared: Path | None = None,
) -> AsyncIterator[ServerProcess]:
    """Start a server on tmp_path's database; on exit, kill whatever is left of it and its agents.
    `shared`: the workdir and the agents' state dir, shared with other servers (replicas)."""
    state = (shared or tmp_path) / "agent-state"
    config = tmp_path / "sessiongate.toml"
    config.write_text(CONFIG.format(python=sys.executable, state=state, drain_grace=drain_grace))
    argv = [
        *(sys.executable, "-m", "sessiongate.server", "--config", str(config), "--listen", "127.0.0.1:0"),
        *("--workdir", str(shared or tmp_path), "--state-db", str(tmp_path / "sessions.db")),
        *extra_args,
    ]
    server: ServerProcess | None = None
    try:
        async with running(argv) as started:
            server = ServerProcess(started.process, started.port, state, started.log)
            try:
                yield server
            finally:
                await server.channel.close()
    finally:
        if server is not None:
            kill_leftovers(wait_gone(server.agent_pids(), 0))


def run_server(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m sessiongate.server ARGS` run to its exit (a start it refuses, --version,
    --check-config): its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "sessiongate.server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


@dataclass
class Started:
    """A process that said it is serving: its port and its log so far (still growing)."""

    process: subprocess.Popen[str]
    port: int
    log: list[str]


@contextlib.asynccontextmanager
async def running(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    start_bound: float = 30,
    what: str = "server",
) -> AsyncIterator[Started]:
    """`argv` (a server, or `make run`) in its own process group, its stderr collected line by
    line; yields once it logs "serving on … (port N)". Afterwards its whole group is killed."""
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    log: list[str] = []
    reader = asyncio.create_task(asyncio.to_thread(_read_log, process, log))
    try:
        await eventually(
            lambda: _port(log) is not None or process.poll() is not None, start_bound, f"{what} start"
        )
        port = _port(log)
        assert port is not None, f"{what} exited before serving:\n" + "".join(log)
        yield Started(process, port, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)
        await reader


def _read_log(process: subprocess.Popen[str], log: list[str]) -> None:
    assert process.stderr is not None
    for line in process.stderr:  # keep draining so the server never blocks on a full pipe
        log.append(line)


def _port(log: list[str]) -> int | None:
    for line in log:
        match = re.search(r"serving on .* \(port (\d+)\)", line)
        if match:
            return int(match.group(1))
    return None
