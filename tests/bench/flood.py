"""Load from its own process: stream `/flood` turns on the given sessions until stdin closes.

`python -m tests.bench.flood TARGET SESSION_ID...`; prints "streaming" once every stream has
its first event, so latency probes in the harness do not share a loop with this load.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc


async def main(target: str, session_ids: list[str]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        calls = [
            stub.Prompt(pb.PromptRequest(session_id=s, text="/flood 1000000000 64")) for s in session_ids
        ]
        for call in calls:
            await call.read()
        print("streaming", flush=True)

        async def drain(call: grpc.aio.UnaryStreamCall) -> None:
            while await call.read() is not grpc.aio.EOF:
                pass

        drains = [asyncio.ensure_future(drain(c)) for c in calls]
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
        for call in calls:
            call.cancel()
        await asyncio.gather(*drains, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
