"""One Settings object: built-in defaults, then a TOML file, then env vars, then flags.

The TOML file has a `[server]` table with the keys of `ServerLimits` plus `listen`,
`default_agent`, `workdir` and `allowed_roots`, one `[agents.NAME]` table per agent
(`command`, `args`, `env`, `permission_policy`, `mcp_servers`, ...) and one `[mcp_servers.NAME]`
table per operator-named MCP server (stdio: `command`, `args`, `env`, `env_from`; remote:
`type`, `url`, `headers`, `headers_from`). Env vars are `SESSIONGATE_<KEY>` in upper
case (e.g. `SESSIONGATE_STALL_TIMEOUT=30`); flags are `--<key-with-dashes>`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import ipaddress
import os
import pwd
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PERMISSION_POLICIES = ("approve-all", "approve-reads", "deny-all", "ask")
BUILTIN_AGENT = "echo"
ENV_PREFIX = "SESSIONGATE_"
MIN_TURN_LOG_BYTES = 1024 * 1024  # several written batches of a turn's events must fit


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


MCP_TRANSPORTS = ("stdio", "http", "sse")
MCP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # a bounded identifier: shown, logged, stored
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class McpServerConfig:
    """One operator-named MCP server (`[mcp_servers.NAME]`), given to the sessions that use it.

    Values that may be secret (`env`, `headers`) and the names of the server's env vars to read
    them from at each session start (`env_from`, `headers_from`) never show in its repr: a
    Settings printed or logged shows the names and transports only.
    """

    name: str
    transport: str  # "stdio", "http" or "sse"
    command: str = ""  # stdio: the program the agent starts
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    env_from: tuple[str, ...] = field(default=(), repr=False)  # server env vars passed by name
    url: str = ""  # http, sse
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    headers_from: Mapping[str, str] = field(default_factory=dict, repr=False)  # header -> env var

    def resolved_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """`env`, plus each `env_from` variable `environ` has (read now, at a session's start)."""
        return {**self.env, **{k: environ[k] for k in self.env_from if k in environ}}

    def resolved_headers(self, environ: Mapping[str, str]) -> dict[str, str]:
        """`headers`, plus each `headers_from` header whose env var `environ` has."""
        found = {h: environ[v] for h, v in self.headers_from.items() if v in environ}
        return {**self.headers, **found}


DEFAULT_NICE = 0  # see AgentConfig.nice
MAX_NICE = 19  # the lowest CPU priority there is


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """How to start one kind of agent."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    permission_policy: str = "approve-reads"
    pass_env: tuple[str, ...] = ()  # server env vars this agent may see (e.g. its API key)
    spares: int = 0  # started, initialized processes kept ready so CreateSession is fast
    # The agent's CPU priority below the gateway's (`nice` 0-19, inherited by all it starts, its
    # terminals' commands too): the gateway's own work, which every session waits on, runs first
    # when agents take every core. 0 (the default): the gateway's own priority, until it floods
    # (agents/connection.py: then 19).
    nice: int = DEFAULT_NICE
    # "bwrap": in a bubblewrap sandbox; "none": as the server's user, unconfined; "": bwrap
    # where it is installed, else none (said at start). See server/sandbox/launcher.py.
    sandbox: str = ""
    # Sandboxed, the agent's network: "proxy" (only `allowed_domains`, through our filtering
    # proxy: server/sandbox/network_proxy.py), "none", or "host" (the host's own: everything the server
    # reaches). The older booleans still read: false is "none", true "proxy". See network_mode.
    network: str | bool = "proxy"
    allowed_domains: tuple[str, ...] = ()  # "proxy": hosts it may reach, exact or "*.suffix"
    allow_private_destinations: bool = False  # "proxy": may an allowed host be a private address
    ro_paths: tuple[str, ...] = ()  # sandboxed: extra paths the agent may read
    rw_paths: tuple[str, ...] = ()  # sandboxed: extra paths the agent may write
    home: str = ""  # the agent's HOME, read-write (sandboxed default: <state dir>/homes/NAME)
    user: str = ""  # run the agent as this user (and its group); needs the server to run as root
    auth_method: str = ""  # ACP auth method every process of this agent authenticates with first
    # Client capabilities offered to the agent; off, they are not advertised and their methods
    # answer "method not found". See server/sandbox/files.py and server/sandbox/terminals.py.
    client_fs: bool = False  # fs/read_text_file, fs/write_text_file inside the session's cwd
    client_terminal: bool = False  # terminal/* : commands run in the session's cwd, sandboxed like the agent
    mcp_servers: tuple[str, ...] = ()  # operator-named MCP servers given to every session of it
    # Every [mcp_servers.*] table, so the names a session asked for resolve at each of its starts
    # (load_settings fills it; the same mapping as Settings.mcp_servers).
    mcp_catalog: Mapping[str, McpServerConfig] = field(default_factory=dict, repr=False, compare=False)

    @property
    def network_mode(self) -> str:
        """The network: "none", "proxy" or "host" (the older false/true read as "none"/"proxy")."""
        if isinstance(self.network, bool):
            return "proxy" if self.network else "none"
        return self.network


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every bound the server enforces. Durations are seconds."""

    stall_timeout: float = 120.0  # no agent event for this long ends the turn: STREAM_STALLED
    # Per-request stall_timeout is clamped to this: ten minutes of silence is plenty for an agent
    # at work, and one client cannot hold slots with silent turns for an hour.
    max_stall_timeout: float = 600.0
    max_turn_duration: float = 3600.0  # a turn running longer ends: TURN_TIMEOUT
    max_wait_timeout: float = 60.0  # per-request wait_timeout is clamped to this
    # Under the `ask` policy: how long a permission request or elicitation waits on the client
    # before it is rejected (declined); a turn's own permission_timeout is clamped to the maximum.
    permission_timeout: float = 300.0
    max_permission_timeout: float = 3600.0
    cancel_grace: float = 5.0  # after session/cancel, how long the agent has to end the turn
    kill_grace: float = 3.0  # after SIGTERM to the agent's group, how long before SIGKILL
    agent_start_timeout: float = 30.0  # spawn + initialize + session/new (or session/load)
    agent_request_timeout: float = 30.0  # any other request to the agent except the turn itself
    max_prompt_bytes: int = 1_048_576  # total size of a prompt's content
    # Largest event sent to a client (stock gRPC clients receive at most 4 MiB): longer text is
    # split into several events, other events are cut with a marker and a notice.
    max_event_bytes: int = 1_048_576
    max_sessions: int = 64  # sessions with a running (or starting) agent at once
    # A turn's events kept (on disk, in the state database) for WatchTurn and the transcript;
    # past it the oldest are dropped, with a notice. At least 1 MiB.
    max_turn_log_bytes: int = 16 * 1024 * 1024
    turn_retention: int = 100  # turns kept per session (the newest)
    turn_retention_age: float = 7 * 86400.0  # turns older than this are deleted
    busy_retry_after: float = 1.0  # RetryInfo delay suggested with SESSION_BUSY
    drain_grace: float = 10.0  # on SIGTERM, how long running turns may go on
    idle_ttl: float = 1800.0  # an idle session's agent is stopped (SUSPENDED) after this long
    zombie_grace: float = 30.0  # a turn's runner this long past its own bounds is reaped (a safety net)
    session_retention: float = 30 * 86400.0  # a SUSPENDED session idle this long is deleted
    sweep_interval: float = 1.0  # how often the sweeper looks for idle and zombie sessions
    # Replicas (state_url set): a replica that could not renew its lease for this long stops
    # serving its sessions; the others take them over only after it plus a margin.
    lease_ttl: float = 10.0
    max_spares: int = 16  # warm spare agents kept over all agents (they take no session slot)
    max_stored_sessions: int = 10_000  # sessions kept in all (suspended ones too): QUOTA_EXCEEDED past it
    max_concurrent_rpcs: int = 1000  # calls in progress at once; more get RESOURCE_EXHAUSTED from grpc
    max_streams_per_connection: int = 100  # HTTP/2 streams one client connection may open at once
    keepalive_time: float = 60.0  # the server pings an idle connection this often to find dead clients
    keepalive_timeout: float = 20.0  # ...and drops it when a ping goes unanswered this long
    min_client_ping_interval: float = 10.0  # clients pinging more often (with no call) are cut off
    max_connection_idle: float = 3600.0  # a connection with no call for this long is closed (GOAWAY)


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    default_agent: str = BUILTIN_AGENT
    workdir: Path = field(default_factory=Path.cwd)
    allowed_roots: tuple[Path, ...] = ()  # empty: only `workdir` and below
    agents: Mapping[str, AgentConfig] = field(default_factory=dict)
    mcp_servers: Mapping[str, McpServerConfig] = field(default_factory=dict)  # [mcp_servers.NAME]
    limits: ServerLimits = field(default_factory=ServerLimits)
    log_level: str = "INFO"
    log_format: str = "text"  # "text" (key=value) or "json"
    # "asyncio" (the standard library's loop) or "uvloop" (libuv's, no faster here: see
    # docs/benchmarks.md; __main__ keeps grpc's fork handlers out of its agent starts).
    event_loop: str = "asyncio"
    # Where agents that flood run, scheduled idle (sandbox/idle_cgroup.py): "auto" (a child of our
    # own CPU cgroup, where we may make one), "off", or a cgroup directory the operator delegates.
    idle_cgroup: str = "auto"
    metrics_listen: str = ""  # HOST:PORT for Prometheus /metrics; empty: off
    state_db: Path = field(default_factory=lambda: default_state_dir() / "sessions.db")
    state_url: str = ""  # postgresql://...: the shared PostgreSQL store of replicas instead of state_db
    replica_id: str = ""  # this replica's name among replicas (default: host name and port)
    advertise: str = ""  # HOST:PORT the other replicas reach this one at (default: listen)
    # A secret shared by the replicas: a forwarded call is signed with it (server/security/auth.py), never
    # carries it, and the leaseholder trusts the principal name it signs (mTLS principals included).
    replica_token_file: Path | None = None
    # The Fernet key that encrypts client-supplied MCP servers at rest (server/security/secrets.py);
    # None: mcp.key beside state_db, made on first start. Replicas must share one.
    mcp_key_file: Path | None = None
    auth_tokens_file: Path | None = None  # [auth] tokens_file: bearer tokens of principals
    reflection: str = "authenticated"  # [auth] reflection: "authenticated" or "public"
    insecure: bool = False  # serve a non-loopback address without authentication, on purpose
    tls_cert: Path | None = None  # [tls] cert: PEM certificate chain (TLS when set, with tls_key)
    tls_key: Path | None = None  # [tls] key
    tls_client_ca: Path | None = None  # [tls] client_ca: require and verify client certificates (mTLS)
    config_file: Path | None = None  # where these settings were read from (hidden from agents)

    @property
    def authenticated(self) -> bool:
        return self.auth_tokens_file is not None or self.tls_client_ca is not None

    @property
    def roots(self) -> tuple[Path, ...]:
        return self.allowed_roots or (self.workdir,)

    @property
    def mcp_key_path(self) -> Path:
        """Where the key of client-supplied MCP servers is (mcp_key_file, or beside state_db)."""
        return self.mcp_key_file or self.state_db.parent / "mcp.key"


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/sessiongate, or ~/.local/state/sessiongate."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sessiongate"


def builtin_agent() -> AgentConfig:
    """The reference ACP agent shipped with the server, run by this same interpreter."""
    return AgentConfig(name=BUILTIN_AGENT, command=sys.executable, args=("-m", "sessiongate.echo"))


EVENT_LOOPS = ("uvloop", "asyncio")
_LIMIT_FIELDS = {f.name: f for f in fields(ServerLimits)}
_SCALAR_KEYS = (
    "listen",
    "default_agent",
    "workdir",
    "allowed_roots",
    "log_level",
    "log_format",
    "event_loop",
    "idle_cgroup",
    "metrics_listen",
    "state_db",
    "state_url",
    "replica_id",
    "advertise",
    "replica_token_file",
    "mcp_key_file",
    "auth_tokens_file",
    "reflection",
    "insecure",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
)


def load_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from flags (argv), env vars and the `--config` TOML file."""
    environ = os.environ if environ is None else environ
    opts = _parse_flags(argv)
    opts.pop("check_config")  # what to do, not a setting: see check_requested
    raw: dict[str, Any] = {}
    agents: dict[str, AgentConfig] = {BUILTIN_AGENT: builtin_agent()}
    mcp_servers: dict[str, McpServerConfig] = {}
    config_path = opts.pop("config") or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        document = _read_toml(Path(config_path))
        # Relative paths in the file are taken from its directory, not the server's cwd.
        base = Path(config_path).expanduser().absolute().parent.resolve()
        raw.update(_table(document, "server"))
        raw.update(_auth_from_toml(_table(document, "auth")))
        raw.update(_tls_from_toml(_table(document, "tls")))
        raw.update(_paths_from(base, raw))
        for name, table in _table(document, "agents").items():
            agents[name] = _agent_from_toml(name, table, base)
        for name, table in _table(document, "mcp_servers").items():
            mcp_servers[name] = mcp_server_from_toml(name, table, base)
        unknown = set(document) - {"server", "agents", "auth", "tls", "mcp_servers"}
        if unknown:
            raise ConfigError(f"{config_path}: unknown top-level keys {sorted(unknown)}")
    from_env: dict[str, str] = {}  # key -> the env var its value came from
    for key in (*_SCALAR_KEYS, *_LIMIT_FIELDS):
        env_value = environ.get(ENV_PREFIX + key.upper())
        if env_value is not None:
            raw[key] = env_value.split(os.pathsep) if key == "allowed_roots" else env_value
            from_env[key] = ENV_PREFIX + key.upper()
    raw.update({k: v for k, v in opts.items() if v is not None})
    try:
        settings = _build(raw, agents, mcp_servers)
    except ConfigError as exc:  # "stall_timeout must be a number": say where the value came from
        key = str(exc).split(" ", 1)[0]
        if key in from_env and opts.get(key) is None:
            raise ConfigError(f"{from_env[key]}: {exc}") from None
        raise
    if not config_path:
        return settings
    return replace(settings, config_file=Path(os.path.abspath(os.path.expanduser(config_path))))


_PATH_KEYS = (
    "workdir",
    "state_db",
    "replica_token_file",
    "mcp_key_file",
    "auth_tokens_file",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
)


def _from(base: Path, value: Any) -> Any:
    """`value` (a path in the config file) with `~` expanded, from `base` when relative; any
    other type as it is, for validation to refuse."""
    if not isinstance(value, str) or not value:
        return value
    return os.path.normpath(base / os.path.expanduser(value))  # an absolute one replaces `base`


def _paths_from(base: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The config file's path keys in `raw`, taken from `base` (its directory)."""
    found = {key: _from(base, raw[key]) for key in _PATH_KEYS if key in raw}
    roots = raw.get("allowed_roots")
    if isinstance(roots, list):
        found["allowed_roots"] = [_from(base, r) for r in roots]
    return found


def package_version() -> str:
    """The installed distribution's version, or a plain word saying it is not installed."""
    try:
        return importlib.metadata.version("sessiongate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: run from a source tree)"


def check_requested(argv: list[str] | None) -> bool:
    """Whether the flags ask for --check-config (parsed as load_settings does, abbreviations too)."""
    return bool(_parse_flags(argv)["check_config"])


def _parse_flags(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="sessiongate-server", description="sessiongate gRPC server")
    parser.add_argument("--version", action="version", version=f"sessiongate-server {package_version()}")
    parser.add_argument(
        "--check-config",
        dest="check_config",
        action="store_true",
        help="check the configuration (files, TLS, tokens, agents) and exit, without serving",
    )
    parser.add_argument("--config", help="TOML config file (also SESSIONGATE_CONFIG)")
    parser.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:50051)")
    parser.add_argument("--default-agent", dest="default_agent", help="agent used when a request names none")
    parser.add_argument("--workdir", help="default cwd for sessions (default: the current directory)")
    parser.add_argument(
        "--allowed-root",
        dest="allowed_roots",
        action="append",
        help="directory sessions may use as cwd, repeatable (default: the workdir)",
    )
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-format", dest="log_format", help="text (key=value, default) or json")
    parser.add_argument(
        "--event-loop", dest="event_loop", help="asyncio (the standard library's loop, default) or uvloop"
    )
    parser.add_argument(
        "--metrics-listen",
        dest="metrics_listen",
        help="HOST:PORT to serve Prometheus /metrics on (default: off)",
    )
    parser.add_argument(
        "--state-db", dest="state_db", help="SQLite file sessions are kept in (default under XDG_STATE_HOME)"
    )
    parser.add_argument(
        "--state-url",
        dest="state_url",
        help="postgresql://USER@HOST:PORT/DB: keep sessions in PostgreSQL (replicas share it)",
    )
    parser.add_argument("--replica-id", dest="replica_id", help="this replica's name (default HOST:PORT)")
    parser.add_argument(
        "--advertise", help="HOST:PORT other replicas reach this one at (default: the listen address)"
    )
    parser.add_argument(
        "--replica-token-file",
        dest="replica_token_file",
        help="file holding the secret replicas authenticate each other with when they forward calls",
    )
    parser.add_argument(
        "--mcp-key-file",
        dest="mcp_key_file",
        help="Fernet key encrypting client-supplied MCP servers at rest (default: mcp.key beside state_db)",
    )
    parser.add_argument(
        "--auth-tokens-file", dest="auth_tokens_file", help="TOML file of principals and their token hashes"
    )
    parser.add_argument(
        "--reflection", help="who may use server reflection: authenticated (default) or public"
    )
    parser.add_argument(
        "--tls-cert", dest="tls_cert", help="PEM certificate chain: serve TLS (with --tls-key)"
    )
    parser.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", dest="tls_client_ca", help="PEM CA bundle: require and verify client certificates"
    )
    parser.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="allow serving a non-loopback address without authentication",
    )
    for name, spec in _LIMIT_FIELDS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=f"(default {spec.default})")
    return vars(parser.parse_args(argv))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc


