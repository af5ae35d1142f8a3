"""Fixtures: a real sessiongate server on an ephemeral loopback port, real echo-agent subprocesses.

Every test that starts a server gets it drained at the end, and then checks by PID that no
agent process it started is still alive: a leaked agent fails the test that leaked it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiongate.server.app import RunningServer, start_server
from sessiongate.server.sandbox.idle_cgroup import clear_stale, open_idle_cgroup
from sessiongate.server.settings import AgentConfig, ServerLimits, Settings, validate
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.postgres import PostgresServer, postgres_server

ECHO = (sys.executable, "-m", "sessiongate.echo")


def echo_agent(name: str, state_dir: Path, *extra: str, policy: str = "approve-reads") -> AgentConfig:
    return AgentConfig(
        name=name,
        command=ECHO[0],
        args=(*ECHO[1:], *extra),
        env={"ECHO_AGENT_STATE_DIR": str(state_dir), "SESSIONGATE_TEST_MARKER": "agent-env"},
        permission_policy=policy,
        # Unconfined: tests read the agents' PIDs from their state dir, which a PID namespace
        # would hide; tests/test_sandbox.py runs agents in the sandbox.
        sandbox="none",
    )


@dataclass
class Gate:
    """A running test server and a client channel to it."""

    running: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.SessionServiceStub
    state_dir: Path
    workdir: Path
    settings: Settings
    extra_channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    async def create(self, **kwargs: Any) -> pb.Session:
        return await self.stub.CreateSession(pb.CreateSessionRequest(**kwargs), timeout=30)

    async def prompt(
        self, session_id: str, text: str, timeout: float = 30, **kwargs: Any
    ) -> list[pb.PromptEvent]:
        request = pb.PromptRequest(session_id=session_id, text=text, **kwargs)
        return [event async for event in self.stub.Prompt(request, timeout=timeout)]

    async def state(self, session_id: str) -> int:
        session = await self.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=5)
        return session.state

    async def wait_state(self, session_id: str, state: int, timeout: float = 15) -> float:
        """Poll until the session is in `state`; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if await self.state(session_id) == state:
                return time.monotonic() - start
            await asyncio.sleep(0.05)
        raise AssertionError(f"session {session_id} never reached {pb.SessionState.Name(state)}")

    def agent_pids(self) -> set[int]:
        """Every echo agent process these tests' agents started (they record themselves)."""
        pid_dir = self.state_dir / "pids"
        return {int(p.name) for p in pid_dir.iterdir()} if pid_dir.exists() else set()

    def events_log(self) -> list[str]:
        path = self.state_dir / "events.log"
        return path.read_text().splitlines() if path.exists() else []


