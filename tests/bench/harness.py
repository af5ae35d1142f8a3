"""The benchmark: each figure next to its baseline, measured in the same run.

The gateway (`python -m sessiongate.server`), the bare gRPC baseline server and the load generator
(this process) are separate processes. Every figure checks its inputs (each stream really
delivered N events), so a broken run fails instead of reporting a good ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sessiongate.echo.agent import flood_chunk
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.bench.direct_acp import DirectAgent, agent_env
from tests.postgres import PostgresServer, free_port, postgres_server

ROOT = Path(__file__).resolve().parents[2]  # the repository: the misbehaving agent's code


@dataclass(frozen=True)
class Scale:
    """How big a run is: `quick` takes about a minute and a half, `full` is the reference."""

    name: str
    reps: int
    stream_events: int
    concurrent: int
    concurrent_events: int
    ttfe_turns: int
    busy_samples: int
    stalled: int
    creates: int
    memory_sessions: int
    healthy: int  # sessions whose first events are timed in the isolation figure
    noisy_healthy: int  # healthy sessions prompting beside the noisy neighbours...
    noisy_turns: int  # ...this many short turns each, per phase
    noisy_flood: int  # chunks of one flooding turn (restarted when it ends)
    detached: int  # sessions each running one detached flooding turn (ON_DISCONNECT_CONTINUE)...
    detached_log_mib: int  # ...with the gateway's max_turn_log_bytes this many MiB...
    detached_chunks: int  # ...and this many DETACHED_CHUNK-byte chunks each (several times the bound)
    replica_sessions: int  # sessions flooding over 1 replica, then over 2 (half created on each)...
    replica_chunks: int  # ...each running /flood turns of this many 64-byte chunks, back to back...
    replica_window: float  # ...counted over `reps` windows of this many seconds
    slow_chunks: int  # SLOW_CHUNK-byte chunks of the slow-reader figure's turn (read at SLOW_READ)


QUICK = Scale("quick", 1, 2000, 4, 300, 30, 30, 6, 3, 10, 4, 2, 25, 20_000, 8, 4, 16_384, 16, 1000, 4.0, 40)
FULL = Scale(
    "full", 5, 20000, 64, 2000, 200, 300, 100, 15, 200, 10, 4, 150, 200_000, 64, 4, 20_480, 64, 2000, 10, 100
)
MIB = 1024 * 1024


@dataclass
class Row:
    figure: str
    unit: str
    baseline: float
    ours: float
    target: str
    met: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("inf")


@dataclass
class Report:
    scale: Scale
    rows: list[Row] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [
            f"Run: `make bench{'' if self.scale.name == 'full' else ' ARGS=--quick'}` ({self.scale.name}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
            f"Python {sys.version.split()[0]}. Medians of {self.scale.reps} repetitions where repeated.",
            "",
            TABLE_HEAD,
            "| --- | ---: | ---: | ---: | --- | --- |",
            *self._row_lines().values(),
        ]
        notes = list(self._note_lines().values())
        return "\n".join(lines + (["", *notes] if notes else [])) + "\n"

    def merged_into(self, page: str, only: list[str]) -> str:
        """A page this harness wrote (its markdown(), with its table), with this run's rows and
        notes in place of the same figures' (new ones after the others), and a line before the
        table saying which figures were re-measured when: `--only` re-measures some figures of a
        whole run. Rows are matched by their label: a figure whose label changed since the page
        was written gets a row of its own, beside the old one."""
        rows, notes = self._row_lines(), self._note_lines()
        lines = page.rstrip("\n").split("\n")
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        said = f"Re-measured {stamp} with `--only {' '.join(only)}`: those figures' rows and notes below."
        merged: list[str] = []
        for line in lines:
            if line == TABLE_HEAD:
                merged += [said, ""]
            if row := _row_figure(line, rows):
                line = rows.pop(row)
            elif note := _note_figure(line, notes):
                line = notes.pop(note)
            merged.append(line)
        table_end = max(i for i, line in enumerate(merged) if line.startswith("| ")) + 1
        merged[table_end:table_end] = rows.values()
        noted = [i for i, line in enumerate(merged) if line.startswith("- ")]
        if noted:  # after the page's notes
            merged[noted[-1] + 1 : noted[-1] + 1] = notes.values()
        elif notes:  # the first notes, below the table
            table_end += len(rows)
            merged[table_end:table_end] = ["", *notes.values()]
        return "\n".join(merged) + "\n"

    def _row_lines(self) -> dict[str, str]:
        return {
            r.figure: f"| {r.figure} | {r.baseline:,.2f} {r.unit} | {r.ours:,.2f} {r.unit} | {r.ratio:.2f} "
            f"| {r.target} | {'yes' if r.met else '**no**'} |"
            for r in self.rows
        }

    def _note_lines(self) -> dict[str, str]:
        return {r.figure: f"- {r.figure}: {r.note}" for r in self.rows if r.note}


TABLE_HEAD = "| figure | baseline | sessiongate | ratio | target | met |"


def _row_figure(line: str, figures: dict[str, str]) -> str:
    """The figure whose table row `line` is ("" if none of `figures`)."""
    return next((f for f in figures if line.startswith(f"| {f} | ")), "")


def _note_figure(line: str, figures: dict[str, str]) -> str:
    """The figure whose note `line` is ("" if none of `figures`)."""
    return max((f for f in figures if line.startswith(f"- {f}: ")), key=len, default="")  # "a: b" over "a"


# ---- processes -----------------------------------------------------------------------------


class Gateway:
    """A `python -m sessiongate.server` process with its own config, database and agent state."""

    def __init__(
        self, workdir: Path, spares: int = 0, max_sessions: int = 400, args: tuple[str, ...] = ()
    ) -> None:
        """`args`: more command-line options for the server (e.g. a limit's flag)."""
        self.workdir = workdir
        state = workdir / "agent-state"
        config = workdir / "bench.toml"
        # Agents run unsandboxed, as in the runs before the sandbox existed: the gateway is what
        # is measured, and warm spares are only for unsandboxed agents. The harness holds more
        # than the default 100 streams on its one connection (100 stalled turns and GetSession).
        config.write_text(
            "[server]\n"
            f"max_sessions = {max_sessions}\nstall_timeout = 600\nidle_ttl = 36000\nlog_level = 'WARNING'\n"
            "max_streams_per_connection = 1000\n"
            f"[agents.echo]\ncommand = '{sys.executable}'\nargs = ['-m', 'sessiongate.echo']\n"
            f"env = {{ ECHO_AGENT_STATE_DIR = '{state}' }}\nsandbox = 'none'\n"
            f"[agents.warm]\ncommand = '{sys.executable}'\nargs = ['-m', 'sessiongate.echo']\n"
            f"env = {{ ECHO_AGENT_STATE_DIR = '{state}' }}\nspares = {spares}\nsandbox = 'none'\n"
            f"[agents.misbehaving]\ncommand = '{sys.executable}'\nargs = ['-m', 'tests.misbehaving_agent']\n"
            f"env = {{ PYTHONPATH = '{ROOT}' }}\nsandbox = 'none'\n"
        )
        self.process = subprocess.Popen(
            [
                *(
                    sys.executable,
                    "-m",
                    "sessiongate.server",
                    "--config",
                    str(config),
                    "--listen",
                    "127.0.0.1:0",
                ),
                *(
                    "--workdir",
                    str(workdir),
                    "--state-db",
                    str(workdir / "sessions.db"),
                    "--log-level",
                    "INFO",
                ),
                *args,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.port = 0
        self.log: list[str] = []  # the gateway's log, shown when a figure fails
        ready = threading.Event()

        def read_log() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                match = re.search(r"serving on .* \(port (\d+)\)", line)
                if match:
                    self.port = int(match.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not ready.wait(60) or not self.port:
            raise RuntimeError("the gateway did not start")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.SessionServiceStub(self.channel)

    def rss_kib(self) -> int:
        return _rss_kib(self.process.pid)

    async def stop(self) -> None:
        await self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            await asyncio.to_thread(self.process.wait, 10)


@contextlib.asynccontextmanager
async def gateway(scratch: Path, **options: Any) -> AsyncIterator[Gateway]:
    workdir = Path(tempfile.mkdtemp(dir=scratch))
    gate = Gateway(workdir, **options)
    try:
        yield gate
    except BaseException:
        print("".join(gate.log[-40:]), file=sys.stderr)
        raise
    finally:
        await gate.stop()


@dataclass(frozen=True)
class BareServer:
    """A running server of `served()` (the bare server, the relay): its stub, and its pid (for
    its CPU time)."""

    stub: pb_grpc.SessionServiceStub
    pid: int


def bare_server() -> contextlib.AbstractAsyncContextManager[BareServer]:
    """A running tests/bench/bare_server.py."""
    return served("tests.bench.bare_server")


def relay_server(scratch: Path) -> contextlib.AbstractAsyncContextManager[BareServer]:
    """A running tests/bench/relay_server.py, on its own echo agent."""
    return served("tests.bench.relay_server", tempfile.mkdtemp(dir=scratch))


@contextlib.asynccontextmanager
async def served(module: str, *args: str) -> AsyncIterator[BareServer]:
    """`python -m module args` (a server that prints its port, and ends when its stdin closes),
    in a process group of its own that is killed if it does not end by itself."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout and process.stdin
    try:
        port = int((await asyncio.wait_for(process.stdout.readline(), 60)).decode())
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield BareServer(pb_grpc.SessionServiceStub(channel), process.pid)
        finally:
            await channel.close()
        process.stdin.close()
        await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no RSS for {pid}")


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the gateway's agents)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if int(_stat_fields(int(entry))[1]) == pid:
                    out.append(int(entry))
    return out


# ---- measuring helpers ---------------------------------------------------------------------


async def stream_counted(
    stub: pb_grpc.SessionServiceStub, request: pb.PromptRequest, chunk_size: int = 64
) -> tuple[int, int, float, float]:
    """(agent chunks delivered, message-chunk events that carried them, seconds to first event,
    seconds in all) of one Prompt stream.

    Chunks are counted by text length, so that chunks the gateway coalesced count as the
    agent events they carry, and a stream that lost or added text fails the check.
    """
    started = time.perf_counter()
    first = 0.0
    chars = events = 0
    last: pb.PromptEvent | None = None
    async for event in stub.Prompt(request, timeout=600):
        if not first:
            first = time.perf_counter() - started
        if event.HasField("message_chunk"):
            chars += len(event.message_chunk.content.text.text)
            events += 1
        last = event
    if last is None or not last.HasField("result"):
        raise RuntimeError("a stream ended without its result")
    if chars % chunk_size:
        raise RuntimeError(f"{chars} characters is not a whole number of {chunk_size}-byte chunks")
    return chars // chunk_size, events, first, time.perf_counter() - started


async def stream(
    stub: pb_grpc.SessionServiceStub, request: pb.PromptRequest, chunk_size: int = 64
) -> tuple[int, float, float]:
    """(agent chunks delivered, seconds to first event, seconds in all) of one Prompt stream
    (see stream_counted)."""
    chunks, _, first, took = await stream_counted(stub, request, chunk_size)
    return chunks, first, took


def expect(count: int, wanted: int, what: str) -> None:
    if count != wanted:
        raise RuntimeError(f"{what}: got {count} events, expected {wanted}: the run is broken")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def sessions(gate: Gateway, count: int, agent: str = "echo") -> list[str]:
    ids = []
    for _ in range(count):  # one at a time: the machine has 2 cores
        ids.append(
            (await gate.stub.CreateSession(pb.CreateSessionRequest(agent=agent), timeout=120)).session_id
        )
    return ids


async def repeat(reps: int, measure: Callable[[], Awaitable[float]]) -> float:
    return statistics.median([await measure() for _ in range(reps)])


@dataclass
class LoadTotals:
    """What a load's client received: filled in once the load has ended."""

    events: int = 0
    chars: int = 0  # of message text
    turns: int = 0
    seconds: float = 0.0  # from its first event on every session to its end


@contextlib.asynccontextmanager
async def load(gate: Gateway, ids: list[str], text: str = "") -> AsyncIterator[LoadTotals]:
    """Turns of `text` (default: long paced answers) kept running on `ids` during the block,
    restarted when they end, from a process of their own (tests/bench/flood.py)."""
    options = ("--text", text) if text else ()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tests.bench.flood", *options, f"127.0.0.1:{gate.port}", *ids),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin and process.stdout
    totals = LoadTotals()
    try:
        if (await asyncio.wait_for(process.stdout.readline(), 180)).strip() != b"streaming":
            raise RuntimeError(f"the load {text!r} did not start: the run is broken")
        started = time.perf_counter()
        await asyncio.sleep(1)  # the turns are streaming, from another process
        yield totals
        process.stdin.close()
        totals.seconds = time.perf_counter() - started
        out = (await asyncio.wait_for(process.stdout.read(), 60)).decode().split()
        await asyncio.wait_for(process.wait(), 30)
        if len(out) != 5 or out[0] != "done" or out[4] != "0":
            raise RuntimeError(f"the load {text!r} ended badly ({' '.join(out)}): the run is broken")
        totals.events, totals.chars, totals.turns = (int(n) for n in out[1:4])
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# ---- the figures -----------------------------------------------------------------------------


CPU_SETTLE = 0.2  # seconds after a measured stream before a server's CPU time is read: its turn's tail counts
CPU_TARGET = 15.0  # µs of gateway CPU per relayed chunk (issue 25)


@dataclass
class CpuTally:
    """A server process's own CPU time (user plus system, /proc/PID/stat) over measured streams,
    summed over them (and over the processes measured, one at a time), and what they delivered."""

    seconds: float = 0.0
    chunks: int = 0
    events: int = 0  # the message-chunk events that carried them
    streams: int = 0
    repetitions: int = 0
    pid: int = 0
    began: float = 0.0

    def start(self, pid: int) -> None:
        self.pid, self.began = pid, _cpu_seconds(pid)[0]

    async def stop(self, counted: list[tuple[int, int, float, float]]) -> None:
        """After the streams `counted` (stream_counted's answers) ended, and CPU_SETTLE more."""
        await asyncio.sleep(CPU_SETTLE)
        self.seconds += _cpu_seconds(self.pid)[0] - self.began
        self.chunks += sum(c[0] for c in counted)
        self.events += sum(c[1] for c in counted)
        self.streams += len(counted)
        self.repetitions += 1

    def per_chunk(self) -> float:
        """Microseconds of CPU per chunk delivered."""
        return self.seconds / self.chunks * 1e6 if self.chunks else float("inf")


def cpu_row(figure: str, floor: CpuTally, gate: CpuTally) -> Row:
    """The gateway's CPU per relayed chunk against the bare server's per event (one chunk each)."""
    ours = gate.per_chunk()
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    return Row(
        figure,
        "µs",
        floor.per_chunk(),
        ours,
        f"<= {CPU_TARGET:g} µs",
        ours <= CPU_TARGET,
        f"the gateway process's own CPU (user + system from /proc/PID/stat, in {tick:g} ms ticks; its "
        f"agents not counted) over its {gate.repetitions} measured repetitions ({gate.streams} streams), "
        f"read {CPU_SETTLE:g} s after each one's streams ended: {gate.seconds * 1000:,.0f} ms for "
        f"{gate.chunks:,} agent chunks, delivered in {gate.events:,} message events "
        f"({gate.chunks / max(gate.events, 1):.2f} chunks per delivered event); baseline: the bare "
        f"grpc.aio server's own CPU per event in this run, the floor of any gRPC server "
        f"({floor.seconds * 1000:,.0f} ms for {floor.chunks:,} events, one chunk each)",
    )


async def single_stream(scale: Scale, scratch: Path) -> list[Row]:
    """One /flood stream: the gateway's rate against a bare grpc.aio server's, and the gateway's
    CPU per relayed chunk against the bare server's per event. Each server gets one unmeasured
    warm-up stream first (the bare server's also opens its channel's connection)."""
    n = scale.stream_events
    bare_cpu = CpuTally()

    async def bare() -> float:
        async with bare_server() as server:
            expect((await stream(server.stub, pb.PromptRequest(text="10 64")))[0], 10, "bare warm-up")
            bare_cpu.start(server.pid)
            counted = await stream_counted(server.stub, pb.PromptRequest(text=f"{n} 64"))
            await bare_cpu.stop([counted])
        expect(counted[0], n, "bare server stream")
        return n / counted[3]

    async with gateway(scratch) as gate:
        (sid,) = await sessions(gate, 1)
        warm = pb.PromptRequest(session_id=sid, text="/flood 10 64")
        expect((await stream(gate.stub, warm))[0], 10, "gateway warm-up")
        gate_cpu = CpuTally()

        async def ours() -> float:
            gate_cpu.start(gate.process.pid)
            counted = await stream_counted(gate.stub, pb.PromptRequest(session_id=sid, text=f"/flood {n} 64"))
            took = counted[3]
            await gate_cpu.stop([counted])
            expect(counted[0], n, "gateway stream")
            return n / took

        baseline, measured = await repeat(scale.reps, bare), await repeat(scale.reps, ours)
    return [
        Row(
            "events/s, one Prompt stream (/flood, 64-byte chunks)",
            "ev/s",
            baseline,
            measured,
            ">= 0.8 x baseline",
            measured >= 0.8 * baseline,
        ),
        cpu_row(
            "gateway CPU per relayed chunk, one Prompt stream (/flood, 64-byte chunks)", bare_cpu, gate_cpu
        ),
    ]


async def concurrent_streams(scale: Scale, scratch: Path) -> list[Row]:
    """`concurrent` sessions flooding at once: the gateway's summed rate against direct ACP clients
    on the same agents (and a bare grpc.aio server's, in the note), and the gateway's CPU per
    relayed chunk against the bare server's per event. Each server gets an unmeasured warm-up."""
    k, n = scale.concurrent, scale.concurrent_events
    bare_cpu = CpuTally()

    async def bare() -> float:
        async with bare_server() as server:
            expect((await stream(server.stub, pb.PromptRequest(text="10 64")))[0], 10, "bare warm-up")
            bare_cpu.start(server.pid)
            started = time.perf_counter()
            results = await asyncio.gather(
                *(stream_counted(server.stub, pb.PromptRequest(text=f"{n} 64")) for _ in range(k))
            )
            took = time.perf_counter() - started
            await bare_cpu.stop(list(results))
        expect(sum(r[0] for r in results), k * n, "bare server, concurrent streams")
        return k * n / took

    agents = [DirectAgent(agent_env(scratch)) for _ in range(k)]
    for agent in agents:
        await agent.start(str(scratch))
    try:

        async def direct() -> float:
            started = time.perf_counter()
            results = await asyncio.gather(*(a.turn(f"/flood {n} 64") for a in agents))
            took = time.perf_counter() - started
            expect(sum(r[0] for r in results), k * n, "direct ACP clients")
            return k * n / took

        direct_rate = await repeat(scale.reps, direct)
    finally:
        await asyncio.gather(*(a.stop() for a in agents))
    bare_rate = await repeat(scale.reps, bare)

    async with gateway(scratch) as gate:
        ids = await sessions(gate, k)
        warm = await asyncio.gather(
            *(stream(gate.stub, pb.PromptRequest(session_id=s, text="/flood 10 64")) for s in ids)
        )
        expect(sum(w[0] for w in warm), k * 10, "gateway warm-up")
        gate_cpu = CpuTally()

        async def ours() -> float:
            gate_cpu.start(gate.process.pid)
            started = time.perf_counter()
            results = await asyncio.gather(
                *(
                    stream_counted(gate.stub, pb.PromptRequest(session_id=s, text=f"/flood {n} 64"))
                    for s in ids
                )
            )
            took = time.perf_counter() - started
            await gate_cpu.stop(list(results))
            expect(sum(r[0] for r in results), k * n, "gateway, concurrent streams")
            return k * n / took

        measured = await repeat(scale.reps, ours)
    return [
        Row(
            f"events/s summed over {k} concurrent sessions",
            "ev/s",
            direct_rate,
            measured,
            ">= 1.0 x the direct ACP clients",
            measured >= direct_rate,
            f"baseline = the direct ACP clients' rate ({direct_rate:,.0f} ev/s: {k} SDK clients on "
            f"their own echo agents, no gateway); a bare grpc.aio server streamed {bare_rate:,.0f} ev/s",
        ),
        cpu_row(f"gateway CPU per relayed chunk, {k} concurrent sessions", bare_cpu, gate_cpu),
    ]


SETTLE_CORES = 0.1  # a machine whose cores are busy less than this (all of them together)...
SETTLE_WINDOW = 0.5  # ...over this many seconds has settled...
SETTLE_MAX = 10.0  # ...waited for at most this long (a machine busy with more than the bench is
# then measured as it is)


def _busy_ticks() -> int:
    """Clock ticks this machine's cores have been busy so far (/proc/stat: all but idle and
    iowait, steal included: a core the host gave to another guest was not ours)."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4]


async def settled() -> float:
    """Until the machine has settled after the setup a figure timed nothing of (agents starting,
    100 turns' first writes to the store, what the figure before left stopping): seconds waited.
    A figure's timed part then measures its steady state, not the tail of its setup."""
    started = time.perf_counter()
    while time.perf_counter() - started < SETTLE_MAX:
        before = _busy_ticks()
        await asyncio.sleep(SETTLE_WINDOW)
        if _busy_ticks() - before < SETTLE_CORES * SETTLE_WINDOW * os.sysconf("SC_CLK_TCK"):
            break
    return time.perf_counter() - started


async def time_to_first_event(scale: Scale, scratch: Path) -> list[Row]:
    """Short turns ("hi"), four series interleaved turn by turn in a shuffled order, so that drift
    on the machine hits all: a direct ACP client on its own echo agent, the gateway, a bare
    grpc.aio stream of one chunk (one gRPC hop with nothing behind it), and a minimal relay (that
    hop and a pipe to an echo agent, nothing else: the floor of any gateway like ours). Channels
    connect in an unmeasured warm-up."""
    direct_agent = DirectAgent(agent_env(scratch))
    await direct_agent.start(str(scratch))
    series: dict[str, list[float]] = {"direct": [], "ours": [], "bare": [], "relay": []}
    try:
        async with bare_server() as bare, relay_server(scratch) as relay, gateway(scratch) as gate:
            (sid,) = await sessions(gate, 1)
            expect((await stream(bare.stub, pb.PromptRequest(text="1 64")))[0], 1, "bare warm-up")
            await stream(relay.stub, pb.PromptRequest(text="hi"), chunk_size=1)
            turns: dict[str, Callable[[], Awaitable[float]]] = {
                "direct": lambda: _first(direct_agent.turn("hi")),
                "ours": lambda: _first(stream(gate.stub, pb.PromptRequest(session_id=sid, text="hi"), 1)),
                "bare": lambda: _first(stream(bare.stub, pb.PromptRequest(text="1 64"))),
                "relay": lambda: _first(stream(relay.stub, pb.PromptRequest(text="hi"), 1)),
            }
            await settled()
            order, shuffled = list(turns), random.Random(0)
            for _ in range(scale.ttfe_turns):
                shuffled.shuffle(order)  # the one after the gateway gets its turn's tail: by turns
                for name in order:
                    series[name].append(await turns[name]() * 1000)
    finally:
        await direct_agent.stop()
    rows = []
    for p, budget in ((50, 1.0), (99, 3.0)):
        base, mine = percentile(series["direct"], p), percentile(series["ours"], p)
        floor, relay_p = percentile(series["bare"], p), percentile(series["relay"], p)
        rows.append(
            Row(
                f"time to first event, p{p} (added by the gateway)",
                "ms",
                base,
                mine,
                f"<= +{budget:g} ms",
                mine - base <= budget,
                f"p{p} added {mine - base:+.2f} ms; a bare grpc.aio stream alone takes {floor:.2f} ms "
                f"to its first event; a minimal relay (that hop and a pipe to the agent, nothing else) adds "
                f"{relay_p - base:+.2f} ms",
            )
        )
    base, mine = percentile(series["direct"], 50), percentile(series["ours"], 50)
    floor, relay_p = percentile(series["bare"], 50), percentile(series["relay"], 50)
    share = mine - (base + floor)
    rows.append(
        Row(
            "time to first event, p50: the gateway's own share beyond one bare gRPC hop",
            "ms",
            base + floor,
            mine,
            "<= +0.3 ms",
            share <= 0.3,
            f"p50 of {scale.ttfe_turns} turns each, interleaved: direct ACP client {base:.2f} ms, bare "
            f"grpc.aio hop {floor:.2f} ms, gateway {mine:.2f} ms; baseline = direct + bare hop "
            f"{base + floor:.2f} ms; the gateway's own share {share:+.2f} ms; a minimal relay's "
            f"{relay_p - (base + floor):+.2f} ms ({relay_p:.2f} ms)",
        )
    )
    return rows


async def _first(turn: Awaitable[tuple[Any, ...]]) -> float:
    """Seconds to the first event of a turn measured by `stream` or `DirectAgent.turn`."""
    return float((await turn)[1])


async def busy_rejection(scale: Scale, scratch: Path) -> Row:
    k = scale.concurrent
    async with gateway(scratch) as gate:
        ids = await sessions(gate, k + 1)
        busy_id, streaming = ids[0], ids[1:]
        stall = duration_pb2.Duration(seconds=600)
        hold = gate.stub.Prompt(pb.PromptRequest(session_id=busy_id, text="/stall", stall_timeout=stall))
        await hold.read()
        rejected: list[float] = []
        unary: list[float] = []
        async with load(gate, streaming):
            for _ in range(scale.busy_samples):
                started = time.perf_counter()
                try:
                    async for _event in gate.stub.Prompt(
                        pb.PromptRequest(session_id=busy_id, text="x"), timeout=30
                    ):
                        pass
                    raise RuntimeError("the busy session accepted a prompt: the run is broken")
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                rejected.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await gate.stub.GetSession(pb.GetSessionRequest(session_id=busy_id), timeout=30)
                unary.append((time.perf_counter() - started) * 1000)
        hold.cancel()
    base, mine = percentile(unary, 99), percentile(rejected, 99)
    return Row(
        f"SESSION_BUSY rejection p99 while {k} turns stream",
        "ms",
        base,
        mine,
        "<= 2 x GetSession p99",
        mine <= 2 * base,
        f"p50: GetSession {percentile(unary, 50):.2f} ms, rejection {percentile(rejected, 50):.2f} ms",
    )


ISOLATION_TURNS = 5  # times scale.ttfe_turns: a p99 of 1,000 turns is their 10th slowest, not one of 2


async def isolation(scale: Scale, scratch: Path) -> Row:
    """Healthy sessions' time to first event on a gateway holding `stalled` stalled turns, against
    the same on a quiet gateway beside it. Their turns alternate, so that whatever else the machine
    does meanwhile (its host's other guests) hits both alike; each gateway's turn follows the
    other's, so the tail of one turn lands on the other gateway's next as much as on its own."""
    healthy = scale.healthy
    turns = max(1, ISOLATION_TURNS * scale.ttfe_turns // healthy) * healthy
    async with gateway(scratch) as quiet, gateway(scratch) as stalling:
        quiet_ids, healthy_ids = await sessions(quiet, healthy), await sessions(stalling, healthy)
        stalled_ids = await sessions(stalling, scale.stalled)
        stall = duration_pb2.Duration(seconds=600)
        stalls = [
            stalling.stub.Prompt(pb.PromptRequest(session_id=s, text="/stall", stall_timeout=stall))
            for s in stalled_ids
        ]
        for call in stalls:
            await call.read()
        busy = 0
        for s in stalled_ids:
            state = (await stalling.stub.GetSession(pb.GetSessionRequest(session_id=s))).state
            busy += state == pb.SESSION_STATE_BUSY
        if busy != scale.stalled:
            raise RuntimeError(f"only {busy} of {scale.stalled} sessions are stalled: the run is broken")
        waited = await settled()
        firsts: dict[str, list[float]] = {"quiet": [], "stalling": []}
        for _ in range(turns // healthy):
            for pair in zip(quiet_ids, healthy_ids, strict=True):
                for name, gate, sid in zip(("quiet", "stalling"), (quiet, stalling), pair, strict=True):
                    _, first, _ = await stream(
                        gate.stub, pb.PromptRequest(session_id=sid, text="hi"), chunk_size=1
                    )
                    firsts[name].append(first * 1000)
        for call in stalls:
            call.cancel()
    without, with_stalled = percentile(firsts["quiet"], 99), percentile(firsts["stalling"], 99)
    return Row(
        f"time to first event p99, healthy sessions, {scale.stalled} sessions stalled",
        "ms",
        without,
        with_stalled,
        "ratio <= 1.2",
        with_stalled <= 1.2 * without,
        f"p99 of {turns:,} short turns over {healthy} healthy sessions on each of two gateways, alternating "
        f"turn by turn: one holding the stalled sessions, the baseline a quiet one beside it; measured "
        f"once the machine settled after the stalls' setup ({waited:.1f} s); p50 "
        f"{percentile(firsts['quiet'], 50):.2f} ms quiet, {percentile(firsts['stalling'], 50):.2f} ms beside "
        "the stalls",
    )


NOISY_FLOODS = 8  # agents flooding valid events at full speed beside the healthy sessions
PROBE_GAP = 0.01  # seconds between one healthy session's turns (and between GetSession probes)


async def probe(gate: Gateway, ids: list[str], turns: int) -> tuple[list[float], list[float]]:
    """(times to first event, GetSession latencies), in ms: `turns` short turns on each of the
    healthy sessions `ids`, prompting concurrently, and GetSession calls meanwhile."""
    done = asyncio.Event()

    async def prompting(sid: str) -> list[float]:
        firsts = []
        for _ in range(turns):
            _, first, _ = await stream(gate.stub, pb.PromptRequest(session_id=sid, text="hi"), chunk_size=1)
            firsts.append(first * 1000)
            await asyncio.sleep(PROBE_GAP)
        return firsts

    async def getting() -> list[float]:
        took = []
        while not done.is_set():
            started = time.perf_counter()
            await gate.stub.GetSession(pb.GetSessionRequest(session_id=ids[0]), timeout=30)
            took.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(PROBE_GAP)
        return took

    getter = asyncio.create_task(getting())
    try:
        results = await asyncio.gather(*(prompting(s) for s in ids))
    finally:
        done.set()
        unary = await getter
    return [first for firsts in results for first in firsts], unary


async def settle(gate: Gateway, ids: list[str]) -> None:
    """Until the turns of `ids` (cancelled by a load's end) are over and their agents settled
    (an agent that did not answer the cancel in time is ended and restarted), and a moment more."""
    deadline = time.monotonic() + 120
    settled = (pb.SESSION_STATE_IDLE, pb.SESSION_STATE_SUSPENDED)
    for sid in ids:
        while (
            await gate.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30)
        ).state not in settled:
            if time.monotonic() > deadline:
                raise RuntimeError("a cancelled load's turn did not end: the run is broken")
            await asyncio.sleep(0.1)
    await asyncio.sleep(2)


def garbage_counts(gate: Gateway) -> list[tuple[float, int]]:
    """(log time, lines dropped so far) from the gateway's garbage summaries (one per 100,000)."""
    counts = []
    for line in gate.log:
        match = re.match(r"\S+ (\d\d):(\d\d):(\d\d),(\d+) .*has written (\d+) \"?garbage lines", line)
        if match:
            hours, minutes, seconds, millis, lines = (int(g) for g in match.groups())
            counts.append((hours * 3600 + minutes * 60 + seconds + millis / 1000, lines))
    return counts


async def noisy_neighbours(scale: Scale, scratch: Path) -> list[Row]:
    """Healthy sessions' first events beside agents that flood, as a ratio to the same sessions
    with no noisy agent, on one server: quiet, one agent writing garbage, quiet again, 8
    full-speed floods of valid events. The baseline pools both quiet phases, each measured
    right before a noisy one."""
    turns = scale.noisy_turns
    async with gateway(scratch) as gate:
        ids = await sessions(gate, scale.noisy_healthy)
        flooders = await sessions(gate, NOISY_FLOODS)
        (garbage_id,) = await sessions(gate, 1, agent="misbehaving")
        await probe(gate, ids, 2)  # warm-up: first-use costs are not measured
        quiet, quiet_unary = await probe(gate, ids, turns)
        rss_before = gate.rss_kib()
        async with load(gate, [garbage_id], "/garbageforever") as garbage:
            garbaged, garbaged_unary = await probe(gate, ids, turns)
            rss_garbage = gate.rss_kib()
        counts = garbage_counts(gate)
        await settle(gate, [garbage_id])
        killed = any("agent ignored cancel" in line and garbage_id in line for line in gate.log)
        quiet_after, quiet_after_unary = await probe(gate, ids, turns)
        async with load(gate, flooders, f"/flood {scale.noisy_flood} 64") as floods:
            flooded, flooded_unary = await probe(gate, ids, turns)
    expected = turns * scale.noisy_healthy
    for samples, phase in (
        (quiet, "quiet"),
        (garbaged, "garbage"),
        (quiet_after, "quiet"),
        (flooded, "floods"),
    ):
        expect(len(samples), expected, f"healthy first events ({phase})")
    if floods.chars < NOISY_FLOODS * 64 or not garbage.events or not counts:
        raise RuntimeError("the floods delivered nothing, or no garbage was dropped: the run is broken")
    if len(counts) > 1:
        (t0, n0), (t1, n1) = counts[0], counts[-1]
        garbage_rate = f"{(n1 - n0) / (t1 - t0):,.0f} lines/s"
    else:
        garbage_rate = f"at least {counts[-1][1]:,} lines"
    baseline = percentile(quiet + quiet_after, 99)
    quiet_get = statistics.median(quiet_unary + quiet_after_unary)
    before_p99, after_p99 = percentile(quiet, 99), percentile(quiet_after, 99)
    rows = []
    for noisy, label, note in (
        (
            flooded,
            f"{NOISY_FLOODS} agents flooding valid events",
            f"GetSession p50 {statistics.median(flooded_unary):.2f} ms beside the floods ({quiet_get:.2f} ms "
            f"quiet; issue 9 saw ~160 ms before its transport); healthy p50 "
            f"{percentile(quiet + quiet_after, 50):.2f} ms quiet, {percentile(flooded, 50):.2f} ms beside "
            f"the floods; quiet p99 {after_p99:.2f} ms right before the floods; the "
            f"floods' client received {floods.chars // 64 / floods.seconds:,.0f} chunks/s "
            f"({floods.events / floods.seconds:,.0f} events/s, {floods.turns} turns)",
        ),
        (
            garbaged,
            "one agent flooding garbage",
            f"GetSession p50 {statistics.median(garbaged_unary):.2f} ms ({quiet_get:.2f} ms quiet); healthy "
            f"p50 {percentile(garbaged, 50):.2f} ms; quiet p99 {before_p99:.2f} ms right before; the "
            f"gateway dropped {garbage_rate} (its log's summaries); its RSS {rss_before / 1024:,.0f} MiB "
            f"before, {rss_garbage / 1024:,.0f} MiB during"
            + (
                "; the agent's answer to the cancel waited behind the garbage the gateway had "
                "buffered, so it was ended as ignoring the cancel"
                if killed
                else ""
            ),
        ),
    ):
        p99 = percentile(noisy, 99)
        rows.append(
            Row(
                f"time to first event p99, {scale.noisy_healthy} healthy sessions, {label}",
                "ms",
                baseline,
                p99,
                "ratio <= 2.0",
                p99 <= 2.0 * baseline,
                note,
            )
        )
    flooded_get = statistics.median(flooded_unary)
    rows.append(
        Row(
            f"GetSession p50, beside {NOISY_FLOODS} agents flooding valid events",
            "ms",
            quiet_get,
            flooded_get,
            "ratio <= 2.0",
            flooded_get <= 2.0 * quiet_get,
            f"GetSession on a healthy session every {PROBE_GAP * 1000:g} ms while {scale.noisy_healthy} "
            f"healthy sessions prompt: {len(flooded_unary):,} calls beside the floods, baseline the "
            f"{len(quiet_unary) + len(quiet_after_unary):,} calls of both quiet phases; p99 "
            f"{percentile(quiet_unary + quiet_after_unary, 99):.2f} ms quiet, "
            f"{percentile(flooded_unary, 99):.2f} ms beside the floods",
        )
    )
    return rows


async def create_latency(scale: Scale, scratch: Path) -> Row:
    async with gateway(scratch, spares=2) as gate:

        async def create_p50(agent: str) -> float:
            took = []
            await gate.stub.CloseSession(  # warm-up: first-use costs in the server are not measured
                pb.CloseSessionRequest(
                    session_id=(
                        await gate.stub.CreateSession(pb.CreateSessionRequest(agent=agent))
                    ).session_id
                )
            )
            for _ in range(scale.creates):
                if agent == "warm":
                    await asyncio.sleep(1.5)  # the spare taken last time is replaced
                started = time.perf_counter()
                session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent=agent), timeout=120)
                took.append((time.perf_counter() - started) * 1000)
                await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
            return statistics.median(took)

        cold = await create_p50("echo")
        warm = await create_p50("warm")
    return Row(
        "CreateSession p50, warm spares vs cold start",
        "ms",
        cold,
        warm,
        "<= 10 ms and <= 0.05 x cold",
        warm <= 10 and warm <= 0.05 * cold,
    )


async def memory(scale: Scale, scratch: Path) -> Row:
    n = scale.memory_sessions
    async with gateway(scratch) as gate:
        warmup = await sessions(gate, 2)  # imports, first-use allocations
        for sid in warmup:
            await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
        await asyncio.sleep(1)
        before = gate.rss_kib()
        await sessions(gate, n)
        await asyncio.sleep(1)
        after = gate.rss_kib()
        agents = _children(gate.process.pid)
        if len(agents) != n:
            raise RuntimeError(f"{len(agents)} agent processes for {n} sessions: the run is broken")
        agent_rss = sum(_rss_kib(pid) for pid in agents) / n
    per_session = (after - before) / n
    return Row(
        f"gateway memory per idle session ({n} sessions, agents excluded)",
        "KiB",
        before,
        per_session,
        "<= 64 KiB per session",
        per_session <= 64,
        f"gateway RSS {before:,} KiB with none, {after:,} KiB with {n}; "
        f"each agent process: {agent_rss:,.0f} KiB RSS",
    )


DETACHED_CHUNK = 1024  # bytes per chunk of a detached flood
RSS_EVERY = 0.2  # seconds between RSS samples while the detached turns run


async def detach(gate: Gateway, sid: str, text: str) -> str:
    """Starts a turn of `text` that runs on when its client leaves, reads its first event and
    leaves (cancels the call); returns its turn id."""
    request = pb.PromptRequest(session_id=sid, text=text, on_disconnect=pb.ON_DISCONNECT_CONTINUE)
    call = gate.stub.Prompt(request, timeout=600)
    try:
        turn_id = str(dict(await call.initial_metadata()).get("sessiongate-turn-id", ""))
        if not turn_id or await call.read() is grpc.aio.EOF:
            raise RuntimeError("a detached turn had no turn id or no first event: the run is broken")
    finally:
        call.cancel()
    return turn_id


async def turns_done(gate: Gateway, started: dict[str, str], timeout: float) -> dict[str, pb.Turn]:
    """The turns `started` ({session id: turn id}) once none of them runs (ListTurns: no events)."""
    deadline = time.monotonic() + timeout
    done: dict[str, pb.Turn] = {}
    while len(done) < len(started):
        for sid, turn_id in started.items():
            if sid in done:
                continue
            listed = await gate.stub.ListTurns(pb.ListTurnsRequest(session_id=sid, page_size=1), timeout=30)
            if not listed.turns or listed.turns[0].turn_id != turn_id:
                raise RuntimeError(f"session {sid}'s last turn is not {turn_id}: the run is broken")
            if listed.turns[0].state != pb.TURN_STATE_RUNNING:
                done[sid] = listed.turns[0]
        if len(done) < len(started):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(started) - len(done)} detached turns still run after {timeout:g}s")
            await asyncio.sleep(0.5)
    return done


def flood_text(events: list[pb.PromptEvent]) -> str:
    return "".join(e.message_chunk.content.text.text for e in events if e.HasField("message_chunk"))


def check_chunks(text: str, last: int, size: int) -> int:
    """How many whole /flood chunks `text` holds, checking that they run on to chunk `last`."""
    if not text or len(text) % size:
        raise RuntimeError(f"{len(text)} characters kept is not a whole number of chunks: the run is broken")
    numbers = [int(text[i : i + size].split(":", 1)[0]) for i in range(0, len(text), size)]
    if numbers != list(range(last - len(numbers) + 1, last + 1)):
        raise RuntimeError("the kept chunks are not the flood's last ones, in order: the run is broken")
    return len(numbers)


async def detached_floods(scale: Scale, scratch: Path) -> Row:
    """Gateway memory with sessions whose clients left turns flooding (ON_DISCONNECT_CONTINUE)
    beside their bounded turn logs: the peak RSS growth over the same gateway with the sessions
    idle, per turn, as a fraction of `max_turn_log_bytes`. Each turn writes several times the
    bound, so a gateway that held the log in memory would grow by at least the bound per turn."""
    n, bound, count = scale.detached, scale.detached_log_mib * MIB, scale.detached_chunks
    text = f"/flood {count} {DETACHED_CHUNK}"
    async with gateway(scratch, args=("--max-turn-log-bytes", str(bound))) as gate:
        warm, *ids = await sessions(gate, n + 1)
        await asyncio.sleep(1)
        unused = gate.rss_kib()
        # Warm-up: first-use costs (the turn log's paths, its tables, a trim) are not measured.
        await turns_done(gate, {warm: await detach(gate, warm, text)}, 300)
        await asyncio.sleep(1)
        before = gate.rss_kib()
        peak = before
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, gate.rss_kib())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RSS_EVERY)

        sampler = asyncio.create_task(sample())
        try:
            turn_ids = await asyncio.gather(*(detach(gate, s, text) for s in ids))
            turns = await turns_done(gate, dict(zip(ids, turn_ids, strict=True)), 900)
        finally:
            stop.set()
            await sampler
        await asyncio.sleep(1)
        after = gate.rss_kib()
        for turn in turns.values():
            if turn.state != pb.TURN_STATE_COMPLETED or turn.result.stop_reason != pb.STOP_REASON_END_TURN:
                raise RuntimeError(
                    f"detached turn {turn.turn_id} did not complete: {turn}: the run is broken"
                )
            if turn.oldest_kept_seq <= 1:
                raise RuntimeError(f"detached turn {turn.turn_id} dropped nothing: the run is broken")
            # Its last events (GetTurn, every page): every chunk reached the log, to the flood's last.
            tail: list[pb.PromptEvent] = []
            after_seq, truncated = max(turn.oldest_kept_seq - 1, turn.last_seq - 8), True
            while truncated:
                page = await gate.stub.GetTurn(
                    pb.GetTurnRequest(session_id=turn.session_id, turn_id=turn.turn_id, after_seq=after_seq),
                    timeout=60,
                )
                if page.last_seq != turn.last_seq or not page.events:
                    raise RuntimeError(
                        f"GetTurn: last_seq {page.last_seq}, not {turn.last_seq}: the run is broken"
                    )
                tail.extend(page.events)
                after_seq, truncated = page.events[-1].seq, page.events_truncated
            if not tail[-1].HasField("result") or tail[-1].seq != turn.last_seq:
                raise RuntimeError(
                    f"detached turn {turn.turn_id} does not end with its result: the run is broken"
                )
            if not flood_text(tail).endswith(flood_chunk(count - 1, DETACHED_CHUNK)):
                raise RuntimeError(f"detached turn {turn.turn_id} lost its last chunk: the run is broken")
        # One finished turn, watched from the start: its oldest events went past the bound.
        sid, turn = ids[0], turns[ids[0]]
        try:
            async for _event in gate.stub.WatchTurn(
                pb.WatchTurnRequest(session_id=sid, after_seq=0, turn_id=turn.turn_id), timeout=60
            ):
                raise RuntimeError("WatchTurn from seq 0 replayed dropped events: the run is broken")
            raise RuntimeError("WatchTurn from seq 0 ended without an error: the run is broken")
        except grpc.aio.AioRpcError as error:
            reason, metadata = error_info(error)
            if error.code() != grpc.StatusCode.OUT_OF_RANGE or reason != "SEQ_NOT_KEPT":
                raise
            named = (metadata.get("oldest_kept_seq"), metadata.get("last_seq"))
            if named != (str(turn.oldest_kept_seq), str(turn.last_seq)):
                raise RuntimeError(f"SEQ_NOT_KEPT names {named}, GetTurn {turn}: the run is broken") from None
        kept = [
            e
            async for e in gate.stub.WatchTurn(
                pb.WatchTurnRequest(session_id=sid, after_seq=turn.oldest_kept_seq - 1, turn_id=turn.turn_id),
                timeout=120,
            )
        ]
        if [e.seq for e in kept] != list(range(turn.oldest_kept_seq, turn.last_seq + 1)):
            raise RuntimeError("WatchTurn did not replay exactly the kept seqs: the run is broken")
        kept_bytes = sum(e.ByteSize() for e in kept)
        if kept_bytes > bound:
            raise RuntimeError(f"a turn kept {kept_bytes} bytes of events, over its bound {bound}")
        kept_chunks = check_chunks(flood_text(kept), count - 1, DETACHED_CHUNK)
        db = gate.workdir / "sessions.db"
        on_disk = sum(f.stat().st_size for f in db.parent.glob(db.name + "*"))  # with its WAL
    window = max(t.end_time.ToMicroseconds() for t in turns.values()) - min(
        t.start_time.ToMicroseconds() for t in turns.values()
    )
    seconds = window / 1e6
    events = sum(t.last_seq for t in turns.values())
    per_turn = (peak - before) / n
    out_mib = count * DETACHED_CHUNK / MIB
    return Row(
        f"gateway RSS growth per detached flooding turn ({n} turns of {out_mib:,.0f} MiB, "
        f"max_turn_log_bytes {scale.detached_log_mib} MiB)",
        "KiB",
        bound / 1024,
        per_turn,
        "ratio <= 0.5 (baseline: the log bound)",
        per_turn <= 0.5 * bound / 1024,
        f"gateway RSS {before / 1024:,.1f} MiB with the sessions idle after one warm-up turn "
        f"({unused / 1024:,.1f} MiB before it), peak {peak / 1024:,.1f} MiB while the {n} turns ran "
        f"detached (sampled every {RSS_EVERY:g} s), {after / 1024:,.1f} MiB after; the turns ran at "
        f"{n * count / seconds:,.0f} agent chunks/s in total ({DETACHED_CHUNK}-byte chunks, "
        f"{n * out_mib / seconds:,.1f} MiB/s; {events / seconds:,.0f} events/s into their logs, "
        f"{events:,} events) over {seconds:,.1f} s; WatchTurn(after_seq 0) on a finished one: "
        f"OUT_OF_RANGE/SEQ_NOT_KEPT, oldest kept seq {turn.oldest_kept_seq:,} of {turn.last_seq:,} "
        f"(GetTurn's last_seq: the result's), the last {kept_chunks:,} of {count:,} chunks kept in "
        f"{kept_bytes / MIB:,.2f} MiB of events; the state database (WAL included) "
        f"{on_disk / MIB:,.0f} MiB after, for {n + 1} turns of {out_mib:,.0f} MiB",
    )


# ---- replicas on one PostgreSQL ----------------------------------------------------------------


class _Shared:
    """What several figures of one run share: one PostgreSQL server, started when a figure first
    asks for it and stopped when the run ends (`run` holds the stack)."""

    stack: contextlib.ExitStack | None = None
    server: PostgresServer | None = None


def postgres() -> PostgresServer:
    if _Shared.server is None:
        if _Shared.stack is None:
            raise RuntimeError("the PostgreSQL server is only there during run()")
        _Shared.server = _Shared.stack.enter_context(postgres_server())
    return _Shared.server


@contextlib.asynccontextmanager
async def replicas(scratch: Path, names: tuple[str, ...]) -> AsyncIterator[dict[str, Gateway]]:
    """Replica gateways named `names` on a fresh database of the run's PostgreSQL, each on a
    fixed free port that it advertises to the others."""
    url = await postgres().fresh_database()
    async with contextlib.AsyncExitStack() as stack:
        gates = {}
        for name in names:
            address = f"127.0.0.1:{free_port()}"
            args = ("--listen", address, "--advertise", address, "--state-url", url, "--replica-id", name)
            gates[name] = await stack.enter_async_context(gateway(scratch, args=args))
        yield gates


async def placed(gates: dict[str, Gateway], per_replica: int) -> dict[str, list[str]]:
    """`per_replica` sessions created on each replica, {replica: ids}, each checked to be served
    by the replica it was created on, as every replica reports it (GetSession's `replica`)."""
    owned = {name: await sessions(gate, per_replica) for name, gate in gates.items()}
    for name, ids in owned.items():
        for sid in ids:
            for gate in gates.values():
                shown = await gate.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30)
                if shown.replica != name:
                    raise RuntimeError(
                        f"session {sid} is on {shown.replica!r}, not {name!r}: the run is broken"
                    )
    return owned


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command's name (whose parentheses may hold anything): [1]
    is the parent, [11] and [12] the user and system CPU time in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user plus system CPU time of a process so far, time its main thread waited to run: runnable
    but not running, as /proc/PID/schedstat counts it); zeros once it is gone."""
    try:
        fields = _stat_fields(pid)
        with open(f"/proc/{pid}/schedstat") as schedstat:
            waited = int(schedstat.read().split()[1]) / 1e9
    except (OSError, IndexError):
        return 0.0, 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), waited


class CpuMeter:
    """CPU time of groups of processes between `start` and `stop`, and the time their main threads
    waited for a core meanwhile: where a machine's cores went. Each group is a function naming its
    processes, asked again at `stop` so that ones started meanwhile (a pool's new database
    connections) count from their start."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.began: dict[int, tuple[float, float]] = {}
        self.used: dict[str, tuple[float, float]] = {}  # (CPU seconds, seconds waiting for a core)
        self.at = 0.0
        self.took = 0.0

    def start(self) -> None:
        self.began = {pid: _cpu_seconds(pid) for pids in self.groups.values() for pid in pids()}
        self.at = time.perf_counter()

    def stop(self) -> None:
        self.took = time.perf_counter() - self.at
        self.used = {}
        for label, pids in self.groups.items():
            cpu = waited = 0.0
            for pid in pids():
                (cpu_now, waited_now), (cpu_then, waited_then) = (
                    _cpu_seconds(pid),
                    self.began.get(pid, (0, 0)),
                )
                cpu, waited = cpu + cpu_now - cpu_then, waited + waited_now - waited_then
            self.used[label] = (cpu, waited)

    def seconds(self, label: str) -> float:
        """CPU seconds group `label` used between `start` and `stop`."""
        return self.used[label][0]

    def total(self) -> float:
        """Cores used by all the groups together."""
        return sum(cpu for cpu, _ in self.used.values()) / self.took

    def cores(self) -> str:
        """Cores each group used, and how many of its processes waited for one, on average."""
        return ", ".join(
            f"{label} {cpu / self.took:.2f} ({waited / self.took:.2f} waiting)"
            for label, (cpu, waited) in self.used.items()
        )

    def per_event(self, events: int) -> str:
        """Microseconds of CPU each group spent per event."""
        return ", ".join(f"{label} {cpu / events * 1e6:.0f} µs" for label, (cpu, _) in self.used.items())

    @classmethod
    def pooled(cls, meters: list[CpuMeter]) -> CpuMeter:
        """The meters' measured spans as one: their times and each group's CPU added up."""
        pooled = cls(meters[0].groups)
        pooled.took = sum(meter.took for meter in meters)
        pooled.used = {
            label: (
                sum(meter.used[label][0] for meter in meters),
                sum(meter.used[label][1] for meter in meters),
            )
            for label in meters[0].used
        }
        return pooled


