"""The built-in agent reaches its session's MCP servers (/mcp list, tools, call), driven directly over ACP.

No gateway: the test is the ACP client and passes `mcpServers` at session/new and session/load,
as the gateway will. The servers are real ones written with the `mcp` SDK (tests/mcp_server.py):
over stdio (started by the agent) and over streamable HTTP (started here on a loopback port).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import acp
import pytest
from acp import schema
from sessiongate.server.agents.transport import LINE_LIMIT

from tests.conftest import eventually
from tests.mcp_server import serving

REPO = Path(__file__).resolve().parent.parent
SECRET = f"s3cret-{uuid.uuid4().hex}"  # an env value that must reach the stdio server, never a reply
HEADER_SECRET = f"Bearer hdr-{uuid.uuid4().hex}"


class _Client:
    """The client side of ACP: collects the agent's message text."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        if getattr(update, "session_update", "") == "agent_message_chunk":
            self.chunks.append(update.content.text)

    async def request_permission(self, **_: Any) -> schema.RequestPermissionResponse:
        return schema.RequestPermissionResponse(outcome=schema.DeniedOutcome(outcome="cancelled"))


class EchoOverAcp:
    """One echo agent process, driven directly over stdio, in its own process group."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self.client = _Client()
        assert process.stdin and process.stdout
        self.conn: Any = acp.connect_to_agent(self.client, process.stdin, process.stdout)  # type: ignore[arg-type]
        self.session_id = ""
        self.replies: list[str] = []  # every reply of this agent, to check what never appears

    async def turn(self, text: str) -> str:
        """Run one prompt; its reply text."""
        self.client.chunks.clear()
        response = await self.conn.prompt(
            session_id=self.session_id, prompt=[schema.TextContentBlock(type="text", text=text)]
        )
        assert response.stop_reason == "end_turn", text
        await eventually(lambda: bool(self.client.chunks), timeout=5, what=f"the reply to {text!r}")
        reply = "".join(self.client.chunks)
        self.replies.append(reply)
        return reply


@contextlib.asynccontextmanager
async def echo_agent(state_dir: Path) -> AsyncIterator[EchoOverAcp]:
    """Start `python -m sessiongate.echo` (cwd: the repo, so `-m tests.mcp_server` resolves)."""
    stderr_path = state_dir / f"agent-{uuid.uuid4().hex[:6]}.stderr"
    state_dir.mkdir(parents=True, exist_ok=True)
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sessiongate.echo",
            "--state-dir",
            str(state_dir),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
            start_new_session=True,
            limit=LINE_LIMIT,
        )
    agent = EchoOverAcp(process, stderr_path)
    try:
        initialized = await agent.conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        assert initialized.agent_capabilities.mcp_capabilities.http
        assert initialized.agent_capabilities.mcp_capabilities.sse
        yield agent
    finally:
        await agent.conn.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the agent and any MCP server it started
        await process.wait()


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    """The streamable HTTP server's URL."""
    with serving("http") as port:
        yield f"http://127.0.0.1:{port}/mcp"


def stdio_server(name: str, command: str = sys.executable) -> schema.McpServerStdio:
    return schema.McpServerStdio(
        name=name,
        command=command,
        args=["-m", "tests.mcp_server", "stdio"],
        env=[schema.EnvVariable(name="SECRET_TOKEN", value=SECRET)],
    )


def http_mcp_server(name: str, url: str) -> schema.HttpMcpServer:
    return schema.HttpMcpServer(
        type="http",
        name=name,
        url=url,
        headers=[schema.HttpHeader(name="Authorization", value=HEADER_SECRET)],
    )


def sse_mcp_server(name: str, url: str) -> schema.SseMcpServer:
    header = schema.HttpHeader(name="Authorization", value=HEADER_SECRET)
    return schema.SseMcpServer(type="sse", name=name, url=url, headers=[header])


def assert_no_secret(agent: EchoOverAcp) -> None:
    for text in [*agent.replies, agent.stderr.read_text(errors="replace")]:
        assert SECRET not in text
        assert HEADER_SECRET not in text