def _table(document: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _agent_from_toml(name: str, table: Any, base: Path | None = None) -> AgentConfig:
    """One `[agents.NAME]` table; its relative paths are taken from `base` (the config file's
    directory; default the current one)."""
    base = base or Path.cwd()
    where = f"[agents.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - {
        "command",
        "args",
        "env",
        "permission_policy",
        "pass_env",
        "spares",
        "nice",
        "auth_method",
        "mcp_servers",
        *SANDBOX_KEYS,
        *CAPABILITY_KEYS,
    }
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    command, default_args = table.get("command"), []
    if command is None and name == BUILTIN_AGENT:  # the built-in agent with some keys set (sandbox)
        command, default_args = builtin_agent().command, list(builtin_agent().args)
    if not isinstance(command, str) or not command:
        raise ConfigError(f"{where}: `command` must be a non-empty string")
    if "/" in command:  # a path, not a name looked up on PATH
        command = _from(base, command)
    args = table.get("args", default_args)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"{where}: `args` must be a list of strings")
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{where}: `env` must be a table of strings")
    policy = table.get("permission_policy", "approve-reads")
    if policy not in PERMISSION_POLICIES:
        raise ConfigError(f"{where}: `permission_policy` must be one of {', '.join(PERMISSION_POLICIES)}")
    pass_env = table.get("pass_env", [])
    if not isinstance(pass_env, list) or not all(isinstance(v, str) and v for v in pass_env):
        raise ConfigError(f"{where}: `pass_env` must be a list of environment variable names")
    spares = table.get("spares", 0)
    if not isinstance(spares, int) or isinstance(spares, bool) or spares < 0:
        raise ConfigError(f"{where}: `spares` must be a whole number, 0 or more")
    nice = table.get("nice", DEFAULT_NICE)
    if not isinstance(nice, int) or isinstance(nice, bool) or not 0 <= nice <= MAX_NICE:
        raise ConfigError(f"{where}: `nice` must be a whole number from 0 to {MAX_NICE}")
    auth_method = table.get("auth_method", "")
    if not isinstance(auth_method, str):
        raise ConfigError(f"{where}: `auth_method` must be a string (one of the agent's auth method ids)")
    mcp_names = table.get("mcp_servers", [])
    if not isinstance(mcp_names, list) or not all(isinstance(n, str) for n in mcp_names):
        raise ConfigError(f"{where}: `mcp_servers` must be a list of [mcp_servers.NAME] names")
    config = AgentConfig(name, command, tuple(args), dict(env), policy, tuple(pass_env), spares)
    capabilities = _capabilities_from_toml(where, table)
    sandbox = _sandbox_from_toml(where, table, base)
    return replace(
        config, nice=nice, auth_method=auth_method, mcp_servers=tuple(mcp_names), **sandbox, **capabilities
    )


