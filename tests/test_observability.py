"""Metrics (Prometheus) and structured logs."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families
from sessiongate.server.api import metrics
from sessiongate.server.api.metrics import Metrics, metrics_address
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, expect_error
from tests.processes import server_process


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_sessions_turns_outcomes_rejections_starts_and_events(
    make_gate: GateFactory,
) -> None:
    gate: Gate = await make_gate(metrics=True, agents={"refuses": ("--fail-init",)})
    assert gate.running.metrics_port
    ok = await gate.create()
    events = await gate.prompt(ok.session_id, "one two")
    busy_turn = asyncio.create_task(gate.prompt(ok.session_id, "/sleep 1 x"))
    await gate.wait_state(ok.session_id, pb.SESSION_STATE_BUSY)
    await expect_error(gate.stub.Prompt(pb.PromptRequest(session_id=ok.session_id, text="busy")))
    events += await busy_turn
    stalled = await gate.create()
    await expect_error(
        gate.stub.Prompt(
            pb.PromptRequest(
                session_id=stalled.session_id, text="/stall", stall_timeout=duration_pb2.Duration(seconds=1)
            )
        )
    )
    crashed = await gate.create()
    await expect_error(gate.stub.Prompt(pb.PromptRequest(session_id=crashed.session_id, text="/crash")))
    await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="refuses")))
    await gate.wait_state(stalled.session_id, pb.SESSION_STATE_IDLE)

    m = await scrape(gate.running.metrics_port)
    echo = (("agent", "echo"),)

    def turns(outcome: str) -> float:
        return m.get(("sessiongate_turns_total", (("agent", "echo"), ("outcome", outcome))), 0)

    assert (turns("ok"), turns("stalled"), turns("agent_exited")) == (2, 1, 1)
    assert m[("sessiongate_busy_rejections_total", echo)] == 1
    assert m[("sessiongate_agent_starts_total", (("agent", "echo"), ("result", "ok")))] == 3
    assert m[("sessiongate_agent_starts_total", (("agent", "refuses"), ("result", "failed")))] == 1
    assert m[("sessiongate_events_streamed_total", echo)] == len(events) + 1 + 1  # + stall and crash chunks
    assert m[("sessiongate_turn_duration_seconds_count", echo)] == 4
    assert m[("sessiongate_time_to_first_event_seconds_count", echo)] == 4
    assert m[("sessiongate_sessions", (("state", "idle"),))] == 2
    assert m[("sessiongate_sessions", (("state", "suspended"),))] == 1  # the crashed one


async def test_metrics_are_off_unless_asked_for(gate: Gate) -> None:
    assert gate.running.metrics_port is None


def test_a_bare_metrics_port_binds_loopback_not_every_interface() -> None:
    assert metrics_address("9464") == metrics_address(":9464") == ("127.0.0.1", 9464)
    assert metrics_address("0.0.0.0:9464") == ("0.0.0.0", 9464)  # every interface: only when named
    assert metrics_address("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError):
        metrics_address("localhost")
    exporter = Metrics(lambda: [])
    port = exporter.serve(":0")
    try:
        assert exporter._httpd is not None
        assert exporter._httpd.server_address[:2] == ("127.0.0.1", port)
    finally:
        exporter.stop()


async def test_the_metrics_endpoint_drops_silent_and_trickling_clients_and_serves_others_meanwhile(
    make_gate: GateFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(metrics, "REQUEST_DEADLINE", 1.5)
    gate: Gate = await make_gate(metrics=True)
    port = gate.running.metrics_port
    assert port

    def silent() -> float:
        """Connect and send nothing: seconds until the server hangs up."""
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert sock.recv(1024) == b""
        return time.monotonic() - start

    def trickle() -> float:
        """Send a request a byte every 0.2s (well within the idle timeout): seconds until cut off."""
        start = time.monotonic()
        request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"." * 100
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for byte in request:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break  # reset: the server has closed it
                if select.select([sock], [], [], 0.2)[0]:
                    break  # an answer or end-of-file: the server is done with it
            else:
                raise AssertionError("the server held a trickling client past its request deadline")
        return time.monotonic() - start

    idle = asyncio.create_task(asyncio.to_thread(silent))
    slow = asyncio.create_task(asyncio.to_thread(trickle))
    await asyncio.sleep(0.1)
    assert ("sessiongate_sessions", (("state", "idle"),)) in await scrape(port)  # others are served
    assert 0.4 < await idle < 3
    assert 1.4 < await slow < 5


async def test_json_logs_carry_session_agent_and_turn_and_never_the_prompt(tmp_path: Path) -> None:
    secret = "do-not-log-this-prompt-text"
    async with server_process(tmp_path, extra_args=("--log-format", "json")) as server:
        session = await server.stub.CreateSession(pb.CreateSessionRequest())
        request = pb.PromptRequest(session_id=session.session_id, text=f"/crash {secret}")
        await expect_error(server.stub.Prompt(request))
        assert await server.stop() == 0
        log = list(server.log)
    entries = [json.loads(line) for line in log]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    about_session = [e for e in entries if e.get("session") == session.session_id]
    assert any(
        e["logger"] == "sessiongate.agent.stderr" and "crashing" in e["message"] for e in about_session
    )
    assert any(e.get("turn") == "1" and e.get("agent") == "echo" for e in about_session)
    assert not any(secret in line for line in log)
