"""The lock map: create, get, list, close and sweep sessions; their records in the store.

The map lock guards the dicts below and nothing else: no `await` on I/O ever happens while
it is held. Everything slow runs in tasks of the pool's supervisor, outside it, and callers
await those tasks shielded, so a client that goes away never cuts a create or a close in
half:
- a create runs in its own task; concurrent creates with one `request_id` all await that one
  task (one request id never spawns two agents), and it finishes even if its first caller
  leaves, so a retry finds the session. A create without a request id nobody else can ask
  for is abandoned with its caller, and cleaned up (agent, slot, row).
- a close runs in its own task: the record is deleted first, then the agent is ended.
  Recently closed sessions are remembered, so closing one again answers the same (a retried
  CloseSession is safe); the store keeps a tombstone of each for the session retention, so
  it also answers the same after a restart or through another replica.

The sweeper suspends sessions idle past the TTL, deletes suspended sessions idle past the
retention, and reaps turns whose runner outlived its own bounds (a safety net). It reads
lock-free attributes only, never waits on a session, and survives its own errors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sessiongate.server.agents.holder import AgentFactory, real_agent
from sessiongate.server.agents.slots import LiveLimit, Slots
from sessiongate.server.agents.spares import SparePool
from sessiongate.server.errors import (
    InvalidArgument,
    NotSupported,
    SessionGateError,
    SessionNotFound,
    ShuttingDown,
    clip,
)
from sessiongate.server.security import principals
from sessiongate.server.security.quotas import PromptRate, check_room, check_shared_room
from sessiongate.server.security.secrets import SecretBox
from sessiongate.server.sessions.session import Session, SessionServices, SessionView
from sessiongate.server.sessions.stored import (
    CLIENT_TOOLS_KEY,
    MCP_SERVERS_KEY,
    ClientMcpServers,
    State,
    StoredSession,
)
from sessiongate.server.settings import AgentConfig, McpServerConfig, ServerLimits
from sessiongate.server.state.base import WRITE_TIMEOUT, Fences, SessionRecord, Store, Tombstone
from sessiongate.server.state.postgres import PostgresStore
from sessiongate.server.supervisor import Supervisor, joined
from sessiongate.server.turns.client_tools import ClientToolSpec
from sessiongate.server.turns.transcripts import Transcripts

log = logging.getLogger("sessiongate.pool")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_TOKEN = 256  # characters of a page token (ours are about 80)
CLOSED_KEPT = 1024  # recently closed sessions remembered for an idempotent CloseSession
# A changed session's record is built and queued for writing this long after its first change:
# a turn's start and end (and turns in a row) become one write, made off the first event's path.
PERSIST_DELAY = 0.1

SortKey = tuple[float, str]  # (create_time, session_id): the listing order, and page tokens


@dataclass(frozen=True, slots=True)
class _Pending:
    """A create in progress for a request id, and what it was asked for."""

    agent: str
    cwd: str
    task: asyncio.Task[Session]


class ClosingSteps:
    """What the pool awaits once its sessions have ended, before it closes the store (replicas:
    hand this replica's sessions to the others and leave).

    The steps belong to objects made after the pool, since they need it (the replica's leases
    and router): this list is made first and given to the pool, and they add their step as they
    are made. A failing step is logged by the pool; the store is closed all the same."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], Awaitable[None]]] = []

    def add(self, step: Callable[[], Awaitable[None]]) -> None:
        self._steps.append(step)

    async def run(self) -> None:
        for step in self._steps:
            await step()


class SessionPool:
    """Every session this server serves: their map, creation, restore, close and eviction."""

    def __init__(
        self,
        limits: ServerLimits,
        store: Store,
        spares: SparePool | None = None,
        agent_factory: AgentFactory = real_agent,
        roots: tuple[Path, ...] = (),
        live_limit: LiveLimit | None = None,
        *,
        on_agent_start: Callable[[str, bool], None] | None = None,
        fences: Fences | None = None,
        before_store_close: ClosingSteps | None = None,
        secret_box: SecretBox | None = None,
    ) -> None:
        """`live_limit`: each principal's max_live_sessions by name, given when authentication is
        configured (agent slots are then shared fairly between principals, see server/agents/slots.py);
        None: one trust domain, plain least-recently-used eviction. `on_agent_start`: (agent name,
        started ok) after each agent start. `fences`: where the store reports sessions another
        replica took over (they are fenced off here). `before_store_close`: run at shutdown.
        `secret_box`: seals client-supplied MCP servers (none: CreateSession may not supply any)."""
        self.limits = limits
        self._store = store
        self.transcripts = Transcripts(store, limits)  # every session's turns
        self._spares = spares
        self._map_lock = asyncio.Lock()
        self._sessions: dict[str, Session] = {}
        self._unpersisted: dict[str, Session] = {}  # changed since their records were last queued
        self._persist_timer: asyncio.TimerHandle | None = None
        self._order: list[SortKey] = []  # sorted: creation order for ListSessions
        # request_id idempotency is per principal: keys are (principal, request_id).
        self._by_request_id: dict[tuple[str, str], Session] = {}
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._starting: dict[asyncio.Task[Session], Session] = {}
        # Replicas count each principal's sessions and prompts in the database they share.
        self._shared = store if isinstance(store, PostgresStore) else None
        self._prompt_rate = PromptRate(self._shared)
        self._closing: dict[str, tuple[Session, asyncio.Task[Session]]] = {}
        self._recently_closed: OrderedDict[str, Session] = OrderedDict()
        self._slots = Slots(limits.max_sessions, self._slot_holders, live_limit)
        self._supervisor = Supervisor()
        self._services = SessionServices(
            limits,
            self._slots,
            self._supervisor,
            transcripts=self.transcripts,
            on_change=self._persist_later,
            on_agent_start=on_agent_start,
            spares=spares,
            agent_factory=agent_factory,
            roots=roots,
            secret_box=secret_box,
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._shutdown: asyncio.Future[None] | None = None
        self._agents: Mapping[str, AgentConfig] = {}
        self.draining = False
        self._before_store_close = before_store_close
        if fences is not None:
            fences.handle_with(self.fence)

    # ---- start-up ----------------------------------------------------------------------

    async def load(self, agents: Mapping[str, AgentConfig]) -> int:
        """Bring back every stored session as SUSPENDED; start the sweeper. Returns the count."""
        self._agents = agents
        now = time.time()
        for record in await self._store.open():
            if now - record.last_active_time > self.limits.session_retention:
                self._store.delete_later(record.session_id)
                continue
            self._publish(self._restore(record))
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="sessiongate-sweeper")
        return len(self._sessions)

    def view(self, record: SessionRecord, *, closed: bool = False) -> StoredSession:
        """A stored session as its record has it, for showing (GetSession, ListSessions) while
        no Session of it runs here; `closed`: a tombstone's."""
        # An agent no longer configured keeps its sessions listed; resuming them fails clearly.
        config = self._agents.get(record.agent) or AgentConfig(name=record.agent, command="")
        return StoredSession.from_record(record, config, closed=closed)

    def _restore(self, record: SessionRecord) -> Session:
        """A stored session as a SUSPENDED Session, not published: loaded at start, or taken over
        from another replica."""
        stored = self.view(record)
        return self._new_session(
            stored.config,
            stored.cwd,
            stored.request_id,
            stored.labels,
            stored.principal,
            stored,
            stored.requested_mcp_servers,
            stored.client_mcp,
            stored.client_tools,
        )

    def has(self, session_id: str) -> bool:
        """Whether this replica serves the session now (whoever may see it)."""
        return session_id in self._sessions

    async def adopt(self, record: SessionRecord) -> Session:
        """A session taken over from another replica: served here from now on, SUSPENDED until its
        next prompt resumes it (session/load)."""
        async with self._map_lock:
            self._refuse_if_closed()
            session = self._sessions.get(record.session_id)
            if session is None:
                session = self._restore(record)
                self._publish(session)
        return session

    def fence(self, session_id: str) -> None:
        """The session moved to another replica (a write found its epoch changed): it leaves the
        map now, its turn ends OWNER_LOST and its agent is ended."""
        session = self._sessions.get(session_id)
        if session is not None and not session.fenced:
            self._unpublish(session)
            self._spawn(session.fence(), f"fence-{session_id}")

    async def fence_all(self) -> None:
        """The lease ran out: every session here stops, before another replica may take it over."""
        sessions = list(self._sessions.values())
        for session in sessions:
            self._unpublish(session)
        # Each fence is a task of the supervisor's: once the sessions left the map, shutdown still
        # reaches (and bounds) their fences, and a cancelled caller cuts none of them short.
        fences = [self._spawn(s.fence(), f"fence-{s.session_id}") for s in sessions]
        if fences:
            await asyncio.wait(fences)

    def _new_session(
        self,
        config: AgentConfig,
        cwd: str,
        request_id: str,
        labels: Mapping[str, str],
        principal: str,
        stored: StoredSession | None = None,
        mcp_servers: tuple[str, ...] = (),
        client_mcp: ClientMcpServers | None = None,
        client_tools: tuple[ClientToolSpec, ...] = (),
    ) -> Session:
        return Session(
            self._services,
            config,
            cwd=cwd,
            labels=labels,
            request_id=request_id,
            principal=principal,
            stored=stored,
            mcp_servers=mcp_servers,
            client_mcp=client_mcp,
            client_tools=client_tools,
        )

    # ---- the map -------------------------------------------------------------------------

    async def create(
        self,
        config: AgentConfig,
        cwd: str,
        request_id: str,
        labels: Mapping[str, str],
        mcp_servers: tuple[str, ...] = (),
        client_mcp_servers: tuple[McpServerConfig, ...] = (),
        client_tools: tuple[ClientToolSpec, ...] = (),
    ) -> Session:
        """A new session (or the one `request_id` already made); `mcp_servers`: operator-named
        servers asked for, besides the agent's own; `client_mcp_servers`: the client's own (both
        checked by the caller), sealed here before anything keeps them; `client_tools`: the tools
        the client serves (checked by the caller)."""
        principal = principals.current()
        client_mcp = self._seal(client_mcp_servers)
        key = (principal.name, request_id)
        if not request_id or (key not in self._by_request_id and key not in self._pending):
            await check_shared_room(self._shared, principal)  # (a retried create is not refused)
        async with self._map_lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            existing = self._by_request_id.get(key) if request_id else None
            if existing is not None:
                _check_same_request(request_id, existing.config.name, existing.cwd, config.name, cwd)
                return existing
            pending = self._pending.get(key) if request_id else None
            if pending is not None:
                _check_same_request(request_id, pending.agent, pending.cwd, config.name, cwd)
                task = pending.task
            else:
                kept_by = (s.principal for s in (*self._sessions.values(), *self._starting.values()))
                check_room(kept_by, principals.current(), self.limits.max_stored_sessions)
                session = self._new_session(
                    config,
                    cwd,
                    request_id,
                    labels,
                    principal.name,
                    mcp_servers=mcp_servers,
                    client_mcp=client_mcp,
                    client_tools=client_tools,
                )
                task = self._spawn(
                    self._start(session, principal.max_sessions), f"create-{session.session_id}"
                )
                self._starting[task] = session
                task.add_done_callback(lambda done: self._starting.pop(done, None))
                if request_id:
                    self._pending[key] = _Pending(config.name, cwd, task)
        try:
            return await joined(task)
        except asyncio.CancelledError:
            if not request_id:  # nobody else can ever ask for this session: abandon it
                if task.done() and not task.cancelled() and task.exception() is None:
                    self._spawn(self.close(task.result().session_id), "close-abandoned")  # made, unseen
                else:
                    task.cancel()
            raise

    def _seal(self, servers: tuple[McpServerConfig, ...]) -> ClientMcpServers:
        box = self._services.secret_box
        if not servers:
            return ClientMcpServers()
        if box is None:  # (app always gives one: a pool built without can keep no secret)
            raise NotSupported("this server keeps no key for client-supplied MCP servers")
        return ClientMcpServers.seal(box, servers)

    async def _start(self, session: Session, max_sessions: int | None) -> Session:
        """The create task: start the agent, store the record durably, then publish the session.
        With replicas the insert is refused once the principal keeps `max_sessions` over all of them."""
        written = False
        try:
            await session.start()
            self._refuse_if_closed()
            written = True  # from here on a row may exist, even if the write below is cancelled
            if self._shared is not None:  # durable before CreateSession answers
                await self._shared.put(_record(session), max_sessions)
            else:
                await self._store.put(_record(session))
            self._refuse_if_closed()
        except BaseException as exc:
            self._pending.pop(_request_key(session), None)
            if written:
                self._store.delete_later(session.session_id)  # queued after the put: no ghost row
            await session.close()  # nothing of a failed create stays behind: agent, slot
            if isinstance(exc, asyncio.CancelledError) and self._closed:
                raise ShuttingDown("the server is shutting down") from None
            raise
        async with self._map_lock:
            self._pending.pop(_request_key(session), None)
            self._publish(session)
            current = asyncio.current_task()
            if current is not None:
                self._starting.pop(current, None)  # counted once, as published (quotas)
        log.info("session created session=%s agent=%s", session.session_id, session.config.name)
        return session

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down")

    def _publish(self, session: Session) -> None:
        self._sessions[session.session_id] = session
        bisect.insort(self._order, sort_key(session))
        if session.request_id:
            self._by_request_id[_request_key(session)] = session

    def _unpublish(self, session: Session) -> None:
        """Under the map lock (or synchronously): the session leaves every index."""
        self._sessions.pop(session.session_id, None)
        key = sort_key(session)
        index = bisect.bisect_left(self._order, key)
        if index < len(self._order) and self._order[index] == key:
            del self._order[index]
        if self._by_request_id.get(_request_key(session)) is session:
            del self._by_request_id[_request_key(session)]

    def get(self, session_id: str) -> Session:
        """A plain dict lookup: needs no lock in one event loop, and never waits.

        Another principal's session is not found, exactly as an unknown id is.
        """
        session = self._sessions.get(session_id)
        if session is None or not _visible(session):
            raise _not_found(session_id)
        return session

    def page(
        self, page_size: int, page_token: str, agent: str, labels: Mapping[str, str], principal: str = ""
    ) -> tuple[list[Session], str]:
        """One page of sessions in creation order, and the token of the next page ("" at the end).

        The token is the position after the page's last session (keyset), so sessions closed
        or created between two calls never shift the pages: none is skipped or repeated.
        """
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        after = decode_token(page_token)
        start = bisect.bisect_right(self._order, after) if after is not None else 0
        page: list[Session] = []
        more = False
        for index in range(start, len(self._order)):
            session = self._sessions[self._order[index][1]]
            if not _visible(session) or (principal and session.principal != principal):
                continue
            if (agent and session.config.name != agent) or any(
                session.labels.get(k) != v for k, v in labels.items()
            ):
                continue
            if len(page) == size:
                more = True
                break
            page.append(session)
        return page, encode_token(sort_key(page[-1])) if more else ""

    def token_after(self, session: SessionView) -> str:
        """The page token of the position right after `session` (a page cut short)."""
        return encode_token(sort_key(session))

    async def close(self, session_id: str) -> SessionView:
        """End a session for good; closing one that is already closed answers the same."""
        async with self._map_lock:
            closing = self._closing.get(session_id)
            if closing is not None and not _visible(closing[0]):
                raise _not_found(session_id)
            if closing is None:
                closed = self._recently_closed.get(session_id)
                if closed is not None and _visible(closed):
                    return closed
                self._refuse_if_closed()
                session = self._sessions.get(session_id)
                if session is not None and _visible(session):
                    self._unpublish(session)
                    session.closed = True  # from now on nothing new starts on it
                    closing = (session, self._spawn(self._close(session), f"close-{session_id}"))
                    self._closing[session_id] = closing
        if closing is None:  # closed before a restart, or by another replica?
            return await self._tombstoned(session_id)
        return await joined(closing[1])

    async def _tombstoned(self, session_id: str) -> StoredSession:
        """A session closed within its retention, as its close answered; else (unknown, and not
        the caller's alike) not found."""
        record = await self._store.closed_session(session_id, self.limits.session_retention)
        if record is None or not principals.current().may_see(record.principal):
            raise _not_found(session_id)
        return self.view(record, closed=True)

    async def _close(self, session: Session) -> Session:
        """The close task: forget the record first (a crash now cannot bring it back), then end it.

        The session ends whatever the store says: a record that cannot be deleted now is
        deleted later (logged), never a reason to keep an agent running.
        """
        tombstone = Tombstone(_record(session), self.limits.session_retention)
        try:
            try:
                await self._store.delete(session.session_id, tombstone)
            except SessionGateError as exc:
                log.error(
                    "could not delete a closed session's record now session=%s: %s", session.session_id, exc
                )
                self._store.delete_later(session.session_id, tombstone)
        finally:
            try:
                await session.close()
            finally:
                self._closing.pop(session.session_id, None)
                self._recently_closed[session.session_id] = session
                while len(self._recently_closed) > CLOSED_KEPT:
                    self._recently_closed.popitem(last=False)
        log.info("session closed session=%s", session.session_id)
        return session

    async def admit_prompt(self) -> None:
        """Count a prompt against its principal's rate (QUOTA_EXCEEDED past it)."""
        await self._prompt_rate.admit(principals.current())

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def _slot_holders(self) -> list[Session]:
        """Every session that may hold a slot, once each: published, being created, being closed.

        The slots count each principal's live agents from these (a create's agent counts from
        its start, a closing one until its agent is gone); only published ones are ever idle.
        """
        holders = {s.session_id: s for s in self._starting.values()}
        holders.update(self._sessions)
        holders.update((session_id, s) for session_id, (s, _) in self._closing.items())
        return list(holders.values())

    # ---- shutdown ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Refuse new sessions, end every turn (CANCELLED) and agent; keep every record.

        Idempotent: a second call waits for the first.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._shut_down(hurry=False))
        await asyncio.shield(self._shutdown)

    async def terminate(self) -> None:
        """Like shutdown, but agents are ended at once, without the graces (also mid-shutdown)."""
        await self._shut_down(hurry=True)

    async def _shut_down(self, hurry: bool) -> None:
        sessions = await self._stop_taking_work(hurry)
        ending = (s.kill() if hurry else s.retire() for s in sessions)
        await asyncio.gather(*ending, return_exceptions=True)
        await self._finish(patient=not hurry)

    def refuse_turns(self) -> None:
        """Drain: no new turn starts, not even for prompts already waiting for their session."""
        self.draining = True
        for session in self._sessions.values():
            session.draining = True

    async def _stop_taking_work(self, hurry: bool) -> list[Session]:
        async with self._map_lock:
            self._closed = True
        self.refuse_turns()
        for session, _ in self._closing.values():
            session.draining = True  # a close under way starts no agent to tidy up after itself
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._starting):
            task.cancel()  # their callers get SHUTTING_DOWN
        if self._spares is not None:
            await self._spares.close(force=hurry)
        return [*self._sessions.values(), *(session for session, _ in self._closing.values())]

    async def _finish(self, patient: bool) -> None:
        """Let creates and closes under way end (each is bounded) unless in a hurry; close the store.

        Whatever is still running then is cancelled: agents being stopped still get SIGKILL.
        """
        limits = self.limits
        bound = WRITE_TIMEOUT + 4 * limits.kill_grace  # a close's delete; a cancelled create's stop
        work = [*self._starting, *(task for _, task in self._closing.values())]
        if work and patient:
            await asyncio.wait(work, timeout=bound)
        await self._supervisor.shutdown(timeout=2 * limits.kill_grace)
        if self._before_store_close is not None and patient:
            try:
                await self._before_store_close.run()
            except Exception:
                log.exception("the last step before closing the store failed")
        self._persist_now()
        await self._store.close()

    # ---- the sweeper -------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            try:
                self.sweep()
            except Exception:  # one bad pass must not end sweeping for good
                log.exception("sweep failed; trying again in %gs", self.limits.sweep_interval)

    def sweep(self) -> None:
        """Reap stuck turns; suspend sessions idle past the TTL; delete those past the retention."""
        now = time.time()
        self.transcripts.expire_now_and_then()
        for session in list(self._sessions.values()):
            idle_for = now - session.last_active_time
            if session.zombie():
                session.reap()
            elif session.evictable() and idle_for > self.limits.idle_ttl:
                log.info("idle TTL passed session=%s", session.session_id)
                self._spawn(session.suspend(), f"suspend-{session.session_id}")
            elif idle_for > self.limits.session_retention and _expirable(session):
                log.info("retention passed; deleting session=%s", session.session_id)
                self._unpublish(session)
                session.closed = True  # synchronously with the check: no prompt starts on it now
                self._spawn(self._close(session), f"expire-{session.session_id}")

    def _spawn(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self._supervisor.spawn(work, name)

    def _persist_later(self, session: Session) -> None:
        if session.session_id in self._sessions:
            # (A session being created is written by _start, durably, once it is ready.)
            self._unpersisted[session.session_id] = session
            if self._persist_timer is None:
                self._persist_timer = asyncio.get_running_loop().call_later(PERSIST_DELAY, self._persist_now)

    def _persist_now(self) -> None:
        """Queue the records of the sessions changed since the last time (still this pool's:
        a closed one's record is deleted, not written)."""
        if self._persist_timer is not None:
            self._persist_timer.cancel()
            self._persist_timer = None
        changed, self._unpersisted = self._unpersisted, {}
        for session_id, session in changed.items():
            if self._sessions.get(session_id) is session:
                self._store.put_later(_record(session))


def _visible(session: Session) -> bool:
    """Whether the caller may see `session` at all: its principal's, or an admin."""
    return principals.current().may_see(session.principal)


def _expirable(session: Session) -> bool:
    """Suspended, and nobody works on it or is stopping its agent."""
    return session.state is State.SUSPENDED and not session.lock.busy and not session.holder.stopping


def _request_key(session: Session) -> tuple[str, str]:
    return (session.principal, session.request_id)


def sort_key(session: SessionView) -> SortKey:
    return (session.create_time, session.session_id)


def _record(session: Session) -> SessionRecord:
    info: dict[str, object] = {}
    if session.handshake is not None:
        hs = session.handshake
        info = {
            "name": hs.name,
            "version": hs.version,
            "title": hs.title,
            "load_session": hs.load_session,
            "close_session": hs.close_session,
            "resume_session": hs.resume_session,
            "mcp_http": hs.mcp_http,
            "mcp_sse": hs.mcp_sse,
        }
    if session.requested_mcp_servers:  # names only: the config has the rest, secrets included
        info[MCP_SERVERS_KEY] = list(session.requested_mcp_servers)
    info.update(session.client_mcp.to_info())  # names, transports and one sealed token: no value in the clear
    if session.client_tools is not None:  # declarations only: nothing secret
        info[CLIENT_TOOLS_KEY] = [tool.to_info() for tool in session.client_tools.tools]
    return SessionRecord(
        session_id=session.session_id,
        agent=session.config.name,
        cwd=session.cwd,
        labels=session.labels,
        state=session.state.value,
        agent_session_id=session.agent_session_id,
        request_id=session.request_id,
        create_time=session.create_time,
        last_active_time=session.last_active_time,
        agent_info=info,
        principal=session.principal,
        agent_state=session.agent_state.to_json(),
    )


def _not_found(session_id: str) -> SessionNotFound:
    shown = clip(session_id, 64)  # a client's string: never echoed unbounded
    return SessionNotFound(f"session {shown!r} not found (unknown or closed)", metadata={"session_id": shown})


def _check_same_request(request_id: str, agent: str, cwd: str, new_agent: str, new_cwd: str) -> None:
    if (agent, cwd) != (new_agent, new_cwd):
        raise InvalidArgument.field(
            "request_id",
            f"request_id {request_id!r} was already used for agent {agent!r} in {clip(cwd)!r}",
        )


def encode_token(key: SortKey) -> str:
    return base64.urlsafe_b64encode(json.dumps(["after", key[0], key[1]]).encode()).decode()


def decode_token(token: str) -> SortKey | None:
    if not token:
        return None
    try:
        if len(token) <= MAX_TOKEN:
            tag, create_time, session_id = json.loads(base64.urlsafe_b64decode(token.encode()))
            if tag == "after" and isinstance(create_time, int | float) and isinstance(session_id, str):
                return (float(create_time), session_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError, RecursionError):
        pass
    raise InvalidArgument.field("page_token", "not a token returned by ListSessions")
