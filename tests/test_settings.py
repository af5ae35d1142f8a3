"""Settings: defaults, TOML, env vars and flags, in that order of precedence."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from sessiongate.server.app import start_server
from sessiongate.server.sandbox import launcher as sandbox
from sessiongate.server.settings import (
    BUILTIN_AGENT,
    AgentConfig,
    ConfigError,
    Settings,
    builtin_agent,
    load_settings,
    validate,
)
from sessiongate.v1 import session_service_pb2 as pb
from sessiongate.v1 import session_service_pb2_grpc as pb_grpc

from tests.pki import Pki
from tests.processes import run_server, running


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_need_no_config_and_use_the_builtin_agent(tmp_path: Path) -> None:
    settings = load_settings(["--workdir", str(tmp_path)], environ={})
    assert settings.listen == "127.0.0.1:50051"
    assert settings.default_agent == BUILTIN_AGENT
    assert settings.agents[BUILTIN_AGENT].args == ("-m", "sessiongate.echo")
    assert settings.roots == (tmp_path.resolve(),)


def test_toml_then_env_then_flags(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        f"""
[server]
stall_timeout = 30
max_sessions = 8
allowed_roots = ["{tmp_path}"]
default_agent = "claude"

[agents.claude]
command = "npx"
args = ["@zed-industries/claude-code-acp"]
env = {{ ANTHROPIC_API_KEY = "k" }}
permission_policy = "approve-all"
""",
    )
    env = {"SESSIONGATE_STALL_TIMEOUT": "20", "SESSIONGATE_MAX_SESSIONS": "4"}
    settings = load_settings(
        ["--config", config, "--max-sessions", "2", "--workdir", str(tmp_path)], environ=env
    )
    assert settings.limits.stall_timeout == 20.0  # env beats TOML
    assert settings.limits.max_sessions == 2  # flag beats env
    assert settings.default_agent == "claude"
    claude = settings.agents["claude"]
    assert (claude.command, claude.args, dict(claude.env)) == (
        "npx",
        ("@zed-industries/claude-code-acp",),
        {"ANTHROPIC_API_KEY": "k"},
    )
    assert BUILTIN_AGENT in settings.agents


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nstall_timeout = -1\n", "stall_timeout must be positive"),
        ("[server]\nmax_sessions = 'many'\n", "max_sessions must be an integer"),
        ("[server]\nnonsense = 1\n", "unknown server keys"),
        ("[server]\ndefault_agent = 'ghost'\n", "default_agent 'ghost' is not configured"),
        ("[agents.x]\nargs = []\n", "`command` must be a non-empty string"),
        ("[agents.x]\ncommand = 'x'\nextra = 1\n", "unknown keys"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_config_raises_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError, match=message):
        load_settings(["--config", config, "--workdir", str(tmp_path)], environ={})


def test_workdir_outside_allowed_roots_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="outside the allowed roots"):
        load_settings(["--workdir", str(tmp_path / "a"), "--allowed-root", str(tmp_path / "b")], environ={})


def test_the_example_config_loads_with_every_preset(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "sessiongate.example.toml"
    settings = load_settings(["--config", str(example), "--workdir", str(tmp_path)], environ={})
    assert {"echo", "claude", "codex", "gemini", "opencode"} <= set(settings.agents)
    assert settings.agents["codex"].pass_env == ("OPENAI_API_KEY", "CODEX_API_KEY")
    assert settings.agents["gemini"].args == ("--experimental-acp",)
    assert settings.agents["opencode"].args == ("acp",)
    assert settings.limits.max_sessions == 16


def test_pass_env_must_name_variables(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "[agents.x]\ncommand = 'x'\npass_env = 'KEY'\n")
    with pytest.raises(ConfigError, match="pass_env"):
        load_settings(["--config", config, "--workdir", str(tmp_path)], environ={})


def test_spares_are_a_whole_number_per_agent(tmp_path: Path) -> None:
    good = write(tmp_path / "good.toml", "[agents.x]\ncommand = 'x'\nspares = 3\n")
    assert load_settings(["--config", good, "--workdir", str(tmp_path)], environ={}).agents["x"].spares == 3
    for bad in ("-1", "1.5", "true"):
        config = write(tmp_path / "bad.toml", f"[agents.x]\ncommand = 'x'\nspares = {bad}\n")
        with pytest.raises(ConfigError, match="spares"):
            load_settings(["--config", config, "--workdir", str(tmp_path)], environ={})


def test_an_agents_nice_is_0_to_19_and_0_by_default(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.toml", "[agents.x]\ncommand = 'x'\n")
    assert load_settings(["--config", plain, "--workdir", str(tmp_path)], environ={}).agents["x"].nice == 0
    for value in (0, 19):
        good = write(tmp_path / "good.toml", f"[agents.x]\ncommand = 'x'\nnice = {value}\n")
        settings = load_settings(["--config", good, "--workdir", str(tmp_path)], environ={})
        assert settings.agents["x"].nice == value
    for bad in ("-1", "20", "1.5", "true", "'5'"):
        config = write(tmp_path / "bad.toml", f"[agents.x]\ncommand = 'x'\nnice = {bad}\n")
        with pytest.raises(ConfigError, match="nice"):
            load_settings(["--config", config, "--workdir", str(tmp_path)], environ={})


def test_sandbox_keys_per_agent_are_read_and_checked(tmp_path: Path) -> None:
    good = write(
        tmp_path / "good.toml",
        "[agents.x]\ncommand = 'x'\nsandbox = 'bwrap'\nnetwork = false\n"
        "ro_paths = ['/opt/tools']\nrw_paths = ['/var/cache/x']\nhome = '/var/lib/x'\n",
    )
    x = load_settings(["--config", good, "--workdir", str(tmp_path)], environ={}).agents["x"]
    assert (x.sandbox, x.network, x.ro_paths, x.rw_paths, x.home) == (
        "bwrap",
        False,
        ("/opt/tools",),
        ("/var/cache/x",),
        "/var/lib/x",
    )
    for text, message in [
        ("sandbox = 'docker'", "`sandbox` must be"),
        ("network = 'yes'", "`network` must be true or false"),
        ("ro_paths = ['']", "`ro_paths` must be a list of paths"),
        ("user = 'no-such-user-here'", "user 'no-such-user-here' does not exist"),
    ]:
        config = write(tmp_path / "bad.toml", f"[agents.x]\ncommand = 'x'\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load_settings(["--config", config, "--workdir", str(tmp_path)], environ={})


def test_a_bare_metrics_port_is_accepted(tmp_path: Path) -> None:
    for value in ("9464", ":9464", "127.0.0.1:9464"):
        settings = load_settings(["--metrics-listen", value, "--workdir", str(tmp_path)], environ={})
        assert settings.metrics_listen == value
    with pytest.raises(ConfigError, match="metrics_listen must be HOST:PORT"):
        load_settings(["--metrics-listen", "host:", "--workdir", str(tmp_path)], environ={})


def test_file_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "tokens.toml", "")
    (tmp_path / "work").mkdir()  # beside the state, not containing it (authenticated)
    flags = ["--workdir", "work", "--state-db", "s.db", "--auth-tokens-file", "tokens.toml"]
    settings = load_settings(flags, environ={})
    assert settings.state_db == tmp_path / "s.db" and settings.auth_tokens_file == tmp_path / "tokens.toml"


def test_relative_paths_in_a_config_file_are_taken_from_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--config conf/x.toml` run from elsewhere: every path in the file is the file's
    directory's (absolute ones and `~` as they are), a bare command name is left to PATH, and
    flags and env vars still start from the current directory."""
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    for directory in (conf / "work", conf / "work" / "w", elsewhere):
        directory.mkdir(parents=True)
    for name in ("tokens.toml", "cert.pem", "key.pem", "ca.pem"):  # only their being files is checked
        write(conf / name, "")
    write(conf / "replica.token", "r" * 32)
    config = conf / "x.toml"
    write(
        config,
        '[server]\nworkdir = "work/w"\nallowed_roots = ["work"]\nstate_db = "state/s.db"\n'
        'replica_token_file = "replica.token"\n'
        '[tls]\ncert = "cert.pem"\nkey = "key.pem"\nclient_ca = "ca.pem"\n'
        '[auth]\ntokens_file = "tokens.toml"\n'
        '[agents.x]\ncommand = "bin/agent"\nro_paths = ["ro", "/opt/tools"]\nrw_paths = ["../rw"]\n'
        'home = "homes/x"\n'
        '[agents.y]\ncommand = "agent-on-path"\nhome = "~/y"\n',
    )
    monkeypatch.chdir(elsewhere)
    settings = load_settings(["--config", os.path.join("..", "conf", "x.toml")], environ={})
    conf = conf.resolve()
    assert (settings.workdir, settings.allowed_roots) == (conf / "work" / "w", (conf / "work",))
    assert settings.state_db == conf / "state" / "s.db"
    assert settings.replica_token_file == conf / "replica.token"
    assert settings.auth_tokens_file == conf / "tokens.toml"
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (
        conf / "cert.pem",
        conf / "key.pem",
        conf / "ca.pem",
    )
    assert settings.config_file is not None and settings.config_file.is_absolute()
    assert settings.config_file.resolve() == conf / "x.toml"
    x, y = settings.agents["x"], settings.agents["y"]
    assert x.command == str(conf / "bin" / "agent")
    assert (x.ro_paths, x.rw_paths) == ((str(conf / "ro"), "/opt/tools"), (str(tmp_path.resolve() / "rw"),))
    assert x.home == str(conf / "homes" / "x")
    assert (y.command, y.home) == ("agent-on-path", os.path.expanduser("~/y"))
    # Flags and env vars are the shell's: from the current directory.
    (elsewhere / "mine").mkdir()
    environ = {"SESSIONGATE_STATE_DB": "st/s.db"}
    flags = ["--config", str(config), "--workdir", "mine", "--allowed-root", "mine"]
    settings = load_settings(flags, environ=environ)
    assert (settings.workdir, settings.state_db) == (
        elsewhere.resolve() / "mine",
        elsewhere.resolve() / "st" / "s.db",
    )


