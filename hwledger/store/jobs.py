"""The jobs table: submitting, finding, listing and the compare-and-set state transitions."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable
from typing import Any

from ansible_collections.hwledger.fleet.plugins.plugin_utils.agent_values import RESERVED_AGENT_NAME

from hwledger.errors import UserError
from hwledger.store.job_env import redacted_spec_json
from hwledger.store.records import JOB_COLUMNS, JOB_UPDATABLE, JobRow, job_row, job_value, utc_now
from hwledger.store.records import where as where_clause
from hwledger.store.schema import JOB_ACTIVE_STATES, JOB_STATES, JOB_TERMINAL_STATES

# `--max-attempts` above this is a mistake (a job that fails the same way a hundred times will not succeed).
MAX_ATTEMPTS_LIMIT = 100


class JobTables:
    """Jobs (mixed into `Store`). Every state change is one committed transaction with its event.

    A job's env values leave the store as soon as no attempt can need them (`job_env`): at its end, and at
    the launch of its last allowed attempt. Each such removal is followed by a WAL checkpoint that truncates
    the -wal file, so the old row does not linger there either (`truncate_wal`)."""

    def submit_job(self, agent: str, spec: dict, *, job_id: str | None = None,
                   timeout_s: float | None = None, max_attempts: int = 1) -> JobRow:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) \
                or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise UserError(f"max attempts must be a whole number from 1 to {MAX_ATTEMPTS_LIMIT}, got {max_attempts!r}")
        job_id = job_id or str(uuid.uuid4())
        now = utc_now()
        with self._write() as conn:
            known = conn.execute("SELECT state FROM agents WHERE name = ?", (agent,)).fetchone()
            if agent != RESERVED_AGENT_NAME and (known is None or known[0] == "removed"):  # auto: placed at dispatch
                raise UserError(f"no registered agent named {agent!r}; see `hwledger fleet list`")
            try:
                conn.execute(
                    "INSERT INTO jobs (id, agent, spec, state, created_at, updated_at, timeout_s, max_attempts) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (job_id, agent, json.dumps(spec, sort_keys=True), now, now, timeout_s, max_attempts),
                )
            except sqlite3.IntegrityError as exc:
                raise UserError(f"a job with id {job_id} already exists; give the job a new job_id") from exc
            self._event(conn, "job_state", agent=agent, job_id=job_id, at=now, old=None, new="queued")
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> JobRow | None:
        row = self._conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_row(row) if row else None

    def find_job(self, prefix: str) -> JobRow | None:
        """A job by full id or by a unique id prefix (at least 4 characters), as `git` does."""
        job = self.get_job(prefix)
        if job or len(prefix) < 4:
            return job
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
            (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
        ).fetchall()
        if len(rows) > 1:
            raise UserError(f"job id prefix {prefix!r} is ambiguous; give more characters")
        return job_row(rows[0]) if rows else None

    def list_jobs(self, *, agent: str | None = None, states: Iterable[str] | None = None,
                  newest: int | None = None, cleanup_pending: bool | None = None) -> list[JobRow]:
        """Jobs oldest first; with `newest`, only the newest N of them (chosen by SQL, not in Python); with
        `cleanup_pending`, only those whose remote clean-up is (or is not) pending."""
        where, params = where_clause(agent=agent)
        states = list(states or [])
        if states:
            where += (" AND " if where else " WHERE ") + f"state IN ({', '.join('?' * len(states))})"
            params += states
        if cleanup_pending is not None:
            where += (" AND " if where else " WHERE ") + "cleanup_pending = ?"
            params.append(int(cleanup_pending))
        if newest is None:
            # rowid breaks ties of the millisecond in submission order (first come, first served).
            sql = f"SELECT {JOB_COLUMNS} FROM jobs{where} ORDER BY created_at, rowid"
            return [job_row(r) for r in self._conn.execute(sql, params)]
        sql = f"SELECT {JOB_COLUMNS} FROM jobs{where} ORDER BY created_at DESC, rowid DESC LIMIT ?"
        return [job_row(r) for r in reversed(self._conn.execute(sql, [*params, int(newest)]).fetchall())]

    def transition_job(self, job_id: str, from_states: Iterable[str], to_state: str, **fields: Any) -> bool:
        """Compare-and-set a job's state (and ride-along columns) in one committed transaction.

        Returns False, changing nothing, when the job is not in one of `from_states` (another
        process moved it first: e.g. a cancel raced a dispatch). The change and its event are on
        disk when this returns True, so the caller may act on it.
        """
        if to_state not in JOB_STATES:
            raise ValueError(f"unknown job state {to_state!r}")
        unknown = set(fields) - JOB_UPDATABLE
        if unknown:
            raise ValueError(f"not updatable job fields: {sorted(unknown)}")
        from_states = list(from_states)
        now = utc_now()
        if to_state in JOB_TERMINAL_STATES:
            fields.setdefault("finished_at", now)
        values = {k: job_value(k, v) for k, v in fields.items()}
        sets = "".join(f", {k} = ?" for k in values)
        with self._write() as conn:
            row = conn.execute("SELECT state, agent, spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in from_states:
                return False
            conn.execute(
                f"UPDATE jobs SET state = ?, updated_at = ?{sets} WHERE id = ?",
                (to_state, now, *values.values(), job_id),
            )
            detail = {k: v for k, v in fields.items() if k in ("error", "exit_code", "remote_dir", "attempts")}
            self._event(conn, "job_state", agent=row[1], job_id=job_id, at=now, old=row[0], new=to_state, **detail)
            redacted = to_state in JOB_TERMINAL_STATES and self._redact_env(conn, job_id, row[2])
        if redacted:
            self.truncate_wal()
        return True

    @staticmethod
    def _redact_env(conn: sqlite3.Connection, job_id: str, spec_json: str) -> bool:
        """Drop the job's env values from its stored spec (names kept). True when there were any."""
        redacted = redacted_spec_json(spec_json)
        if redacted is None:
            return False
        conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (redacted, job_id))
        return True

    def record_launch(self, job_id: str) -> bool:
        """The job's command was started on its host: this attempt counts (once). At the launch of the last
        allowed attempt the env values leave the store (no later attempt can need them). False when the
        job is not running or this attempt was already counted."""
        now = utc_now()
        with self._write() as conn:
            row = conn.execute("SELECT state, agent, attempts, max_attempts, launched_at, spec FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if row is None or row[0] != "running" or row[4] is not None:
                return False
            attempts = row[2] + 1
            conn.execute("UPDATE jobs SET attempts = ?, launched_at = ?, updated_at = ? WHERE id = ?",
                         (attempts, now, now, job_id))
            self._event(conn, "job_launched", agent=row[1], job_id=job_id, at=now, attempt=attempts,
                        max_attempts=row[3])
            redacted = attempts >= row[3] and self._redact_env(conn, job_id, row[5])
        if redacted:
            self.truncate_wal()
        return True

    def requeue_job(self, job_id: str, *, error: str, before_start: bool, cleanup_pending: bool) -> bool:
        """An active job back to `queued` for another attempt (compare-and-set, like transition_job).

        `before_start`: its command never started (the attempt was not counted). A clean-up still pending
        (the old attempt's remote dir) is done before the job is dispatched again."""
        now = utc_now()
        with self._write() as conn:
            row = conn.execute("SELECT state, agent FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in JOB_ACTIVE_STATES:
                return False
            conn.execute(
                "UPDATE jobs SET state = 'queued', updated_at = ?, dispatched_at = NULL, started_at = NULL, "
                "launched_at = NULL, run_dir = NULL, error = ?, cleanup_pending = ? WHERE id = ?",
                (now, error, int(cleanup_pending), job_id))
            self._event(conn, "job_state", agent=row[1], job_id=job_id, at=now, old=row[0], new="queued",
                        error=error, requeued=True, before_start=before_start)
        return True

    def start_failures(self, job_id: str) -> int:
        """How many times the job was requeued because it failed before its command started."""
        return sum(1 for event in self.list_events(job_id=job_id, kind="job_state")
                   if event.detail.get("requeued") and event.detail.get("before_start"))

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Change ride-along columns without a state change (e.g. the remote dir once it is known)."""
        unknown = set(fields) - JOB_UPDATABLE
        if unknown:
            raise ValueError(f"not updatable job fields: {sorted(unknown)}")
        values = {k: job_value(k, v) for k, v in fields.items()}
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
        redacted = False
        with self._write() as conn:
            row = conn.execute("SELECT state, agent, spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UserError(f"no job {job_id}")
            state, agent, spec_json = row
            if state in ("queued", "dispatched"):
                why = "cancelled before dispatch" if state == "queued" else "cancelled before it started"
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, updated_at = ?, finished_at = ?, "
                    "error = ? WHERE id = ?", (now, now, why, job_id))
                self._event(conn, "job_state", agent=agent, job_id=job_id, at=now, old=state, new="cancelled",
                            error=why)
                redacted = self._redact_env(conn, job_id, spec_json)
                state = "cancelled"
            elif state in JOB_ACTIVE_STATES:
                conn.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id))
                self._event(conn, "job_cancel_requested", agent=agent, job_id=job_id, at=now)
        if redacted:
            self.truncate_wal()
        return state

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def next_queued_job(self, agent: str) -> JobRow | None:
        row = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE agent = ? AND state = 'queued' ORDER BY created_at, id LIMIT 1",
            (agent,),
        ).fetchone()
        return job_row(row) if row else None
