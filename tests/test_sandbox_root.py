"""What a sandboxed agent sees of the host, tried for real (issue 20 items 6 and 7).

The root is an allow-list (system paths, /etc without what only root may read, the agent's
own paths), and as root the server runs its agents as nobody inside their user namespace.
A secret file in a directory the agent sees is left out of that directory, which stays so
when the secret is replaced by rename (as editors and configuration tools do): a bind of
/dev/null over the file covered only its old inode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sessiongate.server.settings import AgentConfig
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import ECHO, GateFactory, expect_error
from tests.test_sandbox import needs_bwrap, say

MARK = "secret-marker-"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="what an agent of a root server can read")


def boxed(**overrides: object) -> AgentConfig:
    return AgentConfig(
        name="boxed",
        command=ECHO[0],
        args=ECHO[1:],
        sandbox="bwrap",
        client_terminal=True,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A directory outside /tmp (which the sandbox replaces anyway)."""
    path = Path(tempfile.mkdtemp(prefix="sessiongate-root-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root_marker() -> Iterator[Path]:
    """A file in root's home, as /root/.claude or /root/.codex hold logins."""
    directory = Path(tempfile.mkdtemp(prefix=".sessiongate-test-", dir="/root"))
    marker = directory / "login.json"
    marker.write_text(f"{MARK}root-login")
    yield marker
    shutil.rmtree(directory, ignore_errors=True)


def hidden(reply: str) -> bool:
    return MARK not in reply and "root:" not in reply


def replace_by_rename(path: Path, text: str) -> None:
    """`cp path t && edit t && mv t path`: a new inode under the old name."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.rename(new, path)


@needs_bwrap
@as_root
async def test_as_root_an_agent_is_not_root_inside_and_reads_no_root_only_file(
    make_gate: GateFactory, root_marker: Path
) -> None:
    gate = await make_gate(agents={"boxed": boxed()})
    (gate.workdir / "project").mkdir()
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed", cwd="project"), timeout=30)
    sid = session.session_id

    uid = await say(gate, sid, "/terminal id -u")
    assert uid.startswith("terminal exit 0 ") and uid.split(": ", 1)[1].strip() not in ("", "0"), uid
    for path in ("/etc/shadow", "/etc/gshadow", str(root_marker)):
        assert Path(path).exists(), path
        read = await say(gate, sid, f"/read {path}")
        assert read.startswith("cannot read") and hidden(read), (path, read)
        cat = await say(gate, sid, f"/terminal cat {path}")
        assert not cat.startswith("terminal exit 0 ") and hidden(cat), (path, cat)
    listed = await say(gate, sid, "/terminal ls -a /root")
    assert root_marker.parent.name not in listed, listed

    # Its cwd and home are still its own to write, and the system's programs still run.
    assert await say(gate, sid, "/write made.txt x") == "wrote made.txt"
    assert (gate.workdir / "project" / "made.txt").read_text() == "x"
    home = (await say(gate, sid, "/env HOME")).removeprefix("HOME=")
    assert await say(gate, sid, f"/write {home}/mine.txt y") == f"wrote {home}/mine.txt"
    assert (Path(home) / "mine.txt").read_text() == "y"
    made = await say(gate, sid, "/terminal sh -c 'echo z > by-terminal.txt && /usr/bin/env'")
    assert made.startswith("terminal exit 0 ") and f"HOME={home}" in made, made
    assert (gate.workdir / "project" / "by-terminal.txt").read_text() == "z\n"


@needs_bwrap
async def test_the_host_outside_the_allow_list_is_not_there(
    make_gate: GateFactory, outside_tmp: Path
) -> None:
    (outside_tmp / "private.txt").write_text(f"{MARK}private")
    gate = await make_gate(agents={"boxed": boxed()})
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30)
    read = await say(gate, session.session_id, f"/read {outside_tmp / 'private.txt'}")
    assert read == "cannot read: No such file or directory", read
    listed = await say(gate, session.session_id, "/terminal ls /")
    names = set(listed.split(": ", 1)[1].split())
    assert {"usr", "etc", "bin"} <= names and not names & {"var", "srv", "home"}, listed


@needs_bwrap
async def test_a_secret_replaced_by_rename_stays_hidden_from_a_running_agent_and_a_new_one(
    make_gate: GateFactory, outside_tmp: Path
) -> None:
    shared = outside_tmp / "shared"  # a ro_path the agent sees, holding the server's config
    shared.mkdir()
    config = shared / "sessiongate.toml"
    config.write_text(f"# {MARK}config-1\n")
    (shared / "public.txt").write_text("visible")
    gate = await make_gate(agents={"boxed": boxed(ro_paths=(str(shared),))}, settings={"config_file": config})
    first = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30)
    assert await say(gate, first.session_id, f"/read {shared / 'public.txt'}") == "visible"
    assert hidden(await say(gate, first.session_id, f"/read {config}"))

    replace_by_rename(config, f"# {MARK}config-2\n")
    for sid in (
        first.session_id,
        (await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"))).session_id,
    ):
        read = await say(gate, sid, f"/read {config}")
        assert hidden(read), read
        cat = await say(gate, sid, f"/terminal cat {config}")
        assert hidden(cat), cat


@needs_bwrap
async def test_a_secret_in_a_writable_path_masks_its_directory_even_after_a_rename(
    make_gate: GateFactory, outside_tmp: Path
) -> None:
    writable = outside_tmp / "rw"
    (writable / "conf").mkdir(parents=True)
    config = writable / "conf" / "sessiongate.toml"
    config.write_text(f"# {MARK}config-1\n")
    gate = await make_gate(
        agents={"boxed": boxed(rw_paths=(str(writable),))}, settings={"config_file": config}
    )
    session = await gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30)
    sid = session.session_id
    assert await say(gate, sid, f"/write {writable / 'note.txt'} n") == f"wrote {writable / 'note.txt'}"
    assert (writable / "note.txt").read_text() == "n"
    replace_by_rename(config, f"# {MARK}config-2\n")
    assert hidden(await say(gate, sid, f"/read {config}"))
    assert hidden(await say(gate, sid, f"/terminal cat {config}"))


@needs_bwrap
async def test_a_secret_right_in_a_writable_path_refuses_the_agent(
    make_gate: GateFactory, outside_tmp: Path
) -> None:
    config = outside_tmp / "sessiongate.toml"
    config.write_text(f"# {MARK}config\n")
    gate = await make_gate(
        agents={"boxed": boxed(rw_paths=(str(outside_tmp),))}, settings={"config_file": config}
    )
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(agent="boxed"), timeout=30))
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.reason == "AGENT_UNAVAILABLE"
    assert "keeps from agents" in error.message and str(config) not in error.message
