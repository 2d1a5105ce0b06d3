"""The store's schema: states and the migrations that build its tables (applied by `base.StoreBase`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

SCHEMA_VERSION = 2

# `degraded`: the host answers, but a GPU it had is missing (fell off the bus).
AGENT_STATES = ("pending", "online", "degraded", "stale", "offline", "error", "host_key_changed", "removed")
JOB_STATES = ("queued", "dispatched", "running", "succeeded", "failed", "timed_out", "cancelled", "lost")
JOB_TERMINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled", "lost"})
JOB_ACTIVE_STATES = frozenset({"dispatched", "running"})


def _state_check(column: str, states: Sequence[str]) -> str:
    return f"CHECK ({column} IN ({', '.join(repr(s) for s in states)}))"


# A migration never changes once released: v1 keeps the states it was written with.
_V1_AGENT_STATES = ("pending", "online", "stale", "offline", "error", "host_key_changed", "removed")
_AGENT_V1_COLUMNS = (
    "name, hostname, ip, port, ssh_user, key_path, key_fingerprint, host_key_fingerprint, bastion, "
    "bastion_host_key_fingerprint, registered_at, state, state_reason, state_msg, state_since, last_seen, "
    "last_attempt, consecutive_misses, last_snapshot_id, removed_at"
)

MIGRATIONS: tuple[str, ...] = (
    # v1
    f"""
    CREATE TABLE agents (
        name                 TEXT PRIMARY KEY,
        hostname             TEXT NOT NULL,
        ip                   TEXT,
        port                 INTEGER NOT NULL,
        ssh_user             TEXT NOT NULL,
        key_path             TEXT NOT NULL,
        key_fingerprint      TEXT,
        host_key_fingerprint TEXT,
        bastion              TEXT,
        bastion_host_key_fingerprint TEXT,
        registered_at        TEXT NOT NULL,
        state                TEXT NOT NULL DEFAULT 'pending' {_state_check('state', _V1_AGENT_STATES)},
        state_reason         TEXT,
        state_msg            TEXT,
        state_since          TEXT NOT NULL,
        last_seen            TEXT,
        last_attempt         TEXT,
        consecutive_misses   INTEGER NOT NULL DEFAULT 0,
        last_snapshot_id     INTEGER,
        removed_at           TEXT
    );
    CREATE TABLE snapshots (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        agent       TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        ok          INTEGER NOT NULL,
        reason      TEXT,
        msg         TEXT,
        data        TEXT
    );
    CREATE INDEX snapshots_by_agent ON snapshots(agent, id);
    CREATE TABLE jobs (
        id               TEXT PRIMARY KEY,
        agent            TEXT NOT NULL,
        spec             TEXT NOT NULL,
        state            TEXT NOT NULL {_state_check('state', JOB_STATES)},
        created_at       TEXT NOT NULL,
        updated_at       TEXT NOT NULL,
        dispatched_at    TEXT,
        started_at       TEXT,
        finished_at      TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        timeout_s        REAL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        exit_code        INTEGER,
        result           TEXT,
        error            TEXT,
        run_dir          TEXT,
        remote_dir       TEXT,
        cleanup_pending  INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_by_agent_state ON jobs(agent, state, created_at);
    CREATE INDEX jobs_by_state ON jobs(state);
    CREATE TABLE events (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        at     TEXT NOT NULL,
        kind   TEXT NOT NULL,
        agent  TEXT,
        job_id TEXT,
        detail TEXT
    );
    CREATE INDEX events_by_job ON events(job_id, id);
    CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    """,
    # v2: the reliability work. agents: the `degraded` state (SQLite cannot alter a CHECK, so the table is
    # rebuilt), when an offline agent is dialled next (backoff), coalesced state events of a flapping
    # agent (and an index to find its recent ones), and the GPUs it is expected to have. jobs: how many attempts a job may take, and when its
    # command was launched on the host (an attempt counts from there).
    f"""
    CREATE TABLE agents_v2 (
        name                 TEXT PRIMARY KEY,
        hostname             TEXT NOT NULL,
        ip                   TEXT,
        port                 INTEGER NOT NULL,
        ssh_user             TEXT NOT NULL,
        key_path             TEXT NOT NULL,
        key_fingerprint      TEXT,
        host_key_fingerprint TEXT,
        bastion              TEXT,
        bastion_host_key_fingerprint TEXT,
        registered_at        TEXT NOT NULL,
        state                TEXT NOT NULL DEFAULT 'pending' {_state_check('state', AGENT_STATES)},
        state_reason         TEXT,
        state_msg            TEXT,
        state_since          TEXT NOT NULL,
        last_seen            TEXT,
        last_attempt         TEXT,
        consecutive_misses   INTEGER NOT NULL DEFAULT 0,
        last_snapshot_id     INTEGER,
        removed_at           TEXT,
        next_attempt_at      TEXT,
        state_events_coalesced INTEGER NOT NULL DEFAULT 0,
        expected_gpus        TEXT
    );
    INSERT INTO agents_v2 ({_AGENT_V1_COLUMNS}) SELECT {_AGENT_V1_COLUMNS} FROM agents;
    DROP TABLE agents;
    ALTER TABLE agents_v2 RENAME TO agents;
    CREATE INDEX events_by_agent ON events(agent, kind, id);
    ALTER TABLE jobs ADD COLUMN max_attempts INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN launched_at TEXT;
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION


def split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (BEGIN ... END;) whole."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
