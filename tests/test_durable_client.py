"""The SDK and the CLI side of durable turns (issue 11), against a real server and the built-in
agent: prompt(on_disconnect="continue"), watch_turn, list_turns, get_turn; the iterator that
re-attaches by itself after a transport failure (through a TCP proxy the test cuts, and
across a restart of the server); the CLI's watch, history and prompt --detach with Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sessiongate.client import (
    AgentError,
    AsyncSessionClient,
    SeqNotKept,
    SessionClient,
    SessionGateError,
    TurnInterrupted,
    TurnNotFound,
)
from sessiongate.client._common import Reattach
from sessiongate.echo.agent import flood_chunk
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, kinds, reply_text
from tests.processes import server_process
from tests.test_cli import cli

WORDS = [f"w{i}" for i in range(20)]
PACED = "/pace 300 " + " ".join(WORDS)  # 20 chunks 0.3 s apart: about 6 s
# Channel options for clients behind the proxy: reconnect soon after a cut (the default
# backoff starts at 1 s and grows; the tests need not wait for it).
FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500))


async def whole_turn(client: AsyncSessionClient, session_id: str, turn_id: str) -> pb.Turn:
    """GetTurn, every page."""
    turn = await client.get_turn(session_id, turn_id)
    while turn.events_truncated:
        page = await client.get_turn(session_id, turn_id, turn.events[-1].seq)
        turn.events.extend(page.events)
        turn.events_truncated = page.events_truncated
    return turn


async def finished(client: AsyncSessionClient, session_id: str, turn_id: str, timeout: float = 60) -> pb.Turn:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        turn = await client.get_turn(session_id, turn_id)
        if turn.state != pb.TURN_STATE_RUNNING:
            return turn
        await asyncio.sleep(0.1)
    raise AssertionError(f"turn {turn_id} still running after {timeout:g}s")


def seqs(events: Any) -> list[int]:
    return [e.seq for e in events]


class Proxy:
    """A TCP relay between clients and a server that the test can break: `cut()` drops every
    connection at once (the client's stream fails UNAVAILABLE with no sessiongate reason; the
    server sees its client gone), and while `refusing` every new connection is dropped as
    soon as it is accepted. `upstream` (the server's port) may change between connections."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.refusing = False
        self.accepted = 0
        self.port = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:  # the server is not there (restarting): as good as a cut
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                end.transport.abort()
                self._open.discard(end)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()  # one way ends: so does the other


@contextlib.asynccontextmanager
async def proxied(gate: Gate) -> AsyncIterator[tuple[Proxy, AsyncSessionClient]]:
    async with (
        Proxy(gate.running.port) as proxy,
        AsyncSessionClient(proxy.target, options=FAST_RECONNECT) as client,
    ):
        yield proxy, client


# ---- SDK ------------------------------------------------------------------------------------


async def test_watch_turn_replays_exactly_the_events_after_a_seq_then_the_rest_and_the_result(
    gate: Gate,
) -> None:
    async with AsyncSessionClient(gate.target) as client:
        sid = (await client.create_session()).session_id
        events = client.prompt(sid, PACED, on_disconnect="continue")
        first = [await anext(events) for _ in range(3)]
        await events.aclose()  # the reader leaves; the turn goes on
        turn_id = events.turn_id
        assert turn_id and events.session_id == sid and events.last_seq == 3 and seqs(first) == [1, 2, 3]
        assert (await client.get_turn(sid, turn_id)).state == pb.TURN_STATE_RUNNING
        assert (await client.get_session(sid)).turn_id == turn_id

        watched = client.watch_turn(sid, after_seq=3, turn_id=turn_id)
        rest = [event async for event in watched]
        assert seqs(rest) == list(range(4, rest[-1].seq + 1))  # no gap, no duplicate
        assert kinds(rest)[-1] == "result" and rest[-1].result.stop_reason == pb.STOP_REASON_END_TURN
        assert watched.turn_id == turn_id and watched.last_seq == rest[-1].seq
        turn = await whole_turn(client, sid, turn_id)
        assert turn.state == pb.TURN_STATE_COMPLETED and turn.on_disconnect == pb.ON_DISCONNECT_CONTINUE
        assert list(turn.events) == first + rest
        assert reply_text(rest) == " " + " ".join(WORDS[3:])  # the agent finished without a reader

        def blocking_watch() -> tuple[list[pb.PromptEvent], str, int]:
            with SessionClient(gate.target) as sync:
                tail = sync.watch_turn(sid, 10)  # no turn id: the last turn
                return list(tail), tail.turn_id, tail.last_seq

        # The blocking twin, in a thread (the server runs on this event loop).
        assert await asyncio.to_thread(blocking_watch) == (list(turn.events[10:]), turn_id, turn.last_seq)

        with pytest.raises(TurnNotFound) as unknown:
            [e async for e in client.watch_turn(sid, turn_id="no-such-turn")]
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(SeqNotKept) as past:
            [e async for e in client.watch_turn(sid, turn.last_seq + 5, turn_id)]
        assert past.value.metadata["last_seq"] == str(turn.last_seq)
        with pytest.raises(ValueError, match="cancel or continue"):
            client.prompt(sid, "x", on_disconnect="later")


async def test_list_turns_newest_first_and_get_turn_with_its_events(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target) as client:
        sid = (await client.create_session()).session_id
        assert [t async for t in client.list_turns(sid)] == []
        await client.reply(sid, "first turn")
        with pytest.raises(AgentError):
            await client.reply(sid, "/error")
        text, result = await client.reply(sid, "third turn", on_disconnect="continue")
        assert text == "third turn" and result.stop_reason == pb.STOP_REASON_END_TURN

        turns = [t async for t in client.list_turns(sid, page_size=1)]  # three pages
        assert [t.prompt[0].text.text for t in turns] == ["third turn", "/error", "first turn"]
        assert [t.state for t in turns] == [
            pb.TURN_STATE_COMPLETED,
            pb.TURN_STATE_FAILED,
            pb.TURN_STATE_COMPLETED,
        ]
        assert all(not t.events for t in turns)
        assert (turns[1].error.code, turns[1].error.reason) == ("INTERNAL", "AGENT_ERROR")
        assert turns[0].on_disconnect == pb.ON_DISCONNECT_CONTINUE
        assert turns[2].on_disconnect != pb.ON_DISCONNECT_CONTINUE
        assert all(t.end_time.ToNanoseconds() >= t.start_time.ToNanoseconds() > 0 for t in turns)
        assert (await client.get_session(sid)).turn_id == turns[0].turn_id

        first = await client.get_turn(sid, turns[2].turn_id)
        assert not first.events_truncated and first.last_seq == first.events[-1].seq
        assert seqs(first.events) == list(range(1, first.last_seq + 1))
        assert reply_text(list(first.events)) == "first turn"
        assert first.result.stop_reason == pb.STOP_REASON_END_TURN
        later = await client.get_turn(sid, turns[2].turn_id, after_seq=3)
        assert list(later.events) == list(first.events[3:])
        with pytest.raises(TurnNotFound):
            await client.get_turn(sid, "no-such-turn")

        def blocking() -> tuple[list[str], pb.Turn]:
            with SessionClient(gate.target) as sync:
                return [t.turn_id for t in sync.list_turns(sid)], sync.get_turn(sid, turns[2].turn_id)

        assert await asyncio.to_thread(blocking) == ([t.turn_id for t in turns], first)


# ---- re-attaching after a transport failure ----------------------------------------------------


def test_reattach_is_bounded_per_outage_and_only_for_transport_failures() -> None:
    """The policy alone, on a fake clock: backoff 0.2 s doubling to 2 s; a connection that
    keeps breaking as soon as it is made, with no event read, is given up within the budget;
    an event, or a stream that stayed up a while, begins a new outage."""
    now = [1000.0]
    lost = SessionGateError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    policy = Reattach(10, None, clock=lambda: now[0])
    delays = []
    while (delay := policy.delay(lost, "turn")) is not None:
        delays.append(delay)
        now[0] += delay + 0.05  # the re-attach: its headers come, then it breaks again at once
        policy.attached()
    assert delays[:5] == [0.2, 0.4, 0.8, 1.6, 2.0] and set(delays[4:]) == {2.0}
    assert 8 <= sum(delays) <= 10

    policy.progressed()  # an event came: a new outage starts afresh
    assert policy.delay(lost, "turn") == 0.2
    assert policy.delay(lost, "turn") == 0.4
    policy.attached()
    now[0] += 6  # stayed up a while before this failure
    assert policy.delay(lost, "turn") == 0.2

    draining = SessionGateError(grpc.StatusCode.UNAVAILABLE, "draining", reason="SHUTTING_DOWN")
    assert policy.delay(draining, "turn") is None  # the server's answer, not a lost connection
    assert policy.delay(SessionGateError(grpc.StatusCode.INTERNAL, "x"), "turn") is None
    assert policy.delay(lost, "") is None  # no turn id: the turn may not have started
    assert Reattach(0, None).delay(lost, "turn") is None
    assert Reattach(30, now[0] + 0.1, clock=lambda: now[0]).delay(lost, "turn") is None  # past the deadline


async def test_a_continuing_prompt_reattaches_after_a_cut_connection_without_losing_or_repeating_events(
    gate: Gate,
) -> None:
    async with proxied(gate) as (proxy, client):
        sid = (await client.create_session()).session_id
        events = client.prompt(sid, PACED, on_disconnect="continue", timeout=60)
        seen: list[pb.PromptEvent] = []
        async for event in events:
            seen.append(event)
            if len(seen) == 3:
                request = pb.GetTurnRequest(session_id=sid, turn_id=events.turn_id)
                running = await gate.stub.GetTurn(request, timeout=10)
                assert running.state == pb.TURN_STATE_RUNNING  # cut mid-turn
                proxy.cut()
        assert proxy.accepted >= 2, "the iteration went on over a new connection"
        assert seqs(seen) == list(range(1, len(seen) + 1))
        assert kinds(seen)[-1] == "result" and seen[-1].result.stop_reason == pb.STOP_REASON_END_TURN
        assert reply_text(seen) == " ".join(WORDS)
        async with AsyncSessionClient(gate.target) as direct:
            assert list((await whole_turn(direct, sid, events.turn_id)).events) == seen


async def test_a_watch_reattaches_after_a_cut_connection_in_the_blocking_client(gate: Gate) -> None:
    session = await gate.create()
    sid = session.session_id
    call = gate.stub.Prompt(
        pb.PromptRequest(session_id=sid, text=PACED, on_disconnect=pb.ON_DISCONNECT_CONTINUE), timeout=60
    )
    turn_id = dict(await call.initial_metadata())["sessiongate-turn-id"]
    call.cancel()  # nobody prompts any more; the turn goes on
    loop = asyncio.get_running_loop()
    async with Proxy(gate.running.port) as proxy:

        def watch() -> tuple[list[pb.PromptEvent], str]:
            with SessionClient(proxy.target, options=FAST_RECONNECT) as sync:
                events = sync.watch_turn(sid, timeout=60)
                seen = []
                for event in events:
                    seen.append(event)
                    if len(seen) == 3:
                        loop.call_soon_threadsafe(proxy.cut)
                return seen, events.turn_id

        seen, watched_id = await asyncio.to_thread(watch)
        assert proxy.accepted >= 2
    assert watched_id == turn_id
    assert seqs(seen) == list(range(1, len(seen) + 1)) and kinds(seen)[-1] == "result"
    assert reply_text(seen) == " ".join(WORDS)


async def test_without_continue_a_cut_is_raised_and_a_reattach_gives_up_after_its_budget(gate: Gate) -> None:
    async with proxied(gate) as (proxy, client):
        sid = (await client.create_session()).session_id
        events = client.prompt(sid, PACED)  # cancel on disconnect (the default): never re-attached
        with pytest.raises(SessionGateError) as lost:
            async for event in events:
                if event.seq == 3:
                    proxy.cut()
        assert lost.value.code == grpc.StatusCode.UNAVAILABLE and not lost.value.reason
        assert proxy.accepted == 1 and events.last_seq == 3
        cancelled = await finished(client, sid, events.turn_id)
        assert cancelled.result.stop_reason == pb.STOP_REASON_CANCELLED  # the server saw its client go

        events = client.prompt(sid, PACED, on_disconnect="continue", reattach_timeout=2)
        started = time.monotonic()
        with pytest.raises(SessionGateError) as gone:
            async for event in events:
                if event.seq == 3:
                    proxy.refusing = True
                    proxy.cut()
                    started = time.monotonic()
        assert gone.value.code == grpc.StatusCode.UNAVAILABLE and not gone.value.reason
        assert time.monotonic() - started < 15
        assert events.last_seq == 3
        # The turn went on all along: pick it up later from where the iteration stopped.
        proxy.refusing = False
        rest = [e async for e in client.watch_turn(sid, events.last_seq, events.turn_id, timeout=60)]
        assert seqs(rest)[0] == 4 and rest[-1].result.stop_reason == pb.STOP_REASON_END_TURN
        assert (await finished(client, sid, events.turn_id)).state == pb.TURN_STATE_COMPLETED


async def test_after_a_server_restart_the_reattached_iteration_ends_with_turn_interrupted(
    tmp_path: Path,
) -> None:
    """kill -9 of the server is a transport failure: the iteration re-attaches to the
    restarted server (same state database), which replays nothing new and ends the turn's
    stream UNAVAILABLE/TURN_INTERRUPTED: a server's answer, raised, not retried."""
    async with (
        server_process(tmp_path) as first,
        Proxy(first.port) as proxy,
        AsyncSessionClient(proxy.target, options=FAST_RECONNECT) as client,
    ):
        sid = (await client.create_session("echo")).session_id
        events = client.prompt(sid, "/hang", on_disconnect="continue", timeout=120)
        early = [await anext(events)]  # one chunk, then silence
        await asyncio.sleep(1.5)  # past the turn log's write interval: these are on disk
        first.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.process.wait, 10)
        rest = asyncio.create_task(anext(events))  # re-attaching while no server is there
        async with server_process(tmp_path) as second:
            proxy.upstream = second.port
            with pytest.raises(TurnInterrupted) as interrupted:
                try:
                    await asyncio.wait_for(rest, 60)
                finally:
                    rest.cancel()
            assert interrupted.value.code == grpc.StatusCode.UNAVAILABLE
            assert events.last_seq == 1 and seqs(early) == [1]
            assert proxy.accepted >= 2
            turn = await client.get_turn(sid, events.turn_id)
            assert turn.state == pb.TURN_STATE_INTERRUPTED and list(turn.events) == early


