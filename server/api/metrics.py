"""Prometheus metrics, served on their own port (off unless `metrics_listen` is set).

Each server has its own registry, so tests can run several servers in one process.
Sessions by state are counted at scrape time from the pool, on the exporter's thread;
everything else is counted where it happens.

The exporter is plain HTTP with no authentication: a bare port binds loopback only, and every
connection is bounded in time, so a client that connects and sends nothing (or trickles bytes)
cannot hold a thread and a socket forever.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from sessiongate.server.settings import is_loopback

if TYPE_CHECKING:
    from sessiongate.server.sessions.session import Session

log = logging.getLogger("sessiongate.metrics")

LOOPBACK = "127.0.0.1"  # the host of a metrics_listen given as a bare port
# Each exporter connection: at most IDLE_TIMEOUT seconds waiting on one read or write, and
# REQUEST_DEADLINE seconds in all; then it is closed. Read per connection (tests lower them).
IDLE_TIMEOUT = 10.0
REQUEST_DEADLINE = 30.0

# Turn outcomes, by ErrorInfo reason; a turn that ends OK is "ok" or "cancelled".
OUTCOMES = {
    "STREAM_STALLED": "stalled",
    "TURN_TIMEOUT": "turn_timeout",
    "AGENT_EXITED": "agent_exited",
    "AGENT_ERROR": "agent_error",
    "AGENT_AUTH_REQUIRED": "agent_auth_required",
    "AGENT_UNAVAILABLE": "agent_unavailable",
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _SessionsByState(Collector):
    def __init__(self, sessions: Callable[[], Iterable[Session]]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts: dict[str, int] = {s: 0 for s in ("idle", "busy", "recovering", "suspended")}
        for session in list(self._sessions()):  # a snapshot: the loop may change the map meanwhile
            counts[session.state.value] = counts.get(session.state.value, 0) + 1
        family = GaugeMetricFamily("sessiongate_sessions", "Sessions by state.", labels=["state"])
        for state, count in sorted(counts.items()):
            family.add_metric([state], count)
        yield family


def metrics_address(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) → (host, port). A bare port, `9464` or `:9464`, binds
    loopback: serving every interface takes an explicit host such as `0.0.0.0`."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"metrics_listen must be HOST:PORT or a port, got {listen!r}")
    return host.strip("[]") or LOOPBACK, int(port)


class _Handler(WSGIRequestHandler):
    """One scrape, bounded: IDLE_TIMEOUT on each socket read or write, REQUEST_DEADLINE in all."""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(IDLE_TIMEOUT)

    def handle(self) -> None:
        deadline = threading.Timer(REQUEST_DEADLINE, self._cut)
        deadline.daemon = True
        deadline.start()
        try:
            super().handle()
        except OSError as error:  # timed out, cut at the deadline, or the client went away
            log.debug("metrics client %s dropped: %r", self.client_address[0], error)
        finally:
            deadline.cancel()

    def _cut(self) -> None:
        """Past the deadline: wake the handler's blocked read or write, which then fails."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: scrapes every few seconds are noise."""


class _Server(ThreadingWSGIServer):
    """A thread per connection (daemon threads), errors to our log rather than stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("metrics request from %s failed", client_address[0], exc_info=True)


def _http_server(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_Server):
        address_family = family

    return make_server(str(address[0]), port, make_wsgi_app(registry), Server, handler_class=_Handler)


class Metrics:
    """The server's counters and histograms, and the exporter that serves them with the sessions
    gauge.

    Made before the pool (its agents' starts and the network proxy's decisions count here), so
    the pool's sessions are given to `serve`, when scrapes begin; `sessions` here is for an
    exporter whose sessions are known up front."""

    def __init__(self, sessions: Callable[[], Iterable[Session]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._counting_sessions = False
        if sessions is not None:
            self._count_sessions(sessions)
        self.turns = Counter(
            "sessiongate_turns", "Turns by agent and outcome.", ["agent", "outcome"], registry=self.registry
        )
        self.busy_rejections = Counter(
            "sessiongate_busy_rejections", "Prompts refused SESSION_BUSY.", ["agent"], registry=self.registry
        )
        self.agent_starts = Counter(
            "sessiongate_agent_starts",
            "Agent processes started, by result (ok, failed).",
            ["agent", "result"],
            registry=self.registry,
        )
        self.events = Counter(
            "sessiongate_events_streamed", "PromptEvents sent to clients.", ["agent"], registry=self.registry
        )
        self.turn_duration = Histogram(
            "sessiongate_turn_duration_seconds",
            "Turn duration, request to last event.",
            ["agent"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.first_event = Histogram(
            "sessiongate_time_to_first_event_seconds",
            "Time from a Prompt request to its first event.",
            ["agent"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.proxy_connections = Counter(
            "sessiongate_proxy_connections",
            "Connections sandboxed agents made through the network proxy, by decision (allowed, "
            "refused_domain, refused_address, refused_limit, bad_request, unreachable).",
            ["agent", "decision"],
            registry=self.registry,
        )
        self._httpd: WSGIServer | None = None

    def agent_started(self, agent: str, ok: bool) -> None:
        self.agent_starts.labels(agent, "ok" if ok else "failed").inc()

    def proxy_decision(self, agent: str, decision: str) -> None:
        self.proxy_connections.labels(agent, decision).inc()

    def _count_sessions(self, sessions: Callable[[], Iterable[Session]]) -> None:
        if not self._counting_sessions:
            self.registry.register(_SessionsByState(sessions))
            self._counting_sessions = True

    def serve(self, listen: str, sessions: Callable[[], Iterable[Session]] | None = None) -> int:
        """Serve /metrics on `listen` (see metrics_address; port 0 picks one), with `sessions`
        counted by state at each scrape; returns the port."""
        if sessions is not None:
            self._count_sessions(sessions)
        host, port = metrics_address(listen)
        httpd = _http_server(host, port, self.registry)
        threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
        self._httpd = httpd
        bound: int = httpd.server_port
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics", shown, bound)
        if not is_loopback(f"{shown}:{bound}"):
            log.warning("metrics are served on %s, beyond this machine, without authentication", shown)
        return bound

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is not None:
            self._httpd = None

            def close() -> None:
                httpd.shutdown()  # waits for serve_forever to return: not on the event loop
                httpd.server_close()

            threading.Thread(target=close, daemon=True).start()
