"""Profile the gateway: `python -m tests.bench.profile {stream,first-event} [--turns N]`.

Runs `python -m sessiongate.server` under cProfile in its own process, drives it from this one, stops
it with SIGTERM (so the profile is written) and prints the functions that cost most per
turn: `stream` floods one session (/flood), `first-event` runs short turns one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc


def start_profiled_server(workdir: Path, profile: Path) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "sessiongate.server"),
            *("--listen", "127.0.0.1:0", "--workdir", str(workdir), "--state-db", str(workdir / "db")),
        ],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        match = re.search(r"serving on .* \(port (\d+)\)", line)
        if match:
            # Keep draining the log so the server never blocks on a full pipe.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(match.group(1))
    raise RuntimeError("the profiled server did not start")


async def drive(port: int, workload: str, turns: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        session = await stub.CreateSession(pb.CreateSessionRequest(), timeout=60)
        text = "/flood 20000 64" if workload == "stream" else "hi"
        firsts = []
        started = time.perf_counter()
        for _ in range(turns):
            t0 = time.perf_counter()
            call = stub.Prompt(pb.PromptRequest(session_id=session.session_id, text=text))
            await call.read()
            firsts.append((time.perf_counter() - t0) * 1000)
            while await call.read() is not grpc.aio.EOF:
                pass
        took = time.perf_counter() - started
    firsts.sort()
    return f"{turns} turns in {took:.1f}s, first event p50 {firsts[len(firsts) // 2]:.2f} ms (under cProfile)"


def report(profile: Path, turns: int, top: int) -> None:
    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    rows = []
    for (path, _line, name), (_cc, calls, own, cumulative, _callers) in stats.items():
        short = path.split("site-packages/")[-1].split(str(Path.cwd()) + "/")[-1]
        startup = "importlib" in short or name in (
            "<built-in method builtins.exec>",
            "<built-in method builtins.__build_class__>",
        )
        if calls >= turns and not startup:  # per-turn work, not imports and start-up
            rows.append((cumulative / turns * 1000, own / turns * 1000, calls, f"{short}:{name}"))
    rows.sort(reverse=True)
    print("per turn: cumulative ms, own ms, calls, function")
    for cumulative, own, calls, where in rows[:top]:
        print(f"{cumulative:8.3f} {own:8.3f} {calls:8d}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    parser.add_argument("workload", choices=["stream", "first-event"])
    parser.add_argument("--turns", type=int, help="turns to run (default: 3 for stream, 300 for first-event)")
    parser.add_argument("--top", type=int, default=30)
    opts = parser.parse_args()
    turns = opts.turns or (3 if opts.workload == "stream" else 300)
    with tempfile.TemporaryDirectory(prefix="sessiongate-profile-") as tmp:
        workdir, profile = Path(tmp), Path(tmp) / "server.prof"
        process, port = start_profiled_server(workdir, profile)
        try:
            print(asyncio.run(drive(port, opts.workload, turns)))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        report(profile, turns, opts.top)


if __name__ == "__main__":
    main()
