"""The README's (and docs/**/*.md's) shell blocks run as written, against a server of the test's own.

Each file gets one `sessiongate-server` (the default configuration, as `make run` serves it)
on an ephemeral port, with its own state and HOME; `:50051` in a command becomes that port,
and a session id the file shows in an earlier command's output becomes the one that command
really returned. Blocks that cannot run unattended say so with a marker (tests/markdown_blocks.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.markdown_blocks import Block, Command, looks_like_shell, parse, python_program

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
# docs/benchmarks.md is written by `make bench`: results, no commands to run.
DOCS = ROOT / "docs"
FILES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if p != DOCS / "benchmarks.md")]
COMMAND_TIMEOUT = 60
ADDRESS = re.compile(r"\b(localhost|127\.0\.0\.1|0\.0\.0\.0):50051\b")
ID_FIELDS = ("session_id", "request_id")
EXIT_LINE = re.compile(r"^exit \d+$", re.M)
EXIT_COMMENT = re.compile(r'echo "exit \$\?".*#.*\bexit (\d+)')
# A plain command whose comment starts with a status code (`# Unauthenticated: ...`) fails with it.
CODE_COMMENT = re.compile(
    r"#\s*(Cancelled|Unknown|InvalidArgument|DeadlineExceeded|NotFound|AlreadyExists|PermissionDenied|"
    r"ResourceExhausted|FailedPrecondition|Aborted|OutOfRange|Unimplemented|Internal|Unavailable|"
    r"Unauthenticated)\b"
)


def _ids(key: str, text: str) -> list[str]:
    return re.findall(rf'"{key}":\s*"([^"]+)"', text)


def _volatile(token: str) -> bool:
    """An id, hash or version the file shows as an example: not compared."""
    return any(
        len(part) >= 12 and re.search(r"\d", part) and re.search(r"[A-Za-z]", part)
        for part in re.split(r"[.-]", token)
    )


# A folded message chunk event's line, as the files show grpcurl's output: `{ "seq": "5",
# "message_chunk": { "content": { "text": { "text": "hello" } } } }`.
CHUNK_LINE = re.compile(r'"message_chunk":.*"text":\s*"([^"]*)"')


def salient(expected: str) -> list[str]:
    """The words of the shown output a real run must print too, in order: not ids, times,
    numbers or absolute paths (which differ per run), nor the `...` of an elision. Of a
    message chunk's line only its text counts: how an agent's text is cut into events varies
    with timing (text that comes within the event gap, as on a busy machine, leaves merged)."""
    expected = "\n".join(
        match.group(1) if (match := CHUNK_LINE.search(line)) else line for line in expected.splitlines()
    )
    text = re.sub(r"(?<![\w.])/[\w./-]+", " ", expected)
    words = (w.rstrip(".-") for w in re.findall(r"\b[A-Za-z_][\w.-]*", text))
    return [w for w in words if w and not _volatile(w)]


@dataclass
class Shell:
    """One emulated interactive shell: its variables and cwd carry over between commands."""

    env: dict[str, str]
    cwd: Path
    state: Path

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        env_file, cwd_file = self.state / "env", self.state / "cwd"
        keep = f"env -0 > {shlex.quote(str(env_file))}; pwd > {shlex.quote(str(cwd_file))}"
        script = f"trap 'rc=$?; {keep}; exit $rc' EXIT\nset -a\n{command}\n"
        # Its own process group: a command that outlives its bound is ended with all it started.
        process = subprocess.Popen(
            ["bash", "-c", script],
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # anything it left running in the background
            process.wait()
        done = subprocess.CompletedProcess(process.args, process.returncode, output)
        if env_file.exists():
            pairs = (item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
            self.env = {k: v for k, v in pairs if k not in ("_", "SHLVL", "PWD", "OLDPWD")}
            self.cwd = Path(cwd_file.read_text().strip())
        return done.returncode, done.stdout


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """Ctrl-C, as the reader stops it; what is left of it after a bound is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def as_make_run(tmp_path: Path) -> tuple[Server, int, dict[str, str]]:
    """The server as `make run` serves it (the default configuration: the built-in agent,
    reflection on) in a HOME and state directory of its own, and a reader's shell environment
    (the virtualenv active, no SESSIONGATE_* of ours)."""
    home, work, state = tmp_path / "home", tmp_path / "work", tmp_path / "state"
    for directory in (home, work, state):
        directory.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONGATE_") and k != "VIRTUAL_ENV"}
    path_var = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"  # as `. .venv/bin/activate` does
    env.update(PATH=path_var, HOME=str(home), XDG_STATE_HOME=str(state))
    argv = [str(VENV_BIN / "sessiongate-server"), "--listen", "127.0.0.1:0"]
    server, port = start_server(argv, env, work, tmp_path / "server.log")
    return server, port, env