class MarkedLoad:
    """A tests/bench/marked_flood.py process flooding `ids` on one gateway."""

    def __init__(self, process: asyncio.subprocess.Process, ids: list[str]) -> None:
        self.process = process
        self.ids = ids

    async def mark(self) -> int:
        """Agent chunks received so far, checking that every session received some since the last mark."""
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(b"mark\n")
        await self.process.stdin.drain()
        words = (await asyncio.wait_for(self.process.stdout.readline(), 60)).split()
        if len(words) != 3 or words[0] != b"mark":
            raise RuntimeError(f"the flooding load answered {words!r} to a mark: the run is broken")
        chunks, moved = int(words[1]), int(words[2])
        if moved != len(self.ids):
            raise RuntimeError(f"only {moved} of {len(self.ids)} flooded sessions got events in a window")
        return chunks


@contextlib.asynccontextmanager
async def marked_load(gate: Gateway, ids: list[str], chunks: int) -> AsyncIterator[MarkedLoad]:
    """`/flood chunks 64` turns kept running on `ids` (owned by `gate`) from a process of their own;
    on leaving, checks that every turn that ended carried all its chunks and its result."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tests.bench.marked_flood", "--chunks", str(chunks)),
        *(f"127.0.0.1:{gate.port}", *ids),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin and process.stdout
    try:
        if (await asyncio.wait_for(process.stdout.readline(), 180)).strip() != b"streaming":
            raise RuntimeError("the flooding load did not start: the run is broken")
        yield MarkedLoad(process, ids)
        process.stdin.close()
        out = (await asyncio.wait_for(process.stdout.read(), 60)).decode().split()
        await asyncio.wait_for(process.wait(), 30)
        if len(out) != 4 or out[0] != "done" or out[2:] != ["0", "0"] or int(out[1]) < len(ids):
            raise RuntimeError(
                f"the flooding load ended badly ({' '.join(out)}; done TURNS BAD FAILED, at least "
                f"{len(ids)} turns wanted): the run is broken"
            )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


SLOW_READ = 0.1  # seconds of work a slow reader does per event
SLOW_CHUNK = 1_000_000  # bytes of each chunk the slow reader gets


@dataclass
class Reading:
    """What one client read of a Prompt stream."""

    events: int = 0
    chunks: int = 0  # whole SLOW_CHUNK chunks of text
    result: bool = False
    seconds: float = 0.0  # to the result (or to the stream's end, without one)
    ended: str = ""  # how a stream without its result ended


async def read_stream(
    stub: pb_grpc.SessionServiceStub, sid: str, text: str, pause: float, bound: float
) -> Reading:
    """One Prompt stream, `pause` seconds of work after each event, ended by the client after
    `bound` seconds: a stream that stalls shows as a shortfall, never as a hung run."""
    reading = Reading()
    chars = 0
    started = time.perf_counter()
    try:
        async with asyncio.timeout(bound + 10):
            async for event in stub.Prompt(pb.PromptRequest(session_id=sid, text=text), timeout=bound):
                reading.events += 1
                if event.HasField("message_chunk"):
                    chars += len(event.message_chunk.content.text.text)
                if event.HasField("result"):
                    reading.result, reading.seconds = True, time.perf_counter() - started
                await asyncio.sleep(pause)
    except grpc.aio.AioRpcError as error:
        reading.ended = f"{error.code().name} ({error_info(error)[0] or 'no reason'})"
    except TimeoutError:
        reading.ended = f"no end within {bound + 10:g}s"
    if not reading.result:
        reading.seconds = time.perf_counter() - started
    reading.chunks = chars // SLOW_CHUNK
    return reading


async def slow_reader(scale: Scale, scratch: Path) -> list[Row]:
    """One turn of large chunks read by a client doing SLOW_READ s of work per event, against
    a client reading with no pause (two sessions of one gateway, one after the other, `reps`
    times): every event must reach the slow one too, in about the fast one's time plus its
    reading time. The slow stream is bounded (3 x its reading time + 30 s) and a stall is
    reported as the events it fell short by."""
    n = scale.slow_chunks
    text = f"/flood {n} {SLOW_CHUNK}"
    fast: list[Reading] = []
    slow: list[Reading] = []
    async with gateway(scratch) as gate:
        fast_sid, slow_sid = await sessions(gate, 2)
        expect(
            (await stream(gate.stub, pb.PromptRequest(session_id=fast_sid, text="/flood 10 64")))[0],
            10,
            "warm-up",
        )
        for _ in range(scale.reps):
            fast.append(await read_stream(gate.stub, fast_sid, text, 0.0, 60 + n))
            if not fast[-1].result or fast[-1].chunks != n:
                raise RuntimeError(f"the fast reader got {fast[-1].chunks} of {n} chunks: the run is broken")
            reading = fast[-1].events * SLOW_READ
            slow.append(await read_stream(gate.stub, slow_sid, text, SLOW_READ, 3 * reading + 30))
            if not slow[-1].result:
                break  # the turn is stuck: the next one would find the session busy
    short = [r for r in slow if not r.result or r.chunks != n]
    fast_s = statistics.median(r.seconds for r in fast)
    slow_s = statistics.median(r.seconds for r in slow)
    events = fast[-1].events
    expected = fast_s + events * SLOW_READ
    worst = short[0] if short else slow[-1]
    delivered = (
        f"slow reader: {worst.events} of {events} events ({worst.chunks} of {n} chunks), "
        f"then {worst.ended or 'no result'} after {worst.seconds:.1f}s"
        if short
        else f"all {events} events (the {n} chunks among them, and the result) to both, every repetition"
    )
    title = f"slow reader, 1 MB chunks (/flood {n} {SLOW_CHUNK}, {SLOW_READ:g} s per event) vs a fast reader"
    return [
        Row(
            f"{title}: events delivered",
            "events",
            events,
            worst.events,
            "all (= the fast reader's, with the result)",
            not short,
            delivered,
        ),
        Row(
            f"{title}: time to result",
            "s",
            expected,
            slow_s,
            f"<= 1.5 x (fast reader's time + events x {SLOW_READ:g} s)",
            not short and slow_s <= 1.5 * expected,
            f"fast reader: result in {fast_s:.2f}s; slow reader: {slow_s:.2f}s, "
            f"{slow_s / fast_s:.1f} x the fast one, against an expected reading time of "
            f"{events * SLOW_READ:.1f}s ({events} events x {SLOW_READ:g} s); baseline = fast + reading time",
        ),
    ]


async def forwarded_stream(scale: Scale, scratch: Path) -> Row:
    """One flooding turn on a session owned by replica A, streamed from A (baseline) and through
    replica B, which forwards the call to A (ours); interleaved, medians of `reps`."""
    n = scale.stream_events
    async with replicas(scratch, ("a", "b")) as gates:
        owned = await placed({"a": gates["a"]}, 1)
        sid = owned["a"][0]
        shown = await gates["b"].stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30)
        if shown.replica != "a":
            raise RuntimeError(f"session {sid} is on {shown.replica!r}, not 'a': the run is broken")
        request = pb.PromptRequest(session_id=sid, text=f"/flood {n} 64")
        warm = pb.PromptRequest(session_id=sid, text="/flood 10 64")
        for gate in gates.values():  # warm-up: B's first forwarded call opens its channel to A
            expect((await stream(gate.stub, warm))[0], 10, "warm-up stream")
        a, b = gates["a"].process.pid, gates["b"].process.pid
        meter = CpuMeter({"A": lambda: [a], "B": lambda: [b]})
        direct: list[float] = []
        forwarded: list[float] = []
        cpu: dict[str, list[str]] = {"direct": [], "forwarded": []}
        for _ in range(scale.reps):
            for label, gate, rates in (("direct", gates["a"], direct), ("forwarded", gates["b"], forwarded)):
                meter.start()
                chunks, _, took = await stream(gate.stub, request)
                meter.stop()
                expect(chunks, n, f"{label} stream")
                rates.append(n / took)
                cpu[label].append(meter.per_event(n))
        for gate in gates.values():  # still A's: B forwarded every stream, it took nothing over
            shown = await gate.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30)
            if shown.replica != "a":
                raise RuntimeError(f"session {sid} moved to {shown.replica!r}: the run is broken")
    baseline, measured = statistics.median(direct), statistics.median(forwarded)
    return Row(
        "events/s, one Prompt stream forwarded by another replica vs straight from the owner "
        "(/flood, 64-byte chunks, PostgreSQL store)",
        "ev/s",
        baseline,
        measured,
        ">= 0.7 x baseline",
        measured >= 0.7 * baseline,
        f"{n:,} chunks a stream; gateway CPU per chunk (last repetition): direct: {cpu['direct'][-1]}; "
        f"forwarded: {cpu['forwarded'][-1]}",
    )


LOAD_PROCESSES = 2  # flooding clients: the same number in both phases, so only the replicas differ


async def flooded_replicas(
    scale: Scale, scratch: Path, names: tuple[str, ...], windows: int
) -> dict[str, Any]:
    """`scale.replica_sessions` sessions spread evenly over replicas `names` (created on each,
    so owned there), all flooding from LOAD_PROCESSES client processes that talk to the owners;
    agent chunks/s over `windows` windows and GetSession latencies (to the owner) meanwhile."""
    per_replica = scale.replica_sessions // len(names)
    async with replicas(scratch, names) as gates:
        owned = await placed(gates, per_replica)
        groups = [
            (gate, owned[name][i :: LOAD_PROCESSES // len(names)])
            for name, gate in gates.items()
            for i in range(LOAD_PROCESSES // len(names))
        ]
        owner = {sid: (name, gates[name]) for name, ids in owned.items() for sid in ids}
        async with contextlib.AsyncExitStack() as stack:
            loads = [
                await stack.enter_async_context(marked_load(g, ids, scale.replica_chunks))
                for g, ids in groups
            ]
            done = asyncio.Event()

            async def getting() -> list[float]:
                took: list[float] = []
                while not done.is_set():
                    for sid, (name, gate) in owner.items():
                        if done.is_set():
                            break
                        started = time.perf_counter()
                        shown = await gate.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30)
                        took.append((time.perf_counter() - started) * 1000)
                        if shown.replica != name:
                            raise RuntimeError(f"session {sid} moved to {shown.replica!r}: the run is broken")
                        await asyncio.sleep(PROBE_GAP)
                return took

            database = postgres().process.pid
            meter = CpuMeter(
                {
                    "gateways": lambda: [g.process.pid for g in gates.values()],
                    "agents": lambda: [p for g in gates.values() for p in _children(g.process.pid)],
                    "clients": lambda: [load.process.pid for load in loads],
                    "PostgreSQL": lambda: [database, *_children(database)],
                    "harness": lambda: [os.getpid()],
                }
            )
            await asyncio.sleep(1)  # every stream is flowing
            getter = asyncio.create_task(getting())
            rates = []
            try:
                before = first = sum(await asyncio.gather(*(load.mark() for load in loads)))
                at = time.perf_counter()
                meter.start()
                for _ in range(windows):
                    await asyncio.sleep(scale.replica_window)
                    after = sum(await asyncio.gather(*(load.mark() for load in loads)))
                    now = time.perf_counter()
                    rates.append((after - before) / (now - at))
                    before, at = after, now
                meter.stop()
            finally:
                done.set()
                unary = await getter
            if len(unary) < 50:
                raise RuntimeError(f"only {len(unary)} GetSession samples: the run is broken")
    return {"rates": rates, "unary": unary, "meter": meter, "chunks": before - first}


REPLICA_PHASES = (1, 2, 2, 1)  # replicas in each phase: the machine's drift over the run hits both


def pooled_phases(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The phases of one replica count as one run: every window, call and CPU second."""
    rates = [rate for phase in phases for rate in phase["rates"]]
    return {
        "rate": statistics.median(rates),
        "windows": len(rates),
        "unary": [took for phase in phases for took in phase["unary"]],
        "meter": CpuMeter.pooled([phase["meter"] for phase in phases]),
        "chunks": sum(phase["chunks"] for phase in phases),
    }


