"""How an agent process is started: unconfined, or in a bubblewrap sandbox.

An agent runs tools a model chose, with whatever its process can reach. Sandboxed
(`sandbox = "bwrap"`, the default where Debian's `bubblewrap` is installed), it sees:
- of the host, read-only, only an allow-list (`SYSTEM_PATHS`): `/usr`, `/bin`, `/sbin`,
  `/lib*`, `/opt`, the resolver's `/run/systemd/resolve`, and `/etc` without what only root
  may read there (`/etc/shadow`, SSH host keys, sudoers...: left out, see `_root_only`); then
  what its command needs (its directory, this interpreter for our bridge, our code for the
  built-in agent) and its `ro_paths`; no `/root`, `/home`, `/var` or `/srv`; a private `/tmp`,
  its own `/dev` and `/proc`;
- when the server runs as root and the agent has no `user`: uid and gid nobody inside, through
  a user namespace mapping them to the server's (so its cwd and home stay writable, and what
  it makes there is the server's); with no capabilities, the allow-list is what keeps it from
  the host's root-owned files. `user = "..."` runs it as that user on the host too (setpriv);
- its own PID namespace, so `/proc` shows no server process (no `/proc/<pid>/environ`);
- the session's cwd read-write (bound through the checked directory's descriptor, so a
  symlink swapped in after the check cannot move it), its home read-write, and the extra
  `ro_paths`/`rw_paths` configured for it;
- a home of its principal's own: `<state dir>/homes/<principal>/<agent>` (see `home()`),
  never another principal's, whose transcripts, logins and hook-running settings live there;
- none of the server's secrets: the state directory (other sessions, the database) is an
  empty tmpfs; the tokens file, TLS key, config and socket are left out of every read-only
  directory that shows them, which becomes a read-only tmpfs of bind mounts of its other
  entries (a secret replaced by rename there stays out: a bind over the file would cover only
  its old inode); in a writable one (cwd, home, `rw_paths`) the directory holding a secret is
  an empty tmpfs, and a secret right in such a path refuses the agent (`_own_and_masks`);
- its network (`network`): "proxy" (the default) a namespace of its own whose one way out is
  our filtering proxy, reaching only `allowed_domains` at public addresses (network_proxy.py);
  "none" only a loopback of its own; "host" the host's, all of it (said at start). With "proxy"
  the spawn's `network` handle adds the hosts of its session's http/sse MCP servers later;
- no capabilities, even when the server runs as root;
- `--die-with-parent`: it ends with the server.
The process is the leader of its own process group, as unsandboxed agents are, so stopping
it (SIGTERM, then SIGKILL to the group) works the same way. A sandbox is made for one cwd,
so sandboxed agents get no warm spares.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pwd
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from sessiongate.server import logs
from sessiongate.server.errors import AgentUnavailable
from sessiongate.server.sandbox.idle_cgroup import IdleCgroup
from sessiongate.server.sandbox.network_proxy import NetworkProxy, SandboxNetwork
from sessiongate.server.sandbox.workdir import WorkDir
from sessiongate.server.settings import AgentConfig

BWRAP_PACKAGE = "bubblewrap"  # Debian's package, `apt-get install bubblewrap`


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


PRIVATE_TMP = "/tmp"
BRIDGE_SOCKET = "/tmp/.sessiongate-proxy.sock"  # the network proxy's socket, inside the sandbox
SETPRIV = "setpriv"  # util-linux: takes another user's identity, then execs
SANDBOX_DIR = Path(__file__).parent  # our standard-library scripts run inside sandboxes
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout: the built-in agent's code
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # a principal name used as it is
# The host a sandboxed agent sees, read-only (each where it exists; a symlink such as
# /bin -> usr/bin stays one); /etc without what only root may read. Anything else: ro_paths.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/etc")
SYSTEM_PATHS_TRY = ("/run/systemd/resolve",)  # where /etc/resolv.conf may point
ETC = Path("/etc")
MAX_VIEW_ENTRIES = 4096  # bind mounts for the read-only directories that show a secret

# The principal an agent is being made for: the one its session belongs to, set by the holder around
# the start (which may run in a task no caller's principal is in, or an admin's), read when the
# agent is made. "" (no authentication, or an agent made for no session: a spare, a login).
_home_principal: ContextVar[str] = ContextVar("sessiongate_home_principal", default="")


@contextmanager
def homes_of(principal: str) -> Iterator[None]:
    """Agents made inside get `principal`'s homes (and spares of another home are not used)."""
    token = _home_principal.set(principal)
    try:
        yield
    finally:
        _home_principal.reset(token)


