"""Secrets kept at rest: a Fernet key file and the box that seals and opens values with it.

Client-supplied MCP servers (their env and header values may be API tokens) are stored in the
session's record sealed by a `SecretBox`, and opened at each agent start. The key lives in its
own file (`mcp_key_file`, default `mcp.key` beside the state database), made 0600 on the
first start (written whole, then linked: two servers starting at once never write two keys)
and read afterwards; agents never see it (the launcher hides it like the tokens file).
Fernet (AES-128-CBC with an HMAC-SHA256) is `cryptography`'s: nothing home-made.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sessiongate.server.settings import ConfigError

KEY_BYTES_MAX = 1024  # a Fernet key is 44 characters; a bigger file is not one


class SecretUnreadable(Exception):
    """A sealed value this box cannot open (another key, or damaged)."""


class SecretBox:
    """Seals and opens values with one Fernet key."""

    def __init__(self, key: bytes | None = None, path: Path | None = None) -> None:
        self._fernet = Fernet(key) if key is not None else None
        self._path = path  # where the key is read (or made) at its first use, without `key`

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    @classmethod
    def at(cls, path: Path) -> SecretBox:
        """The box of the key in `path`, read (or made) by `ready()` or its first use: a server
        makes it once its store has made the state directory, which reports a directory that
        cannot be made."""
        return cls(path=path)

    @classmethod
    def from_key_file(cls, path: Path) -> SecretBox:
        """The box of the key in `path`, made there (0600) when there is no file yet; a file that
        does not hold a Fernet key is a ConfigError naming it (never showing its content)."""
        box = cls.at(path)
        box.ready()
        return box

    def ready(self) -> None:
        """Read the key, or make it when there is no file yet (see from_key_file)."""
        if self._fernet is not None:
            return
        assert self._path is not None, "a SecretBox has a key or a key file"
        key = _read_or_create(self._path)
        try:
            self._fernet = Fernet(key.strip())
        except ValueError:
            raise ConfigError(
                f"{self._path} is not a Fernet key (mcp_key_file: 32 url-safe base64-encoded bytes);"
                " restore the right one, or move it away to make a new key (stored client MCP"
                " servers then cannot be read)"
            ) from None

    def _key(self) -> Fernet:
        self.ready()
        assert self._fernet is not None
        return self._fernet

    def seal(self, data: bytes) -> str:
        """`data` encrypted and authenticated: one Fernet token (ASCII)."""
        return self._key().encrypt(data).decode("ascii")

    def open(self, token: str) -> bytes:
        """What `seal` sealed; SecretUnreadable when this key did not seal it or it was altered."""
        try:
            return self._key().decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise SecretUnreadable("a sealed value cannot be opened with this key") from None


def _read_or_create(path: Path) -> bytes:
    """The key in `path`, or a new one put there whole: written to a private temporary file
    (0600, O_EXCL) and linked into place, so a concurrent start reads either no file or the
    complete key, and of two starts racing only one key wins (link never replaces)."""
    if path.exists():
        return _read(path)
    key = Fernet.generate_key()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return _read(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the MCP key file {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):  # never hides what went wrong above
            temporary.unlink(missing_ok=True)
    return key


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as source:
            data = source.read(KEY_BYTES_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the MCP key file {path}: {exc.strerror}") from None
    return data if len(data) <= KEY_BYTES_MAX else b""