def require_installed(path: Path | str | None, why: str) -> str:
    """`path` of a third-party tool the tests drive; the test is skipped, saying why, where it
    is not installed (`make test` installs them all)."""
    if path is None or not Path(path).exists():
        pytest.skip(f"{why} is not installed (run `make test`, which installs it)")
    return str(path)


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command's name (whose parentheses may hold anything): [0]
    is the state, [1] the parent, [16] the nice value (the file's 3rd, 4th and 19th fields)."""
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


@functools.cache
def idle_cgroup_parent() -> Path | None:
    """Our own cgroup of the CPU controller where "auto" can make an idle cgroup (probed: one
    made and removed), or None: the idle cgroup's tests and checks are skipped there (CI runs as
    root, with cgroup v1's cpu hierarchy)."""
    idle = open_idle_cgroup("auto")
    if idle is None:
        return None
    idle.remove()
    return idle.path.parent


@pytest.fixture(autouse=True, scope="session")
def no_idle_cgroups_left() -> Iterator[None]:
    """A server a test SIGKILLs leaves its idle cgroup (the next start clears it): cleared here."""
    yield
    parent = idle_cgroup_parent()
    if parent is not None:
        clear_stale(parent)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting its parent's wait counts as gone)."""
    try:
        return proc_stat(pid)[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
    """PIDs still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p for p in left if alive(p)}
    return left


async def eventually(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(0.05)


def kill_leftovers(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


GateFactory = Callable[..., Awaitable[Gate]]


@pytest.fixture(autouse=True, scope="session")
def isolated_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test, and no server or agent a test starts, may touch the real user's state dir."""
    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if previous is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = previous


@pytest.fixture
async def make_gate(tmp_path: Path) -> AsyncIterator[GateFactory]:
    """Start servers with chosen limits and extra agents; all are drained and checked at the end."""
    gates: list[Gate] = []
    state_dir = tmp_path / "agent-state"
    workdir = tmp_path / "work"
    workdir.mkdir()

    async def factory(
        agents: dict[str, tuple[str, ...] | AgentConfig] | None = None,
        state_db: Path | None = None,
        state_url: str = "",
        metrics: bool = False,
        auth_tokens_file: Path | None = None,
        reflection: str = "authenticated",
        settings: dict[str, Any] | None = None,
        **limits: Any,
    ) -> Gate:
        """`agents` values: echo-agent flags, ("policy", NAME), ("command", PATH, *ARGS), or a config."""
        state_db = state_db or tmp_path / f"sessions-{len(gates)}.db"
        configs = {"echo": echo_agent("echo", state_dir)}
        for name, extra in (agents or {}).items():
            if isinstance(extra, AgentConfig):
                configs[name] = extra
            elif extra and extra[0] == "policy":
                configs[name] = echo_agent(name, state_dir, policy=extra[1])
            elif extra and extra[0] == "command":
                configs[name] = AgentConfig(name=name, command=extra[1], args=extra[2:], sandbox="none")
            else:
                configs[name] = echo_agent(name, state_dir, *extra)
        defaults = {
            "stall_timeout": 10.0,
            "cancel_grace": 2.0,
            "kill_grace": 2.0,
            "agent_start_timeout": 15.0,
        }
        validated = validate(
            replace(
                Settings(
                    listen="127.0.0.1:0",
                    default_agent="echo",
                    workdir=workdir,
                    agents=configs,
                    limits=replace(ServerLimits(), **{**defaults, **limits}),
                    state_db=state_db,
                    state_url=state_url,
                    metrics_listen="127.0.0.1:0" if metrics else "",
                    auth_tokens_file=auth_tokens_file,
                    reflection=reflection,
                ),
                **(settings or {}),
            )
        )
        running = await start_server(validated)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        gate = Gate(running, channel, pb_grpc.SessionServiceStub(channel), state_dir, workdir, validated)
        gates.append(gate)
        return gate

    yield factory

    for gate in gates:
        await gate.running.drain(0)
        for extra in gate.extra_channels:
            await extra.close()
        await gate.channel.close()
    pids = gates[0].agent_pids() if gates else set()
    leaked = await asyncio.to_thread(wait_gone, pids, 10)
    kill_leftovers(leaked)
    assert not leaked, f"agent processes outlived the server: {sorted(leaked)}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole run (each test takes a fresh database of it)."""
    with postgres_server() as server:
        yield server


@dataclass(frozen=True)
class StateBackend:
    """Where a test's servers keep their state: an SQLite file or a PostgreSQL database."""

    name: str
    state_db: Path
    state_url: str = ""

    def gate_kwargs(self) -> dict[str, Any]:
        """For make_gate: every server of the test on the same state."""
        return {"state_db": self.state_db, "state_url": self.state_url}

    def process_args(self) -> tuple[str, ...]:
        """For server_process's extra_args."""
        if self.state_url:  # a restarted server is the same replica: its sessions are its own again
            return ("--state-url", self.state_url, "--replica-id", "replica-a")
        return ("--state-db", str(self.state_db))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """One value read from the state database by the test itself (SQL with ? placeholders)."""
        if not self.state_url:
            with contextlib.closing(sqlite3.connect(self.state_db)) as db:
                return db.execute(sql, args).fetchone()[0]
        numbers = itertools.count(1)
        db = await asyncpg.connect(self.state_url, timeout=10)
        try:
            return await db.fetchval(re.sub(r"\?", lambda _: f"${next(numbers)}", sql), *args)
        finally:
            await db.close(timeout=10)


@pytest.fixture(params=["sqlite", "postgres"])
async def state(request: pytest.FixtureRequest, tmp_path: Path) -> StateBackend:
    """The persistence tests run on both backends of the store."""
    if request.param == "sqlite":
        return StateBackend("sqlite", tmp_path / "state" / "sessions.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return StateBackend("postgres", tmp_path / "unused.db", await server.fresh_database())


@pytest.fixture
async def gate(make_gate: GateFactory) -> Gate:
    gate: Gate = await make_gate()
    return gate


@dataclass
class ErrorDetails:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay: float | None = None
    violations: dict[str, str] = field(default_factory=dict)
    quota: dict[str, str] = field(default_factory=dict)  # QuotaFailure: subject -> description


def details_of(error: grpc.aio.AioRpcError) -> ErrorDetails:
    """Decode `grpc-status-details-bin` the way any client would."""
    status = rpc_status.from_call(error)
    out = ErrorDetails(code=error.code(), message=error.details() or "")
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason, out.domain, out.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            out.quota = {v.subject: v.description for v in quota.violations}
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.violations = {v.field: v.description for v in bad.field_violations}
    return out


async def rpc_error(call: Any) -> grpc.aio.AioRpcError | None:
    """The error a unary call or a stream ends with; None if it succeeds."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def expect_error(call: Any) -> ErrorDetails:
    """Await a unary call or drain a stream, expecting it to fail; returns the decoded status."""
    error = await rpc_error(call)
    if error is None:
        raise AssertionError("the call succeeded; an error was expected")
    return details_of(error)


def kinds(events: list[pb.PromptEvent]) -> list[str]:
    return [e.WhichOneof("event") or "" for e in events]


def reply_text(events: list[pb.PromptEvent]) -> str:
    return "".join(e.message_chunk.content.text.text for e in events if e.HasField("message_chunk"))
