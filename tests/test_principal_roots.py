"""A directory belongs to its principal (issue 20 item 5): `roots` per principal in the tokens
file, `{principal}` made one safe path component, checked at create and at every agent start
against the session owner's roots (an admin resuming alice's session is held to alice's), and no
root that contains the state directory."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest
from sessiongate.server.sandbox.launcher import principal_dir
from sessiongate.server.security.principals import TokensFileError, TokenTable, token_hash
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, expect_error, reply_text
from tests.processes import run_server

TOKENS = {"alice": "alice-secret", "bob": "bob-secret", "root": "root-secret", "../alice": "dots-secret"}


def tokens_with_roots(path: Path, roots: dict[str, str]) -> Path:
    """Every principal of TOKENS (root an admin), each with `roots = [roots[name] or the default]`."""
    text = ""
    for name, token in TOKENS.items():
        admin = "admin = true\n" if name == "root" else ""
        text += f'[principals."{name}"]\ntoken_sha256 = "{token_hash(token)}"\n{admin}'
        text += f'roots = ["{roots.get(name, roots["*"])}"]\n\n'
    path.write_text(text)
    return path


def as_(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")]


@pytest.fixture
async def roots_gate(make_gate: GateFactory, tmp_path: Path) -> Gate:
    work = tmp_path / "work"  # make_gate's workdir: the server's one root
    tokens = tokens_with_roots(tmp_path / "tokens.toml", {"*": f"{work}/{{principal}}"})
    gate: Gate = await make_gate(auth_tokens_file=tokens)
    return gate


async def create(gate: Gate, who: str, cwd: str = "") -> pb.Session:
    request = pb.CreateSessionRequest(cwd=cwd)
    session: pb.Session = await gate.stub.CreateSession(request, metadata=as_(who), timeout=30)
    return session


async def refused_cwd(gate: Gate, who: str, cwd: str) -> str:
    error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(cwd=cwd), metadata=as_(who)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, (cwd, error.message)
    return error.violations["cwd"]


async def say(gate: Gate, who: str, session_id: str, text: str) -> str:
    request = pb.PromptRequest(session_id=session_id, text=text)
    return reply_text([e async for e in gate.stub.Prompt(request, metadata=as_(who), timeout=30)])


async def suspend(gate: Gate, session_id: str) -> None:
    assert await gate.running.pool.get(session_id).suspend(), "the session was not idle"


async def test_bob_cannot_use_alices_directory_and_works_in_his_own(roots_gate: Gate) -> None:
    work = roots_gate.workdir
    alice = await create(roots_gate, "alice")
    assert alice.cwd == str(work / "alice")  # her first root, made for her
    assert stat.S_IMODE((work / "alice").stat().st_mode) == 0o700
    (work / "alice" / "notes.txt").write_text("alice's")
    (work / "bob" / "proj").mkdir(parents=True)
    (work / "bob" / "into-alice").symlink_to(work / "alice")
    for cwd in (str(work / "alice"), "../alice", "into-alice", str(work), "/"):
        assert "outside the allowed roots" in await refused_cwd(roots_gate, "bob", cwd), cwd
    bob = await create(roots_gate, "bob")
    assert bob.cwd == str(work / "bob")
    proj = await create(roots_gate, "bob", "proj")  # relative to his first root
    assert proj.cwd == str(work / "bob" / "proj")
    assert (await say(roots_gate, "bob", proj.session_id, "/write mine.txt b")) == "wrote mine.txt"
    assert (work / "bob" / "proj" / "mine.txt").read_text() == "b"

    # His own directory swapped for a way into alice's: the next agent start refuses it.
    await suspend(roots_gate, proj.session_id)
    (work / "bob" / "proj").rename(work / "bob" / "old-proj")
    (work / "bob" / "proj").symlink_to(work / "alice")
    error = await expect_error(
        roots_gate.stub.Prompt(
            pb.PromptRequest(session_id=proj.session_id, text="/read notes.txt"), metadata=as_("bob")
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CWD_NOT_ALLOWED")
    assert "alice's" not in error.message


async def test_a_name_unsafe_as_a_path_gets_a_root_of_its_own_not_another_principals(
    roots_gate: Gate,
) -> None:
    work = roots_gate.workdir
    await create(roots_gate, "alice")
    dots = await create(roots_gate, "../alice")
    assert dots.cwd == str(work / principal_dir("../alice"))
    assert Path(dots.cwd).parent == work and Path(dots.cwd).name.startswith("~")
    assert "outside the allowed roots" in await refused_cwd(roots_gate, "../alice", str(work / "alice"))


async def test_an_admin_resuming_alices_session_is_held_to_alices_roots(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    tokens = tokens_with_roots(tmp_path / "tokens.toml", {"*": f"{work}/{{principal}}"})
    gate = await make_gate(auth_tokens_file=tokens)
    sid = (await create(gate, "alice")).session_id
    await suspend(gate, sid)
    # Outside the admin's own roots (work/root), inside alice's: the admin's prompt resumes it.
    assert (await say(gate, "root", sid, "/write by-admin.txt r")) == "wrote by-admin.txt"
    # Alice's roots narrowed (a reload): her session's directory is no longer hers to use, for
    # the admin too, though it is still inside the server's roots.
    tokens_with_roots(tokens, {"*": f"{work}/{{principal}}", "alice": f"{work}/elsewhere"})
    assert gate.running.tokens is not None
    gate.running.tokens.load()
    await suspend(gate, sid)
    for who in ("root", "alice"):
        error = await expect_error(
            gate.stub.Prompt(pb.PromptRequest(session_id=sid, text="hi"), metadata=as_(who), timeout=30)
        )
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CWD_NOT_ALLOWED"), who


def test_a_principals_root_must_lie_inside_the_servers_and_not_contain_the_state_dir(tmp_path: Path) -> None:
    work, state = tmp_path / "work", tmp_path / "state"
    tokens = tmp_path / "tokens.toml"
    for root, why in (
        (f"{tmp_path}/other/{{principal}}", "outside the server's roots"),
        (f"{work}/../{{principal}}", "outside the server's roots"),
        (str(tmp_path), "contains the state directory"),
        (str(state), "contains the state directory"),
    ):
        tokens_with_roots(tokens, {"*": root})
        with pytest.raises(TokensFileError, match=why):
            TokenTable(tokens, (work,), state).load()
    tokens_with_roots(tokens, {"*": f"{work}/{{principal}}"})
    table = TokenTable(tokens, (work,), state)
    table.load()
    assert table.roots_of("bob") == (work / "bob",)
    assert table.roots_of("../alice") == (work / principal_dir("../alice"),)
    assert table.roots_of("nobody") == ()


def test_a_tokens_file_with_a_root_outside_the_servers_refuses_the_start(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    tokens = tokens_with_roots(tmp_path / "tokens.toml", {"*": f"{tmp_path}/{{principal}}"})
    result = run_server(
        *("--listen", "127.0.0.1:0", "--workdir", str(work), "--auth-tokens-file", str(tokens)),
        *("--state-db", str(tmp_path / "state" / "s.db")),
    )
    assert result.returncode == 2, result.stderr
    assert "roots" in result.stderr and "outside the server's roots" in result.stderr
    assert "Traceback" not in result.stderr