def start_server(argv: list[str] | str, env: dict[str, str], cwd: Path, log: Path) -> tuple[Server, int]:
    """Start a server in its own process group and wait (bounded) for its 'serving on' line."""
    shell = isinstance(argv, str)
    command: list[str] = ["bash", "-c", f"set -a\nexec {argv}"] if isinstance(argv, str) else argv
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(process, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"serving on \S+ \(port (\d+)\)", log.read_text(errors="replace"))
        if match:
            return server, int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    server.stop()
    what = f"`{argv}`" if shell else "the test's server"
    raise AssertionError(f"{what} did not start serving:\n{log.read_text(errors='replace')[-3000:]}")


@dataclass
class Walk:
    """A file's blocks run in order, with what the reader's shells would hold."""

    base_env: dict[str, str]
    port: int
    tmp: Path
    shells: dict[int, Shell] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def shell(self, number: int) -> Shell:
        if number not in self.shells:
            state = self.tmp / f"shell{number}"
            state.mkdir()
            self.shells[number] = Shell(dict(self.base_env), ROOT, state)
        return self.shells[number]

    def substitute(self, text: str) -> str:
        text = ADDRESS.sub(lambda m: f"{m.group(1)}:{self.port}", text)
        for shown, real in self.ids.items():
            text = text.replace(shown, real)
        return text

    def run(self, block: Block, command: Command, shell: Shell) -> None:
        where = f"{block.path.relative_to(ROOT)}:{command.line}"
        code, output = shell.run(self.substitute(command.text))
        shown = f"{where}: `{command.text}`"
        clipped = output[-3000:]
        status = CODE_COMMENT.search(command.text)
        expect_failure = status or (
            re.search(r"^(ERROR:|error:)", command.expected, re.M)
            and not re.search(r'echo "exit \$\?"\s*$', command.text)
        )
        if status:
            _check(status.group(1) in output, f"{shown}: no {status.group(1)} in its output:\n{clipped}")
        if expect_failure:
            _check(code != 0, f"{shown} exited 0, but the file shows it failing:\n{clipped}")
        else:
            _check(code == 0, f"{shown} exited {code}:\n{clipped}")
        position = 0
        for word in salient(command.expected):
            found = output.find(word, position)
            _check(found >= 0, f"{shown}: its output lacks {word!r} (in order) shown in the file:\n{clipped}")
            position = found + len(word)
        exits = EXIT_LINE.findall(command.expected)
        exits += [f"exit {n}" for n in EXIT_COMMENT.findall(command.text)]
        for line in exits:
            _check(bool(re.search(rf"^{line}$", output, re.M)), f"{shown}: no `{line}` in:\n{clipped}")
        for key in ID_FIELDS:  # the ids the file shows stand for the ones really returned
            pairs = zip(_ids(key, command.expected), _ids(key, output), strict=False)
            self.ids.update((s, r) for s, r in pairs if s != r)


def _check(ok: bool, message: str) -> None:
    """Fail naming the file, line and command, without the runner's locals."""
    if not ok:
        pytest.fail(message, pytrace=False)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_blocks_are_tagged_and_markers_understood(path: Path) -> None:
    """A shell session in an untagged block would be missed; a marker the test does not know
    would silently run a block meant to be skipped (or the reverse)."""
    problems = []
    for block in parse(path):
        if looks_like_shell(block):
            problems.append(f"{block.where}: a shell session in an untagged block: tag it ```console")
        if block.marker is not None and (problem := block.marker_problem()):
            problems.append(f"{block.where}: {problem}")
    assert not problems, "\n".join(problems)


