"""The SQLite store: the only module in hwledger that talks SQL.

Design notes (why, not what):
- WAL mode so CLI readers never block the server's writes and vice versa; one writer at a time is
  fine because every write transaction is short and never spans SSH or Ansible I/O.
- Every write transaction starts with `BEGIN IMMEDIATE`: the write lock is taken up front, so a
  writer waits (busy_timeout) instead of failing a lock upgrade half way through (a DEFERRED
  transaction that upgrades does not honour busy_timeout).
- `synchronous=FULL`: a job transition that was committed survives a power loss, not only a crash.
- Files are created under umask 077 and then forced to 0600; SQLite gives the -wal/-shm sidecars
  the mode of the database file, so they stay private whoever recreates them later.
- The schema is versioned with `PRAGMA user_version`; each migration runs in its own immediate
  transaction that re-reads the version, so two processes opening a fresh file cannot both migrate.
- The `events` table is append-only (triggers refuse UPDATE and DELETE).
- Nothing secret is stored: key *fingerprints* only, never key material.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hwledger.errors import UserError
from hwledger.paths import ensure_data_dir

SCHEMA_VERSION = 1
DEFAULT_BUSY_TIMEOUT_S = 15.0
DEFAULT_SNAPSHOTS_KEPT = 12  # per agent; the latest good snapshot is kept besides these

AGENT_STATES = ("pending", "online", "stale", "offline", "error", "host_key_changed", "removed")
JOB_STATES = ("queued", "dispatched", "running", "succeeded", "failed", "timed_out", "cancelled", "lost")
JOB_TERMINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled", "lost"})
JOB_ACTIVE_STATES = frozenset({"dispatched", "running"})


def _state_check(column: str, states: Sequence[str]) -> str:
    return f"CHECK ({column} IN ({', '.join(repr(s) for s in states)}))"


_MIGRATIONS: tuple[str, ...] = (
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
        state                TEXT NOT NULL DEFAULT 'pending' {_state_check('state', AGENT_STATES)},
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
)
assert len(_MIGRATIONS) == SCHEMA_VERSION


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds, the one timestamp format in the store."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def age_seconds(value: str | None, now: datetime | None = None) -> float | None:
    when = parse_time(value)
    if when is None:
        return None
    return max(0.0, ((now or datetime.now(timezone.utc)) - when).total_seconds())


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class AgentRecord:
    """What `register-ssh` knows about an agent."""

    name: str
    hostname: str
    port: int
    ssh_user: str
    key_path: str
    ip: str | None = None
    key_fingerprint: str | None = None
    host_key_fingerprint: str | None = None
    bastion: str | None = None
    bastion_host_key_fingerprint: str | None = None


@dataclass(frozen=True)
class AgentRow:
    name: str
    hostname: str
    ip: str | None
    port: int
    ssh_user: str
    key_path: str
    key_fingerprint: str | None
    host_key_fingerprint: str | None
    bastion: str | None
    bastion_host_key_fingerprint: str | None
    registered_at: str
    state: str
    state_reason: str | None
    state_msg: str | None
    state_since: str
    last_seen: str | None
    last_attempt: str | None
    consecutive_misses: int
    last_snapshot_id: int | None
    removed_at: str | None


@dataclass(frozen=True)
class JobRow:
    id: str
    agent: str
    spec: dict
    state: str
    created_at: str
    updated_at: str
    dispatched_at: str | None
    started_at: str | None
    finished_at: str | None
    attempts: int
    timeout_s: float | None
    cancel_requested: bool
    exit_code: int | None
    result: dict | None
    error: str | None
    run_dir: str | None
    remote_dir: str | None
    cleanup_pending: bool

    @property
    def terminal(self) -> bool:
        return self.state in JOB_TERMINAL_STATES


@dataclass(frozen=True)
class SnapshotRow:
    id: int
    agent: str
    recorded_at: str
    ok: bool
    reason: str | None
    msg: str | None
    data: dict | None


@dataclass(frozen=True)
class EventRow:
    id: int
    at: str
    kind: str
    agent: str | None
    job_id: str | None
    detail: dict


@dataclass(frozen=True)
class HeartbeatRecord:
    """One host's outcome of one tick, as the server decided it."""

    agent: str
    ok: bool
    snapshot: dict | None = None
    reason: str | None = None
    msg: str | None = None


