"""The floor of any gateway like ours: a minimal relay. A bare grpc.aio SessionService whose
Prompt writes the prompt to one echo agent as a JSON-RPC line and streams the message chunks of
the lines it reads back, then the result. No ACP SDK, session, lock, log, store, validation or
metrics: what is left is the gRPC hop plus a pipe to the agent, in one process.

Run as `python -m tests.bench.relay_server WORKDIR`; prints its port on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import acp
import grpc
from sessiongate.server.agents.transport import LINE_LIMIT
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.bench.direct_acp import agent_env


class Agent:
    """One echo agent over stdio, spoken to a line at a time (one request at a time)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin and process.stdout
        self.process, self._stdin, self._stdout = process, process.stdin, process.stdout
        self._next_id = 0

    def send(self, method: str, params: dict[str, Any]) -> None:
        self._next_id += 1
        line = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params}
        self._stdin.write(json.dumps(line).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        return dict(json.loads(await self._stdout.readline()))

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        self.send(method, params)
        while "id" not in (message := await self.receive()):
            pass
        return message["result"]


class RelayService(pb_grpc.SessionServiceServicer):
    def __init__(self, agent: Agent, session_id: str) -> None:
        self._agent = agent
        self._session_id = session_id

    async def Prompt(self, request: pb.PromptRequest, context: Any) -> AsyncIterator[pb.PromptEvent]:
        prompt = [{"type": "text", "text": request.text}]
        self._agent.send("session/prompt", {"sessionId": self._session_id, "prompt": prompt})
        seq = 0
        while "id" not in (message := await self._agent.receive()):
            update = message["params"]["update"]
            if update.get("sessionUpdate") == "agent_message_chunk":
                seq += 1
                text = pb.ContentBlock(text=pb.TextContent(text=update["content"]["text"]))
                yield pb.PromptEvent(seq=seq, message_chunk=pb.ContentChunk(content=text))
        yield pb.PromptEvent(seq=seq + 1, result=pb.TurnResult(stop_reason=pb.STOP_REASON_END_TURN))


async def main(workdir: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sessiongate.echo",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=agent_env(Path(workdir)),
        limit=LINE_LIMIT,
    )
    agent = Agent(process)
    await agent.call("initialize", {"protocolVersion": acp.PROTOCOL_VERSION, "clientCapabilities": {}})
    session = await agent.call("session/new", {"cwd": workdir, "mcpServers": []})
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(RelayService(agent, session["sessionId"]), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.stop(0)
    process.kill()
    await process.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
