"""The PostgreSQL schema and its versioned migrations (the SQLite ones are in store.py).

Several replicas may start at once against one database: each brings the schema up to date
inside one transaction holding an advisory lock, so exactly one of them runs a step and the
others then find it done. PostgreSQL's DDL is transactional: a step that fails leaves the
database as it was, version number included.
"""

from __future__ import annotations

import asyncpg
from sessiongate.server.state.base import StoreError

# pg_advisory_xact_lock key: "sgschema" as a number, unlikely to collide with an application's.
MIGRATION_LOCK = 0x7367736368656D61

REQUEST_ID_INDEX = "sessions_owner_request"

# Each version's step from the one before. Version 1 is the SQLite schema at its version 4
# (sessions with their principals and agent state, turns and their events).
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE sessions (
    session_id       TEXT PRIMARY KEY,
    agent            TEXT NOT NULL,
    cwd              TEXT NOT NULL,
    labels           TEXT NOT NULL,
    state            TEXT NOT NULL,
    agent_session_id TEXT NOT NULL,
    request_id       TEXT NOT NULL,
    create_time      DOUBLE PRECISION NOT NULL,
    last_active_time DOUBLE PRECISION NOT NULL,
    agent_info       TEXT NOT NULL,
    owner            TEXT NOT NULL DEFAULT '',
    agent_state      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX sessions_request_id ON sessions (request_id) WHERE request_id != '';
CREATE TABLE turns (
    turn_id    TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    started    DOUBLE PRECISION NOT NULL,
    ended      DOUBLE PRECISION,
    state      TEXT NOT NULL,
    first_seq  BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL,
    record     BYTEA NOT NULL,
    failure    BYTEA
);
CREATE INDEX turns_by_session ON turns (session_id, started, turn_id);
CREATE TABLE turn_events (
    turn_id TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    event   BYTEA NOT NULL,
    PRIMARY KEY (turn_id, seq)
);
""",
    # Replicas: each registers with a lease; each session has a leaseholder replica and an epoch (the
    # fencing token every write of the session checks). '' owns nothing: released on drain.
    2: """
CREATE TABLE replicas (
    replica_id  TEXT PRIMARY KEY,
    advertise   TEXT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL,
    free_slots  INTEGER NOT NULL DEFAULT 0
);
ALTER TABLE sessions ADD COLUMN replica TEXT NOT NULL DEFAULT '';
ALTER TABLE sessions ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
CREATE INDEX sessions_by_replica ON sessions (replica);
""",
    # One session per principal's request id over all replicas (a retried CreateSession through
    # another replica finds it; two racing ones cannot both store theirs).
    3: f"""
CREATE UNIQUE INDEX {REQUEST_ID_INDEX} ON sessions (owner, request_id) WHERE request_id != '';
""",
    # Tombstones: a closed session's record (store.Tombstone) for its retention, so a CloseSession
    # retried after a restart or through another replica answers the same.
    4: """
CREATE TABLE closed_sessions (
    session_id  TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    closed_time DOUBLE PRECISION NOT NULL,
    record      TEXT NOT NULL
);
CREATE INDEX closed_sessions_by_time ON closed_sessions (closed_time);
""",
    # Quotas over all replicas (quotas.py): a principal's sessions are counted by their `owner`
    # column, and its prompts of the last minute are kept as timestamps (the database's clock),
    # pruned as it prompts.
    5: """
CREATE INDEX sessions_by_owner ON sessions (owner);
CREATE TABLE prompt_times (
    principal TEXT NOT NULL,
    sent      TIMESTAMPTZ NOT NULL
);
CREATE INDEX prompt_times_by_principal ON prompt_times (principal, sent);
""",
}
SCHEMA_VERSION = max(MIGRATIONS)


async def migrate(db: asyncpg.Connection, migrations: dict[int, str] = MIGRATIONS) -> int:
    """Bring the database up to date; the version it was at."""
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS sessiongate_schema (version INTEGER NOT NULL)")
        found = await db.fetchval("SELECT max(version) FROM sessiongate_schema")
        version = int(found or 0)
        latest = max(migrations)
        if version > latest:
            raise StoreError(f"schema version {version} is newer than this server's {latest}")
        for step in range(version + 1, latest + 1):
            try:
                async with db.transaction():  # a savepoint: the error names the step
                    await db.execute(migrations[step])
                    await db.execute("INSERT INTO sessiongate_schema (version) VALUES ($1)", step)
            except asyncpg.PostgresError as exc:
                raise StoreError(
                    f"cannot bring the session database from schema version {step - 1} to {step}: {exc};"
                    " it is left as it was"
                ) from exc
    return version
