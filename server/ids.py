"""Ids the gateway makes for clients to name things by: sessions, turns, questions."""

from __future__ import annotations

import secrets


def opaque_id(random_bytes: int) -> str:
    """`random_bytes` random bytes, URL-safe, never starting with "-": an id a client pastes into
    a shell (`sessiongate respond-tool SID ID`) must not read as an option there."""
    while (made := secrets.token_urlsafe(random_bytes)).startswith("-"):
        pass
    return made
