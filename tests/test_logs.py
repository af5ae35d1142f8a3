"""Log lines: text logs cannot be broken or forged by what agents and clients write."""

from __future__ import annotations

import logging

from server import logs


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
    assert line.endswith(" session=abc\\ndef agent=echo")
