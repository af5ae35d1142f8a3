"""How an agent process is started: unconfined, or in a bubblewrap sandbox.

An agent runs tools a model chose, with whatever its process can reach. Sandboxed
(`sandbox = "bwrap"`, the default where Debian's `bubblewrap` is installed), it sees:
- the root file system read-only, a private `/tmp`, its own `/dev` and `/proc`;
- its own PID namespace, so `/proc` shows no server process (no `/proc/<pid>/environ`);
- the session's cwd read-write (bound through the checked directory's descriptor, so a
  symlink swapped in after the check cannot move it), its home read-write, and the extra
  `ro_paths`/`rw_paths` configured for it;
- a home of the session owner's own: `<state dir>/homes/<principal>/<agent>` (see `home()`),
  never another principal's, whose transcripts, logins and hook-running settings live there;
- none of the server's secrets: the state directory (other sessions, the database) is an
  empty tmpfs, the tokens file and TLS key are /dev/null;
- its network (`network`): "proxy" (the default) a namespace of its own whose one way out is
  our filtering proxy, reaching only `allowed_domains` at public addresses (network_proxy.py);
  "none" only a loopback of its own; "host" the host's, all of it (said at start);
- no capabilities, even when the server runs as root;
- `--die-with-parent`: it ends with the server.
The process is the leader of its own process group, as unsandboxed agents are, so stopping
it (SIGTERM, then SIGKILL to the group) works the same way. A sandbox is made for one cwd,
so sandboxed agents get no warm spares.
"""

from __future__ import annotations

import contextlib
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

from server import logs
from server.errors import AgentUnavailable
from server.network_proxy import NetworkProxy, bridge_command
from server.settings import AgentConfig
from server.workdir import WorkDir

BWRAP_PACKAGE = "bubblewrap"  # Debian's package, `apt-get install bubblewrap`


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


PRIVATE_TMP = "/tmp"
BRIDGE_SOCKET = "/tmp/.sessiongate-proxy.sock"  # the network proxy's socket, inside the sandbox
SETPRIV = "setpriv"  # util-linux: takes another user's identity, then execs
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the built-in agent's code
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # a principal name used as it is

# The principal an agent is being made for: the owner of its session, set by the holder around
# the start (which may run in a task no caller's principal is in, or an admin's), read when the
# agent is made. "" (no authentication, or an agent made for no session: a spare, a login).
_home_owner: ContextVar[str] = ContextVar("sessiongate_home_owner", default="")


@contextmanager
def homes_of(owner: str) -> Iterator[None]:
    """Agents made inside get `owner`'s homes (and spares of another home are not used)."""
    token = _home_owner.set(owner)
    try:
        yield
    finally:
        _home_owner.reset(token)


def home_owner() -> str:
    return _home_owner.get()


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