def home_principal() -> str:
    return _home_principal.get()


# Gateway sockets the agent being made reaches at the same path inside its sandbox (its session's
# client tools: turns/client_tools.py), set by the session around the start like homes_of. Each
# lives under /tmp, which is the sandbox's own tmpfs, so bwrap can make the path there.
_agent_sockets: ContextVar[tuple[str, ...]] = ContextVar("sessiongate_agent_sockets", default=())


@contextmanager
def sockets_for_agent(paths: Iterable[str]) -> Iterator[None]:
    """Agents made inside see these sockets (bound into a sandbox at the same path)."""
    token = _agent_sockets.set(tuple(paths))
    try:
        yield
    finally:
        _agent_sockets.reset(token)


def stdlib_script(python: str, script: str, *args: str) -> list[str]:
    """`python` running `script`, one of this package's standard-library scripts (`bridge.py`,
    `tools_relay.py`), by source with `args`, inside a sandbox that has none of our packages.
    -I -S: the agent's PYTHON* variables, site-packages and cwd play no part in it."""
    return [python, "-I", "-S", "-c", _script_source(script), *args]


@functools.cache
def _script_source(script: str) -> str:
    """A script's source, read once (every sandboxed start and every client tools session runs one)."""
    return (SANDBOX_DIR / script).read_text()


def agent_script(config: AgentConfig, script: str, *args: str) -> list[str]:
    """`stdlib_script` as `config`'s agent runs it (another user's gets a system python3: see
    _bridge_python), e.g. the client tools relay it starts as an MCP server."""
    return stdlib_script(_bridge_python(_identity(config.user)[0]), script, *args)


def principal_dir(name: str) -> str:
    """`name` as one safe path component: a plain name as it is; any other (a `/`, `..`, NUL, a
    leading dot, a long one) as `~<its plain characters>~<hash>`, which no plain name can be and
    no other name shares."""
    if PLAIN_NAME.fullmatch(name):
        return name
    kept = re.sub(r"[^A-Za-z0-9_.@-]", "", name)[:32]
    return f"~{kept}~{hashlib.sha256(name.encode(errors='surrogatepass')).hexdigest()[:24]}"


