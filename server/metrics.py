"""Prometheus metrics, served on their own port (off unless `metrics_listen` is set).

Each server has its own registry, so tests can run several servers in one process.
Sessions by state are counted at scrape time from the pool, on the exporter's thread;
everything else is counted where it happens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.session import Session

log = logging.getLogger("sessiongate.metrics")

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


class Metrics:
    def __init__(self, sessions: Callable[[], Iterable[Session]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SessionsByState(sessions))
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
        self._httpd: object | None = None

    def agent_started(self, agent: str, ok: bool) -> None:
        self.agent_starts.labels(agent, "ok" if ok else "failed").inc()

    def serve(self, listen: str) -> int:
        """Serve /metrics on HOST:PORT (port 0 picks one); returns the port."""
        host, _, port = listen.rpartition(":")
        httpd, _thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)
        self._httpd = httpd
        bound: int = httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is not None:
            threading.Thread(target=httpd.shutdown, daemon=True).start()  # type: ignore[attr-defined]
            self._httpd = None
