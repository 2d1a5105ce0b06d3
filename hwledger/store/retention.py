"""Retention: finished jobs and events older than a cut leave the store, and the file gives the space back
(`hwledger fleet prune`, and `hwledger fleet serve` once an hour).

Why it is shaped this way:
- Rows go in batches, each its own short write transaction, so a server writing heartbeats meanwhile waits
  at most one batch (milliseconds), never the whole prune.
- Events stay append-only for everything younger than the cut: the delete trigger lets a row go only while
  the transaction holds a cut in `prune_gate` (schema v3) and only when the row is older than it, and the
  gate is emptied before the transaction commits. A cut younger than MIN_EVENT_AGE_DAYS is refused by the
  gate itself, whatever the caller asks.
- Only finished jobs go (succeeded, failed, timed_out, cancelled, lost), by when they finished; a queued or
  running job is never pruned, however old. `job_totals` (the finished-jobs counter) is not lowered.
- The file shrinks: a store created by this hwledger uses incremental auto-vacuum, and freed pages are
  handed back in batches (`PRAGMA incremental_vacuum`), each a short write transaction: what the server's
  hourly prune does. `hwledger fleet prune` may rewrite the file instead (`VACUUM`, holding the write lock
  for its duration) when more than a quarter of it is free, which is much faster, and it must for a store
  created by an earlier hwledger (auto_vacuum NONE), which only a VACUUM can switch to incremental. The server
  never rewrites (a long rewrite would hold back its heartbeats); on such an old store it reuses the freed
  pages in place until someone runs `hwledger fleet prune`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from hwledger.store.schema import HISTORY_MINUTES, JOB_TERMINAL_STATES, MIN_EVENT_AGE_DAYS

PRUNE_BATCH_ROWS = 2000
VACUUM_BATCH_PAGES = 2048  # 8 MiB of 4 KiB pages per write transaction
REWRITE_WHEN_FREE = 4  # with `full_vacuum`: rewrite the file when more than 1/4 of its pages are free
AUTO_VACUUM_NONE, AUTO_VACUUM_FULL, AUTO_VACUUM_INCREMENTAL = 0, 1, 2


def iso(when: datetime) -> str:
    """The store's timestamp format (records.utc_now) for a cut."""
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class PruneReport:
    jobs_before: str | None
    events_before: str | None
    dry_run: bool
    jobs: int = 0
    events: int = 0
    history: int = 0
    vacuum: str | None = None  # "incremental", "full" or None (nothing to give back, or not asked)
    needs_full_vacuum: bool = False  # a store from before incremental auto-vacuum; only a full VACUUM shrinks it
    size_before: int = 0
    size_after: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {key: getattr(self, key) for key in (
            "jobs_before", "events_before", "dry_run", "jobs", "events", "history", "vacuum", "needs_full_vacuum",
            "size_before", "size_after", "seconds")}


