"""Retention (hwledger/store/retention.py): old finished jobs and old events go, everything younger stays
append-only, the file shrinks, and a store from an earlier hwledger is migrated and can be shrunk too."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from hwledger.store import AgentRecord, Store
from hwledger.store.retention import iso
from hwledger.store.schema import MIGRATIONS, split_sql

NOW = datetime.now(timezone.utc)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "state" / "fleet.db"


@pytest.fixture
def store(db):
    with Store.open(db) as opened:
        opened.upsert_agent(AgentRecord(name="gpu1", hostname="10.0.0.1", port=22, ssh_user="root",
                                        key_path="/k/id"))
        yield opened


def _finished_job(store: Store, *, days_ago: float, state: str = "succeeded", output: str = "") -> str:
    job = store.submit_job("gpu1", {"command": ["true"]})
    store.transition_job(job.id, ["queued"], "dispatched")
    store.transition_job(job.id, ["dispatched"], "running")
    store.transition_job(job.id, ["running"], state, finished_at=iso(NOW - timedelta(days=days_ago)),
                         result={"stdout_tail": output} if output else None)
    return job.id


def _raw(db) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


def _add_event(db, *, days_ago: float, kind: str = "old") -> None:
    with _raw(db) as conn:
        conn.execute("INSERT INTO events (at, kind) VALUES (?, ?)", (iso(NOW - timedelta(days=days_ago)), kind))


def test_prune_removes_old_finished_jobs_only_and_keeps_the_finished_counter(store):
    old = _finished_job(store, days_ago=40)
    old_lost = _finished_job(store, days_ago=35, state="lost")
    young = _finished_job(store, days_ago=3)
    ancient_queued = store.submit_job("gpu1", {"command": ["sleep", "1"]}).id  # never finished: never pruned
    totals = store.finished_job_totals()
    report = store.prune(jobs_before=NOW - timedelta(days=30), events_before=None)
    assert report.jobs == 2 and report.events == 0
    assert store.get_job(old) is None and store.get_job(old_lost) is None
    assert store.get_job(young) is not None and store.get_job(ancient_queued) is not None
    assert store.finished_job_totals() == totals and totals["succeeded"] == 2 and totals["lost"] == 1


def test_prune_removes_old_events_and_a_younger_event_still_cannot_be_deleted(store, db):
    _add_event(db, days_ago=100, kind="ancient")
    _add_event(db, days_ago=5, kind="recent")
    report = store.prune(jobs_before=None, events_before=NOW - timedelta(days=90))
    assert report.events == 1
    kinds = [e.kind for e in store.list_events()]
    assert "ancient" not in kinds and "recent" in kinds and "agent_registered" in kinds

    with _raw(db) as conn:
        # Without the pruner's gate: nothing can be deleted or changed.
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events WHERE kind = 'recent'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET kind = 'x'")
        # With a gate open (as the pruner does, inside one transaction): still only what is older than it.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO prune_gate (id, events_before) VALUES (1, ?)", (iso(NOW - timedelta(days=30)),))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events WHERE kind = 'recent'")
        conn.execute("ROLLBACK")
        # A gate younger than a day is refused by the schema itself.
        with pytest.raises(sqlite3.IntegrityError, match="never pruned"):
            conn.execute("INSERT INTO prune_gate (id, events_before) VALUES (1, ?)", (iso(NOW),))
        assert conn.execute("SELECT count(*) FROM prune_gate").fetchone()[0] == 0
    with pytest.raises(ValueError, match="never pruned"):
        store.prune(jobs_before=None, events_before=NOW - timedelta(hours=1))


def test_dry_run_counts_and_changes_nothing(store, db):
    _finished_job(store, days_ago=40)
    _add_event(db, days_ago=100)
    events = len(store.list_events())
    report = store.prune(jobs_before=NOW - timedelta(days=30), events_before=NOW - timedelta(days=90), dry_run=True)
    assert (report.jobs, report.events, report.dry_run) == (1, 1, True)
    assert len(store.list_jobs()) == 1 and len(store.list_events()) == events


def test_the_file_shrinks_after_pruning_big_job_outputs(store):
    assert store.auto_vacuum_mode() == 2  # a new store is incremental
    for _job in range(40):
        _finished_job(store, days_ago=60, output="x" * 60000)
    store.prune(jobs_before=None, events_before=None, wait_for_readers=True)
    grown = store.size_bytes()
    report = store.prune(jobs_before=NOW - timedelta(days=30), events_before=None, wait_for_readers=True)
    assert report.jobs == 40 and report.vacuum == "incremental"
    assert report.size_after < grown / 4


def _v1_store(db) -> None:
    """A store as hwledger with schema v1 made it (no auto-vacuum, the old triggers)."""
    db.parent.mkdir(mode=0o700)
    with _raw(db) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in split_sql(MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO agents (name, hostname, port, ssh_user, key_path, registered_at, state_since) "
                     "VALUES ('gpu1', 'h', 22, 'u', '/k', ?, ?)", (iso(NOW), iso(NOW)))
        for n in range(30):
            conn.execute("INSERT INTO jobs (id, agent, spec, state, created_at, updated_at, finished_at, result) "
                         "VALUES (?, 'gpu1', '{}', 'succeeded', ?, ?, ?, ?)",
                         (f"job-{n}", iso(NOW - timedelta(days=50)), iso(NOW - timedelta(days=50)),
                          iso(NOW - timedelta(days=50)), json.dumps({"stdout_tail": "y" * 60000})))


def test_a_v1_store_is_migrated_counts_its_finished_jobs_and_shrinks_after_a_full_vacuum(db):
    _v1_store(db)
    with Store.open(db) as store:
        assert store.finished_job_totals()["succeeded"] == 30  # counted by the migration
        assert store.auto_vacuum_mode() == 0
        kept = store.prune(jobs_before=NOW - timedelta(days=30), events_before=None, wait_for_readers=True)
        assert kept.jobs == 30 and kept.vacuum is None and kept.needs_full_vacuum  # the server's way: reuse only
        report = store.prune(jobs_before=None, events_before=None, full_vacuum=True, wait_for_readers=True)
        assert report.vacuum == "full" and not report.needs_full_vacuum
        assert store.auto_vacuum_mode() == 2
        assert report.size_after < report.size_before / 4