def test_a_root_that_contains_the_state_dir_is_refused(tmp_path: Path) -> None:
    """A session made in the state dir (its cwd bound over the sandbox's mask) would show its agent
    every session's data: explicit roots never contain it; the workdir standing in for them only
    with authentication (unauthenticated, a server in $HOME with its state below stays the norm)."""
    work, state_db = tmp_path / "work", tmp_path / "state" / "sessions.db"
    work.mkdir()
    with pytest.raises(ConfigError, match=r"allowed_roots: .* contains the state directory"):
        load_settings(
            ["--workdir", str(work), "--allowed-root", str(tmp_path), "--state-db", str(state_db)], environ={}
        )
    tokens = write(tmp_path / "tokens.toml", "")
    with pytest.raises(ConfigError, match=r"workdir .* contains the state directory"):
        load_settings(
            ["--workdir", str(tmp_path), "--state-db", str(state_db), "--auth-tokens-file", tokens],
            environ={},
        )
    assert load_settings(["--workdir", str(tmp_path), "--state-db", str(state_db)], environ={})
    beside = ["--allowed-root", str(work), "--state-db", str(state_db), "--auth-tokens-file", tokens]
    assert load_settings(["--workdir", str(work), *beside], environ={}).roots == (work.resolve(),)


def test_a_root_that_contains_the_state_dir_stops_the_server_with_exit_2(tmp_path: Path) -> None:
    result = run_server(
        *("--listen", "127.0.0.1:0", "--workdir", str(tmp_path), "--allowed-root", str(tmp_path)),
        *("--state-db", str(tmp_path / "state" / "s.db")),
    )
    assert result.returncode == 2, result.stderr
    assert "allowed_roots" in result.stderr and "state directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_builtin_agent_takes_its_keys_without_a_command(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", '[agents.echo]\nsandbox = "none"\n')
    echo = load_settings(["--config", config, "--workdir", str(tmp_path)], environ={}).agents[BUILTIN_AGENT]
    assert (echo.command, echo.args, echo.sandbox) == (builtin_agent().command, builtin_agent().args, "none")
    with pytest.raises(ConfigError, match="`command` must be a non-empty string"):
        load_settings(["--config", write(tmp_path / "d.toml", "[agents.x]\nsandbox = 'none'\n")], environ={})