MCP_STDIO_KEYS = ("command", "args", "env", "env_from")
MCP_REMOTE_KEYS = ("type", "url", "headers", "headers_from")


def mcp_server_from_toml(name: str, table: Any, base: Path | None = None) -> McpServerConfig:
    """One `[mcp_servers.NAME]` table: stdio (`command`, `args`, `env`, `env_from`) or remote
    (`type` "http" or "sse", `url`, `headers`, `headers_from`); exactly one of command and url.
    A relative command path is taken from `base` (the config file's directory)."""
    where = f"[mcp_servers.{name}]"
    if not MCP_NAME.fullmatch(name):
        raise ConfigError(
            f"[mcp_servers.{name[:64]}]: the name must be a letter then letters, digits, - or _ (at most 64)"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - {*MCP_STDIO_KEYS, *MCP_REMOTE_KEYS}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    if ("command" in table) == ("url" in table):
        raise ConfigError(f"{where}: set exactly one of `command` (stdio) and `url` (http, sse)")
    if "command" in table:
        return _mcp_stdio(where, name, table, base or Path.cwd())
    return _mcp_remote(where, name, table)


def _mcp_stdio(where: str, name: str, table: dict[str, Any], base: Path) -> McpServerConfig:
    remote = set(table) & set(MCP_REMOTE_KEYS)
    if remote:
        raise ConfigError(f"{where}: {sorted(remote)} are for http/sse servers, not with `command`")
    command = table["command"]
    if not isinstance(command, str) or not command:
        raise ConfigError(f"{where}: `command` must be a non-empty string")
    if "/" in command:
        command = _from(base, command)
    args = table.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"{where}: `args` must be a list of strings")
    env = _string_table(where, "env", table.get("env", {}))
    env_from = table.get("env_from", [])
    if not isinstance(env_from, list) or not all(
        isinstance(v, str) and ENV_NAME.fullmatch(v) for v in env_from
    ):
        raise ConfigError(f"{where}: `env_from` must be a list of environment variable names")
    return McpServerConfig(name, "stdio", command, tuple(args), env, tuple(env_from))


