"""Settings: defaults, TOML, env vars and flags, in that order of precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import BUILTIN_AGENT, ConfigError, load_settings


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_need_no_config_and_use_the_builtin_agent(tmp_path: Path) -> None:
    settings = load_settings(["--workdir", str(tmp_path)], environ={})
    assert settings.listen == "127.0.0.1:50051"
    assert settings.default_agent == BUILTIN_AGENT
    assert settings.agents[BUILTIN_AGENT].args == ("-m", "server.echo_agent")
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
        ("ro_paths = ['relative']", "`ro_paths` must be a list of absolute paths"),
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
    settings = load_settings(["--state-db", "s.db", "--auth-tokens-file", "tokens.toml"], environ={})
    assert settings.state_db == tmp_path / "s.db" and settings.auth_tokens_file == tmp_path / "tokens.toml"
