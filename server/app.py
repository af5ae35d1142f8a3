"""Build and run the grpc.aio server: SessionService, health, reflection, signals, drain."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from sessiongate.server.agents.holder import real_agents
from sessiongate.server.agents.logins import AgentLogins
from sessiongate.server.agents.spares import SparePool
from sessiongate.server.api.metrics import Metrics
from sessiongate.server.api.service import SessionService
from sessiongate.server.cluster.leases import Leases
from sessiongate.server.cluster.router import Router
from sessiongate.server.sandbox.idle_cgroup import IdleCgroup, open_idle_cgroup
from sessiongate.server.sandbox.launcher import BWRAP_PACKAGE, Launcher
from sessiongate.server.sandbox.network_proxy import NetworkProxy
from sessiongate.server.sandbox.workdir import Roots
from sessiongate.server.security.auth import UNAUTHENTICATED_TOTAL, AuthInterceptor
from sessiongate.server.security.principals import TokenTable, live_limits
from sessiongate.server.security.secrets import SecretBox
from sessiongate.server.security.tls import CertificateFiles
from sessiongate.server.sessions.pool import ClosingSteps, SessionPool
from sessiongate.server.settings import (
    BUILTIN_AGENT,
    AgentConfig,
    ConfigError,
    ServerLimits,
    Settings,
    replica_token,
)
from sessiongate.server.state.base import Fences, Store
from sessiongate.server.state.postgres import PostgresStore
from sessiongate.server.state.sqlite import SessionStore
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

log = logging.getLogger("sessiongate")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionService"].full_name
SERVER_STOP_GRACE = 2.0  # after sessions are closed, time for final messages to reach clients


@dataclass
class RunningServer:
    """A started server and the parts tests and the drain logic need."""

    server: grpc.aio.Server
    port: int
    pool: SessionPool
    service: SessionService
    health: HealthServicer
    metrics: Metrics
    metrics_port: int | None
    tokens: TokenTable | None = None
    network: NetworkProxy | None = None  # sandboxed agents' way out (network = "proxy")
    idle: IdleCgroup | None = None  # where flooding agents run (idle_cgroup)
    _draining: asyncio.Future[None] | None = None

    async def drain(self, grace: float) -> None:
        """Stop taking work, let running turns finish within `grace`, then end them (CANCELLED).

        Every agent process group is ended and every session stays stored, SUSPENDED.
        Idempotent: a second call waits for the first.
        """
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain(grace))
        await asyncio.shield(self._draining)

    async def stop_now(self) -> None:
        """Second signal: abandon the drain's graces; agents are killed at once, sessions kept."""
        if self._draining is not None:
            self._draining.cancel()
        self.service.draining = True
        await self.pool.terminate()
        self._remove_idle_cgroup()
        await self._close_network()
        await self.server.stop(0)
        await self._stop_watching_tokens()
        self.metrics.stop()

    def _remove_idle_cgroup(self) -> None:
        """Once our agents are ended: the idle cgroup goes (if we made it and it is empty)."""
        if self.idle is not None:
            self.idle.remove()

    async def _close_network(self) -> None:
        if self.network is not None:
            await self.network.close()

    async def _stop_watching_tokens(self) -> None:
        if self.tokens is not None:
            await self.tokens.stop_watching()

    async def _drain(self, grace: float) -> None:
        self.service.draining = True
        self.pool.refuse_turns()
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(*(s.wait_turn_over(grace) for s in self.pool.sessions()))
        await self.pool.shutdown()
        self._remove_idle_cgroup()
        await self._close_network()
        await self.server.stop(SERVER_STOP_GRACE)
        await self._stop_watching_tokens()
        self.metrics.stop()


def make_store(state_url: str, state_db: Path, replica_id: str = "", fences: Fences | None = None) -> Store:
    """PostgreSQL (shared by replicas) when a state URL is set, else the SQLite file. `fences`
    hears of the sessions a PostgreSQL write found moved to another replica."""
    if state_url:
        return PostgresStore(state_url, replica_id, on_fenced=fences.report if fences is not None else None)
    return SessionStore(state_db)