class Launcher:
    """Turns an agent's config (and its session's checked directory) into a `Spawn`."""

    def __init__(
        self,
        bwrap: str | None = None,
        hidden: Iterable[Path] = (),
        homes: Path | None = None,
        principal: str = "",
    ) -> None:
        self.bwrap = bwrap  # the bwrap executable, or None where it is not installed
        self._hidden = tuple(Path(p) for p in hidden)  # the server's secrets, kept from agents
        self._homes = homes  # where agents without `home` or `user` get one of their own
        self.principal = principal  # whose agents these are ("": no one's, no authentication)
        self.network: NetworkProxy | None = None  # network = "proxy" goes through it; None: no network

    def for_principal(self, principal: str) -> Launcher:
        """This launcher for the agents (and their terminals) of `principal`'s sessions."""
        launcher = Launcher(self.bwrap, self._hidden, self._homes, principal)
        launcher.network = self.network
        return launcher

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
        network, first = self._network(config, user)
        argv = [*identity, self.bwrap, *options, *network, "--", *first, *command]
        fds = (workdir.fd,) if workdir is not None else ()
        return Spawn(tuple(argv), env, pass_fds=fds)

    def _network(self, config: AgentConfig, user: int | None) -> tuple[list[str], list[str]]:
        """The sandbox's network: bwrap options (after the private /tmp, which the proxy's socket
        is bound into), and the command run first inside it (the bridge to the proxy)."""
        mode = config.network_mode
        if mode == "host":
            return [], []
        if mode != "proxy" or self.network is None:  # "none", or no proxy to go through: nothing
            return ["--unshare-net"], []
        # The session is the one being started (the log context), "" for an agent of none.
        session = logs._fields.get().get("session", "")
        path = self.network.open(config, self.principal, session, user)
        return ["--unshare-net", "--bind", str(path), BRIDGE_SOCKET], bridge_command(
            _bridge_python(user), BRIDGE_SOCKET
        )

    def _bwrap_options(
        self, config: AgentConfig, home: str | None, workdir: WorkDir | None, chdir: str | None
    ) -> list[str]:
        options = ["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        options += ["--cap-drop", "ALL"]  # no capabilities, even when the server runs as root
        options += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", PRIVATE_TMP]
        # What the agent's own command needs where the private /tmp covered it (e.g. a
        # virtualenv under /tmp), read-only; then its paths, home and cwd.
        binds = [
            (p, "--ro-bind-try", str(p))
            for p in _runtime_paths(config.command)
            if p.is_relative_to(PRIVATE_TMP)
        ]
        binds += [(Path(p), "--ro-bind", p) for p in config.ro_paths]
        binds += [(Path(p), "--bind", p) for p in config.rw_paths]
        for target, how, source in binds:
            options += [how, source, str(target)]
        options += self._own_and_masks(binds, home, workdir)
        if chdir is not None:
            options += ["--chdir", chdir]
        return options

    def _own_and_masks(
        self, binds: list[tuple[Path, str, str]], home: str | None, workdir: WorkDir | None
    ) -> list[str]:
        """The agent's home and cwd, and the masks over the server's secrets, shallowest first so
        that the deeper mount wins: a cwd containing the state dir does not show it (its mask
        comes after), a home or cwd inside it stays the agent's own (it comes after the mask).
        Directories become an empty tmpfs, files /dev/null; each only where it is visible."""
        own = []
        if home is not None:
            own.append((Path(home), ["--bind-try", home, home]))
        if workdir is not None:
            own.append((Path(workdir.path), ["--bind-fd", str(workdir.fd), workdir.path]))
        shown = [Path("/"), *(target for target, _, _ in binds), *(target for target, _ in own)]
        empty = [Path(PRIVATE_TMP)]
        mounts: list[tuple[int, int, list[str]]] = []  # (depth, order on a tie, arguments)
        for secret in sorted((p for p in self._hidden if p.is_dir()), key=lambda p: len(p.parts)):
            if _visible(secret, shown, empty):
                empty.append(secret)
                mounts.append((len(secret.parts), 0, ["--tmpfs", str(secret)]))
        mounts += [(len(target.parts), 1, arguments) for target, arguments in own]
        for secret in self._hidden:
            if not secret.is_dir() and secret.exists() and _visible(secret, shown, empty):
                mounts.append((len(secret.parts), 2, ["--ro-bind", "/dev/null", str(secret)]))
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
    """Whether the deepest mount over `path` shows the host (a bind, the root) or not (a tmpfs)."""
    covering = max(
        (p for p in (*shown, *empty) if path.is_relative_to(p) and p != path), key=lambda p: len(p.parts)
    )
    return covering not in empty


def _runtime_paths(command: str) -> set[Path]:
    """The command's directory (and its target's), and this interpreter's, with our code."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), SOURCE_ROOT}
    found = shutil.which(command)
    if found:
        paths |= {Path(found).parent, Path(os.path.realpath(found)).parent}
    return {p.resolve() if p.exists() else p for p in paths}


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