def test_markdown_conventions_parse(tmp_path: Path) -> None:
    """Continuations, heredocs, markers, prompts and their output, on a small file."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```sh\necho one \\\n  two\ncat <<EOF\nx\nEOF\n```\n\n"
        "<!-- readme-test: skip (needs a person) -->\n\n```console\n$ read x\n```\n"
        '```console\n$ false; echo "exit $?"\nexit 1\n$ echo \'{"session_id": "anBaLm2EDfMuiMYTvVeov5lC"}\'\n'
        '{ "session_id": "anBaLm2EDfMuiMYTvVeov5lC" }\n```\n'
    )
    first, skipped, prompted = parse(doc)
    assert [c.text for c in first.commands] == ["echo one \\\n  two", "cat <<EOF\nx\nEOF"]
    assert skipped.skip_reason == "needs a person"
    assert [(c.line, c.expected) for c in prompted.commands] == [
        (15, "exit 1"),
        (17, '{ "session_id": "anBaLm2EDfMuiMYTvVeov5lC" }'),
    ]
    assert salient(prompted.commands[1].expected) == ["session_id"]


def test_salient_words_leave_out_what_differs_per_run() -> None:
    shown = '"cwd": "/path/you/started/it/in", "agent_session_id": "echo-988d065e5e9f493f846d0e2959e67135"'
    assert salient(shown) == ["cwd", "agent_session_id"]
    assert salient("grpc.health.v1.Health\n-- end_turn · 6 in / 6 out tokens") == [
        "grpc.health.v1.Health",
        "end_turn",
        "in",
        "out",
        "tokens",
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_blocks_run_as_written(path: Path, tmp_path: Path) -> None:
    blocks = [b for b in parse(path) if b.is_shell or (b.lang == "python" and python_program(b))]
    runnable = [b for b in blocks if b.skip_reason is None]
    if not runnable:
        pytest.skip(f"{path.name}: " + ("every shell block is marked skip" if blocks else "no shell blocks"))
    server, port, env = as_make_run(tmp_path)
    env["SESSIONGATE_TARGET"] = f"localhost:{port}"  # the CLI's default target is the README's port
    walk = Walk(env, port, tmp_path)
    try:
        for block in runnable:
            shell = walk.shell(block.shell)
            commands = block.commands
            if block.lang == "python":
                commands = [Command(block.line + 1, f"python3 - <<'EOF'\n{block.text}\nEOF")]
            elif "server" in block.options:
                commands = commands[:-1]
            for command in commands:
                walk.run(block, command, shell)
            if "server" in block.options:
                server.stop()  # the reader stops the server before starting this one
                last = block.commands[-1]
                server, _ = start_server(
                    walk.substitute(last.text), shell.env, shell.cwd, tmp_path / f"server-{last.line}.log"
                )
    finally:
        server.stop()


def test_a_shown_message_chunks_words_count_whatever_the_chunking() -> None:
    shown = '{ "seq": "5", "message_chunk": { "content": { "text": { "text": "hello" } } } }\n'
    shown += '{ "seq": "6", "message_chunk": { "content": { "text": { "text": " from" } } } }\n'
    shown += '{ "seq": "7", "result": { "stop_reason": "STOP_REASON_END_TURN" } }'
    assert salient(shown) == ["hello", "from", "seq", "result", "stop_reason", "STOP_REASON_END_TURN"]


def test_shown_commands_give_a_token_in_one_word() -> None:
    """A random token (secrets.token_urlsafe) starts with "-" one time in 64, and `--token
    "$TOKEN"` then reads it as an option (exit 2: "expected one argument"); `--token="$TOKEN"`
    takes any token. Once, a run of running-for-others.md drew such a token."""
    split = re.compile(r"--token\s+[\"'$]")
    shown = [block for path in FILES for block in parse(path)]  # every code block, not the prose
    assert len(shown) > 10  # the parse found the files' blocks
    found = [f"{block.where}: {match.group(0)}" for block in shown for match in split.finditer(block.text)]
    assert not found, found
