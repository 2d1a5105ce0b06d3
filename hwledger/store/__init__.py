"""The SQLite store: the only package in hwledger that talks SQL.

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
- The `events` table is append-only (triggers refuse UPDATE, and DELETE of anything younger than the cut of
  `hwledger fleet prune`; see retention.py).
- Nothing secret is kept: key *fingerprints* only, never key material; a job's env values (often tokens)
  only until no attempt of the job can need them, then its names only (`job_env`), and the -wal file is
  truncated after each removal so no old copy lingers there (`secure_delete` zeroes the freed space in
  the database file).
- A job's log (what `hwledger job logs` prints) is bounded per job where it is appended: the oldest rows go
  first, in the same transaction (job_logs.py).
"""

from __future__ import annotations

from hwledger.store.agents import AgentTables
from hwledger.store.base import DEFAULT_BUSY_TIMEOUT_S, DEFAULT_SNAPSHOTS_KEPT, StoreBase, StoreError
from hwledger.store.job_env import env_redacted, shown_spec
from hwledger.store.job_logs import LOG_KEPT_BYTES, JobLogTables, JobLogView, LogCursor, LogEntry, RunningLog
from hwledger.store.jobs import MAX_ATTEMPTS_LIMIT, JobTables
from hwledger.store.placement import PlacementTables
from hwledger.store.records import (
    AgentRecord,
    AgentRow,
    AgentUpdate,
    EventRow,
    JobRow,
    SnapshotRow,
    StateChange,
    age_seconds,
    parse_time,
    utc_now,
)
from hwledger.store.retention import PruneReport, Retention
from hwledger.store.schema import AGENT_STATES, JOB_ACTIVE_STATES, JOB_STATES, JOB_TERMINAL_STATES, SCHEMA_VERSION
from hwledger.store.watch import MemoryPoint, WatchQueries


class Store(AgentTables, JobTables, JobLogTables, PlacementTables, WatchQueries, Retention, StoreBase):
    """One connection to the store. Use one per thread (sqlite3 connections are not shared)."""


__all__ = [
    "AGENT_STATES", "DEFAULT_BUSY_TIMEOUT_S", "DEFAULT_SNAPSHOTS_KEPT", "JOB_ACTIVE_STATES", "JOB_STATES",
    "JOB_TERMINAL_STATES", "LOG_KEPT_BYTES", "MAX_ATTEMPTS_LIMIT", "SCHEMA_VERSION", "AgentRecord", "AgentRow",
    "AgentUpdate", "EventRow", "JobLogView", "JobRow", "LogCursor", "LogEntry", "MemoryPoint", "PruneReport",
    "RunningLog", "SnapshotRow", "StateChange", "Store", "StoreError", "age_seconds", "env_redacted", "parse_time",
    "shown_spec", "utc_now",
]