def server_options(limits: ServerLimits) -> list[tuple[str, int]]:
    """Explicit transport limits: message size, streams, keepalive enforcement, idle connections."""
    return [
        # A request is at most a prompt and its framing: anything larger is refused by grpc.
        ("grpc.max_receive_message_length", limits.max_prompt_bytes + 64 * 1024),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        ("grpc.keepalive_time_ms", int(limits.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(limits.keepalive_timeout * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(limits.min_client_ping_interval * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", int(limits.max_connection_idle * 1000)),
        # grpc's default on Linux lets a second server bind a busy port and take half its calls.
        ("grpc.so_reuseport", 0),
    ]


def use_pidfd_child_watcher() -> None:
    """Python 3.11 waits for each child process on a thread of its own; a pidfd watcher needs
    none (Python 3.12 and later do this by themselves)."""
    if sys.version_info < (3, 12) and hasattr(asyncio, "PidfdChildWatcher"):
        try:
            os.close(os.pidfd_open(os.getpid()))  # the kernel must support pidfds (Linux 5.3+)
        except OSError:
            return
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)


def say_sandboxes(launcher: Launcher, agents: Iterable[AgentConfig]) -> None:
    """One line per agent at start: how it runs, and what is wrong if it cannot."""
    for config in agents:
        problem = launcher.problem(config)
        if problem is None and (missing := command_problem(config)) is not None:
            log.warning("%s; its sessions fail AGENT_UNAVAILABLE until that is fixed", missing)
        if problem is not None:
            log.error("%s; its sessions fail AGENT_UNAVAILABLE", problem)
        elif launcher.sandboxed(config) and config.network_mode == "host":
            log.warning(
                "agent=%s runs in a bubblewrap sandbox on the host's network (network = host): "
                "it reaches all the server reaches",
                config.name,
            )
        elif launcher.sandboxed(config):
            log.info("agent=%s runs in a bubblewrap sandbox (network=%s)", config.name, config.network_mode)
        elif config.sandbox == "none":
            log.info("agent=%s runs unconfined (sandbox = none)", config.name)
        else:
            log.warning(
                "agent=%s runs unconfined: bwrap is not installed (install the %s package to sandbox it)",
                config.name,
                BWRAP_PACKAGE,
            )


def refuse_unconfined(launcher: Launcher, settings: Settings) -> None:
    """With authentication or TLS, no agent runs unconfined by accident: an agent left at the
    default sandbox where bwrap is missing stops the start; `sandbox = "none"` is the way to say
    it on purpose."""
    if not (settings.authenticated or settings.tls_cert is not None):
        return
    unconfined = sorted(
        c.name for c in settings.agents.values() if not c.sandbox and not launcher.sandboxed(c)
    )
    if unconfined:
        raise ConfigError(
            f"bwrap is not installed, so agents {', '.join(unconfined)} would run unconfined for "
            f"authenticated principals: install the {BWRAP_PACKAGE} package (apt-get install "
            f'{BWRAP_PACKAGE}), or set sandbox = "none" in [agents.NAME] for each to run it so '
            f"([agents.{BUILTIN_AGENT}] needs only that line)"
        )


def tighten_state_dir(path: Path) -> None:
    """The state dir (database, agents' homes) is the server's alone: made 0700, and an existing
    one of ours tightened to 0700. A shared sticky directory (/tmp) is left as it is; a directory
    that cannot be made is reported by the store."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_uid == os.geteuid() and not info.st_mode & stat.S_ISVTX and info.st_mode & 0o077:
            os.chmod(path, 0o700)
            log.warning("state dir %s was mode %o; tightened to 0700", path, stat.S_IMODE(info.st_mode))
    except OSError:
        return


@dataclass
class Preflight:
    """What a start checks and reads before it opens the state or the network."""

    tokens: TokenTable | None
    launcher: Launcher
    certificates: CertificateFiles | None


def preflight(settings: Settings) -> Preflight:
    """Every check a start makes before it opens the state database or binds (`--check-config`
    makes these and no more): ConfigError (exit 2) saying what is wrong."""
    if settings.state_url and settings.authenticated and settings.replica_token_file is None:
        # Else a forwarded call could only pass on the caller's own token, to an address read
        # from the database: a reusable secret to wherever a row points.
        raise ConfigError(
            "replicas (state_url) with authentication need replica_token_file (--replica-token-file):"
            " a secret of 16+ characters the replicas share, to sign the calls they forward"
        )
    # Principals' roots lie inside the server's, never containing the state dir (security/principals.py).
    tokens = (
        TokenTable(settings.auth_tokens_file, settings.roots, settings.state_db.parent)
        if settings.auth_tokens_file
        else None
    )
    if tokens is not None:
        tokens.load()  # an unusable tokens file stops the start (configuration error, exit 2)
    if settings.mcp_key_path.exists():  # (made by the first start, not by --check-config)
        SecretBox.from_key_file(settings.mcp_key_path)  # not a Fernet key: exit 2
    # What agents must not see: the tokens, the TLS key, the config (other agents' env), and
    # our own Unix socket (an agent could use the API over it as the server's user).
    listening = settings.listen.startswith("unix://")
    unix_socket = Path(settings.listen.removeprefix("unix://")) if listening else None
    secrets = (
        settings.auth_tokens_file,
        settings.tls_key,
        settings.config_file,
        settings.replica_token_file,
        settings.mcp_key_path,  # the key of client-supplied MCP servers' secrets
    )
    launcher = Launcher.for_server(settings.state_db, (*secrets, unix_socket))
    refuse_unconfined(launcher, settings)
    return Preflight(tokens, launcher, certificate_files(settings))


def certificate_files(settings: Settings) -> CertificateFiles | None:
    """The TLS certificate, key and client CA, read now: unreadable or not PEM is a ConfigError."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        return CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except OSError as exc:
        raise ConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"TLS: {exc}") from None


def agent_problems(launcher: Launcher, agents: Iterable[AgentConfig]) -> dict[str, str]:
    """Why each agent that cannot start here cannot (by agent name)."""
    found = {}
    for config in agents:
        problem = launcher.problem(config) or command_problem(config)
        if problem is not None:
            found[config.name] = problem
    return found


def command_problem(config: AgentConfig) -> str | None:
    """Whether the agent's command is there to run: a path must be an executable file, a name
    must be found on PATH (the agent's own PATH when its env sets one)."""
    command = config.command
    if "/" in command:
        if not os.path.isfile(command):
            return f"agent {config.name!r}: command {command} does not exist"
        if not os.access(command, os.X_OK):
            return f"agent {config.name!r}: command {command} is not executable"
        return None
    if shutil.which(command, path=config.env.get("PATH")) is None:
        return f"agent {config.name!r}: command {command!r} is not found on PATH"
    return None


def check_config(settings: Settings) -> dict[str, str]:
    """`--check-config`: the start's checks (ConfigError when one fails), nothing started, bound
    or opened; returns the agents that could not start here, and why."""
    return agent_problems(preflight(settings).launcher, settings.agents.values())


def client_hint(settings: Settings, port: int) -> tuple[str, tuple[str, ...]]:
    """A first command to try against this server, as the log's last start line: a message
    template and its arguments (the addresses, quoted by the log if they need it)."""
    unix = settings.listen.startswith("unix://")
    host = settings.listen.rpartition(":")[0]
    target = settings.listen if unix else f"{'localhost' if _wildcard_host(host) else host}:{port}"
    flags = ""
    if settings.tls_cert is not None:
        flags += " --tls-ca CA.pem"  # the CA that signed the server's certificate
    if settings.tls_client_ca is not None:
        flags += " --tls-cert CLIENT.pem --tls-key CLIENT-KEY.pem"
    elif settings.auth_tokens_file is not None:
        flags += " --token TOKEN"
    template = f"try: sessiongate --target %s{flags} prompt hello"
    if settings.authenticated or settings.tls_cert is not None:
        return template, (target,)
    if unix:
        return template + "  (or: grpcurl -plaintext -unix %s list)", (target, target.removeprefix("unix://"))
    return template + "  (or: grpcurl -plaintext %s list)", (target, target)


def _wildcard_host(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")


async def start_server(settings: Settings) -> RunningServer:
    """Load stored sessions and start serving on `settings.listen` (port 0 picks a free port)."""
    idle = open_idle(settings.idle_cgroup)
    try:
        return await _start_server(settings, idle)
    except BaseException:  # a start that failed leaves no cgroup behind
        if idle is not None:
            idle.remove()
        raise


async def _start_server(settings: Settings, idle: IdleCgroup | None) -> RunningServer:
    use_pidfd_child_watcher()
    checked = preflight(settings)
    metrics = Metrics()  # agent starts and proxy decisions count here; sessions at serve, below
    launcher = checked.launcher.with_network(NetworkProxy(metrics.proxy_decision)).with_idle(idle)
    tokens = checked.tokens
    tighten_state_dir(settings.state_db.parent)
    secret_box = SecretBox.at(settings.mcp_key_path)  # read, or made, once the store has its directory
    say_sandboxes(launcher, settings.agents.values())
    logins = AgentLogins(settings.agents)
    spares = SparePool(settings.agents, settings.limits, metrics.agent_started, launcher, logins)
    agent_factory = real_agents(launcher, logins)
    replica_id = settings.replica_id or default_replica_id(settings.listen)
    # Two true cycles, broken by go-betweens made first: the store reports fenced sessions to the
    # pool made with it (`fences`), and the replica's release, which needs the leases and
    # router made with the pool, runs before the pool closes the store (`closing`).
    fences = Fences()
    closing = ClosingSteps()
    store = make_store(settings.state_url, settings.state_db, replica_id, fences)
    pool = SessionPool(
        settings.limits,
        store,
        spares,
        agent_factory=agent_factory,
        roots=Roots(settings.roots, tokens.roots_of) if tokens is not None else settings.roots,
        live_limit=live_limits(tokens, settings.authenticated),
        on_agent_start=metrics.agent_started,
        fences=fences,
        before_store_close=closing,
        secret_box=secret_box,
    )
    restored = await pool.load(settings.agents)
    secret_box.ready()  # the first start makes the key (a corrupt one was refused by preflight)
    spares.start()
    log.info("session store %s: %d sessions restored (SUSPENDED)", store.where, restored)
    router = await join_replicas(settings, replica_id, store, pool, closing) if settings.state_url else None
    interceptors = (
        [
            AuthInterceptor(
                tokens,
                settings.tls_client_ca is not None,
                settings.reflection == "public",
                replica_token(settings),
                settings.advertise or settings.listen,  # as the others read it (join_replicas)
            )
        ]
        if settings.authenticated
        else []
    )
    # Public calls (health, open reflection) have a budget of their own in the interceptor, on
    # top of the authenticated calls' max_concurrent_rpcs.
    extra = UNAUTHENTICATED_TOTAL if settings.authenticated else 0
    server = grpc.aio.server(
        interceptors=interceptors,
        options=server_options(settings.limits),
        maximum_concurrent_rpcs=settings.limits.max_concurrent_rpcs + extra,
    )
    service = SessionService(
        replace(settings, replica_id=replica_id),
        pool,
        metrics,
        logins=logins,
        agent_factory=agent_factory,
        spares=spares,
        router=router,
    )
    health = HealthServicer()
    pb_grpc.add_SessionServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = bind(server, settings, checked.certificates)
    await server.start()
    if settings.listen.startswith("unix://"):  # local clients, authenticated by the file mode
        os.chmod(settings.listen.removeprefix("unix://"), 0o600)
    if tokens is not None:
        tokens.start_watching()
    if not settings.authenticated:
        log.warning(
            "serving without authentication: whoever reaches %s can use every session", settings.listen
        )
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = metrics.serve(settings.metrics_listen, pool.sessions) if settings.metrics_listen else None
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "asyncio" or "uvloop"
    log.info(
        "serving on %s (port %d), default agent %s, event loop %s",
        settings.listen,
        port,
        settings.default_agent,
        loop,
    )
    template, addresses = client_hint(settings, port)
    log.info(template, *addresses)
    return RunningServer(
        server, port, pool, service, health, metrics, metrics_port, tokens, launcher.network, idle
    )


def open_idle(setting: str) -> IdleCgroup | None:
    """The server's idle cgroup for flooding agents (idle_cgroup.py); a named one that cannot
    be made idle is a configuration error."""
    try:
        idle = open_idle_cgroup(setting)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"idle_cgroup {setting[:200]!r} cannot be made idle: {why}") from None
    if idle is not None:
        log.info("flooding agents run in the idle cgroup %s", idle.path)
    return idle


def bind(server: grpc.aio.Server, settings: Settings, certificates: CertificateFiles | None) -> int:
    """Add the listening port; OSError (exit 1) saying why it cannot, "address already in use"
    for a port or a Unix socket another server holds."""
    if settings.listen.startswith("unix://"):
        refuse_live_unix_socket(settings.listen)  # grpc would unlink it and take it over
    try:
        if certificates is not None:
            port = server.add_secure_port(settings.listen, certificates.credentials())
        else:
            port = server.add_insecure_port(settings.listen)
    except RuntimeError:  # grpc says only "failed to bind": ask the kernel why
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}: {bind_failure(settings.listen)}")
    return port


def refuse_live_unix_socket(listen: str) -> None:
    path = listen.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            return  # none there, or a stale file grpc replaces
    raise OSError(f"cannot listen on {listen}: address already in use (another server answers there)")


def bind_failure(listen: str) -> str:
    """Why a TCP `HOST:PORT` cannot be bound, from a probe bind ("address already in use")."""
    host, _, port = listen.rpartition(":")
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
        family, kind, _, _, address = addresses[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    except ValueError:
        pass
    return "the address cannot be bound"


def default_replica_id(listen: str) -> str:
    """HOST:PORT of this machine; with an ephemeral port, HOST:pidPID."""
    port = listen.rpartition(":")[2]
    return f"{socket.gethostname()}:{port if port.isdigit() and port != '0' else f'pid{os.getpid()}'}"


async def join_replicas(
    settings: Settings, replica_id: str, store: Store, pool: SessionPool, closing: ClosingSteps
) -> Router:
    """Register this replica's lease (sessions found moved are fenced off through the store's
    `fences`); the pool's `closing` steps release ours on drain."""
    assert isinstance(store, PostgresStore)
    limit = settings.limits.max_sessions

    async def lease_lost() -> None:
        for session_id in list(store.epochs):
            store.disown(session_id)
        await pool.fence_all()

    leases = Leases(
        store.url,
        store.pool,
        replica_id,
        settings.advertise or settings.listen,
        settings.limits.lease_ttl,
        # A draining replica takes no forwarded creates.
        free_slots=lambda: 0 if pool.draining else limit - sum(1 for s in pool.sessions() if s.holds_slot),
        on_lost=lease_lost,
        retention=settings.limits.session_retention,
    )
    await leases.start()
    router = Router(pool, store, leases, replica_token(settings))

    async def release() -> None:
        # Alone, it keeps its sessions: restarted under the same replica id it serves them again.
        # A fence under way ends its agents first: released rows must not have agents running.
        await leases.fenced()
        try:
            if await leases.peers():
                released = await store.release()
                log.info("released %d sessions to the other replicas replica=%s", released, replica_id)
        finally:
            try:
                await leases.leave()
            finally:
                await router.close()

    closing.add(release)
    log.info("replica=%s advertised at %s, lease %gs", replica_id, leases.advertise, leases.lease_ttl)
    return router


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; drain on the first signal, stop at once on the second."""
    running = await start_server(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0
    drain_task: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("received %s (%d)", signal.Signals(signum).name, signals_seen)
        stop.set()
        if signals_seen > 1 and drain_task is not None:
            drain_task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    drain_task = asyncio.create_task(running.drain(settings.limits.drain_grace))
    try:
        await drain_task
    except asyncio.CancelledError:
        log.warning("second signal: stopping now")
        await running.stop_now()
    log.info("stopped")
    return 0


__all__ = ["RunningServer", "serve", "start_server"]
