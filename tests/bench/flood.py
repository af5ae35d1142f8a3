"""Load from its own process: keep streaming turns on the given sessions until stdin closes.

`python -m tests.bench.flood [--text TEXT] TARGET SESSION_ID...`. Each session runs turns
back to back (the next one starts when one ends). The default turn is a long one, a word
every 50 ms (20 chunks/s: a model writing a long answer); `--text "/flood 100000 64"` makes
every session an agent streaming as fast as it can. Prints "streaming" once every
session's first turn has produced an event, so that latency probes in the harness do not
share a loop with the load; when stdin closes, cancels the turns and prints
"done EVENTS CHARS TURNS FAILED" (events received, characters of message text in them,
turns started, streams that failed) so the harness can check that the load really ran.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from google.protobuf import duration_pb2
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

TURN_TEXT = "/pace 50 " + " ".join(f"w{i}" for i in range(2000))
# A turn that just ended may hold its session for a moment: the next one waits for it.
WAIT = duration_pb2.Duration(seconds=30)


async def main(target: str, session_ids: list[str], text: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        started = asyncio.Semaphore(0)
        stop = asyncio.Event()
        counts = {"events": 0, "chars": 0, "turns": 0}

        async def keep_streaming(session_id: str) -> None:
            first = True
            while not stop.is_set():
                counts["turns"] += 1
                request = pb.PromptRequest(session_id=session_id, text=text, wait_timeout=WAIT)
                # Every stream is read as it arrives: unread streams would fill the
                # connection's flow-control window and starve the others.
                async for event in stub.Prompt(request):
                    counts["events"] += 1
                    if event.HasField("message_chunk"):
                        counts["chars"] += len(event.message_chunk.content.text.text)
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
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for error in failed:
            print(f"a stream failed: {error!r}", file=sys.stderr, flush=True)
        print(f"done {counts['events']} {counts['chars']} {counts['turns']} {len(failed)}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench.flood")
    parser.add_argument("--text", default=TURN_TEXT, help="each turn's prompt (default: a paced long answer)")
    parser.add_argument("target")
    parser.add_argument("session_ids", nargs="+")
    opts = parser.parse_args()
    asyncio.run(main(opts.target, opts.session_ids, opts.text))