class Retention:
    """Pruning and vacuuming (mixed into `Store`)."""

    def size_bytes(self) -> int:
        """The store's size on disk: the database file and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    def auto_vacuum_mode(self) -> int:
        return int(self._conn.execute("PRAGMA auto_vacuum").fetchone()[0])

    def prune(self, *, jobs_before: datetime | None, events_before: datetime | None, dry_run: bool = False,
              vacuum: bool = True, full_vacuum: bool = False, wait_for_readers: bool = False,
              keep_going: Callable[[], bool] = lambda: True) -> PruneReport:
        """Remove finished jobs that finished before `jobs_before` and events before `events_before` (None:
        keep them all), and the page's history older than an hour. Then hand the freed pages back when
        `vacuum`; `full_vacuum` allows rewriting the file (VACUUM) when that is cheaper, or the only way (a
        store from before incremental auto-vacuum). `wait_for_readers`: checkpoint the log fully at the end (waits for readers), so the
        sizes reported are final; otherwise a passive checkpoint (the next checkpoint finishes the job).
        `keep_going` is asked between batches: False stops the prune there (the server is stopping)."""
        started = time.monotonic()
        if events_before is not None and events_before > datetime.now(timezone.utc) - timedelta(days=MIN_EVENT_AGE_DAYS):
            raise ValueError(f"events younger than {MIN_EVENT_AGE_DAYS} day(s) are never pruned")
        report = PruneReport(iso(jobs_before) if jobs_before else None, iso(events_before) if events_before else None,
                             dry_run, size_before=self.size_bytes())
        history_cut = iso(datetime.now(timezone.utc) - timedelta(minutes=HISTORY_MINUTES))[:16]
        if dry_run:
            report.jobs = self._count_old_jobs(report.jobs_before) if report.jobs_before else 0
            report.events = self._count(
                "SELECT count(*) FROM events WHERE at < ?", report.events_before) if report.events_before else 0
            report.history = self._count("SELECT count(*) FROM gpu_memory_history WHERE minute < ?", history_cut)
        else:
            if report.jobs_before:
                report.jobs = self._prune_jobs(report.jobs_before, keep_going)
            if report.events_before and keep_going():
                report.events = self._prune_events(report.events_before, keep_going)
            with self._write() as conn:
                report.history = conn.execute("DELETE FROM gpu_memory_history WHERE minute < ?",
                                              (history_cut,)).rowcount
        mode = self.auto_vacuum_mode()
        report.needs_full_vacuum = mode == AUTO_VACUUM_NONE
        if vacuum and not dry_run and keep_going():
            report.vacuum = self._vacuum(mode, full=full_vacuum, keep_going=keep_going)
            if report.vacuum == "full":
                report.needs_full_vacuum = False
        self._conn.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if wait_for_readers else 'PASSIVE'})").fetchall()
        report.size_after = self.size_bytes()
        report.seconds = round(time.monotonic() - started, 3)
        return report

    # -- counting (dry run) ----------------------------------------------------------------

    def _count(self, sql: str, *params: object) -> int:
        return int(self._conn.execute(sql, params).fetchone()[0])

    def _count_old_jobs(self, cut: str) -> int:
        states = sorted(JOB_TERMINAL_STATES)
        return self._count(f"SELECT count(*) FROM jobs WHERE state IN ({', '.join('?' * len(states))}) "
                           "AND coalesce(finished_at, updated_at) < ?", *states, cut)

    # -- deleting --------------------------------------------------------------------------

    def _prune_jobs(self, cut: str, keep_going: Callable[[], bool]) -> int:
        states = sorted(JOB_TERMINAL_STATES)
        sql = (f"DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE state IN "
               f"({', '.join('?' * len(states))}) AND coalesce(finished_at, updated_at) < ? LIMIT ?)")
        removed = 0
        while True:
            with self._write() as conn:
                count = conn.execute(sql, (*states, cut, PRUNE_BATCH_ROWS)).rowcount
            removed += count
            if count < PRUNE_BATCH_ROWS or not keep_going():
                return removed

    def _prune_events(self, cut: str, keep_going: Callable[[], bool]) -> int:
        removed = 0
        while True:
            with self._write() as conn:
                # The gate lives only inside this transaction (see the module's notes).
                conn.execute("INSERT INTO prune_gate (id, events_before) VALUES (1, ?)", (cut,))
                count = conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? ORDER BY id LIMIT ?)",
                    (cut, PRUNE_BATCH_ROWS)).rowcount
                conn.execute("DELETE FROM prune_gate")
            removed += count
            if count < PRUNE_BATCH_ROWS or not keep_going():
                return removed

    # -- giving the space back -------------------------------------------------------------

    def _freelist(self) -> int:
        return int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])

    def _vacuum(self, mode: int, *, full: bool, keep_going: Callable[[], bool]) -> str | None:
        pages = int(self._conn.execute("PRAGMA page_count").fetchone()[0])
        if full and (mode == AUTO_VACUUM_NONE or self._freelist() * REWRITE_WHEN_FREE > pages):
            # A rewrite copies only the live pages, once: far cheaper than moving them one by one when much of
            # the file is free (a year of a 100-agent fleet: 2 s against 90 s). It cannot run inside a
            # transaction; it takes the write lock itself for the whole rewrite.
            self._conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._conn.execute("VACUUM")
            return "full"
        if mode == AUTO_VACUUM_INCREMENTAL:
            if not self._freelist():
                return None
            while self._freelist() and keep_going():
                before = self._freelist()
                with self._write() as conn:
                    conn.execute(f"PRAGMA incremental_vacuum({VACUUM_BATCH_PAGES})").fetchall()
                if self._freelist() >= before:
                    break  # nothing moved (should not happen): never loop for ever
            return "incremental"
        return None  # FULL mode gives pages back at each commit; NONE without `full` reuses them in place
