"""A third-party MCP server behind a session: `@modelcontextprotocol/server-everything` (issue 23).

The reference server of the MCP project (npm, pinned in tests/node/package.json and installed
there by `make test`), run over stdio as an operator-named `[mcp_servers.everything]`. Its
`dist/index.js` takes the transport as its first argument (`stdio`, the default). Among its
tools are `echo` ({"message"} -> "Echo: MESSAGE") and `get-sum` ({"a", "b"} -> "The sum of A
and B is SUM."). The built-in agent reaches them with the official `mcp` SDK through `/mcp tools`
and `/mcp call`, proving a session's agent is given a server it did not write and can use it.

A test skips, saying why, only when node or the package is not installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sessiongate.server.settings import McpServerConfig

from tests.conftest import Gate, GateFactory, echo_agent, reply_text, require_installed

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tests" / "node" / "node_modules" / "@modelcontextprotocol" / "server-everything"
ENTRY = PACKAGE / "dist" / "index.js"  # package.json's bin `mcp-server-everything`
AGENT = "echo-mcp"


@pytest.fixture
async def gate(make_gate: GateFactory, tmp_path: Path) -> Gate:
    """A server whose built-in agent's sessions may name `everything`, the npm server over stdio."""
    node = require_installed(shutil.which("node"), "node")
    entry = require_installed(ENTRY, "@modelcontextprotocol/server-everything (npm, tests/node)")
    catalog = {"everything": McpServerConfig("everything", "stdio", command=node, args=(entry, "stdio"))}
    agents = {AGENT: echo_agent(AGENT, tmp_path / "echo-state")}
    made: Gate = await make_gate(agents=agents, settings={"mcp_servers": catalog})
    return made


async def test_the_builtin_agent_lists_and_calls_the_everything_servers_tools(gate: Gate) -> None:
    created = await gate.create(agent=AGENT, mcp_servers=["everything"])
    assert [(s.name, s.transport) for s in created.mcp_servers] == [("everything", "stdio")]

    listed = reply_text(await gate.prompt(created.session_id, "/mcp tools everything", timeout=60))
    tools = set(listed.split(", "))
    assert {"echo", "get-sum", "get-env"} <= tools, listed

    echoed = await gate.prompt(created.session_id, '/mcp call everything echo {"message": "hi"}', timeout=60)
    assert reply_text(echoed) == "Echo: hi"

    add = '/mcp call everything get-sum {"a": 2, "b": 3}'
    summed = await gate.prompt(created.session_id, add, timeout=60)
    assert reply_text(summed) == "The sum of 2 and 3 is 5."


async def test_a_bad_argument_is_the_servers_error_in_one_short_line(gate: Gate) -> None:
    created = await gate.create(agent=AGENT, mcp_servers=["everything"])
    events = await gate.prompt(created.session_id, '/mcp call everything echo {"message": 7}', timeout=60)
    reply = reply_text(events)
    # The server's own validation (zod) refuses it; the agent says so, naming the server.
    assert reply.startswith("mcp tool error from everything:") and "Invalid arguments for tool echo" in reply
    assert "Echo:" not in reply and "\n" not in reply