# ---- CLI ------------------------------------------------------------------------------------


async def test_cli_watch_from_a_seq_renders_the_rest_like_prompt(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target) as client:
        sid = (await client.create_session()).session_id
        events = client.prompt(sid, PACED, on_disconnect="continue")
        for _ in range(3):
            await anext(events)
        await events.aclose()

        (code, out, err), (text_code, text, _) = await asyncio.gather(
            cli(gate, "watch", sid, "--from", "3", "--json"),  # the running turn
            cli(gate, "watch", sid, "--turn", events.turn_id, "--from", "3"),
        )
        assert code == 0, err
        watched = [json.loads(line) for line in out.splitlines()]
        assert [int(e["seq"]) for e in watched] == list(range(4, len(watched) + 4))
        assert watched[-1]["result"]["stop_reason"] == "STOP_REASON_END_TURN"
        assert text_code == 0
        assert text.splitlines() == [" " + " ".join(WORDS[3:]), "-- end_turn · 22 in / 20 out tokens"]

        code, _, err = await cli(gate, "watch", sid, "--turn", "no-such-turn")
        assert code == 3 and "NOT_FOUND TURN_NOT_FOUND" in err and f"sessiongate history {sid}" in err
        last = int(watched[-1]["seq"])
        code, _, err = await cli(gate, "watch", sid, "--from", str(last + 1))
        assert code == 2 and "OUT_OF_RANGE SEQ_NOT_KEPT" in err and f"--from takes at most {last}" in err

        with pytest.raises(AgentError):
            await client.reply(sid, "/error")
        code, _, err = await cli(gate, "watch", sid)  # ends as the turn's Prompt stream did
        assert code == 1 and "INTERNAL AGENT_ERROR" in err


