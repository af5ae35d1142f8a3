"""A config file's relative paths are taken from the file's directory (issue 21 item 1): the
`sessiongate-server --config sessiongate.toml` of docs/operations/running-for-others.md, run as
a real server from elsewhere."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
import pytest
from sessiongate.server.sandbox.launcher import _visible, find_bwrap
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.conftest import reply_text
from tests.processes import running

CONFIG = """
[server]
listen = "127.0.0.1:0"
workdir = "work"
allowed_roots = ["work"]
state_db = "state/sessions.db"
default_agent = "boxed"

[agents.boxed]
command = "{python}"
args = ["-m", "sessiongate.echo"]
sandbox = "bwrap"
network = "none"
rw_paths = ["scratch"]
"""


@pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
async def test_a_server_started_with_a_relative_config_runs_sandboxed_agents(tmp_path: Path) -> None:
    """Started from another directory with `--config conf/sessiongate.toml`, the server keeps
    its state and sessions where the config says, relative to the config, and its sandboxed
    agent starts and answers (it failed INTERNAL: the sandbox met relative paths)."""
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    for directory in (conf / "work", conf / "scratch", elsewhere):
        directory.mkdir(parents=True)
    (conf / "sessiongate.toml").write_text(CONFIG.format(python=sys.executable))
    source_root = Path(__file__).resolve().parent.parent
    argv = [
        sys.executable,
        "-m",
        "sessiongate.server",
        "--config",
        os.path.join("..", "conf", "sessiongate.toml"),
    ]
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    async with running(argv, cwd=elsewhere, env=env) as started:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{started.port}") as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            session = await stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
            assert session.cwd == str((conf / "work").resolve())
            prompt = pb.PromptRequest(session_id=session.session_id, text="hello")
            assert reply_text([e async for e in stub.Prompt(prompt, timeout=30)]) == "hello"
        assert (conf / "state" / "sessions.db").is_file()
        assert not (elsewhere / "state").exists() and not (elsewhere / "work").exists()


def test_the_sandbox_visibility_check_is_total() -> None:
    """`_visible` answers for any path: one under no mount (outside every root, or relative, as
    a relative config once gave it) is not shown; it raised `max() arg is an empty sequence`."""
    shown, empty = [Path("/srv/work")], [Path("/srv/work/tmp")]
    assert not _visible(Path("/elsewhere/state"), shown, empty)
    assert not _visible(Path("state"), shown, empty)
    assert not _visible(Path("/srv/work"), shown, empty)  # a mount is not above itself
    assert not _visible(Path("/x"), [], [])
    assert _visible(Path("/srv/work/a"), shown, empty)
    assert not _visible(Path("/srv/work/tmp/a"), shown, empty)
