"""Fenced blocks of the project's Markdown files, as a reader pastes them into a shell.

A shell block (```sh, ```bash, ```console) is run unless the line before it (blank lines
aside) is a marker saying otherwise:

    <!-- readme-test: skip (why it cannot run unattended) -->
    <!-- readme-test: shell 2 -->            run in a second shell (its own cwd and variables)
    <!-- readme-test: server -->             its last command is a server: start it in the
                                             background (stopping the one before, as Ctrl-C)
    <!-- readme-test: shell 2, server -->    both

Lines starting `$ ` are commands (with `\\` continuations) and the lines after one, up to
the next, its output; without them every line is a command (heredocs and continuations
kept together). A python block that parses as a module is run as `python3 -`; one that
does not (top-level `await`, a fragment) is not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SHELL_LANGS = {"sh", "bash", "console", "shell"}
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


@dataclass
class Command:
    line: int  # 1-based line of the command in its file
    text: str
    expected: str = ""  # the output the file shows after it


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None
    commands: list[Command] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def options(self) -> set[str]:
        return {part.strip() for part in (self.marker or "").split(",") if part.strip()}

    @property
    def skip_reason(self) -> str | None:
        match = re.fullmatch(r"skip \((.+)\)", self.marker or "")
        return match.group(1) if match else None

    @property
    def shell(self) -> int:
        numbers = [int(m.group(1)) for o in self.options if (m := re.fullmatch(r"shell (\d+)", o))]
        return numbers[0] if numbers else 1

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS

    def marker_problem(self) -> str | None:
        """Why the marker is not understood, if it is not."""
        if self.marker is None or self.skip_reason:
            return None
        known = {"server"} | {o for o in self.options if re.fullmatch(r"shell \d+", o)}
        unknown = self.options - known
        return f"unknown readme-test marker {self.marker!r}" if unknown or not self.options else None


def parse(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        text = "\n".join(lines[start + 1 : end])
        block = Block(path, start + 1, match.group(1), text, marker and marker.group(1))
        block.commands = _commands(block.text, start + 2)
        blocks.append(block)
        i = end + 1
    return blocks


def looks_like_shell(block: Block) -> bool:
    """An untagged block with `$ ` prompts: a shell session that should say so."""
    return block.lang == "" and any(line.startswith("$ ") for line in block.text.splitlines())


def python_program(block: Block) -> bool:
    try:
        compile(block.text, block.where, "exec")  # top-level await: a fragment
    except SyntaxError:
        return False
    return True


def _commands(text: str, first_line: int) -> list[Command]:
    lines = text.splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if prompted and not line.startswith("$ "):
            if commands:
                commands[-1].expected += line + "\n"
            i += 1
            continue
        if not prompted and (not line.strip() or line.lstrip().startswith("#")):
            i += 1
            continue
        start = i
        body = [line[2:] if prompted else line]
        while body[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            body.append(lines[i])
        for heredoc in HEREDOC.finditer("\n".join(body)):
            while i + 1 < len(lines) and lines[i].strip() != heredoc.group(2):
                i += 1
                body.append(lines[i])
        commands.append(Command(first_line + start, "\n".join(body)))
        i += 1
    for command in commands:
        command.expected = command.expected.strip("\n")
    return commands
