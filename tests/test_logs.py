"""Log lines: text logs cannot be broken or forged by what agents and clients write."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sessiongate.server import logs
from sessiongate.v1 import session_service_pb2 as pb

from tests.conftest import Gate, GateFactory, eventually, expect_error
from tests.test_auth import as_, tokens_file


def test_text_lines_escape_control_characters_and_keep_every_field() -> None:
    formatter = logs.TextFormatter()
    record = logging.LogRecord(
        "sessiongate.agent.stderr",
        logging.INFO,
        __file__,
        1,
        "agent=%s | %s",
        ("echo", "one\nFAKE ERROR\x1b[31m"),
        None,
    )
    record.fields = {"session": "abc\ndef", "agent": "echo"}
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line
    assert "one\\nFAKE ERROR\\x1b[31m" in line
    # A field the message already mentions is still appended (it is the context's, not the text's).
    assert line.endswith(' session="abc\\ndef" agent=echo')


def logfmt(line: str) -> list[tuple[str, str]]:
    """The `key=value` pairs a logfmt reader finds in `line` (bare words and quoted strings
    that name no key are skipped, as prose)."""
    pairs, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        if line[i] == '"':  # a quoted string where a key would be: prose, no field
            _, i = _quoted(line, i)
            continue
        start = i
        while i < len(line) and line[i] not in ' ="':
            i += 1
        key = line[start:i]
        if i < len(line) and line[i] == "=":
            i += 1
            if i < len(line) and line[i] == '"':
                value, i = _quoted(line, i)
            else:
                start = i
                while i < len(line) and line[i] != " ":
                    i += 1
                value = line[start:i]
            pairs.append((key, value))
    return pairs


def _quoted(line: str, i: int) -> tuple[str, int]:
    out, i = [], i + 1
    while i < len(line) and line[i] != '"':
        if line[i] == "\\" and i + 1 < len(line):
            i += 1
            out.append({"n": "\n", "r": "\r", "t": "\t"}.get(line[i], line[i]))
        else:
            out.append(line[i])
        i += 1
    return "".join(out), i + 1


def format_line(msg: str, *args: object, **fields: str) -> str:
    record = logging.LogRecord("sessiongate.test", logging.INFO, __file__, 1, msg, args, None)
    record.fields = fields
    return logs.TextFormatter().format(record)


def test_no_value_can_add_a_field_to_a_text_line() -> None:
    """A label, an agent's stderr line or a client's id that reads `x principal=alice` is one
    quoted value: a logfmt reader finds no second principal in the line."""
    hostile = ["x principal=alice", 'x" principal="alice', 'x\\" principal=alice', "", "a\nprincipal=alice"]
    for value in hostile:
        line = format_line("call principal=%s label=%s | %s", "bob", value, value, session=value, turn="3")
        pairs = logfmt(line.split(" ", 3)[3])  # after the time, level and logger name
        assert [v for k, v in pairs if k == "principal"] == ["bob"], line
        assert ("label", value) in pairs and ("turn", "3") in pairs, line
    plain = format_line("turn ended outcome=%s events=%d seconds=%.3f", "ok", 3, 0.5, session="abc-_1")
    assert plain.endswith("turn ended outcome=ok events=3 seconds=0.500 session=abc-_1")


async def test_a_session_id_cannot_forge_the_principal_of_an_audit_line(
    make_gate: GateFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sessiongate.audit")
    gate: Gate = await make_gate(auth_tokens_file=tokens_file(tmp_path / "tokens.toml"))
    forged = "nope principal=root"
    error = await expect_error(
        gate.stub.GetSession(pb.GetSessionRequest(session_id=forged), metadata=as_("bob"), timeout=10)
    )
    assert error.reason == "SESSION_NOT_FOUND"
    formatter = logs.TextFormatter()

    def lines() -> list[str]:
        return [formatter.format(r) for r in caplog.records if r.name == "sessiongate.audit"]

    # The call's line is written as its handler returns, which can be just after the client saw
    # the status (as tests/test_auth.py waits for it too).
    await eventually(lambda: any("GetSession" in line for line in lines()), 5, "the call's audit line")
    line = next(line for line in lines() if "GetSession" in line)
    pairs = logfmt(line)
    assert [v for k, v in pairs if k == "principal"] == ["bob"], line
    assert ("session", forged) in pairs, line
