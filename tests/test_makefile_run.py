"""`make run` keeps its state in the checkout (`.state/`), never in the per-user default
($XDG_STATE_HOME or ~/.local/state) an installed server uses: a clone's first run must not
restore every other clone's sessions."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import grpc
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import reply_text
from tests.processes import running

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
# Marked old so make never reinstalls the virtualenv (pyproject.toml may be newer than the stamp).
NO_SETUP = ("-o", str(VENV / ".installed"))


def test_make_run_points_the_state_into_the_checkout_and_still_passes_args() -> None:
    dry = subprocess.run(
        ["make", "-n", *NO_SETUP, "run", "ARGS=--listen 127.0.0.1:6000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (command,) = [line for line in dry.stdout.splitlines() if "-m sessiongate.server" in line]
    assert f"XDG_STATE_HOME='{REPO}/.state'" in command
    assert command.endswith("-m sessiongate.server --listen 127.0.0.1:6000")


async def test_make_run_writes_its_state_under_the_checkout_and_nothing_per_user(tmp_path: Path) -> None:
    # A checkout of its own (the Makefile run there), so this never shares a developer's .state/.
    checkout, home, xdg = tmp_path / "checkout", tmp_path / "home", tmp_path / "xdg"
    for directory in (checkout, home, xdg):
        directory.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_STATE_HOME": str(xdg)}
    argv = [
        *("make", "-s", "-f", str(REPO / "Makefile"), "-C", str(checkout), f"VENV={VENV}", *NO_SETUP),
        *("run", "ARGS=--listen 127.0.0.1:0"),
    ]
    async with running(argv, env=env, start_bound=60, what="make run") as started:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{started.port}") as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            session = await stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
            events = [
                e async for e in stub.Prompt(pb.PromptRequest(session_id=session.session_id, text="hi"))
            ]
            assert reply_text(events) == "hi"
        os.killpg(started.process.pid, signal.SIGTERM)  # Ctrl-C's way: the group make and the server share
        await asyncio.to_thread(started.process.wait, 30)

    state = checkout / ".state" / "sessiongate"
    assert (state / "sessions.db").is_file(), "".join(started.log)
    if shutil.which("bwrap") is None:
        return  # unsandboxed, the built-in agent keeps its own records in the server user's HOME
    # The built-in agent's own record of the session (its home is under the state dir too).
    assert list(state.rglob("echo-agent/sessions/*.json")), sorted(map(str, state.rglob("*")))
    assert not list(xdg.rglob("*")) and not list(home.rglob("*")), "state written outside the checkout"
