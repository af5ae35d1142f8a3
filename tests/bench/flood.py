"""Load from its own process: keep streaming turns on the given sessions until stdin closes.

`python -m tests.bench.flood TARGET SESSION_ID...`. Each session runs long turns back to
back, a word every 50 ms (20 chunks/s: a model writing a long answer). Prints "streaming"
once every session's first turn has produced an event, so that latency probes in the
harness do not share a loop with the load.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

TURN_TEXT = "/pace 50 " + " ".join(f"w{i}" for i in range(2000))


async def main(target: str, session_ids: list[str]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        started = asyncio.Semaphore(0)
        stop = asyncio.Event()

        async def keep_streaming(session_id: str) -> None:
            first = True
            while not stop.is_set():
                # Every stream is read as it arrives: unread streams would fill the
                # connection's flow-control window and starve the others.
                async for _ in stub.Prompt(pb.PromptRequest(session_id=session_id, text=TURN_TEXT)):
                    if first:
                        first = False
                        started.release()
                    if stop.is_set():
                        return

        tasks = [asyncio.ensure_future(keep_streaming(s)) for s in session_ids]
        for _ in session_ids:
            await started.acquire()
        print("streaming", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