def _mcp_remote(where: str, name: str, table: dict[str, Any]) -> McpServerConfig:
    stdio = set(table) & set(MCP_STDIO_KEYS)
    if stdio:
        raise ConfigError(f"{where}: {sorted(stdio)} are for stdio servers, not with `url`")
    transport = table.get("type")
    if transport not in ("http", "sse"):
        raise ConfigError(f'{where}: `type` must be "http" or "sse" (a server with `url`)')
    url = table["url"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: `url` must be an http:// or https:// URL")
    headers = _string_table(where, "headers", table.get("headers", {}))
    headers_from = _string_table(where, "headers_from", table.get("headers_from", {}))
    if not all(ENV_NAME.fullmatch(v) for v in headers_from.values()):
        raise ConfigError(f"{where}: `headers_from` maps header names to environment variable names")
    return McpServerConfig(name, transport, url=url, headers=headers, headers_from=headers_from)


def _string_table(where: str, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) and k for k, v in value.items()):
        raise ConfigError(f"{where}: `{key}` must be a table of strings")
    return dict(value)


def with_mcp_servers(
    agents: Mapping[str, AgentConfig], mcp_servers: Mapping[str, McpServerConfig]
) -> dict[str, AgentConfig]:
    """Each agent with the catalog of MCP servers; an agent's `mcp_servers` naming a server not
    configured is a ConfigError."""
    found = {}
    for name, config in agents.items():
        for server in config.mcp_servers:
            if server not in mcp_servers:
                known = ", ".join(sorted(mcp_servers)) or "none"
                raise ConfigError(
                    f"[agents.{name}] mcp_servers: no [mcp_servers.{server[:64]}] is configured "
                    f"(configured: {known})"
                )
        found[name] = replace(config, mcp_catalog=mcp_servers)
    return found


