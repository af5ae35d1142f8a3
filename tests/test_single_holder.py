"""One server per port and per SQLite state database (issue 21 item 2): a second server on a busy
port, or on a database another server holds, exits 1 with a clear message and the first keeps
serving. Real server processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

from grpc_health.v1 import health_pb2
from sessiongate.v1 import session_service_pb2 as pb

from tests.processes import ServerProcess, server_process

START_BOUND = 60.0  # seconds a second server may take to fail (or, on the old code, to serve)


def second_server(tmp_path: Path, listen: str, state_db: Path) -> tuple[int | None, str]:
    """Start `python -m sessiongate.server` as a user would; its exit code and stderr once it exits, or None
    and its stderr so far once it says it is serving (killed then) or after START_BOUND."""
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "sessiongate.server", "--config", str(tmp_path / "sessiongate.toml")),
            *("--listen", listen, "--workdir", str(tmp_path), "--state-db", str(state_db)),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert process.stderr is not None
    try:
        killer = threading.Timer(START_BOUND, process.kill)  # bounds the blocking reads below
        killer.start()
        try:
            for line in process.stderr:
                lines.append(line)
                if "serving on" in line:  # the old code: it shares the port or the database
                    process.kill()
                    process.wait(10)
                    return None, "".join(lines)
        finally:
            killer.cancel()
        code = process.wait(10)
        return (code if code >= 0 else None), "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def still_serving(server: ServerProcess) -> None:
    assert await server.health_status() == health_pb2.HealthCheckResponse.SERVING
    created = await server.stub.CreateSession(pb.CreateSessionRequest(agent="echo"), timeout=30)
    got = await server.stub.GetSession(pb.GetSessionRequest(session_id=created.session_id), timeout=10)
    assert got.session_id == created.session_id


async def test_a_second_server_on_a_busy_port_exits_1_and_the_first_keeps_serving(tmp_path: Path) -> None:
    async with server_process(tmp_path) as first:
        other = tmp_path / "other"
        other.mkdir()
        code, err = await asyncio.to_thread(
            second_server, tmp_path, f"127.0.0.1:{first.port}", other / "sessions.db"
        )
        assert code == 1, err
        assert "address already in use" in err and f"127.0.0.1:{first.port}" in err, err
        assert "Traceback" not in err, err
        await still_serving(first)


async def test_a_second_server_on_a_held_state_database_exits_1_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    database = tmp_path / "sessions.db"
    async with server_process(tmp_path) as first:
        code, err = await asyncio.to_thread(second_server, tmp_path, "127.0.0.1:0", database)
        assert code == 1, err
        assert f"state database {database} is in use by another server" in err, err
        assert f"pid {first.process.pid}" in err, err
        assert "Traceback" not in err, err
        await still_serving(first)
        assert await first.stop() == 0
    # The lock went with the first server: a new one starts on the same database.
    async with server_process(tmp_path) as again:
        assert again.log_has("1 sessions restored")
        await still_serving(again)
