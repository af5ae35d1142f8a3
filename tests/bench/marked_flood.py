"""Flooding load from its own process, counted in windows the harness marks.

`python -m tests.bench.marked_flood --chunks N TARGET SESSION_ID...`. Each session runs
`/flood N 64` turns back to back (the next one starts when one ends). Prints "streaming"
once every session's first turn has produced an event. Then, for each line "mark" on stdin,
prints "mark CHUNKS MOVED": the agent chunks received so far on all sessions (counted by
text length, so coalesced events count as the chunks they carry) and how many sessions
received any since the last mark. When stdin closes, cancels the turns and prints
"done TURNS BAD FAILED": turns that ran to their result, completed turns that did not carry
exactly N whole chunks ending in an END_TURN result, and streams that failed. The harness
fails the run unless BAD and FAILED are 0 and every session moved in every window.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import grpc
from google.protobuf import duration_pb2
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

CHUNK = 64
# A turn that just ended may hold its session for a moment: the next one waits for it.
WAIT = duration_pb2.Duration(seconds=30)


async def main(target: str, session_ids: list[str], chunks: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        started = asyncio.Semaphore(0)
        stop = asyncio.Event()
        chars = dict.fromkeys(session_ids, 0)  # per session, over all its turns
        counts = {"turns": 0, "bad": 0}

        async def keep_flooding(session_id: str) -> None:
            first = True
            request = pb.PromptRequest(
                session_id=session_id, text=f"/flood {chunks} {CHUNK}", wait_timeout=WAIT
            )
            while not stop.is_set():
                turn_chars = 0
                last: pb.PromptEvent | None = None
                # Every stream is read as it arrives: unread streams would fill the
                # connection's flow-control window and starve the others.
                async for event in stub.Prompt(request):
                    if event.HasField("message_chunk"):
                        size = len(event.message_chunk.content.text.text)
                        turn_chars += size
                        chars[session_id] += size
                    last = event
                    if first:
                        first = False
                        started.release()
                    if stop.is_set():
                        return
                counts["turns"] += 1
                if (
                    turn_chars != chunks * CHUNK
                    or last is None
                    or not last.HasField("result")
                    or last.result.stop_reason != pb.STOP_REASON_END_TURN
                ):
                    counts["bad"] += 1

        tasks = [asyncio.ensure_future(keep_flooding(s)) for s in session_ids]
        waiting: asyncio.Future[Any] = asyncio.gather(*(started.acquire() for _ in session_ids))
        done, _ = await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:  # a stream failed before every session streamed
            waiting.cancel()
        else:
            print("streaming", flush=True)
            seen = dict(chars)
            loop = asyncio.get_running_loop()
            while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "mark":
                moved = sum(chars[s] > seen[s] for s in session_ids)
                seen = dict(chars)
                print(f"mark {sum(seen.values()) // CHUNK} {moved}", flush=True)
        stop.set()
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for error in failed:
            print(f"a stream failed: {error!r}", file=sys.stderr, flush=True)
        print(f"done {counts['turns']} {counts['bad']} {len(failed)}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench.marked_flood")
    parser.add_argument("--chunks", type=int, required=True, help="chunks per flooding turn")
    parser.add_argument("target")
    parser.add_argument("session_ids", nargs="+")
    opts = parser.parse_args()
    asyncio.run(main(opts.target, opts.session_ids, opts.chunks))