async def test_cli_history_lists_the_turns_and_shows_one_with_every_page_of_its_events(gate: Gate) -> None:
    async with AsyncSessionClient(gate.target) as client:
        sid = (await client.create_session()).session_id
        await client.reply(sid, "hello \x1b[2Jthere")  # a control character in what is shown
        with pytest.raises(AgentError):
            await client.reply(sid, "/error")
        flood = "/flood 2000 2048"  # about 4 MB of events: more than one GetTurn page
        await client.reply(sid, flood)
        turns = [t async for t in client.list_turns(sid)]
        assert (await client.get_turn(sid, turns[0].turn_id)).events_truncated

    code, out, err = await cli(gate, "history", sid)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["TURN", "STATE", "STARTED", "DURATION", "LAST", "SEQ", "END", "PROMPT"]
    states = ("completed", "failed", "completed")
    assert [row.split()[:2] for row in rows] == [[t.turn_id, s] for t, s in zip(turns, states, strict=True)]
    assert rows[0].split()[5:] == [str(turns[0].last_seq), "end_turn", *flood.split()]
    assert rows[1].split()[5:] == ["0", "INTERNAL", "AGENT_ERROR", "/error"]
    assert rows[2].endswith(" end_turn                     hello ?[2Jthere") and "\x1b" not in out

    code, out, _ = await cli(gate, "history", "--json", sid)
    assert [json.loads(line)["turn_id"] for line in out.splitlines()] == [t.turn_id for t in turns]

    code, out, err = await cli(gate, "history", sid, turns[0].turn_id)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"turn {turns[0].turn_id} · completed · started ")
    assert lines[0].endswith(f"events 1-{turns[0].last_seq}")
    assert lines[1] == f"> {flood}"
    assert "".join(flood_chunk(i, 2048) for i in range(2000)) in lines  # every page, in order
    assert lines[-1].startswith("-- end_turn")

    code, out, _ = await cli(gate, "history", "--json", sid, turns[0].turn_id)
    summary, *events = (json.loads(line) for line in out.splitlines())
    assert summary["turn_id"] == turns[0].turn_id and "events" not in summary
    assert [int(e["seq"]) for e in events] == list(range(1, turns[0].last_seq + 1))

    code, out, _ = await cli(gate, "history", sid, turns[1].turn_id)
    assert out.splitlines()[1:] == [
        "> /error",
        "-- failed: INTERNAL AGENT_ERROR: agent 'echo' failed the turn: echo agent: "
        "failing the turn as asked (/error)",
    ]
    code, out, _ = await cli(gate, "history", sid, turns[2].turn_id)
    assert out.splitlines()[1] == "> hello ?[2Jthere"
    code, _, err = await cli(gate, "history", sid, "no-such-turn")
    assert code == 3 and "TURN_NOT_FOUND" in err


