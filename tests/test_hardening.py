"""What a caller learns, and what the server leaves open (issue 20 item 11): a cwd refused by
the path the caller gave, agents listed to each principal as far as it may use them, and a state
directory tightened to the server alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest
from sessiongate.server.errors import CwdNotAllowed
from sessiongate.server.sandbox.workdir import open_checked
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, expect_error
from tests.test_auth import as_, tokens_file


async def test_a_refused_cwd_is_named_as_given_never_as_the_server_resolves_it(
    gate: Gate, tmp_path: Path
) -> None:
    hidden = tmp_path / "where-the-server-keeps-things"
    hidden.mkdir()
    (gate.workdir / "link").symlink_to(hidden)
    (gate.workdir / "loop").symlink_to(gate.workdir / "loop")
    server_cwd = os.getcwd()
    for cwd, why in (
        ("/proc/self/cwd", "outside the allowed roots"),
        ("link", "outside the allowed roots"),
        ("link/../../..", "outside the allowed roots"),
        ("loop/x", "cannot be resolved"),
    ):
        error = await expect_error(gate.stub.CreateSession(pb.CreateSessionRequest(cwd=cwd), timeout=30))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, cwd
        message = error.violations["cwd"]
        assert message.startswith(repr(cwd)) and why in message, message
        for resolved in (server_cwd, hidden.name, str(tmp_path)):
            assert resolved not in message.replace(str(gate.workdir), ""), (cwd, message)


async def test_agents_are_listed_to_each_principal_as_far_as_it_may_use_them(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    gate: Gate = await make_gate(agents={"second": ()}, auth_tokens_file=tokens_file(tmp_path / "t.toml"))

    async def listed(who: str) -> pb.ListAgentsResponse:
        answer: pb.ListAgentsResponse = await gate.stub.ListAgents(
            pb.ListAgentsRequest(), metadata=as_(who), timeout=10
        )
        return answer

    admin = await listed("root")
    assert [a.name for a in admin.agents] == ["echo", "second"] and admin.default_agent == "echo"
    assert all(a.command and a.args for a in admin.agents)
    bob = await listed("bob")  # every agent, but not how each is run
    assert [a.name for a in bob.agents] == ["echo", "second"] and bob.default_agent == "echo"
    assert not any(a.command or a.args for a in bob.agents)
    assert [a.is_default for a in bob.agents] == [True, False]
    carol = await listed("carol")  # agents = ["second"]: echo, the default, is not hers
    assert [a.name for a in carol.agents] == ["second"] and carol.default_agent == ""
    assert not carol.agents[0].command and not carol.agents[0].args


async def test_without_authentication_every_agent_is_listed_with_its_command(gate: Gate) -> None:
    answer = await gate.stub.ListAgents(pb.ListAgentsRequest(), timeout=10)
    assert [a.name for a in answer.agents] == ["echo"] and answer.default_agent == "echo"
    assert answer.agents[0].command and answer.agents[0].args


async def test_an_existing_state_dir_is_tightened_to_the_server_alone(
    make_gate: GateFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    shared = tmp_path / "shared"  # sticky and open to all, like /tmp: not ours to change
    shared.mkdir()
    os.chmod(shared, 0o1777)
    gate = await make_gate(state_db=state / "sessions.db")
    await gate.create()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    await make_gate(state_db=shared / "sessions.db")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_a_session_directory_that_now_leads_outside_is_refused_without_saying_where(
    tmp_path: Path,
) -> None:
    """Checked at every agent start: the session's cwd, swapped for a symlink, is refused by the
    name the caller knows; where it leads as the server resolves it goes only to the log."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "project").symlink_to("/proc/self/cwd")
    with pytest.raises(CwdNotAllowed) as refused:
        open_checked(str(root / "project"), (root,))
    status = refused.value.to_status()
    assert str(root / "project") in status.details and "outside the allowed roots" in status.details
    assert os.getcwd() not in status.details.replace(str(root), "")
    assert refused.value.metadata == {"cwd": str(root / "project")}
