"""Job logs in the store: what the heartbeats read of running jobs' output, bounded per job, and where the
reading of each job's log on its host stands (schema v5; the logic that fills them is hwledger/job_logs.py).

Why bounded here: a job may print without end; the store keeps the newest LOG_KEPT_BYTES of each job's log
and drops the oldest rows first, in the same transaction that appends, so no reader ever sees a job's log
over its bound. What was dropped is counted (`dropped_bytes`, up to `dropped_to_seq`) so that readers can
say so where it happened.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hwledger.store.records import JOB_COLUMNS, JobRow, job_row, utc_now

LOG_KEPT_BYTES = 4 * 1024 * 1024  # per job
LOG_STREAMS = ("stdout", "stderr", "note")
_DROP_BATCH = 64


@dataclass(frozen=True)
class LogCursor:
    """Where the reading of a job's log on its host stands: the private dir it belongs to, the file
    generation and offset read up to, and how many bytes of stdout and stderr are in hand."""

    remote_dir: str
    generation: int = 0
    offset: int = 0
    stdout_pos: int = 0
    stderr_pos: int = 0


@dataclass(frozen=True)
class LogEntry:
    seq: int
    stream: str  # stdout | stderr | note
    at: str
    data: bytes


@dataclass(frozen=True)
class RunningLog:
    """A running job whose log is read: its agent, its recorded private dir and its cursor (None: none yet)."""

    job_id: str
    agent: str
    remote_dir: str
    cursor: LogCursor | None


@dataclass(frozen=True)
class JobLogView:
    """One consistent look at a job and its log (one read transaction): the entries after a point, the
    cursor, and what the bound dropped (`dropped_to_seq`: rows up to it are gone)."""

    job: JobRow
    entries: list[LogEntry]
    cursor: LogCursor | None
    dropped_bytes: int
    dropped_to_seq: int
    more: bool  # entries past the size asked for are there: read again from the last one


_CURSOR_COLUMNS = "remote_dir, generation, log_offset, stdout_pos, stderr_pos"


def _cursor(row: Sequence | None) -> LogCursor | None:
    return LogCursor(*row[:5]) if row else None


class JobLogTables:
    """Job logs (mixed into `Store`)."""

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every SELECT inside sees the same committed state."""
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    def running_job_logs(self) -> list[RunningLog]:
        """Running jobs with a recorded private dir, oldest first, with their log cursors."""
        rows = self._conn.execute(
            f"SELECT j.id, j.agent, j.remote_dir, {', '.join('c.' + c.strip() for c in _CURSOR_COLUMNS.split(','))} "
            "FROM jobs AS j LEFT JOIN job_log_cursors AS c ON c.job_id = j.id "
            "WHERE j.state = 'running' AND j.remote_dir IS NOT NULL ORDER BY j.started_at, j.id").fetchall()
        return [RunningLog(r[0], r[1], r[2], _cursor(r[3:]) if r[3] is not None else None) for r in rows]

    def job_log_cursor(self, job_id: str) -> LogCursor | None:
        row = self._conn.execute(f"SELECT {_CURSOR_COLUMNS} FROM job_log_cursors WHERE job_id = ?", (job_id,)).fetchone()
        return _cursor(row)

    def append_job_log(self, job_id: str, expected: LogCursor | None, cursor: LogCursor,
                       entries: Sequence[tuple[str, bytes]]) -> bool:
        """Append `entries` ((stream, bytes), in order) and move the cursor to `cursor`, in one transaction,
        if the cursor is still `expected` (None: there was none); False, changing nothing, otherwise (the
        entries were read from a position that is not current any more). Then drop the job's oldest rows
        while it holds more than LOG_KEPT_BYTES."""
        now = utc_now()
        with self._write() as conn:
            row = conn.execute(f"SELECT {_CURSOR_COLUMNS}, next_seq, kept_bytes, dropped_bytes, dropped_to_seq "
                               "FROM job_log_cursors WHERE job_id = ?", (job_id,)).fetchone()
            if _cursor(row) != expected:
                return False
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                return False  # pruned meanwhile
            seq, kept, dropped, dropped_to = row[5:] if row else (1, 0, 0, 0)
            for stream, data in entries:
                if stream not in LOG_STREAMS:
                    raise ValueError(f"unknown log stream {stream!r}")
                if not data:
                    continue
                conn.execute("INSERT INTO job_logs (job_id, seq, stream, at, data) VALUES (?, ?, ?, ?, ?)",
                             (job_id, seq, stream, now, bytes(data)))
                seq += 1
                kept += len(data)
            while kept > LOG_KEPT_BYTES:
                oldest = conn.execute("SELECT seq, length(data) FROM job_logs WHERE job_id = ? ORDER BY seq LIMIT ?",
                                      (job_id, _DROP_BATCH)).fetchall()
                if not oldest:
                    kept = 0
                    break
                gone = []
                for old_seq, size in oldest:
                    if kept <= LOG_KEPT_BYTES:
                        break
                    gone.append(old_seq)
                    kept -= size
                    dropped += size
                    dropped_to = old_seq
                conn.execute("DELETE FROM job_logs WHERE job_id = ? AND seq <= ?", (job_id, gone[-1]))
            conn.execute(
                "INSERT INTO job_log_cursors (job_id, remote_dir, generation, log_offset, stdout_pos, stderr_pos, "
                "next_seq, kept_bytes, dropped_bytes, dropped_to_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (job_id) DO UPDATE SET remote_dir = excluded.remote_dir, generation = excluded.generation, "
                "log_offset = excluded.log_offset, stdout_pos = excluded.stdout_pos, stderr_pos = excluded.stderr_pos, "
                "next_seq = excluded.next_seq, kept_bytes = excluded.kept_bytes, dropped_bytes = excluded.dropped_bytes, "
                "dropped_to_seq = excluded.dropped_to_seq",
                (job_id, cursor.remote_dir, cursor.generation, cursor.offset, cursor.stdout_pos, cursor.stderr_pos,
                 seq, kept, dropped, dropped_to))
        return True

    def read_job_log(self, job_id: str, *, after_seq: int = 0, max_bytes: int = LOG_KEPT_BYTES) -> JobLogView | None:
        """The job and the entries of its log after `after_seq` (about `max_bytes` of them at most; `more`
        says when there are others), from one consistent snapshot. None when there is no such job."""
        with self._snapshot() as conn:
            row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            state = conn.execute(f"SELECT {_CURSOR_COLUMNS}, dropped_bytes, dropped_to_seq FROM job_log_cursors "
                                 "WHERE job_id = ?", (job_id,)).fetchone()
            entries: list[LogEntry] = []
            size = 0
            more = False
            rows = conn.execute("SELECT seq, stream, at, data FROM job_logs WHERE job_id = ? AND seq > ? ORDER BY seq",
                                (job_id, after_seq))
            for seq, stream, at, data in rows:
                if entries and size + len(data) > max_bytes:
                    more = True
                    break
                entries.append(LogEntry(seq, stream, at, bytes(data)))
                size += len(data)
            rows.close()  # before the COMMIT: a statement left running would hold the snapshot
        return JobLogView(job_row(row), entries, _cursor(state), state[5] if state else 0, state[6] if state else 0,
                          more)

    def job_log_size(self, job_id: str) -> tuple[int, int]:
        """(rows, bytes) of the job's log as stored."""
        row = self._conn.execute("SELECT count(*), coalesce(sum(length(data)), 0) FROM job_logs WHERE job_id = ?",
                                 (job_id,)).fetchone()
        return int(row[0]), int(row[1])
