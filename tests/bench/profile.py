"""Profile the gateway with a sampling profiler:
`python -m tests.bench.profile {stream,first-event,concurrent} [--turns N] [--svg FILE]`.

Starts `python -m sessiongate.server`, samples it with py-spy while this process drives it,
and prints the frames that the samples spent most time in, own and inclusive (a flame graph's
widest frames), as shares of the samples taken while the workload ran:
- `stream` floods one session (/flood 20000 64), `concurrent` floods 16 sessions at once;
- `first-event` runs short turns one after another (the time to first event's path).
`--svg` also writes the flame graph. Extra server options follow `--`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
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

from tests.bench.harness import Gateway, _cpu_seconds, _stat_fields


async def drive(pid: int, port: int, workload: str, turns: int, profiling: threading.Event) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        count = 16 if workload == "concurrent" else 1
        create = pb.CreateSessionRequest(agent="echo")
        ids = [(await stub.CreateSession(create, timeout=60)).session_id for _ in range(count)]
        text = "hi" if workload == "first-event" else "/flood 20000 64"
        firsts: list[float] = []
        received = [0]

        async def one(sid: str) -> None:
            for _ in range(turns):
                t0 = time.perf_counter()
                call = stub.Prompt(pb.PromptRequest(session_id=sid, text=text))
                await call.read()
                firsts.append((time.perf_counter() - t0) * 1000)
                while await call.read() is not grpc.aio.EOF:
                    received[0] += 1

        await one(ids[0])  # warm up, unsampled
        firsts.clear()
        received[0] = 0
        profiling.set()
        await asyncio.sleep(0.5)
        started, cpu, system = time.perf_counter(), _cpu_seconds(pid)[0], _system_seconds(pid)
        await asyncio.gather(*(one(s) for s in ids))
        took, cpu = time.perf_counter() - started, _cpu_seconds(pid)[0] - cpu
        system = _system_seconds(pid) - system
    firsts.sort()
    chunks = turns * count * (1 if workload == "first-event" else 20000)
    return (
        f"{turns * count} turns in {took:.1f}s, first event p50 {firsts[len(firsts) // 2]:.2f} ms,"
        f" gateway CPU {cpu / chunks * 1e6:.1f} µs per chunk"
        f" ({system / chunks * 1e6:.1f} µs of it in the kernel),"
        f" {chunks / max(received[0], 1):.1f} chunks per event"
    )


def _system_seconds(pid: int) -> float:
    """The CPU time a process spent in the kernel so far (its system calls)."""
    return int(_stat_fields(pid)[12]) / os.sysconf("SC_CLK_TCK")


def report(raw: Path, top: int) -> None:
    """Own and inclusive shares of py-spy's collapsed stacks ("frame;frame;... count")."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r" \((?:.*/)?([^/:]*)(?::\d+)?\)$", r" (\1)", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"{total} samples")
    for title, counter in (("own", own), ("inclusive", inclusive)):
        print(f"\ntop frames, {title} share of the samples:")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / total:6.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    parser.add_argument("workload", choices=["stream", "concurrent", "first-event"])
    parser.add_argument("--turns", type=int, help="turns to run (default: 3 for floods, 300 for first-event)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--svg", type=Path, help="also write the flame graph here")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    parser.add_argument("--no-sample", action="store_true", help="only the figures, no profiler")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, server_args = argv[:cut], argv[cut + 1 :]
    opts = parser.parse_args(ours)
    turns = opts.turns or (300 if opts.workload == "first-event" else 3)
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: make setup installs it")
    with tempfile.TemporaryDirectory(prefix="sessiongate-profile-") as tmp:
        workdir, raw = Path(tmp), Path(tmp) / "stacks.txt"
        gate = Gateway(workdir, args=tuple(server_args))
        process, port = gate.process, gate.port
        profiling = threading.Event()
        sampler: list[subprocess.Popen[bytes]] = []

        def sample() -> None:
            profiling.wait()
            if opts.no_sample:
                return
            command = [spy, "record", "--pid", str(process.pid), "--rate", "250", "--nonblocking"]
            command += ["--gil"] if opts.gil else []
            outputs = [["--format", "raw", "-o", str(raw)], *([["-o", str(opts.svg)]] if opts.svg else [])]
            for output in outputs:
                sampler.append(subprocess.Popen([*command, *output], stdout=subprocess.DEVNULL))

        threading.Thread(target=sample, daemon=True).start()
        try:
            print(asyncio.run(drive(process.pid, port, opts.workload, turns, profiling)))
        finally:
            for spying in sampler:
                spying.send_signal(signal.SIGINT)
                spying.wait(60)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        if not opts.no_sample:
            report(raw, opts.top)


if __name__ == "__main__":
    main()
