"""Several replicas sharing one PostgreSQL store: any replica answers any call (forwarding to the
owner), a dead owner's sessions are taken over once its lease runs out, a draining replica hands
its sessions over at once. Real server processes, a real PostgreSQL, the built-in agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from sessiongate.server.cluster import router
from sessiongate.server.cluster.leases import TAKEOVER_MARGIN
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import (
    Gate,
    GateFactory,
    details_of,
    eventually,
    expect_error,
    kinds,
    reply_text,
    wait_gone,
)
from tests.postgres import PostgresServer, free_port
from tests.processes import ServerProcess, server_process
from tests.test_auth import as_, tokens_file

PACED = "/pace 300 " + " ".join(f"w{i}" for i in range(30))  # 30 chunks, 0.3 s apart
# The bound a forwarded call promises past its owner's lease and the takeover margin: the router
# looks at the lease in the database as it runs out (a query of milliseconds), plus scheduling on
# a loaded machine. (Without the look: the channel's keepalive, 25 s, or the forwarding bounds.)
FAILOVER_LOOK = 5.0
# A client's retry, the takeover and a new agent's start (session/load) on a loaded machine.
FAILOVER_RESUME = 10.0


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path,
    url: str,
    names: tuple[str, ...],
    lease_ttl: float,
    options: dict[str, tuple[str, ...]] | None = None,
) -> AsyncIterator[dict[str, ServerProcess]]:
    """Replica processes on one database, one workdir and one agent state dir (a shared volume)."""
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        started = {}
        for name in names:
            port = free_port()
            address = f"127.0.0.1:{port}"
            args = ("--state-url", url, "--replica-id", name, "--listen", address, "--advertise", address)
            home = tmp_path / name
            home.mkdir()
            started[name] = await stack.enter_async_context(
                server_process(
                    home,
                    extra_args=(*args, "--lease-ttl", str(lease_ttl), *(options or {}).get(name, ())),
                    shared=shared,
                )
            )
        yield started


async def drain(call: grpc.aio.UnaryStreamCall) -> list[pb.PromptEvent]:
    out = []
    while (event := await call.read()) is not grpc.aio.EOF:
        out.append(event)
    return out


async def stored_turn_states(url: str, session_id: str) -> list[str]:
    """The session's turns' states as the database has them now (ListTurns shows a live turn's
    state from memory)."""
    db = await asyncpg.connect(url, timeout=10)
    try:
        rows = await db.fetch("SELECT state FROM turns WHERE session_id = $1 ORDER BY started", session_id)
    finally:
        await db.close(timeout=10)
    return [row[0] for row in rows]


async def eventually_idle(server: ServerProcess, session_id: str) -> None:
    """The session's turn ended on `server` (the owner) within a few seconds."""
    for _ in range(100):
        shown = await server.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=10)
        if shown.state == pb.SESSION_STATE_IDLE:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"session {session_id} still {pb.SessionState.Name(shown.state)} after 10 s")


async def prompt(server: ServerProcess, session_id: str, text: str) -> list[pb.PromptEvent]:
    request = pb.PromptRequest(session_id=session_id, text=text)
    return [e async for e in server.stub.Prompt(request, timeout=60)]