async def test_list_and_call_over_stdio_and_http(tmp_path: Path, http_server: str) -> None:
    async with echo_agent(tmp_path / "state") as agent:
        servers = [stdio_server("local"), http_mcp_server("remote", http_server)]
        agent.session_id = (await agent.conn.new_session(cwd=str(tmp_path), mcp_servers=servers)).session_id

        listed = (await agent.turn("/mcp list")).splitlines()
        python = os.path.basename(sys.executable)
        assert listed == [f"local stdio {python} env: SECRET_TOKEN", "remote http headers: Authorization"]

        assert await agent.turn('/mcp call local add {"a": 2, "b": 3}') == "5"
        assert await agent.turn('/mcp call remote add {"a": 2, "b": 3}') == "5"
        assert await agent.turn('/mcp call remote echo {"text": "over http"}') == "over http"
        assert await agent.turn("/mcp tools local") == "echo, add, secret_env"

        # The env value reached the stdio server (and only that variable is set there).
        assert await agent.turn('/mcp call local secret_env {"name": "SECRET_TOKEN"}') == "set"
        assert await agent.turn('/mcp call local secret_env {"name": "NOT_GIVEN_TOKEN"}') == "unset"
        assert_no_secret(agent)


async def test_call_over_sse(tmp_path: Path) -> None:
    with serving("sse") as port:
        async with echo_agent(tmp_path / "state") as agent:
            servers = [sse_mcp_server("events", f"http://127.0.0.1:{port}/sse")]
            created = await agent.conn.new_session(cwd=str(tmp_path), mcp_servers=servers)
            agent.session_id = created.session_id
            assert await agent.turn("/mcp list") == "events sse headers: Authorization"
            assert await agent.turn('/mcp call events add {"a": 20, "b": 22}') == "42"
            assert_no_secret(agent)


async def test_errors_reply_one_line_and_the_agent_stays_healthy(tmp_path: Path) -> None:
    async with echo_agent(tmp_path / "state") as agent:
        servers = [stdio_server("local"), stdio_server("ghost", command=str(tmp_path / "no-such-server"))]
        agent.session_id = (await agent.conn.new_session(cwd=str(tmp_path), mcp_servers=servers)).session_id

        unknown = await agent.turn('/mcp call nowhere add {"a": 1, "b": 1}')
        assert unknown == "mcp error: no server named 'nowhere'"
        missing = await agent.turn('/mcp call ghost add {"a": 1, "b": 1}')
        assert missing.startswith("mcp error: ghost: ") and "\n" not in missing and len(missing) < 700
        assert (await agent.turn("/mcp call local add {not json")).startswith(
            "mcp error: arguments are not JSON"
        )
        assert await agent.turn("/mcp call local add [1, 2]") == "mcp error: arguments must be a JSON object"
        tool_error = await agent.turn('/mcp call local add {"a": "x" , "b": 1}')
        assert tool_error.startswith("mcp tool error from local: ")
        huge = await agent.turn("/mcp call local echo " + json.dumps({"text": "y" * 5000}))
        assert len(huge) <= 2000

        assert await agent.turn('/mcp call local add {"a": 1, "b": 1}') == "2"  # still healthy
        assert await agent.turn("still here") == "still here"
        assert_no_secret(agent)


async def test_servers_passed_at_load_reach_a_fresh_agent(tmp_path: Path, http_server: str) -> None:
    state = tmp_path / "state"
    async with echo_agent(state) as agent:
        created = await agent.conn.new_session(cwd=str(tmp_path), mcp_servers=[stdio_server("local")])
        session_id = created.session_id
    async with echo_agent(state) as fresh:
        servers = [http_mcp_server("docs", http_server), stdio_server("local")]
        await fresh.conn.load_session(cwd=str(tmp_path), session_id=session_id, mcp_servers=servers)
        fresh.session_id = session_id
        listed = (await fresh.turn("/mcp list")).splitlines()
        assert [line.split()[:2] for line in listed] == [["docs", "http"], ["local", "stdio"]]
        assert await fresh.turn('/mcp call docs add {"a": 40, "b": 2}') == "42"
    async with echo_agent(state) as bare:  # nothing is kept on disk: a load without servers has none
        await bare.conn.load_session(cwd=str(tmp_path), session_id=session_id, mcp_servers=[])
        bare.session_id = session_id
        assert await bare.turn("/mcp list") == "no mcp servers"
    for path in state.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace")