async def interrupted_cli(gate: Gate, *args: str) -> tuple[int, list[str], str]:
    """Run `sessiongate --json ARGS` (a prompt), send it SIGINT (Ctrl-C) after its third event;
    returns (exit code, its stdout lines, its stderr). Its own process group, killed at the
    end whatever happens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        # As in a shell on a terminal: SIGINT raises KeyboardInterrupt (a test run in the
        # background would hand the CLI an ignored SIGINT).
        "import signal, runpy; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('client', run_name='__main__')",
        *("--target", gate.target, "--json", *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        lines: list[str] = []
        while len(lines) < 3:
            line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
            assert line, "the CLI ended before three events"
            lines.append(line)
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 30)
        lines.extend(out.decode().splitlines())
        return await process.wait(), [line.strip() for line in lines], err.decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def test_cli_prompt_detach_then_ctrl_c_leaves_the_turn_running_and_says_how_to_reattach(
    gate: Gate,
) -> None:
    async with AsyncSessionClient(gate.target) as client:
        sid = (await client.create_session()).session_id
        code, lines, err = await interrupted_cli(gate, "prompt", "--detach", "--session", sid, PACED)
        assert code == 130, err
        turn_id = (await client.get_session(sid)).turn_id
        shown = [int(json.loads(line)["seq"]) for line in lines]
        assert shown == list(range(1, len(shown) + 1))
        hint = (
            f"interrupted: turn {turn_id} continues; re-attach with: "
            f"sessiongate watch {sid} --turn {turn_id} --from {shown[-1]}"
        )
        assert hint in err.splitlines(), err
        turn = await finished(client, sid, turn_id)
        assert turn.state == pb.TURN_STATE_COMPLETED and turn.result.stop_reason == pb.STOP_REASON_END_TURN
        assert turn.on_disconnect == pb.ON_DISCONNECT_CONTINUE

        # The hint's command gets exactly the rest.
        command = re.search(r"sessiongate (watch .*)$", hint)
        assert command is not None
        code, out, err = await cli(gate, "--json", *command.group(1).split())
        assert code == 0, err
        rest = [json.loads(line) for line in out.splitlines()]
        assert [int(e["seq"]) for e in rest] == list(range(shown[-1] + 1, turn.last_seq + 1))
        assert rest[-1]["result"]["stop_reason"] == "STOP_REASON_END_TURN"

        # Without --detach, Ctrl-C still cancels the turn.
        code, _, err = await interrupted_cli(gate, "prompt", "--session", sid, PACED)
        assert code == 130 and "interrupted: the turn was cancelled" in err
        cancelled = await finished(client, sid, (await client.get_session(sid)).turn_id)
        assert cancelled.result.stop_reason == pb.STOP_REASON_CANCELLED