async def test_any_replica_answers_for_a_session_and_forwarded_calls_act_on_the_owner(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    async with replicas(tmp_path, url, ("a", "b", "c"), lease_ttl=10) as r:
        session = await r["a"].stub.CreateSession(pb.CreateSessionRequest(labels={"k": "v"}), timeout=30)
        sid = session.session_id
        assert session.replica == "a"
        # Through B: forwarded to A, the events as A streams them.
        events = await prompt(r["b"], sid, "hello there")
        assert reply_text(events) == "hello there" and [e.seq for e in events] == list(
            range(1, len(events) + 1)
        )
        shown = await r["c"].stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
        assert (
            shown.replica == "a" and shown.state == pb.SESSION_STATE_IDLE and dict(shown.labels) == {"k": "v"}
        )
        # A long turn started through B, cancelled through C.
        call = r["b"].stub.Prompt(pb.PromptRequest(session_id=sid, text=PACED), timeout=60)
        assert dict(await call.initial_metadata())["sessiongate-turn-id"]  # A's header, passed on
        await call.read()
        cancelled = await r["c"].stub.CancelPrompt(pb.CancelPromptRequest(session_id=sid), timeout=10)
        assert cancelled.cancelled
        rest = await drain(call)
        assert rest[-1].result.stop_reason == pb.STOP_REASON_CANCELLED
        # Statuses come back as the owner sent them: a second prompt on a busy session.
        busy_call = r["b"].stub.Prompt(pb.PromptRequest(session_id=sid, text=PACED), timeout=60)
        await busy_call.read()
        busy = await expect_error(r["c"].stub.Prompt(pb.PromptRequest(session_id=sid, text="x"), timeout=10))
        assert (busy.code, busy.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_BUSY")
        assert busy.metadata["session_id"] == sid
        busy_call.cancel()  # the client leaves: the owner cancels the turn upstream
        await eventually_idle(r["a"], sid)
        # The caller's deadline reaches the owner: it passes there too, and the turn is cancelled.
        late = await expect_error(r["b"].stub.Prompt(pb.PromptRequest(session_id=sid, text=PACED), timeout=2))
        assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually_idle(r["a"], sid)
        # ListSessions through any replica pages over every replica's sessions, in creation order.
        other = await r["c"].stub.CreateSession(pb.CreateSessionRequest(labels={"k": "w"}), timeout=30)
        listed, token = [], ""
        while True:
            page = await r["b"].stub.ListSessions(pb.ListSessionsRequest(page_size=1, page_token=token))
            listed.extend(page.sessions)
            token = page.next_page_token
            if not token:
                break
        assert [(s.session_id, s.replica) for s in listed] == [(sid, "a"), (other.session_id, "c")]
        labelled = await r["a"].stub.ListSessions(pb.ListSessionsRequest(labels={"k": "w"}))
        assert [s.session_id for s in labelled.sessions] == [other.session_id]
        unknown = await expect_error(r["b"].stub.GetSession(pb.GetSessionRequest(session_id="s" * 22)))
        assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        # Only A ever ran an agent for it.
        assert r["a"].log_has(f"session created session={sid}")
        assert not any(f"session={sid}" in line and "took over" in line for s in r.values() for line in s.log)


async def test_a_killed_owners_sessions_are_taken_over_once_its_lease_runs_out(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    lease_ttl = 3.0
    async with replicas(tmp_path, url, ("a", "b"), lease_ttl=lease_ttl) as r:
        session = await r["a"].stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
        sid = session.session_id
        assert reply_text(await prompt(r["a"], sid, "remember me")) == "remember me"
        for _ in range(100):  # the turn's record is written just after its result (in a batch)
            if await stored_turn_states(url, sid) == ["completed"]:
                break
            await asyncio.sleep(0.1)
        r["a"].process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(r["a"].process.wait, 10)
        killed = time.monotonic()
        events: list[pb.PromptEvent] = []
        while not events:
            try:
                events = await prompt(r["b"], sid, "/history")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # the owner cannot be reached yet
                assert time.monotonic() - killed < lease_ttl + 30, "not taken over in time"
                await asyncio.sleep(0.5)
        # Resumed with session/load: the agent-side history is there, no context reset.
        assert "notice" not in kinds(events)
        assert "remember me" in reply_text(events)
        shown = await r["b"].stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
        assert shown.replica == "b"
        assert any(f"took over session={sid} from replica=a" in line for line in r["b"].log)
        # Nothing was lost from the database: the turn before the kill is in the transcript.
        turns = (await r["b"].stub.ListTurns(pb.ListTurnsRequest(session_id=sid), timeout=10)).turns
        assert [(t.prompt[0].text.text, t.state) for t in turns][-1] == (
            "remember me",
            pb.TURN_STATE_COMPLETED,
        )


async def test_a_draining_replica_hands_its_sessions_over_without_a_lease_wait(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    async with replicas(tmp_path, url, ("a", "b"), lease_ttl=60) as r:
        session = await r["a"].stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
        sid = session.session_id
        assert reply_text(await prompt(r["a"], sid, "before")) == "before"
        assert await r["a"].stop() == 0
        assert any("released 1 sessions" in line for line in r["a"].log)
        shown = await r["b"].stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
        assert shown.replica == "" and shown.state == pb.SESSION_STATE_SUSPENDED  # read, not moved
        started = time.monotonic()
        events = await prompt(r["b"], sid, "/history")
        assert time.monotonic() - started < 30  # no wait for a 60 s lease
        assert "before" in reply_text(events) and "notice" not in kinds(events)
        shown = await r["b"].stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
        assert shown.replica == "b"


def running_agents(server: ServerProcess) -> set[int]:
    """Agent processes (of any replica: their state dir is shared) that exist and are not stopped."""
    running = set()
    for pid in server.agent_pids():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            running.add(pid)
    return running


async def test_a_paused_owner_loses_its_sessions_and_after_waking_streams_nothing_and_ends_its_agents(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    """A replica's machine frozen longer than its lease (SIGSTOP to the gateway and its agents:
    a partition as its peers see it). Its session moves; once it wakes it streams nothing more for
    it and ends its stale agent; at no instant do two agents run for the session."""
    url = await postgres.fresh_database()
    lease_ttl = 3.0
    async with replicas(tmp_path, url, ("a", "b"), lease_ttl=lease_ttl) as r:
        a, b = r["a"], r["b"]
        session = await a.stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
        sid = session.session_id
        call = a.stub.Prompt(pb.PromptRequest(session_id=sid, text=PACED), timeout=120)
        first = await call.read()
        (old_agent,) = running_agents(a)
        most_running = 0
        sampling = True

        sampled = asyncio.Event()

        async def sample() -> None:
            # Agents running in two samples in a row (0.05 s apart): a process that exists for
            # less than that (a start refused at once) is not an agent serving the session.
            nonlocal most_running
            previous = running_agents(a)
            while sampling:
                await asyncio.sleep(0.05)
                now = running_agents(a)
                most_running = max(most_running, len(now & previous))
                previous = now
                sampled.set()

        sampler = asyncio.create_task(sample())
        await asyncio.wait_for(sampled.wait(), 10)  # the old agent is seen running before the freeze
        os.killpg(os.getpgid(old_agent), signal.SIGSTOP)
        os.killpg(a.process.pid, signal.SIGSTOP)
        try:
            paused = time.monotonic()
            # A's lease (renewed before the freeze) ends within lease_ttl of it; then the margin.
            lease_end = lease_ttl + TAKEOVER_MARGIN
            events: list[pb.PromptEvent] = []
            while not events:  # B takes it over once A's lease and the margin have run out
                try:
                    events = await prompt(b, sid, "/history")
                except grpc.aio.AioRpcError as error:
                    gave_up = time.monotonic() - paused
                    lost = details_of(error)
                    assert (lost.code, lost.reason) == (grpc.StatusCode.UNAVAILABLE, "OWNER_LOST"), lost
                    # A call B forwarded to the frozen A ends on A's lease, not on keepalive.
                    assert gave_up <= lease_end + FAILOVER_LOOK, f"a forwarded call hung {gave_up:.1f}s"
                    await asyncio.sleep(0.5)
            served = time.monotonic() - paused
            assert served >= lease_ttl  # never before A's lease ran out
            assert served <= lease_end + FAILOVER_LOOK + FAILOVER_RESUME, f"B served it after {served:.1f}s"
            assert "earlier turns" in reply_text(events)
            new_agents = running_agents(b) - {old_agent}
            assert len(new_agents) == 1
        finally:
            os.killpg(a.process.pid, signal.SIGCONT)  # the gateway wakes; its agent stays frozen
        # A ends its stale agent (SIGKILL works on a stopped process) and streams nothing more.
        rest: list[pb.PromptEvent] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (event := await call.read()) is not grpc.aio.EOF:
                rest.append(event)
        lost = details_of(ended.value)
        assert (lost.code, lost.reason) == (grpc.StatusCode.UNAVAILABLE, "OWNER_LOST")
        assert not any(e.HasField("result") for e in [first, *rest])
        assert not await asyncio.to_thread(wait_gone, {old_agent}, 10), "A left its stale agent running"
        sampling = False
        await sampler
        assert most_running == 1, f"{most_running} agents ran at once for the session"
        assert a.log_has("lease lost replica=a")
        # The session goes on at B; A forwards to B now.
        assert reply_text(await prompt(a, sid, "still here")) == "still here"
        shown = await a.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
        assert shown.replica == "b"


async def test_creates_go_where_there_is_room_and_a_request_id_is_one_session_over_all_replicas(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    room: dict[str, tuple[str, ...]] = {"a": ("--max-sessions", "1"), "b": ("--max-sessions", "4")}
    async with replicas(tmp_path, url, ("a", "b"), lease_ttl=10, options=room) as r:
        a, b = r["a"], r["b"]
        first = await a.stub.CreateSession(pb.CreateSessionRequest(request_id="r1"), timeout=30)
        assert first.replica == "a"
        # A's only slot is taken: the next create through A is made on B (A suspends nothing).
        second = await a.stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
        assert second.replica == "b"
        shown = await a.stub.GetSession(pb.GetSessionRequest(session_id=first.session_id), timeout=10)
        assert shown.state == pb.SESSION_STATE_IDLE
        # A retried create through the other replica returns the same session.
        again = await b.stub.CreateSession(pb.CreateSessionRequest(request_id="r1"), timeout=30)
        assert again.session_id == first.session_id and again.replica == "a"
        other_cwd = await expect_error(
            b.stub.CreateSession(pb.CreateSessionRequest(request_id="r1", agent="slow"), timeout=30)
        )
        assert other_cwd.code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in other_cwd.violations
        # Two creates racing through both replicas with one request id: one session, whatever wins.
        results = await asyncio.gather(
            *(
                server.stub.CreateSession(pb.CreateSessionRequest(request_id="race"), timeout=30)
                for server in (a, b)
            ),
            return_exceptions=True,
        )
        made = set()
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                lost = details_of(result)
                assert (lost.code, lost.reason) == (grpc.StatusCode.ABORTED, "REQUEST_ID_RACE"), lost
                result = await b.stub.CreateSession(pb.CreateSessionRequest(request_id="race"), timeout=30)
            assert isinstance(result, pb.Session)
            made.add(result.session_id)
        assert len(made) == 1
        listed = (await b.stub.ListSessions(pb.ListSessionsRequest())).sessions
        assert sum(1 for s in listed if s.request_id == "race") == 1


async def test_replicas_authenticate_each_other_and_forward_as_the_callers_principal(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = await postgres.fresh_database()
    tokens = tokens_file(tmp_path / "tokens.toml")
    secret = tmp_path / "replica-token"
    secret.write_text("a-secret-the-replicas-share\n")
    auth = ("--auth-tokens-file", str(tokens), "--replica-token-file", str(secret))
    async with replicas(tmp_path, url, ("a", "b"), lease_ttl=10, options={"a": auth, "b": auth}) as r:
        a, b = r["a"], r["b"]
        session = await a.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("alice"), timeout=30)
        sid = session.session_id
        request = pb.PromptRequest(session_id=sid, text="mine")
        events = [e async for e in b.stub.Prompt(request, metadata=as_("alice"), timeout=30)]
        assert reply_text(events) == "mine"
        # The owner writes its call line as its side of the stream ends, which may be after ours.
        audit = f"call principal=alice rpc=/sessiongate.v1.SessionService/Prompt session={sid} code=OK"
        await eventually(lambda: a.log_has(audit), 10, "the owner's call line")
        for rpc in ("Prompt", "GetSession"):  # another principal: not found, on the owner as here
            call = (
                b.stub.Prompt(request, metadata=as_("bob"), timeout=10)
                if rpc == "Prompt"
                else b.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=as_("bob"), timeout=10)
            )
            hidden = await expect_error(call)
            assert (hidden.code, hidden.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        # ListSessions over all replicas shows each principal its own sessions only.
        bobs = await b.stub.CreateSession(pb.CreateSessionRequest(), metadata=as_("bob"), timeout=30)
        for name, mine in (("alice", sid), ("bob", bobs.session_id)):
            listed = await a.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_(name), timeout=10)
            assert [s.session_id for s in listed.sessions] == [mine]
        everyone = await b.stub.ListSessions(pb.ListSessionsRequest(), metadata=as_("root"), timeout=10)
        assert {(s.session_id, s.owner, s.replica) for s in everyone.sessions} == {
            (sid, "alice", "a"),
            (bobs.session_id, "bob", "b"),
        }
        # A client cannot pose as a replica: a wrong token (even with a valid bearer token) is refused.
        forged = [("sessiongate-replica-token", "guess"), ("sessiongate-principal", "alice"), *as_("bob")]
        refused = await expect_error(a.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=forged))
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED


# ---- forwarded calls to an owner that does not answer (in-process replica, fake owner) --------
# Replica B runs in this process (make_gate) so that its bounds can be shortened; the "owner" is a
# gRPC server here that accepts calls and never answers them, registered in the database as
# replica "a" with the lease the test chooses.


class Silent(pb_grpc.SessionServiceServicer):
    """An owner replica that takes calls and never answers (a hung process, as its peers see it)."""

    def __init__(self, first: pb.PromptEvent | None = None) -> None:
        self.calls = 0
        self.first = first  # an event a Prompt sends (with its headers) before it stops answering

    async def Prompt(self, request: pb.PromptRequest, context: Any) -> AsyncIterator[pb.PromptEvent]:
        self.calls += 1
        if self.first is not None:
            yield self.first
        await asyncio.Event().wait()  # ended by the caller's cancel, or the server's stop
        yield pb.PromptEvent()

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.Session:
        self.calls += 1
        await asyncio.Event().wait()
        return pb.Session()


@contextlib.asynccontextmanager
async def silent_owner(
    url: str, gate: Gate, lease: float, first: pb.PromptEvent | None = None
) -> AsyncIterator[tuple[Silent, str, float]]:
    """Replica "a" at a silent server with a lease of `lease` seconds from now (by the database's
    clock), owning one session; yields the servicer, the session's id, and the monotonic time from
    before the lease was written (the lease ends `lease` seconds after it at the earliest)."""
    servicer = Silent(first)
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    sid = "silent-owner-session-0001"
    db = await asyncpg.connect(url, timeout=10)
    registered = time.monotonic()
    try:
        await db.execute(
            "INSERT INTO replicas (replica_id, advertise, lease_until, free_slots)"
            " VALUES ('a', $1, clock_timestamp() + make_interval(secs => $2), 1)",
            address,
            lease,
        )
        await db.execute(
            "INSERT INTO sessions (session_id, agent, cwd, labels, state, agent_session_id, request_id,"
            " create_time, last_active_time, agent_info, replica, epoch)"
            " VALUES ($1, 'echo', $2, '{}', 'idle', '', '', 1, extract(epoch FROM now()), '{}', 'a', 1)",
            sid,
            str(gate.workdir),
        )
    finally:
        await db.close(timeout=10)
    try:
        yield servicer, sid, registered
    finally:
        await server.stop(0)


async def test_a_forwarded_call_to_an_owner_that_does_not_answer_ends_owner_lost_when_its_lease_runs_out(
    make_gate: GateFactory, postgres: PostgresServer
) -> None:
    """Fail-over waits on the owner's lease, not on the channel's keepalive or the forwarding
    bounds: a call forwarded to an owner that stopped answering ends UNAVAILABLE/OWNER_LOST at
    most `FAILOVER_LOOK` seconds after the owner's lease plus the takeover margin ran out, and
    the caller's retry is served here (the session is taken over)."""
    url = await postgres.fresh_database()
    b = await make_gate(state_url=url)
    lease = 2.0
    async with silent_owner(url, b, lease) as (owner, sid, started):
        prompt_call = b.stub.Prompt(pb.PromptRequest(session_id=sid, text="hello"), timeout=60)
        read_call = b.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=60)
        for call in (prompt_call, read_call):
            lost = await expect_error(call)
            took = time.monotonic() - started
            assert (lost.code, lost.reason) == (grpc.StatusCode.UNAVAILABLE, "OWNER_LOST"), lost
            # Never before the owner's lease and the margin ran out; soon after, however loaded.
            assert lease + TAKEOVER_MARGIN - 0.1 <= took <= lease + TAKEOVER_MARGIN + FAILOVER_LOOK, took
        assert owner.calls == 2  # both were forwarded, and waited on the owner meanwhile
        events = await b.prompt(sid, "hello")
        assert reply_text(events) == "hello"
        shown = await b.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
        assert shown.replica not in ("", "a")


async def test_a_forwarded_stream_whose_owner_stops_mid_turn_ends_owner_lost_when_its_lease_runs_out(
    make_gate: GateFactory, postgres: PostgresServer
) -> None:
    """Past the headers and the first event the relayed stream is cut by the same bound: the
    owner's call is cancelled once its lease and the margin ran out, and the client, having got
    what the owner sent, hears OWNER_LOST (not CANCELLED, not a hang)."""
    url = await postgres.fresh_database()
    b = await make_gate(state_url=url)
    lease = 2.0
    first = pb.PromptEvent(
        seq=1, message_chunk=pb.ContentChunk(content=pb.ContentBlock(text=pb.TextContent(text="hi")))
    )
    async with silent_owner(url, b, lease, first) as (owner, sid, started):
        call = b.stub.Prompt(pb.PromptRequest(session_id=sid, text="hello"), timeout=60)
        assert await call.read() == first
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while await call.read() is not grpc.aio.EOF:
                pass
        lost = details_of(raised.value)
        took = time.monotonic() - started
        assert (lost.code, lost.reason) == (grpc.StatusCode.UNAVAILABLE, "OWNER_LOST"), lost
        assert lease + TAKEOVER_MARGIN - 0.1 <= took <= lease + TAKEOVER_MARGIN + FAILOVER_LOOK, took
        assert owner.calls == 1


async def test_an_owner_that_sends_no_response_headers_in_time_is_owner_lost_not_internal(
    make_gate: GateFactory, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await postgres.fresh_database()
    b = await make_gate(state_url=url)
    monkeypatch.setattr(router, "FORWARD_HEADERS_TIMEOUT", 1.0)
    async with silent_owner(url, b, 3600.0) as (owner, sid, _):  # its lease lives on: only the bound ends it
        lost = await expect_error(b.stub.Prompt(pb.PromptRequest(session_id=sid, text="x"), timeout=60))
        assert (lost.code, lost.reason) == (grpc.StatusCode.UNAVAILABLE, "OWNER_LOST"), lost
        assert "no response headers within 1s" in lost.message
        assert owner.calls == 1
