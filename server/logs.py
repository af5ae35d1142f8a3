"""Structured logs: logfmt `key=value` text (default) or one JSON object per line.

The session, agent and turn being worked on travel in a context variable, so every log
line written while handling a session carries them, including the agent's stderr lines
(its reader task inherits the context of the start that spawned it). Prompt text is
never logged by sessiongate; agent stderr is logged as the agent wrote it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar

_fields: ContextVar[dict[str, str]] = ContextVar("sessiongate_log_fields", default={})  # noqa: B039


def bind(**fields: object) -> None:
    """Add fields to every log line of the current task (and of tasks it starts from now on)."""
    _fields.set({**_fields.get(), **{k: str(v) for k, v in fields.items()}})


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = _fields.get()
        return True


# Characters that would break a text log line or forge a new one: C0/C1 controls, DEL, and
# Unicode's own line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """One log line's worth of `text`: control characters and line breaks escaped."""
    return _UNSAFE.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


# A value a logfmt reader takes as one bare token: anything else is quoted.
_BARE = re.compile(r'[^\s="\\\x00-\x1f\x7f-\x9f\u2028\u2029]+')


def quote(value: str) -> str:
    """`value` as one logfmt value: bare when it is a plain token, else double-quoted with `\\`
    and `"` escaped (and controls, as `escape`), so no text can end it early and add fields."""
    if _BARE.fullmatch(value):
        return value
    return '"' + escape(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _quoted(arg: object) -> object:
    """A message argument as its logfmt value; numbers stay numbers (for %d and %.3f)."""
    return arg if isinstance(arg, int | float) else quote(str(arg))


class TextFormatter(logging.Formatter):
    """logfmt lines. Every value from outside (a message's arguments: agent stderr, paths, ids,
    errors; and the context's fields) is one quoted logfmt value, so none of it can break or
    forge a line, or add a field (`session=<another's> principal=alice`); tracebacks are our own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        original = record.msg, record.args
        record.msg, record.args = escape(_message(record)), None
        try:
            line = super().format(record)
        finally:
            record.msg, record.args = original
        fields = getattr(record, "fields", {})
        return line + "".join(f" {k}={quote(str(v))}" for k, v in fields.items())


def _message(record: logging.LogRecord) -> str:
    args = record.args
    if not args:
        return str(record.msg)
    try:
        if isinstance(args, Mapping):
            return str(record.msg) % {k: _quoted(v) for k, v in args.items()}
        return str(record.msg) % tuple(_quoted(a) for a in args)
    except (TypeError, ValueError):  # a malformed call: logging's own message, whole, quoted
        return quote(record.getMessage())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
