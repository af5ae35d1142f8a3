"""What a new user meets starting the server (issue 21 item 6): `--version`, the start log's
"try:" line, `--check-config`, and a client cut off by a shutdown told so (SHUTTING_DOWN, exit 6
from the CLI) rather than shown a cancel. Real server and CLI processes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from sessiongate.server.app import client_hint
from sessiongate.server.settings import Settings
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import eventually
from tests.processes import run_server, server_process

ROOT = Path(__file__).resolve().parent.parent


# ---- --version -----------------------------------------------------------------------------


def test_version_prints_the_installed_version_and_exits_0() -> None:
    expected = f"sessiongate-server {importlib.metadata.version('sessiongate')}\n"
    result = run_server("--version")
    assert (result.returncode, result.stdout) == (0, expected), result.stderr
    script = Path(sys.executable).parent / "sessiongate-server"
    if script.exists():  # the installed entry point, as a user types it
        result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout) == (0, expected), result.stderr


# ---- the "try:" line -----------------------------------------------------------------------


async def test_the_start_log_names_a_cli_command_that_works_against_this_server(tmp_path: Path) -> None:
    async with server_process(tmp_path) as server:
        hint = next((line for line in server.log if " try: " in line), None)
        assert hint is not None, "".join(server.log)
        assert f"grpcurl -plaintext 127.0.0.1:{server.port} list" in hint
        # The CLI line, pasted: `sessiongate ARGS` run as `python -m sessiongate.client ARGS`.
        command = shlex.split(hint.split(" try: ", 1)[1].split("  (or:", 1)[0])
        assert command[:3] == ["sessiongate", "--target", f"127.0.0.1:{server.port}"], hint
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sessiongate.client", *command[1:]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        assert "hello" in out.decode()


def test_the_try_line_with_tls_and_tokens_names_their_flags_and_no_plaintext(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    tls = Settings(listen="0.0.0.0:7000", tls_cert=pem, tls_key=pem, auth_tokens_file=pem)
    template, args = client_hint(tls, 7000)
    line = template % args
    assert line == "try: sessiongate --target localhost:7000 --tls-ca CA.pem --token TOKEN prompt hello"
    mtls = Settings(listen="127.0.0.1:7000", tls_cert=pem, tls_key=pem, tls_client_ca=pem)
    template, args = client_hint(mtls, 7000)
    assert "--tls-cert CLIENT.pem --tls-key CLIENT-KEY.pem" in template % args
    assert "plaintext" not in template and "--token" not in template
    unix = Settings(listen="unix:///run/sg.sock")
    template, args = client_hint(unix, 0)
    assert template % args == (
        "try: sessiongate --target unix:///run/sg.sock prompt hello"
        "  (or: grpcurl -plaintext -unix /run/sg.sock list)"
    )


# ---- --check-config ------------------------------------------------------------------------

GOOD = """
[server]
listen = "127.0.0.1:{port}"
state_db = "state/sessions.db"

[agents.missing]
command = "no-such-agent-command-xyz"
sandbox = "none"

[agents.notexec]
command = "./agent.sh"
sandbox = "none"

[agents.echo]
sandbox = "none"
"""


def test_check_config_validates_without_serving_binding_or_opening_the_state(tmp_path: Path) -> None:
    (tmp_path / "agent.sh").write_text("#!/bin/sh\n")  # not executable
    with socket.socket() as busy:  # a start would fail on it: the check never binds
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "sessiongate.toml"
        config.write_text(GOOD.format(port=port))
        result = run_server("--check-config", "--config", "sessiongate.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"config ok: {config}\n"), result.stdout
    assert f"listen 127.0.0.1:{port} (no authentication, no TLS)" in result.stdout
    assert "agents echo, missing, notexec (default echo)" in result.stdout
    assert "'no-such-agent-command-xyz' is not found on PATH" in result.stderr
    assert f"command {tmp_path / 'agent.sh'} is not executable" in result.stderr
    assert "serving on" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists(), "the check made the state dir"

    os.chmod(tmp_path / "agent.sh", 0o755)
    config.write_text(GOOD.format(port=port).replace("no-such-agent-command-xyz", "sh"))
    result = run_server("--check-config", "--config", str(config))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@pytest.mark.parametrize(
    ("files", "flags", "said"),
    [
        ({"tokens.toml": "not toml ["}, ("--auth-tokens-file", "tokens.toml"), "tokens.toml"),
        (
            {"cert.pem": "not a certificate", "key.pem": "not a key"},
            ("--tls-cert", "cert.pem", "--tls-key", "key.pem"),
            "not a PEM certificate and key",
        ),
        ({}, ("--stall-timeout", "abc"), "stall_timeout must be a number"),
        ({}, ("--default-agent", "nope"), "default_agent 'nope' is not configured"),
    ],
)
def test_check_config_refuses_what_the_start_refuses_with_exit_2(
    tmp_path: Path, files: dict[str, str], flags: tuple[str, ...], said: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "work").mkdir()
    common = ("--workdir", str(tmp_path / "work"), "--state-db", str(tmp_path / "state" / "s.db"))
    result = run_server("--check-config", *common, *flags, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "sessiongate-server: configuration error:" in result.stderr and said in result.stderr
    assert "config ok" not in result.stdout and "Traceback" not in result.stderr
    started = run_server(*common, *flags, "--listen", "127.0.0.1:0", cwd=tmp_path)  # the start agrees
    assert started.returncode == 2 and said in started.stderr, started.stderr


# ---- a client cut off by a shutdown --------------------------------------------------------


async def test_a_cli_prompt_cut_off_by_a_shutdown_exits_6_saying_shutting_down(tmp_path: Path) -> None:
    async with server_process(tmp_path, drain_grace=1.0) as server:
        cli = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sessiongate.client", "--target", f"127.0.0.1:{server.port}"),
            *("prompt", "/sleep 120"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        try:

            async def busy() -> str:
                listed = await server.stub.ListSessions(pb.ListSessionsRequest(), timeout=10)
                found = [s for s in listed.sessions if s.state == pb.SESSION_STATE_BUSY]
                return found[0].session_id if found else ""

            sid = ""
            deadline = asyncio.get_running_loop().time() + 30
            while not (sid := await busy()):
                assert asyncio.get_running_loop().time() < deadline, "the CLI's turn never ran"
                await asyncio.sleep(0.1)
            watch = server.stub.WatchTurn(pb.WatchTurnRequest(session_id=sid), timeout=60)
            await watch.initial_metadata()

            server.process.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(cli.communicate(), 60)
        finally:
            if cli.returncode is None:
                cli.kill()
                await cli.wait()
        text = err.decode()
        assert cli.returncode == 6, (out.decode(), text)
        assert "UNAVAILABLE SHUTTING_DOWN" in text and "the server is draining" in text, text
        assert "-- cancelled" not in out.decode() + text, out.decode()
        with pytest.raises(grpc.aio.AioRpcError) as watched:  # a watcher is told the same
            async for _ in watch:
                pass
        assert watched.value.code() == grpc.StatusCode.UNAVAILABLE
        assert re.search(r"turn was cancelled when the drain grace ran out", watched.value.details() or "")
        assert await asyncio.to_thread(server.process.wait, 30) == 0
        await eventually(lambda: server.log_has("stopped"), 10, "the server's last line")
