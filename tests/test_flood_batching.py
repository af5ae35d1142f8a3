"""A flood is relayed a gap at a time, not a chunk at a time (issue 25), and nothing else waits:
- the turn log's pump (turn_log.EVENT_GAP): text that follows its last event sooner waits out
  the gap and leaves merged with what came meanwhile; a first chunk, a chunk after a pause,
  and anything that is not text leave at once;
- the agent's reader (transport.READ_GAP): once STREAK small reads in a row found the agent
  writing, the next read waits out the gap with the pipe unpolled (one wake-up per gap, not
  per write); a line after a pause is read at once;
- the event gap is a shared rate (loop_share.FloodRate): while several turns have text to send,
  each one's gap grows with their number, so many streams cost no more events than a few; a
  turn that has none (paused, or done) does not count, and whatever is not text ends a wait.

The gaps are stretched to seconds here, so what waits and what does not is plain whatever the
machine's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import orjson
import pytest
from sessiongate.server.agents import transport as transport_module
from sessiongate.server.agents.transport import READ_BUFFER, AgentTransport, TextRun
from sessiongate.server.loop_share import FloodRate
from sessiongate.server.state.sqlite import SessionStore
from sessiongate.server.turns import turn_log as turn_log_module
from sessiongate.server.turns.turn import Notice, Turn, TurnEnd
from sessiongate.server.turns.turn_log import TurnLog, pump
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import eventually

GAP = 3.0  # seconds: each gap under test, stretched (what is "at once" gets half of it)


def chunk(text: str) -> TextRun:
    return TextRun("agent_message_chunk", text, "")


@contextlib.asynccontextmanager
async def pumping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, turns: int = 1
) -> AsyncIterator[list[tuple[Turn, TurnLog]]]:
    """Turns pumped into their logs, with the gaps stretched: GAP for each turn with text to send
    (GAP for one alone, 2 x GAP each while two have)."""
    monkeypatch.setattr(turn_log_module, "EVENT_GAP", GAP)
    monkeypatch.setattr(turn_log_module, "FLOOD_EVENTS", 1 / GAP)
    store = SessionStore(tmp_path / "sessions.db")
    await store.open()
    pumped = []
    for index in range(turns):
        turn = Turn(stall_timeout=60, max_duration=600)
        log = TurnLog(store, pb.Turn(turn_id=f"t{index}", session_id="s1"), max_bytes=1 << 24)
        pumped.append((turn, log, asyncio.create_task(pump(turn, log, 1 << 20))))
    try:
        yield [(turn, log) for turn, log, _ in pumped]
    finally:
        for turn, _, task in pumped:
            turn.end(TurnEnd("end_turn"))
            await asyncio.wait_for(task, 10)
        await store.close()


def texts(log: TurnLog) -> list[str]:
    return [e.message_chunk.content.text.text for e in log._mem if e.WhichOneof("event") == "message_chunk"]


async def test_a_flood_leaves_one_event_per_gap_and_a_first_chunk_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    async with pumping(tmp_path, monkeypatch) as [(turn, log)]:
        started = loop.time()
        turn.push(chunk("a"))
        await eventually(lambda: texts(log) == ["a"], what="the first chunk, at once")
        assert loop.time() - started < GAP / 2
        turn.push(chunk("b"))
        for _ in range(20):  # the pump runs, and waits out the gap for more text
            await asyncio.sleep(0)
        assert texts(log) == ["a"]
        turn.push(chunk("c"))
        turn.push(chunk("d"))
        await eventually(lambda: len(texts(log)) == 2, what="the merged chunks after the gap")
        assert texts(log) == ["a", "bcd"]
        assert loop.time() - started >= GAP * 0.99


async def test_what_is_not_text_never_waits_for_the_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    async with pumping(tmp_path, monkeypatch) as [(turn, log)]:
        turn.push(chunk("a"))
        await eventually(lambda: texts(log) == ["a"], what="the first chunk")
        started = loop.time()
        turn.notice(Notice("info", "not text"))  # right behind the last event: still at once
        await eventually(lambda: len(log._mem) == 2, what="the notice")
        turn.push(chunk("b"))
        turn.notice(Notice("info", "text is followed by more than text"))  # so b has nothing to wait for
        await eventually(lambda: len(log._mem) == 4, what="the chunk and the notice")
        assert texts(log) == ["a", "b"]
        assert loop.time() - started < GAP / 2


async def test_a_chunk_after_a_pause_leaves_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    async with pumping(tmp_path, monkeypatch) as [(turn, log)]:
        turn.push(chunk("a"))
        await eventually(lambda: texts(log) == ["a"], what="the first chunk")
        await asyncio.sleep(GAP + 0.2)  # a pause longer than the gap
        started = loop.time()
        turn.push(chunk("b"))
        await eventually(lambda: texts(log) == ["a", "b"], what="the chunk after the pause")
        assert loop.time() - started < GAP / 2


async def test_while_two_turns_flood_each_ones_gap_is_twice_as_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    async with pumping(tmp_path, monkeypatch, turns=2) as pumped:
        started = loop.time()  # before the first events: the gaps count from them
        for turn, _ in pumped:
            turn.push(chunk("a"))
        await eventually(lambda: all(texts(log) == ["a"] for _, log in pumped), what="the first chunks")
        for turn, _ in pumped:
            turn.push(chunk("b"))  # both flood now: each waits out 2 x GAP
        await asyncio.sleep(GAP * 1.5)
        assert [texts(log) for _, log in pumped] == [["a"], ["a"]]  # one flood's gap is not enough
        for turn, _ in pumped:
            turn.push(chunk("c"))
        await eventually(
            lambda: all(texts(log) == ["a", "bc"] for _, log in pumped), what="the merged chunks", timeout=20
        )
        assert loop.time() - started >= 2 * GAP
    async with pumping(tmp_path, monkeypatch) as [(turn, log)]:
        started = loop.time()
        turn.push(chunk("a"))
        await eventually(lambda: texts(log) == ["a"], what="the first chunk")
        turn.push(chunk("b"))  # alone again: one gap
        await eventually(lambda: texts(log) == ["a", "b"], what="the chunk after one gap", timeout=20)
        assert GAP <= loop.time() - started < GAP * 1.5


async def test_a_turn_that_pauses_for_a_gap_no_longer_lengthens_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    async with pumping(tmp_path, monkeypatch, turns=2) as [(streaming, log), (paused, paused_log)]:
        streaming.push(chunk("a"))
        paused.push(chunk("a"))
        await eventually(lambda: texts(log) == texts(paused_log) == ["a"], what="the first chunks")
        streaming.push(chunk("b"))  # both count for now: 2 x GAP
        await eventually(lambda: texts(log) == ["a", "b"], what="the chunk after two gaps", timeout=20)
        await eventually(
            lambda: not turn_log_module.floods().counts(paused),
            what="the paused turn to stop counting",
            timeout=20,
        )
        started = loop.time()
        streaming.push(chunk("c"))  # alone now: one gap after b
        await eventually(lambda: texts(log) == ["a", "b", "c"], what="the chunk after one gap", timeout=20)
        assert loop.time() - started < GAP * 1.5


async def test_what_is_not_text_ends_a_floods_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    async with pumping(tmp_path, monkeypatch) as [(turn, log)]:
        turn.push(chunk("a"))
        await eventually(lambda: texts(log) == ["a"], what="the first chunk")
        turn.push(chunk("b"))  # a flood: waits out the gap for more text...
        for _ in range(20):
            await asyncio.sleep(0)
        started = loop.time()
        turn.notice(Notice("info", "not text"))  # ...until this comes
        await eventually(lambda: len(log._mem) == 3, what="the chunk and the notice")
        assert texts(log) == ["a", "b"]
        assert loop.time() - started < GAP / 2


def test_a_flood_rate_counts_the_floods_that_joined_and_not_those_gone() -> None:
    class Flood:
        pass

    rate = FloodRate(0.001, 1000)
    floods = [Flood() for _ in range(3)]
    assert rate.gap() == 0.001  # at least `least`
    for flood in floods:
        rate.join(flood)
        rate.join(flood)  # once only
    assert rate.gap() == pytest.approx(0.003)
    rate.leave(floods.pop())
    rate.leave(Flood())  # one that never joined
    assert rate.gap() == pytest.approx(0.002)
    floods.pop()  # collected without leaving
    assert rate.gap() == pytest.approx(0.001)


def update_line(text: str) -> bytes:
    params = {
        "sessionId": "s",
        "update": {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": text}},
    }
    return orjson.dumps({"jsonrpc": "2.0", "method": "session/update", "params": params}) + b"\n"


def has(received: list[str], count: int) -> Callable[[], bool]:
    return lambda: len(received) == count


class Stdin:
    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


@contextlib.asynccontextmanager
async def agent_pipe(
    dropped: list[int] | None = None,
) -> AsyncIterator[tuple[int, asyncio.ReadTransport, list[str]]]:
    """A real pipe read by an AgentTransport: (the agent's end, our transport, texts received);
    `dropped` collects the sizes of what it drops."""
    read_fd, write_fd = os.pipe()
    reader = asyncio.StreamReader(limit=READ_BUFFER)
    pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
    )
    received: list[str] = []
    transport = AgentTransport(
        "t",
        reader,
        cast(asyncio.StreamWriter, Stdin()),
        lambda *_: None,
        lambda _sid, item: received.append(item.text),
        pipe=pipe,
        on_dropped=dropped.append if dropped is not None else None,
    )
    task = asyncio.create_task(transport.receive())
    try:
        yield write_fd, pipe, received
    finally:
        os.close(write_fd)
        await asyncio.wait_for(task, 10)
        pipe.close()


async def test_a_flooding_agents_pipe_is_read_once_per_gap_and_unpolled_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport_module, "READ_GAP", GAP)
    loop = asyncio.get_running_loop()
    async with agent_pipe() as (agent, pipe, received):
        for index in range(transport_module.STREAK):  # small reads, each finding the agent writing
            os.write(agent, update_line(f"{index}"))
            await eventually(has(received, index + 1), what="each line, at once")
        last_read = loop.time()
        os.write(agent, update_line("x"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert received == [str(i) for i in range(transport_module.STREAK)]  # waiting out the gap
        assert not pipe.is_reading()  # and not polling the pipe meanwhile
        os.write(agent, update_line("y"))
        await eventually(lambda: received[-2:] == ["x", "y"], what="the lines written during the gap")
        assert loop.time() - last_read >= GAP - 0.5  # (last_read: up to a poll after the read)
        await eventually(pipe.is_reading, what="the pipe polled again")


async def test_a_line_after_the_agent_paused_is_read_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "READ_GAP", GAP)
    loop = asyncio.get_running_loop()
    async with agent_pipe() as (agent, _pipe, received):
        for index in range(transport_module.STREAK + 2):
            os.write(agent, update_line(f"{index}"))
            await eventually(has(received, index + 1), what="each line")
        await asyncio.sleep(GAP + 0.2)  # the agent pauses for longer than the gap...
        started = loop.time()
        os.write(agent, update_line("after"))  # ...so this one is read at once
        await eventually(lambda: received[-1] == "after", what="the line after the pause")
        assert loop.time() - started < GAP / 2


@pytest.mark.parametrize("junk", [b"this is not json\n", b"\n"], ids=["garbage", "blank"])
async def test_an_agent_writing_junk_is_read_at_the_garbage_rate_and_its_valid_lines_still_come(
    monkeypatch: pytest.MonkeyPatch, junk: bytes
) -> None:
    """Lines dropped (garbage, blank lines: each one parsed) pace the reads to GARBAGE_RATE,
    a valid line among them or not; the valid ones are still handed on."""
    rate = 64 * 1024
    monkeypatch.setattr(transport_module, "GARBAGE_RATE", rate)
    loop = asyncio.get_running_loop()
    dropped: list[int] = []
    async with agent_pipe(dropped) as (agent, _pipe, received):
        os.set_blocking(agent, False)
        block = junk * (16 * 1024 // len(junk)) + update_line("valid")  # a valid line per 16 KiB
        started = loop.time()
        while loop.time() - started < 2:  # the agent writes as fast as its pipe takes it
            try:
                os.write(agent, block)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        took = loop.time() - started
        read = sum(dropped)
    # Unpaced, this reader drops tens of MiB a second; here at most the rate, and a buffer or
    # two read before the pacing began.
    assert 0 < read <= took * rate + 2 * READ_BUFFER, f"{read} bytes of junk read in {took:.1f}s"
    assert "valid" in received


async def test_one_long_dropped_line_holds_back_the_next_ones_for_a_read_at_most() -> None:
    """A 4 MiB line that is not JSON is paid for a buffer's worth per read (about 60 ms at
    GARBAGE_RATE), not all at once before the next read (4 s): the line after it comes soon."""
    loop = asyncio.get_running_loop()
    async with agent_pipe() as (agent, _pipe, received):
        os.set_blocking(agent, False)
        pending = b"x" * (4 * 1024 * 1024) + b"\n"
        while pending:
            try:
                pending = pending[os.write(agent, pending) :]
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.3)  # read and dropped by now: its cost is due
        written = loop.time()
        os.write(agent, update_line("after"))
        await eventually(lambda: "after" in received, timeout=10, what="the line after the long one")
        assert loop.time() - written < 2, "the long dropped line held back the next read for seconds"