@dataclass(frozen=True)
class AgentUpdate:
    """The server's decision for one agent after a heartbeat (see `Store.record_heartbeats`)."""

    state: str
    consecutive_misses: int
    reason: str | None = None
    msg: str | None = None
    seen: bool = False  # the host answered (even if its GPU tool failed)


@dataclass(frozen=True)
class StateChange:
    agent: str
    old: str
    new: str
    reason: str | None
    msg: str | None


_JOB_UPDATABLE = {
    "dispatched_at", "started_at", "finished_at", "attempts", "exit_code", "result", "error", "run_dir",
    "remote_dir", "cleanup_pending", "cancel_requested",
}


class StoreError(UserError):
    """The store cannot be used (newer schema, unreadable file, locked too long)."""


# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _private_files(db: Path) -> list[Path]:
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


class Store:
    """One connection to the store. Use one per thread (sqlite3 connections are not shared)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, snapshots_kept: int):
        self._conn = conn
        self.path = path
        self.snapshots_kept = snapshots_kept

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        snapshots_kept: int = DEFAULT_SNAPSHOTS_KEPT,
    ) -> "Store":
        path = Path(path)
        ensure_data_dir(path.parent)
        if path.is_symlink():
            raise StoreError(f"store {path} is a symlink; point HWLEDGER_DB/--db at the real file")
        try:
            with _umask(0o077):
                # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE).
                conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"store {path}: cannot switch to WAL mode (got {mode}); "
                                     "is it on a network filesystem? Put the store on a local disk")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
                store = cls(conn, path, snapshots_kept)
                store._migrate()
                # Reading once creates the -shm file under our umask before we fix modes.
                conn.execute("SELECT count(*) FROM agents").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        for file in _private_files(path):
            with contextlib.suppress(FileNotFoundError):
                if file.stat().st_mode & 0o077:
                    os.chmod(file, 0o600)
        return store

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """An immediate write transaction; commits on success, rolls back on any exception."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"store {self.path} is busy ({exc}); another hwledger process holds it too long, "
                             "try again") from exc
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than this hwledger understands "
                f"({SCHEMA_VERSION}); upgrade hwledger or use another --db"
            )
        while version < SCHEMA_VERSION:
            with self._write() as conn:
                # Re-read under the write lock: another process may have migrated meanwhile.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version >= SCHEMA_VERSION:
                    break
                for statement in _split_sql(_MIGRATIONS[version]):
                    conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # -- events ----------------------------------------------------------------------------

    @staticmethod
    def _event(conn: sqlite3.Connection, kind: str, *, agent: str | None = None, job_id: str | None = None,
               at: str | None = None, **detail: Any) -> None:
        conn.execute(
            "INSERT INTO events (at, kind, agent, job_id, detail) VALUES (?, ?, ?, ?, ?)",
            (at or utc_now(), kind, agent, job_id, json.dumps(detail, sort_keys=True)),
        )

    def add_event(self, kind: str, *, agent: str | None = None, job_id: str | None = None, **detail: Any) -> None:
        with self._write() as conn:
            self._event(conn, kind, agent=agent, job_id=job_id, **detail)

    def list_events(self, *, agent: str | None = None, job_id: str | None = None, kind: str | None = None,
                    limit: int | None = None) -> list[EventRow]:
        where, params = _where(agent=agent, job_id=job_id, kind=kind)
        sql = f"SELECT id, at, kind, agent, job_id, detail FROM events{where} ORDER BY id"
        if limit:
            sql = f"SELECT * FROM ({sql.replace('ORDER BY id', 'ORDER BY id DESC')} LIMIT {int(limit)}) ORDER BY id"
        return [EventRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"))
                for r in self._conn.execute(sql, params)]

    # -- agents ----------------------------------------------------------------------------

    def upsert_agent(self, record: AgentRecord) -> None:
        """Record a (re-)registration. A previously removed agent of that name starts afresh."""
        now = utc_now()
        with self._write() as conn:
            conn.execute(
                """
                INSERT INTO agents (name, hostname, ip, port, ssh_user, key_path, key_fingerprint,
                                    host_key_fingerprint, bastion, bastion_host_key_fingerprint,
                                    registered_at, state, state_since)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)
                ON CONFLICT (name) DO UPDATE SET
                    hostname = excluded.hostname, ip = excluded.ip, port = excluded.port,
                    ssh_user = excluded.ssh_user, key_path = excluded.key_path,
                    key_fingerprint = excluded.key_fingerprint,
                    host_key_fingerprint = excluded.host_key_fingerprint,
                    bastion = excluded.bastion,
                    bastion_host_key_fingerprint = excluded.bastion_host_key_fingerprint,
                    registered_at = excluded.registered_at, state = 'pending', state_since = excluded.state_since,
                    state_reason = NULL, state_msg = NULL, consecutive_misses = 0, removed_at = NULL
                """,
                (record.name, record.hostname, record.ip, record.port, record.ssh_user, record.key_path,
                 record.key_fingerprint, record.host_key_fingerprint, record.bastion,
                 record.bastion_host_key_fingerprint, now, now),
            )
            self._event(conn, "agent_registered", agent=record.name, at=now,
                        hostname=record.hostname, port=record.port, ssh_user=record.ssh_user, ip=record.ip,
                        key_fingerprint=record.key_fingerprint, host_key_fingerprint=record.host_key_fingerprint,
                        bastion=record.bastion)

    def mark_agent_removed(self, name: str) -> bool:
        """Mark the agent removed (its row and history stay; its snapshots go). False if unknown."""
        now = utc_now()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE agents SET state = 'removed', state_since = ?, removed_at = ?, last_snapshot_id = NULL "
                "WHERE name = ? AND state != 'removed'",
                (now, now, name),
            )
            if cur.rowcount == 0:
                return False
            conn.execute("DELETE FROM snapshots WHERE agent = ?", (name,))
            self._event(conn, "agent_removed", agent=name, at=now)
            return True

    def get_agent(self, name: str) -> AgentRow | None:
        row = self._conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)).fetchone()
        return AgentRow(*row) if row else None

    def list_agents(self, *, include_removed: bool = False) -> list[AgentRow]:
        where = "" if include_removed else " WHERE state != 'removed'"
        return [AgentRow(*r) for r in self._conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents{where} ORDER BY name")]

    def set_agent_state(self, name: str, state: str, *, reason: str | None = None, msg: str | None = None) -> bool:
        if state not in AGENT_STATES:
            raise ValueError(f"unknown agent state {state!r}")
        now = utc_now()
        with self._write() as conn:
            old = conn.execute("SELECT state FROM agents WHERE name = ?", (name,)).fetchone()
            if old is None or old[0] == "removed":
                return False
            conn.execute(
                "UPDATE agents SET state = ?, state_reason = ?, state_msg = ?, state_since = "
                "CASE WHEN state = ? THEN state_since ELSE ? END WHERE name = ?",
                (state, reason, msg, state, now, name),
            )
            if old[0] != state:
                self._event(conn, "agent_state", agent=name, at=now, old=old[0], new=state, reason=reason, msg=msg)
            return True

    def record_heartbeats(
        self,
        records: Sequence[HeartbeatRecord],
        decide: Callable[[AgentRow, HeartbeatRecord], AgentUpdate],
    ) -> list[StateChange]:
        """Record one tick's outcomes in one transaction and apply the server's state decisions.

        `decide(current_row, record)` runs under the write lock, so the read-modify-write of the
        miss counter cannot race another writer. Agents removed meanwhile are skipped.
        """
        now = utc_now()
        changes: list[StateChange] = []
        with self._write() as conn:
            for record in records:
                row = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE name = ?", (record.agent,)).fetchone()
                if row is None or row[_AGENT_FIELDS.index("state")] == "removed":
                    continue
                current = AgentRow(*row)
                update = decide(current, record)
                snapshot_id = conn.execute(
                    "INSERT INTO snapshots (agent, recorded_at, ok, reason, msg, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (record.agent, now, int(record.ok), record.reason, record.msg,
                     json.dumps(record.snapshot, sort_keys=True) if record.snapshot is not None else None),
                ).lastrowid
                conn.execute(
                    """
                    UPDATE agents SET state = ?, state_reason = ?, state_msg = ?,
                        state_since = CASE WHEN state = ? THEN state_since ELSE ? END,
                        consecutive_misses = ?, last_attempt = ?,
                        last_seen = CASE WHEN ? THEN ? ELSE last_seen END,
                        last_snapshot_id = CASE WHEN ? THEN ? ELSE last_snapshot_id END
                    WHERE name = ?
                    """,
                    (update.state, update.reason, update.msg, update.state, now, update.consecutive_misses, now,
                     int(update.seen), now, int(record.ok and record.snapshot is not None), snapshot_id, record.agent),
                )
                if current.state != update.state:
                    changes.append(StateChange(record.agent, current.state, update.state, update.reason, update.msg))
                    self._event(conn, "agent_state", agent=record.agent, at=now, old=current.state,
                                new=update.state, reason=update.reason, msg=update.msg)
                self._prune_snapshots(conn, record.agent)
        return changes

    def _prune_snapshots(self, conn: sqlite3.Connection, agent: str) -> None:
        """Keep the newest `snapshots_kept` rows per agent, plus the latest good one (status needs it)."""
        conn.execute(
            """
            DELETE FROM snapshots WHERE agent = ?1 AND id <= (
                SELECT id FROM snapshots WHERE agent = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)
              AND id IS NOT (SELECT last_snapshot_id FROM agents WHERE name = ?1)
            """,
            (agent, self.snapshots_kept),
        )

    def latest_snapshot(self, agent: str) -> SnapshotRow | None:
        """The latest good snapshot (GPU data) of the agent, whatever happened after it."""
        row = self._conn.execute(
            "SELECT s.id, s.agent, s.recorded_at, s.ok, s.reason, s.msg, s.data FROM snapshots s "
            "JOIN agents a ON a.last_snapshot_id = s.id WHERE a.name = ?",
            (agent,),
        ).fetchone()
        return _snapshot(row) if row else None

    def list_snapshots(self, agent: str, *, limit: int = 100) -> list[SnapshotRow]:
        rows = self._conn.execute(
            "SELECT id, agent, recorded_at, ok, reason, msg, data FROM snapshots WHERE agent = ? "
            "ORDER BY id DESC LIMIT ?",
            (agent, limit),
        )
        return [_snapshot(r) for r in rows]

    # -- jobs ------------------------------------------------------------------------------

    def submit_job(self, agent: str, spec: dict, *, job_id: str | None = None,
                   timeout_s: float | None = None) -> JobRow:
        job_id = job_id or str(uuid.uuid4())
        now = utc_now()
        with self._write() as conn:
            known = conn.execute("SELECT state FROM agents WHERE name = ?", (agent,)).fetchone()
            if known is None or known[0] == "removed":
                raise UserError(f"no registered agent named {agent!r}; see `hwledger fleet list`")
            try:
                conn.execute(
                    "INSERT INTO jobs (id, agent, spec, state, created_at, updated_at, timeout_s) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                    (job_id, agent, json.dumps(spec, sort_keys=True), now, now, timeout_s),
                )
            except sqlite3.IntegrityError as exc:
                raise UserError(f"a job with id {job_id} already exists; give the job a new job_id") from exc
            self._event(conn, "job_state", agent=agent, job_id=job_id, at=now, old=None, new="queued")
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> JobRow | None:
        row = self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def find_job(self, prefix: str) -> JobRow | None:
        """A job by full id or by a unique id prefix (at least 4 characters), as `git` does."""
        job = self.get_job(prefix)
        if job or len(prefix) < 4:
            return job
        rows = self._conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
            (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
        ).fetchall()
        if len(rows) > 1:
            raise UserError(f"job id prefix {prefix!r} is ambiguous; give more characters")
        return _job(rows[0]) if rows else None

    def list_jobs(self, *, agent: str | None = None, states: Iterable[str] | None = None,
                  newest: int | None = None) -> list[JobRow]:
        """Jobs oldest first; with `newest`, only the newest N of them (chosen by SQL, not in Python)."""
        where, params = _where(agent=agent)
        states = list(states or [])
        if states:
            where += (" AND " if where else " WHERE ") + f"state IN ({', '.join('?' * len(states))})"
            params += states
        if newest is None:
            sql = f"SELECT {_JOB_COLUMNS} FROM jobs{where} ORDER BY created_at, id"
            return [_job(r) for r in self._conn.execute(sql, params)]
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs{where} ORDER BY created_at DESC, id DESC LIMIT ?"
        return [_job(r) for r in reversed(self._conn.execute(sql, [*params, int(newest)]).fetchall())]

    def transition_job(self, job_id: str, from_states: Iterable[str], to_state: str, **fields: Any) -> bool:
        """Compare-and-set a job's state (and ride-along columns) in one committed transaction.

        Returns False, changing nothing, when the job is not in one of `from_states` (another
        process moved it first: e.g. a cancel raced a dispatch). The change and its event are on
        disk when this returns True, so the caller may act on it.
        """
        if to_state not in JOB_STATES:
            raise ValueError(f"unknown job state {to_state!r}")
        unknown = set(fields) - _JOB_UPDATABLE
        if unknown:
            raise ValueError(f"not updatable job fields: {sorted(unknown)}")
        from_states = list(from_states)
        now = utc_now()
        if to_state in JOB_TERMINAL_STATES:
            fields.setdefault("finished_at", now)
        values = {k: _job_value(k, v) for k, v in fields.items()}
        sets = "".join(f", {k} = ?" for k in values)
        with self._write() as conn:
            row = conn.execute("SELECT state, agent FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in from_states:
                return False
            conn.execute(
                f"UPDATE jobs SET state = ?, updated_at = ?{sets} WHERE id = ?",
                (to_state, now, *values.values(), job_id),
            )
            detail = {k: v for k, v in fields.items() if k in ("error", "exit_code", "remote_dir", "attempts")}
            self._event(conn, "job_state", agent=row[1], job_id=job_id, at=now, old=row[0], new=to_state, **detail)
        return True

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Change ride-along columns without a state change (e.g. the remote dir once it is known)."""
        unknown = set(fields) - _JOB_UPDATABLE
        if unknown:
            raise ValueError(f"not updatable job fields: {sorted(unknown)}")
        values = {k: _job_value(k, v) for k, v in fields.items()}
        with self._write() as conn:
            conn.execute(
                f"UPDATE jobs SET updated_at = ?{''.join(f', {k} = ?' for k in values)} WHERE id = ?",
                (utc_now(), *values.values(), job_id),
            )
            if "remote_dir" in fields:
                row = conn.execute("SELECT agent FROM jobs WHERE id = ?", (job_id,)).fetchone()
                self._event(conn, "job_remote_dir", agent=row[0] if row else None, job_id=job_id,
                            remote_dir=fields["remote_dir"])

    def request_cancel(self, job_id: str) -> str:
        """Cancel a job. Returns the job's state afterwards.

        A queued or dispatched job is cancelled at once: nothing of it has started (a worker's
        dispatched -> running compare-and-set then fails, so it never starts). A running one is flagged
        and the server stops it (and records `cancelled`); a finished one is left as it is.
        """
        now = utc_now()
        with self._write() as conn:
            row = conn.execute("SELECT state, agent FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UserError(f"no job {job_id}")
            state, agent = row
            if state in ("queued", "dispatched"):
                why = "cancelled before dispatch" if state == "queued" else "cancelled before it started"
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, updated_at = ?, finished_at = ?, "
                    "error = ? WHERE id = ?", (now, now, why, job_id))
                self._event(conn, "job_state", agent=agent, job_id=job_id, at=now, old=state, new="cancelled",
                            error=why)
                return "cancelled"
            if state in JOB_ACTIVE_STATES:
                conn.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id))
                self._event(conn, "job_cancel_requested", agent=agent, job_id=job_id, at=now)
            return state

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def next_queued_job(self, agent: str) -> JobRow | None:
        row = self._conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE agent = ? AND state = 'queued' ORDER BY created_at, id LIMIT 1",
            (agent,),
        ).fetchone()
        return _job(row) if row else None


# ---------------------------------------------------------------------------------------------
# Row helpers

_AGENT_FIELDS = [f.name for f in AgentRow.__dataclass_fields__.values()]
_AGENT_COLUMNS = ", ".join(_AGENT_FIELDS)
_JOB_FIELDS = [f.name for f in JobRow.__dataclass_fields__.values()]
_JOB_COLUMNS = ", ".join(_JOB_FIELDS)


def _job(row: Sequence[Any]) -> JobRow:
    values = dict(zip(_JOB_FIELDS, row))
    values["spec"] = json.loads(values["spec"])
    values["result"] = json.loads(values["result"]) if values["result"] else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["cleanup_pending"] = bool(values["cleanup_pending"])
    return JobRow(**values)


def _job_value(key: str, value: Any) -> Any:
    if key == "result" and value is not None:
        return json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return int(value)
    return value


def _snapshot(row: Sequence[Any]) -> SnapshotRow:
    return SnapshotRow(row[0], row[1], row[2], bool(row[3]), row[4], row[5], json.loads(row[6]) if row[6] else None)


def _where(**equals: Any) -> tuple[str, list[Any]]:
    parts = [(k, v) for k, v in equals.items() if v is not None]
    if not parts:
        return "", []
    return " WHERE " + " AND ".join(f"{k} = ?" for k, _value in parts), [v for _key, v in parts]


def _split_sql(script: str) -> list[str]:
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
