"""The store's schema: states and the migrations that build its tables (applied by `base.StoreBase`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

SCHEMA_VERSION = 5

# `degraded`: the host answers, but a GPU it had is missing (fell off the bus).
AGENT_STATES = ("pending", "online", "degraded", "stale", "offline", "error", "host_key_changed", "removed")
JOB_STATES = ("queued", "dispatched", "running", "succeeded", "failed", "timed_out", "cancelled", "lost")
JOB_TERMINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled", "lost"})
JOB_ACTIVE_STATES = frozenset({"dispatched", "running"})
# The page's free-memory sparklines: one row per agent, GPU and minute, kept for this long.
HISTORY_MINUTES = 60
# `hwledger fleet prune` never removes an event younger than this, whatever it is asked (see v2).
MIN_EVENT_AGE_DAYS = 1


def _states_list(states) -> str:
    return ", ".join(repr(s) for s in sorted(states))


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
    # v3: retention (`hwledger fleet prune`) and what `serve --http` reads.
    #
    # Events stay append-only for everything younger than the prune's cut. The pruner writes its cut into
    # `prune_gate` and deletes in the same transaction, then empties the gate before it commits, so no
    # committed state ever holds a cut; without a row there no event can be deleted at all, and with one
    # only the events older than it. The gate itself refuses a cut younger than MIN_EVENT_AGE_DAYS.
    #
    # `job_totals` counts jobs as they finish (a trigger, so every writer counts: the server, `job cancel`,
    # `fleet remove`); pruning old jobs does not lower it, so it can be a Prometheus counter.
    #
    # `gpu_memory_history` is the page's last hour of free memory, one row per agent, GPU and minute (the
    # least free seen in that minute). A trigger on snapshots fills it and trims the agent's rows older than
    # HISTORY_MINUTES in the same transaction, so it stays bounded (about 61 rows per GPU) whoever writes
    # snapshots; the snapshots table itself keeps only the newest few per agent.
    f"""
    CREATE TABLE prune_gate (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        events_before TEXT NOT NULL
    );
    CREATE TRIGGER prune_gate_spares_recent_events BEFORE INSERT ON prune_gate
        WHEN new.events_before > strftime('%Y-%m-%dT%H:%M:%f', 'now', '-{MIN_EVENT_AGE_DAYS} days')
        BEGIN SELECT RAISE(ABORT, 'events younger than {MIN_EVENT_AGE_DAYS} day(s) are never pruned'); END;
    DROP TRIGGER events_append_only_delete;
    CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
        WHEN NOT EXISTS (SELECT 1 FROM prune_gate WHERE old.at < prune_gate.events_before)
        BEGIN SELECT RAISE(ABORT, 'events are append-only (hwledger fleet prune removes old ones)'); END;
    CREATE TABLE job_totals (
        state    TEXT PRIMARY KEY,
        finished INTEGER NOT NULL
    );
    INSERT INTO job_totals (state, finished)
        SELECT state, count(*) FROM jobs WHERE state IN ({_states_list(JOB_TERMINAL_STATES)}) GROUP BY state;
    CREATE TRIGGER jobs_count_finished AFTER UPDATE OF state ON jobs
        WHEN new.state IN ({_states_list(JOB_TERMINAL_STATES)})
         AND old.state NOT IN ({_states_list(JOB_TERMINAL_STATES)})
        BEGIN
            INSERT INTO job_totals (state, finished) VALUES (new.state, 1)
                ON CONFLICT (state) DO UPDATE SET finished = finished + 1;
        END;
    CREATE TABLE gpu_memory_history (
        agent       TEXT NOT NULL,
        gpu         INTEGER NOT NULL,
        minute      TEXT NOT NULL,
        free_bytes  INTEGER,
        total_bytes INTEGER,
        PRIMARY KEY (agent, gpu, minute)
    ) WITHOUT ROWID;
    CREATE TRIGGER snapshots_feed_history AFTER INSERT ON snapshots
        WHEN new.ok AND new.data IS NOT NULL
        BEGIN
            INSERT INTO gpu_memory_history (agent, gpu, minute, free_bytes, total_bytes)
                SELECT new.agent, json_extract(g.value, '$.index'), substr(new.recorded_at, 1, 16),
                       json_extract(g.value, '$.memory_free_bytes'), json_extract(g.value, '$.memory_total_bytes')
                FROM json_each(new.data, '$.gpus') AS g
                WHERE json_type(g.value, '$.index') = 'integer'
                ON CONFLICT (agent, gpu, minute) DO UPDATE SET
                    free_bytes = min(coalesce(free_bytes, excluded.free_bytes),
                                     coalesce(excluded.free_bytes, free_bytes)),
                    total_bytes = coalesce(excluded.total_bytes, total_bytes);
            DELETE FROM gpu_memory_history WHERE agent = new.agent
                AND minute < strftime('%Y-%m-%dT%H:%M', new.recorded_at, '-{HISTORY_MINUTES} minutes');
        END;
    """,
    # v4: placement (`hwledger job submit --agent auto --min-free-vram ...`, hwledger.placement).
    #
    # `placement`: where a job with `resources` was placed and why (JSON: agent, backend, gpus [{index, uuid,
    # name, free_bytes}], env, why, snapshot_at, request), written in the same transaction as its queued ->
    # dispatched step. While the job is dispatched or running it is the job's claim on those GPUs: a
    # restarted server reads the claims back from here, and a claim ends when the job leaves those states
    # (no row to delete, so no path that ends a job can forget it). NULL for a job without resources (it
    # holds its whole agent).
    # `placement_note`: why a queued job is not placed yet (JSON: text, agent of the best candidate),
    # written only when it changes.
    """
    ALTER TABLE jobs ADD COLUMN placement TEXT CHECK (placement IS NULL OR json_valid(placement));
    ALTER TABLE jobs ADD COLUMN placement_note TEXT CHECK (placement_note IS NULL OR json_valid(placement_note));
    """,
    # v5: running jobs' logs (`hwledger job logs -f`; hwledger/job_logs.py). `job_logs` holds what the heartbeats
    # read of each job's output, in order (`seq`), as raw bytes per stream, plus hwledger's own notes (bytes
    # lost to the host's log rotation, output dropped here). It is bounded per job by the writer (the oldest
    # rows go first; `job_log_cursors.dropped_*` says how much and up to where). `job_log_cursors` is where the
    # reading of the job's log on its host stands: the private dir it belongs to, the file generation and
    # offset, and how many bytes of each stream are in hand; durable, so a restarted server reads on. Both go
    # with their job (pruning, `ON DELETE CASCADE`).
    """
    CREATE TABLE job_logs (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        seq    INTEGER NOT NULL,
        stream TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr', 'note')),
        at     TEXT NOT NULL,
        data   BLOB NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE job_log_cursors (
        job_id         TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
        remote_dir     TEXT NOT NULL,
        generation     INTEGER NOT NULL DEFAULT 0,
        log_offset     INTEGER NOT NULL DEFAULT 0,
        stdout_pos     INTEGER NOT NULL DEFAULT 0,
        stderr_pos     INTEGER NOT NULL DEFAULT 0,
        next_seq       INTEGER NOT NULL DEFAULT 1,
        kept_bytes     INTEGER NOT NULL DEFAULT 0,
        dropped_bytes  INTEGER NOT NULL DEFAULT 0,
        dropped_to_seq INTEGER NOT NULL DEFAULT 0
    );
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