async def replica_scaling(scale: Scale, scratch: Path) -> list[Row]:
    """The same flooding sessions on 1 replica (baseline) and spread over 2 (ours): total agent
    chunks/s the clients received, and GetSession p99 (to the owner) under that load. Measured in
    four phases, 1, 2, 2 and 1 replicas, each side pooled: the two sides were a minute apart in
    one phase each, and the shared machine's drift between them moved the CPU ratio from 0.7 to
    1.45 between runs of the same code."""
    k = scale.replica_sessions
    windows = max(1, -(-scale.reps // 2))  # per phase: each side gets about 2 x reps/2
    phases: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for index, count in enumerate(REPLICA_PHASES):
        if index:
            await asyncio.sleep(5 if scale is FULL else 1)  # the phase before's processes are gone
        phases[count].append(await flooded_replicas(scale, scratch, ("a", "b")[:count], windows))
    one, two = pooled_phases(phases[1]), pooled_phases(phases[2])
    p50 = {label: percentile(phase["unary"], 50) for label, phase in (("one", one), ("two", two))}
    p99 = {label: percentile(phase["unary"], 99) for label, phase in (("one", one), ("two", two))}
    cores = os.cpu_count() or 1
    gate_cpu = {
        label: phase["meter"].seconds("gateways") / phase["chunks"] * 1e6 if phase["chunks"] else float("inf")
        for label, phase in (("one", one), ("two", two))
    }
    used = one["meter"].total()  # cores the whole 1-replica setup used: gateway, agents, clients, database
    ceiling = one["rate"] * cores / used  # all the cores at the 1-replica phase's CPU per chunk
    load_note = (
        f"{k} sessions flooding /flood {scale.replica_chunks} 64 turns back to back from "
        f"{LOAD_PROCESSES} client processes, medians of {one['windows']} windows of "
        f"{scale.replica_window:g} s each side, in phases of 1, 2, 2 and 1 replicas; "
        f"cores used (and processes waiting for a core): 1 replica: {one['meter'].cores()}; "
        f"2 replicas: {two['meter'].cores()}. CPU per chunk: 1 replica: "
        f"{one['meter'].per_event(one['chunks'])}; 2 replicas: {two['meter'].per_event(two['chunks'])}. "
        f"The agents and clients share "
        f"the {cores} cores with the gateways: all {cores} at the 1-replica CPU per chunk ({used:.2f} cores "
        f"used) would carry {ceiling:,.0f} ev/s, {ceiling / one['rate']:.2f} x the baseline"
    )
    return [
        Row(
            f"events/s summed over {k} flooding sessions, 2 replicas ({k // 2} sessions each) vs 1",
            "ev/s",
            one["rate"],
            two["rate"],
            ">= 1.6 x baseline",
            two["rate"] >= 1.6 * one["rate"],
            load_note,
        ),
        Row(
            f"GetSession p99 while {k} sessions flood, 2 replicas vs 1",
            "ms",
            p99["one"],
            p99["two"],
            "ratio <= 1.0",
            p99["two"] <= p99["one"],
            f"p50 {p50['one']:.2f} ms on 1 replica, {p50['two']:.2f} ms on 2; "
            f"{len(one['unary']):,} and {len(two['unary']):,} calls, each to the session's owner",
        ),
        Row(
            f"gateway CPU per chunk, 2 replicas vs 1 ({k} flooding sessions)",
            "µs",
            gate_cpu["one"],
            gate_cpu["two"],
            "ratio <= 1.1",
            gate_cpu["two"] <= 1.1 * gate_cpu["one"],
            f"the gateway processes' own CPU (user + system from /proc/PID/stat; agents, clients and "
            f"PostgreSQL not counted) over the measured windows, per agent chunk the clients received: "
            f"1 replica {one['meter'].seconds('gateways'):,.2f} s for {one['chunks']:,} chunks; 2 replicas "
            f"{two['meter'].seconds('gateways'):,.2f} s for {two['chunks']:,} chunks, summed over both "
            f"gateways; the machine had {cores} cores",
        ),
    ]


def error_info(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of a failed call."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    return "", {}


FIGURES: list[Callable[[Scale, Path], Awaitable[Row | list[Row]]]] = [
    single_stream,
    concurrent_streams,
    time_to_first_event,
    busy_rejection,
    isolation,
    noisy_neighbours,
    create_latency,
    memory,
    detached_floods,
    slow_reader,
    forwarded_stream,
    replica_scaling,
]


async def run(scale: Scale, only: list[str] | None = None) -> Report:
    report = Report(scale)
    with (
        tempfile.TemporaryDirectory(prefix="sessiongate-bench-") as tmp,
        contextlib.ExitStack() as shared,  # what figures share, such as a PostgreSQL server
    ):
        _Shared.stack, _Shared.server = shared, None
        try:
            for figure in FIGURES:
                if only and figure.__name__ not in only:
                    continue
                await asyncio.sleep(5 if scale is FULL else 1)  # let the last figure's processes go
                started = time.monotonic()
                result = await figure(scale, Path(tmp))
                rows = result if isinstance(result, list) else [result]
                report.rows.extend(rows)
                for row in rows:
                    verdict = "met" if row.met else "MISSED"
                    print(
                        f"{row.figure}: baseline {row.baseline:,.2f} {row.unit}, ours {row.ours:,.2f} "
                        f"{row.unit}, ratio {row.ratio:.2f} ({verdict}) [{time.monotonic() - started:.0f}s]",
                        flush=True,
                    )
        finally:
            _Shared.stack = _Shared.server = None
    return report