@dataclass(frozen=True, slots=True)
class Spawn:
    """Everything `create_subprocess_exec` needs for one agent process."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None = None
    pass_fds: tuple[int, ...] = ()
    # network = "proxy": the sandbox's socket on the proxy, where its session's MCP hosts are added
    network: SandboxNetwork | None = None


class Launcher:
    """Turns an agent's config (and its session's checked directory) into a `Spawn`."""

    def __init__(
        self,
        bwrap: str | None = None,
        hidden: Iterable[Path] = (),
        homes: Path | None = None,
        principal: str = "",
        network: NetworkProxy | None = None,
        idle: IdleCgroup | None = None,
    ) -> None:
        self.bwrap = bwrap  # the bwrap executable, or None where it is not installed
        self._hidden = tuple(Path(p) for p in hidden)  # the server's secrets, kept from agents
        self._homes = homes  # where agents without `home` or `user` get one of their own
        self.principal = principal  # whose agents these are ("": no one's, no authentication)
        self.network = network  # network = "proxy" goes through it; None: no network
        self.idle = idle  # where agents that flood run (idle_cgroup.py); None: nice alone

    def for_principal(self, principal: str) -> Launcher:
        """This launcher for the agents (and their terminals) of `principal`'s sessions."""
        return Launcher(self.bwrap, self._hidden, self._homes, principal, self.network, self.idle)

    def with_network(self, network: NetworkProxy) -> Launcher:
        """This launcher with the gateway's proxy for agents whose network is "proxy"."""
        return Launcher(self.bwrap, self._hidden, self._homes, self.principal, network, self.idle)

    def with_idle(self, idle: IdleCgroup | None) -> Launcher:
        """This launcher with its server's idle cgroup for agents that flood."""
        return Launcher(self.bwrap, self._hidden, self._homes, self.principal, self.network, idle)

    @property
    def hidden(self) -> tuple[Path, ...]:
        """The server's secrets, kept from agents (also from the files the gateway serves them)."""
        return self._hidden

    @classmethod
    def for_server(cls, state_db: Path, secrets: Iterable[Path | None]) -> Launcher:
        """Hides the state dir and database (wherever they are) and `secrets` from agents."""
        state_dir = state_db.parent
        database = (state_db, Path(f"{state_db}-wal"), Path(f"{state_db}-shm"))
        hidden = (state_dir, *database, *(p for p in secrets if p))
        return cls(find_bwrap(), hidden, state_dir / "homes")

    def sandboxed(self, config: AgentConfig) -> bool:
        """Whether `config`'s agents run in bwrap here (the default: when it is installed)."""
        if config.sandbox == "none":
            return False
        return config.sandbox == "bwrap" or self.bwrap is not None

    def problem(self, config: AgentConfig) -> str | None:
        """Why `config`'s agents cannot start here, or None."""
        if config.sandbox == "bwrap" and self.bwrap is None:
            return (
                f"agent {config.name!r} must run in a bubblewrap sandbox, and bwrap is not installed "
                f'(install the {BWRAP_PACKAGE} package, or set sandbox = "none" for it)'
            )
        if config.user and shutil.which(SETPRIV) is None:
            return (
                f"agent {config.name!r} runs as user {config.user!r}, "
                f"and {SETPRIV} (util-linux) is not installed"
            )
        return None

    def home(self, config: AgentConfig) -> str | None:
        """The agent's HOME: configured; else its user's (both shared by every principal); else
        its own under the state dir, one per principal: `homes/<principal>/<agent>`, sandboxed or
        not; for no principal (no authentication) `homes/<agent>` sandboxed, else the server's."""
        if config.home:
            return config.home
        if config.user:
            return _passwd(config.user).pw_dir
        if self._homes is None:
            return None
        if self.principal:
            return str(self._homes / principal_dir(self.principal) / config.name)
        if self.sandboxed(config):
            return str(self._homes / config.name)
        return None

    def spawn(self, config: AgentConfig, env: Mapping[str, str], workdir: WorkDir | None) -> Spawn:
        return self._confined(config, (config.command, *config.args), env, workdir, None)

    def wrap(
        self, config: AgentConfig, argv: Sequence[str], env: Mapping[str, str], workdir: WorkDir, cwd: WorkDir
    ) -> Spawn:
        """A command run for `config`'s agent (a client terminal), confined exactly like the agent:
        its user, and its sandbox over the session's directory `workdir`; started in `cwd` (a
        directory inside `workdir`, by descriptor when unsandboxed)."""
        return self._confined(config, tuple(argv), env, workdir, cwd)

    def _confined(
        self,
        config: AgentConfig,
        command: tuple[str, ...],
        env: Mapping[str, str],
        workdir: WorkDir | None,
        cwd: WorkDir | None,
    ) -> Spawn:
        problem = self.problem(config)
        if problem is not None:
            raise AgentUnavailable(problem, metadata={"agent": config.name})
        env = dict(env)
        user, group = _identity(config.user)
        home = self.home(config)
        if home is not None:
            if config.home or not config.user:  # a user's own home is theirs to make
                _make_home(home, user, group, self._homes)
            env["HOME"] = home
        # Another user's identity is taken by setpriv after the exec, not by the child between
        # fork and exec: a uid or groups for subprocess rule out vfork, and a plain fork of this
        # threaded server (gRPC's threads) can crash the child before it execs.
        identity = _setpriv(user, group)
        start = cwd if cwd is not None else workdir
        if not self.sandboxed(config):
            chdir = start.fd_path if start is not None else None  # chdir in the child, by descriptor
            return Spawn((*identity, *command), env, cwd=chdir)
        assert self.bwrap is not None
        options = self._bwrap_options(config, home, workdir, start.path if start is not None else None)
        network, first, box = self._network(config, user)
        sockets = [a for path in _agent_sockets.get() for a in ("--bind", path, path)]
        argv = [*identity, self.bwrap, *options, *network, *sockets, "--", *first, *command]
        fds = (workdir.fd,) if workdir is not None else ()
        return Spawn(tuple(argv), env, pass_fds=fds, network=box)

    def _network(
        self, config: AgentConfig, user: int | None
    ) -> tuple[list[str], list[str], SandboxNetwork | None]:
        """The sandbox's network: bwrap options (after the private /tmp, which the proxy's socket
        is bound into), the command run first inside it (the bridge to the proxy), and the
        handle of its socket on the proxy."""
        mode = config.network_mode
        if mode == "host":
            return [], [], None
        if mode != "proxy" or self.network is None:  # "none", or no proxy to go through: nothing
            return ["--unshare-net"], [], None
        # The session is the one being started (the log context), "" for an agent of none.
        session = logs._fields.get().get("session", "")
        box = self.network.open(config, self.principal, session, user)
        options = ["--unshare-net", "--bind", str(box.path), BRIDGE_SOCKET]
        return options, stdlib_script(_bridge_python(user), "bridge.py", BRIDGE_SOCKET, "--"), box

    def _bwrap_options(
        self, config: AgentConfig, home: str | None, workdir: WorkDir | None, chdir: str | None
    ) -> list[str]:
        options = ["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        options += ["--cap-drop", "ALL"]  # no capabilities, even when the server runs as root
        if not config.user and os.geteuid() == 0:
            # Not root inside (agents refuse or misuse root): nobody, mapped to our uid so that
            # its cwd and home stay writable. Still uid 0 to the host's permission checks, so
            # the allow-list below, not the uid, keeps it from root-owned files.
            uid, gid = _nobody()
            options += ["--unshare-user", "--uid", str(uid), "--gid", str(gid)]
        # The host's allow-list, what the agent's command needs (also under the private /tmp,
        # e.g. a virtualenv there) and its own paths, shallowest first; "/" in ro_paths (the
        # whole host) goes under /dev, /proc and /tmp. Then its home and cwd, and the masks.
        trees = [(Path(p), "--ro-bind") for p in SYSTEM_PATHS if os.path.lexists(p)]
        needed = (*map(Path, SYSTEM_PATHS_TRY), *_runtime_paths(config.command, bridge=not config.user))
        trees += [(p, "--ro-bind-try") for p in needed]
        trees += [(Path(p), "--ro-bind") for p in config.ro_paths]
        trees += [(Path(p), "--bind") for p in config.rw_paths]
        trees.sort(key=lambda tree: len(tree[0].parts))
        secrets = _with_real_paths(self._hidden)
        remounts: list[str] = []  # made read-only last: later mounts may need mount points there
        budget = [MAX_VIEW_ENTRIES]
        mounts = [(p, _tree(p, how, secrets, remounts, budget, config.name)) for p, how in trees]
        options[:0] = [a for p, arguments in mounts if p == Path("/") for a in arguments]
        options += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", PRIVATE_TMP]
        options += [a for p, arguments in mounts if p != Path("/") for a in arguments]
        options += self._own_and_masks(config, trees, home, workdir)
        options += [*remounts, "--remount-ro", "/"]  # the root itself: nothing to write there
        if chdir is not None:
            options += ["--chdir", chdir]
        return options

    def _own_and_masks(
        self, config: AgentConfig, trees: list[tuple[Path, str]], home: str | None, workdir: WorkDir | None
    ) -> list[str]:
        """The agent's home and cwd, and the masks over the server's secrets, shallowest first so
        that the deeper mount wins: a cwd containing the state dir does not show it (its mask
        comes after), a home or cwd inside it stays the agent's own (it comes after the mask).
        A secret directory becomes an empty tmpfs where it is visible. A secret file left out of
        the read-only views (`_tree`) may still show through a writable path (cwd, home,
        rw_paths): there the directory holding it becomes an empty tmpfs (not a bind over the
        file, which a rename would undo), and a secret right in such a path refuses the agent."""
        own = []
        if home is not None:
            own.append((Path(home), ["--bind-try", home, home]))
        if workdir is not None:
            own.append((Path(workdir.path), ["--bind-fd", str(workdir.fd), workdir.path]))
        writable = [p for p, how in trees if how == "--bind"] + [target for target, _ in own]
        shown = [*(p for p, _ in trees), *(target for target, _ in own)]
        empty = [Path(PRIVATE_TMP)]
        mounts: list[tuple[int, int, list[str]]] = []  # (depth, order on a tie, arguments)
        for secret in sorted((p for p in self._hidden if p.is_dir()), key=lambda p: len(p.parts)):
            if _visible(secret, shown, empty):
                empty.append(secret)
                mounts.append((len(secret.parts), 0, ["--tmpfs", str(secret)]))
        mounts += [(len(target.parts), 1, arguments) for target, arguments in own]
        files = [p for p in _with_real_paths(self._hidden) if p.exists() and not p.is_dir()]
        masked: set[Path] = set()
        for tree in writable:
            for secret in _inside(tree, files):
                if _covering(secret, [*shown, *empty]) != tree or secret.parent in masked:
                    continue  # a deeper mount shows it or not; its directory is masked already
                if secret.parent == tree:
                    raise AgentUnavailable(
                        f"agent {config.name!r} cannot start: a directory it may write holds a file the"
                        " server keeps from agents (its tokens file, TLS key, config or socket);"
                        " move that file out of every session directory, home and rw_paths",
                        metadata={"agent": config.name},
                    )
                masked.add(secret.parent)
                mounts.append((len(secret.parent.parts), 2, ["--tmpfs", str(secret.parent)]))
        return [argument for _, _, arguments in sorted(mounts, key=lambda m: m[:2]) for argument in arguments]


def _bridge_python(user: int | None) -> str:
    """The server's interpreter; for an agent run as another user, a system python3 where there
    is one (the server's may sit where that user cannot reach, as under /root)."""
    if user is not None:
        for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
            if os.access(candidate, os.X_OK):
                return candidate
    return sys.executable


def _visible(path: Path, shown: list[Path], empty: list[Path]) -> bool:
    """Whether the deepest mount over `path` shows the host (a bind) or not (a tmpfs, nothing)."""
    covering = _covering(path, [*shown, *empty])
    return covering is not None and covering not in empty


def _covering(path: Path, mounts: list[Path]) -> Path | None:
    """The deepest of `mounts` above `path`, if any."""
    above = [p for p in mounts if path.is_relative_to(p) and p != path]
    return max(above, key=lambda p: len(p.parts)) if above else None


def _with_real_paths(paths: Iterable[Path]) -> set[Path]:
    """`paths` as configured and where their symlinks lead, both absolute."""
    return {q for p in paths for q in (Path(os.path.abspath(p)), Path(os.path.realpath(p)))}


def _inside(tree: Path, secrets: Iterable[Path]) -> set[Path]:
    """The `secrets` under `tree` (or under where a symlinked tree leads), named as the sandbox
    shows them: under `tree`."""
    found = set()
    for base in {tree, Path(os.path.realpath(tree))}:
        found |= {tree / s.relative_to(base) for s in secrets if s != base and s.is_relative_to(base)}
    return found


def _tree(
    path: Path, how: str, secrets: set[Path], remounts: list[str], budget: list[int], agent: str
) -> list[str]:
    """One path of the host the agent sees. A system symlink stays a symlink. A read-only
    directory showing a secret (or, /etc, what only root may read) becomes a view without it:
    each directory from `path` down to the secret a read-only tmpfs of bind mounts of its other
    entries, so that a secret replaced by rename later is still not there."""
    if str(path) in SYSTEM_PATHS and path.is_symlink():
        return ["--symlink", os.readlink(path), str(path)]
    left_out = _inside(path, secrets) if how != "--bind" else set()
    if path == ETC:
        left_out |= _root_only(ETC)
    if not left_out or not path.is_dir():
        return [how, str(path), str(path)]
    arguments: list[str] = []
    try:
        _view(path, left_out, arguments, remounts, budget)
    except OSError as exc:
        if how.endswith("-try"):
            return []
        raise AgentUnavailable(
            f"agent {agent!r} cannot start: {path} cannot be read ({exc.strerror or exc})",
            metadata={"agent": agent},
        ) from None
    return arguments


def _view(
    directory: Path, left_out: set[Path], arguments: list[str], remounts: list[str], budget: list[int]
) -> None:
    arguments += ["--tmpfs", str(directory)]
    remounts += ["--remount-ro", str(directory)]
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = directory / entry.name
            if path in left_out:
                continue
            budget[0] -= 1
            if budget[0] < 0:
                raise OSError(f"over {MAX_VIEW_ENTRIES} entries beside the secrets left out")
            if entry.is_symlink():
                arguments += ["--symlink", os.readlink(path), str(path)]
            elif entry.is_dir() and any(p.is_relative_to(path) for p in left_out):
                _view(path, left_out, arguments, remounts, budget)
            else:
                arguments += ["--ro-bind", str(path), str(path)]


def _root_only(top: Path) -> set[Path]:
    """What under `top` a user other than its owner and group may not read (a file without o+r,
    a directory without o+rx, not looked into): `/etc/shadow`, SSH host keys, sudoers, TLS
    private keys, a database's password files. Symlinks are kept: they lead into the view."""
    found: set[Path] = set()
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                listed = list(entries)
        except OSError:
            found.add(directory)
            continue
        for entry in listed:
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                found.add(Path(entry.path))
                continue
            if stat.S_ISLNK(mode):
                continue
            need = 0o005 if stat.S_ISDIR(mode) else 0o004
            if mode & need != need:
                found.add(Path(entry.path))
            elif stat.S_ISDIR(mode):
                pending.append(Path(entry.path))
    return found


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


def _runtime_paths(command: str, bridge: bool) -> set[Path]:
    """What the command needs outside the system paths: its directory (and its target's); this
    interpreter and our code when the command is it (the built-in agent), the interpreter also
    for our network `bridge` (an agent with a `user` gets a system python, see _bridge_python).
    Those inside a system path or another of them are left out."""
    interpreter = {Path(sys.prefix), Path(sys.base_prefix)}
    paths = set(interpreter) if bridge else set()
    found = shutil.which(command)
    if found:
        paths |= {Path(found).parent, Path(os.path.realpath(found)).parent}
        if os.path.realpath(found) == os.path.realpath(sys.executable):
            paths |= {*interpreter, SOURCE_ROOT}
    resolved = {p.resolve() if p.exists() else p for p in paths}
    system = [Path(os.path.realpath(p)) for p in SYSTEM_PATHS]
    return {
        p
        for p in resolved
        if not any(p.is_relative_to(s) for s in system)
        and not any(p != q and p.is_relative_to(q) for q in resolved)
    }


def _setpriv(user: int | None, group: int | None) -> tuple[str, ...]:
    """The argv prefix that runs a command as `user` and `group` with no other groups."""
    if user is None:
        return ()
    ids = [f"--reuid={user}", *([f"--regid={group}"] if group is not None else []), "--clear-groups"]
    return (shutil.which(SETPRIV) or SETPRIV, *ids, "--")  # installed: problem() checked


def _identity(user: str) -> tuple[int | None, int | None]:
    if not user:
        return None, None
    entry = _passwd(user)
    return entry.pw_uid, entry.pw_gid


def _passwd(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise AgentUnavailable(f"user {user!r} does not exist", metadata={"user": user}) from None


def _make_home(home: str, user: int | None, group: int | None, homes: Path | None) -> None:
    try:
        if homes is not None and Path(home).is_relative_to(homes):
            _private_dirs(homes, Path(home))
        os.makedirs(home, mode=0o700, exist_ok=True)
        if user is not None:
            # Never through a symlink: whoever can write next to the home could point it at
            # /etc and have root hand it over.
            fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_uid != user:
                    os.fchown(fd, user, group if group is not None else -1)
            finally:
                os.close(fd)
    except OSError as exc:
        raise AgentUnavailable(
            f"the agent's home {home} cannot be made: {exc.strerror or exc}", metadata={"home": home}
        ) from None


def _private_dirs(base: Path, leaf: Path) -> None:
    """`base` and each directory down to `leaf` made 0700 (made only by us, so no other
    principal's agent can list or enter `homes/<principal>`), none of them a symlink."""
    base.parent.mkdir(parents=True, exist_ok=True)
    path = base
    for part in ("", *leaf.relative_to(base).parts):
        path = path / part if part else path
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise OSError(f"{path} is not a directory")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, 0o700)  # made by an older version: tighten it