def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir(exist_ok=True)
    return tmp_path / "work"


def authenticated(tmp_path: Path, how: str, agents: dict[str, AgentConfig]) -> Settings:
    """Settings with a tokens file or TLS (no tokens), and these agents."""
    if how == "tokens":
        extra: dict[str, Any] = {"auth_tokens_file": Path(write(tmp_path / "tokens.toml", ""))}
    else:
        cert, key = Pki.make(tmp_path, "gate").issue("server", ip="127.0.0.1")
        extra = {"tls_cert": cert, "tls_key": key}
    return validate(
        Settings(
            listen="127.0.0.1:0",
            workdir=work(tmp_path),
            state_db=tmp_path / "state" / "sessions.db",
            agents=agents,
            **extra,
        )
    )


@pytest.mark.parametrize("how", ["tokens", "tls"])
async def test_with_authentication_an_agent_never_runs_unconfined_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Where bwrap is missing, an agent left at the default sandbox stops the start (naming the
    package to install); the same agent saying sandbox = "none" itself starts."""
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    boxed = AgentConfig(name="boxed", command=sys.executable, sandbox="bwrap")  # fails its sessions only
    default = {
        BUILTIN_AGENT: builtin_agent(),
        "boxed": boxed,
        "later": replace(builtin_agent(), name="later"),
    }
    with pytest.raises(ConfigError, match=r"agents echo, later would run unconfined.*bubblewrap package"):
        await start_server(authenticated(tmp_path, how, default))
    said = {name: replace(config, sandbox="none") for name, config in default.items() if name != "boxed"}
    running = await start_server(authenticated(tmp_path, how, {**said, "boxed": boxed}))
    await running.drain(0)


def test_with_tokens_and_no_bwrap_on_path_the_server_exits_2_naming_bubblewrap(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", "")
    result = run_server(
        *("--listen", "127.0.0.1:0", "--workdir", str(work(tmp_path)), "--auth-tokens-file", tokens),
        *("--state-db", str(tmp_path / "state" / "s.db")),
        env={**os.environ, "PATH": str(tmp_path / "empty")},  # no bwrap to find
    )
    assert result.returncode == 2, result.stderr
    assert "bubblewrap" in result.stderr and "echo" in result.stderr and "Traceback" not in result.stderr


async def test_without_authentication_the_default_still_runs_unconfined_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    settings = validate(
        Settings(
            listen="127.0.0.1:0",
            workdir=tmp_path,
            state_db=tmp_path / "state" / "sessions.db",
            agents={BUILTIN_AGENT: builtin_agent()},
        )
    )
    running = await start_server(settings)
    await running.drain(0)


def test_a_bad_env_value_names_its_variable(tmp_path: Path) -> None:
    environ = {"SESSIONGATE_STALL_TIMEOUT": "abc"}
    with pytest.raises(ConfigError, match=r"^SESSIONGATE_STALL_TIMEOUT: stall_timeout must be a number"):
        load_settings(["--workdir", str(tmp_path)], environ=environ)
    with pytest.raises(ConfigError, match=r"^stall_timeout must be a number"):  # a flag's value: no env var
        load_settings(["--workdir", str(tmp_path), "--stall-timeout", "abc"], environ=environ)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_the_event_loop_is_a_setting_and_both_loops_serve_a_turn(tmp_path: Path, loop: str) -> None:
    argv = [sys.executable, "-m", "sessiongate.server", "--listen", "127.0.0.1:0", "--event-loop", loop]
    argv += ["--workdir", str(work(tmp_path)), "--state-db", str(tmp_path / "state" / "s.db")]
    async with running(argv) as started, grpc.aio.insecure_channel(f"127.0.0.1:{started.port}") as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        session = await stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
        request = pb.PromptRequest(session_id=session.session_id, text="hi")
        events = [event async for event in stub.Prompt(request, timeout=30)]
        assert events[-1].result.stop_reason == pb.STOP_REASON_END_TURN
        assert "".join(e.message_chunk.content.text.text for e in events) == "hi"
        serving = next(line for line in started.log if "serving on" in line)
        assert f"event loop {loop}" in serving, serving  # uvloop's loop class lives in module "uvloop"
        # Agent starts in a row: under uvloop, grpc's fork handlers once killed about 1 in 13
        # children with SIGSEGV before their exec (a start here fails AGENT_UNAVAILABLE then).
        for _ in range(24):
            started_agent = await stub.CreateSession(pb.CreateSessionRequest(), timeout=30)
            await stub.CloseSession(pb.CloseSessionRequest(session_id=started_agent.session_id), timeout=30)


def test_an_unknown_event_loop_is_refused(tmp_path: Path) -> None:
    result = run_server("--listen", "127.0.0.1:0", "--workdir", str(work(tmp_path)), "--event-loop", "trio")
    assert result.returncode == 2 and "event_loop must be uvloop or asyncio, got 'trio'" in result.stderr
    assert "Traceback" not in result.stderr