CAPABILITY_KEYS = ("client_fs", "client_terminal")


def _capabilities_from_toml(where: str, table: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key in CAPABILITY_KEYS:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: `{key}` must be true or false")
        found[key] = value
    return found


SANDBOX_KEYS = (
    "sandbox",
    "network",
    "allowed_domains",
    "allow_private_destinations",
    "ro_paths",
    "rw_paths",
    "home",
    "user",
)
NETWORK_MODES = ("none", "proxy", "host")
_DOMAIN = re.compile(
    r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?"
)


def _sandbox_from_toml(where: str, table: dict[str, Any], base: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    sandbox = table.get("sandbox", "")
    if sandbox not in ("", "bwrap", "none"):
        raise ConfigError(f'{where}: `sandbox` must be "bwrap" or "none"')
    found["sandbox"] = sandbox
    network = table.get("network", "proxy")
    if not isinstance(network, bool) and network not in NETWORK_MODES:
        raise ConfigError(f'{where}: `network` must be true or false, or one of "none", "proxy", "host"')
    found["network"] = network
    domains = table.get("allowed_domains", [])
    if not isinstance(domains, list) or not all(
        isinstance(d, str) and len(d) <= 253 and _DOMAIN.fullmatch(d) for d in domains
    ):
        raise ConfigError(
            f'{where}: `allowed_domains` must be a list of host names, or "*.suffix" for a domain'
        )
    found["allowed_domains"] = tuple(d.lower() for d in domains)
    allow_private = table.get("allow_private_destinations", False)
    if not isinstance(allow_private, bool):
        raise ConfigError(f"{where}: `allow_private_destinations` must be true or false")
    found["allow_private_destinations"] = allow_private
    for key in ("ro_paths", "rw_paths"):
        paths = table.get(key, [])
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise ConfigError(f"{where}: `{key}` must be a list of paths")
        found[key] = tuple(_from(base, p) for p in paths)
    for key in ("home", "user"):
        value = table.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: `{key}` must be a string")
        found[key] = value
    found["home"] = _from(base, found["home"])
    return found


def _auth_from_toml(table: dict[str, Any]) -> dict[str, Any]:
    unknown = set(table) - {"tokens_file", "reflection"}
    if unknown:
        raise ConfigError(f"[auth]: unknown keys {sorted(unknown)}")
    return {("auth_" + k if k == "tokens_file" else k): v for k, v in table.items()}


def _tls_from_toml(table: dict[str, Any]) -> dict[str, Any]:
    unknown = set(table) - {"cert", "key", "client_ca"}
    if unknown:
        raise ConfigError(f"[tls]: unknown keys {sorted(unknown)}")
    return {f"tls_{k}": v for k, v in table.items()}


def _build(
    raw: dict[str, Any], agents: dict[str, AgentConfig], mcp_servers: dict[str, McpServerConfig]
) -> Settings:
    unknown = set(raw) - set(_SCALAR_KEYS) - set(_LIMIT_FIELDS)
    if unknown:
        raise ConfigError(f"unknown server keys {sorted(unknown)}")
    limits = ServerLimits()
    for name, spec in _LIMIT_FIELDS.items():
        if name in raw:
            limits = replace(
                limits, **{name: _positive(name, raw[name], int if spec.type == "int" else float)}
            )
    if limits.max_turn_log_bytes < MIN_TURN_LOG_BYTES:
        raise ConfigError(f"max_turn_log_bytes must be at least {MIN_TURN_LOG_BYTES} (1 MiB)")
    settings = Settings(agents=agents, mcp_servers=mcp_servers, limits=limits)
    if "listen" in raw:
        settings = replace(settings, listen=str(raw["listen"]))
    if "default_agent" in raw:
        settings = replace(settings, default_agent=str(raw["default_agent"]))
    if "log_level" in raw:
        settings = replace(settings, log_level=str(raw["log_level"]).upper())
    if "log_format" in raw:
        settings = replace(settings, log_format=str(raw["log_format"]).lower())
    if "event_loop" in raw:
        settings = replace(settings, event_loop=str(raw["event_loop"]).lower())
    if "idle_cgroup" in raw:
        settings = replace(settings, idle_cgroup=str(raw["idle_cgroup"]))
    if "metrics_listen" in raw:
        settings = replace(settings, metrics_listen=str(raw["metrics_listen"]))
    if "workdir" in raw:
        settings = replace(settings, workdir=Path(str(raw["workdir"])))
    if raw.get("auth_tokens_file"):
        settings = replace(settings, auth_tokens_file=Path(str(raw["auth_tokens_file"])).expanduser())
    paths = {
        key: Path(str(raw[key])).expanduser()
        for key in ("tls_cert", "tls_key", "tls_client_ca")
        if raw.get(key)
    }
    settings = replace(
        settings,
        tls_cert=paths.get("tls_cert"),
        tls_key=paths.get("tls_key"),
        tls_client_ca=paths.get("tls_client_ca"),
    )
    if "reflection" in raw:
        settings = replace(settings, reflection=str(raw["reflection"]))
    if raw.get("insecure") in (True, "1", "true", "yes"):
        settings = replace(settings, insecure=True)
    if "state_db" in raw:
        settings = replace(settings, state_db=Path(str(raw["state_db"])).expanduser())
    if raw.get("state_url"):
        settings = replace(settings, state_url=str(raw["state_url"]))
    if raw.get("replica_id"):
        settings = replace(settings, replica_id=str(raw["replica_id"]))
    if raw.get("advertise"):
        settings = replace(settings, advertise=str(raw["advertise"]))
    if raw.get("replica_token_file"):
        settings = replace(settings, replica_token_file=Path(str(raw["replica_token_file"])).expanduser())
    if raw.get("mcp_key_file"):
        settings = replace(settings, mcp_key_file=Path(str(raw["mcp_key_file"])).expanduser())
    if "allowed_roots" in raw:
        roots = raw["allowed_roots"]
        if not isinstance(roots, list | tuple):
            raise ConfigError("allowed_roots must be a list of directories")
        settings = replace(settings, allowed_roots=tuple(Path(str(r)) for r in roots))
    return validate(settings)


def _wildcard(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    return listen.startswith("unix://") or host in ("", "0.0.0.0", "::")


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT binds only this machine's loopback interface (or a Unix socket)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(name: str, value: Any, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        ) from None
    if number <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return number


def validate(settings: Settings) -> Settings:
    """Resolve paths and check cross-key rules; returns the resolved Settings."""
    if settings.default_agent not in settings.agents:
        raise ConfigError(
            f"default_agent {settings.default_agent!r} is not configured (agents: {sorted(settings.agents)})"
        )
    if settings.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {settings.log_level!r}")
    if settings.log_format not in ("text", "json"):
        raise ConfigError(f"log_format must be text or json, got {settings.log_format!r}")
    if settings.event_loop not in EVENT_LOOPS:
        raise ConfigError(f"event_loop must be uvloop or asyncio, got {settings.event_loop[:40]!r}")
    if settings.idle_cgroup not in ("auto", "off") and not settings.idle_cgroup.startswith("/"):
        raise ConfigError(
            "idle_cgroup must be auto, off or an absolute cgroup directory, "
            f"got {settings.idle_cgroup[:80]!r}"
        )
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("TLS needs a certificate and its key: set both (--tls-cert, --tls-key)")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("a client CA (mTLS) needs TLS: set the tls cert and key too")
    for path in (
        settings.tls_cert,
        settings.tls_key,
        settings.tls_client_ca,
        settings.auth_tokens_file,
        settings.replica_token_file,
    ):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path} is not a readable file")
    if settings.state_url and not settings.state_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("state_url must be a postgresql:// URL")
    if settings.state_url and settings.tls_cert is not None:
        raise ConfigError(
            "replicas (state_url) forward calls to each other in plain gRPC: no TLS with them yet"
        )
    if settings.state_url and not settings.advertise and _wildcard(settings.listen):
        raise ConfigError(
            f"listen {settings.listen!r} is not an address other replicas can reach: set advertise"
        )
    if settings.reflection not in ("authenticated", "public"):
        raise ConfigError(f"reflection must be authenticated or public, got {settings.reflection!r}")
    if not settings.authenticated and not settings.insecure and not is_loopback(settings.listen):
        raise ConfigError(
            f"listen {settings.listen!r} is not a loopback address and no authentication is configured: "
            "set [auth] tokens_file (--auth-tokens-file), or pass --insecure to serve it without"
        )
    for key in ("listen", "metrics_listen"):
        value = getattr(settings, key)
        if key == "listen" and value.startswith("unix://") and len(value) > len("unix://"):
            continue  # unix:///path/to/socket
        if key == "metrics_listen" and value.isdigit():
            continue  # a bare port: 127.0.0.1 (server/api/metrics.py metrics_address)
        host, sep, port = value.rpartition(":")
        if (value or key == "listen") and (not sep or (not host and key == "listen") or not port.isdigit()):
            raise ConfigError(f"{key} must be HOST:PORT, got {value!r}")
    replica_token(settings)  # a token file too short stops the start here, before anything runs
    for config in settings.agents.values():
        _check_user(config)
    agents = with_mcp_servers(settings.agents, settings.mcp_servers)
    workdir = settings.workdir.expanduser().resolve()
    if not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is not a directory")
    roots = tuple(r.expanduser().resolve() for r in settings.allowed_roots)
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"allowed root {root} is not a directory")
    if roots and not any(workdir.is_relative_to(r) for r in roots):
        raise ConfigError(f"workdir {workdir} is outside the allowed roots")
    _check_state_dir_outside(settings, roots, workdir)
    # Absolute from here on: the sandbox hides these files from agents by their path.
    files = {
        key: getattr(settings, key).expanduser().resolve()
        for key in (
            "state_db",
            "auth_tokens_file",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "config_file",
            "replica_token_file",
            "mcp_key_file",
        )
        if getattr(settings, key) is not None
    }
    return replace(settings, agents=agents, workdir=workdir, allowed_roots=roots, **files)


def _check_state_dir_outside(settings: Settings, roots: tuple[Path, ...], workdir: Path) -> None:
    """No root contains the state dir: a session made there (its cwd bound over the sandbox's
    mask) would show its agent every session's data and every principal's home. The workdir
    standing in for unset allowed_roots is held to it only with authentication: a server started
    in $HOME with its state under ~/.local/state serves one trust domain."""
    state_dir = settings.state_db.expanduser().resolve().parent
    for root in roots:
        if state_dir.is_relative_to(root):
            raise ConfigError(
                f"allowed_roots: {root} contains the state directory {state_dir} (state_db): "
                "choose roots beside it, or move the state elsewhere"
            )
    if not roots and settings.authenticated and state_dir.is_relative_to(workdir):
        raise ConfigError(
            f"workdir {workdir} (the root, allowed_roots being unset) contains the state directory "
            f"{state_dir} (state_db): with authentication set allowed_roots beside it, or move the state"
        )


MIN_REPLICA_TOKEN = 16


def replica_token(settings: Settings) -> str:
    """The replicas' shared secret ('' when none is configured)."""
    if settings.replica_token_file is None:
        return ""
    token = settings.replica_token_file.read_text().strip()
    if len(token) < MIN_REPLICA_TOKEN:
        where = settings.replica_token_file
        raise ConfigError(f"the replica token in {where} must be at least {MIN_REPLICA_TOKEN} characters")
    return token


def _check_user(config: AgentConfig) -> None:
    if not config.user:
        return
    if config.client_fs:
        # The gateway serves fs/* itself, as the server's user: for an agent running as another
        # user that would read and write files with the server's rights, not the agent's.
        raise ConfigError(
            f"[agents.{config.name}] client_fs cannot be used with user {config.user!r}: the gateway "
            "would read and write the files as the server's user"
        )
    try:
        pwd.getpwnam(config.user)
    except KeyError:
        raise ConfigError(f"[agents.{config.name}] user {config.user!r} does not exist") from None
    if os.geteuid() != 0:
        raise ConfigError(
            f"[agents.{config.name}] user {config.user!r}: the server must run as root to start agents "
            "as another user"
        )
