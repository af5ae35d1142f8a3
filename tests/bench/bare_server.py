"""The transport baseline: a bare grpc.aio SessionService whose Prompt streams N PromptEvents
(64-byte message chunks, then a result) straight from memory. No agent, no session, no lock.

Run as `python -m tests.bench.bare_server`; prints its port on stdout.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc


class BareService(pb_grpc.SessionServiceServicer):
    async def Prompt(self, request: pb.PromptRequest, context: Any) -> AsyncIterator[pb.PromptEvent]:
        count, _, size = request.text.partition(" ")
        chunk = pb.ContentChunk(content=pb.ContentBlock(text=pb.TextContent(text="x" * int(size or 64))))
        for seq in range(1, int(count) + 1):
            yield pb.PromptEvent(seq=seq, message_chunk=chunk)
        yield pb.PromptEvent(seq=int(count) + 1, result=pb.TurnResult(stop_reason=pb.STOP_REASON_END_TURN))


async def main() -> None:
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(BareService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
