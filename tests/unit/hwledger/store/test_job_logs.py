"""Job logs in the store (hwledger/store/job_logs.py): appends move the cursor by compare-and-set, the log
is bounded per job with the oldest rows dropped first (and counted), reads are one snapshot."""

from __future__ import annotations

import uuid

import pytest

from hwledger.store import AgentRecord, LogCursor, Store, job_logs
from hwledger.store.schema import SCHEMA_VERSION

DIR = "/tmp/hwledger-job-x-Ab12Cd"


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "s" / "fleet.db") as opened:
        opened.upsert_agent(AgentRecord(name="gpu1", hostname="10.0.0.1", port=22, ssh_user="root", key_path="/k"))
        yield opened


def _running_job(store: Store) -> str:
    job_id = str(uuid.uuid4())
    store.submit_job("gpu1", {"job_id": job_id, "command": ["true"], "schema_version": 1}, job_id=job_id)
    store.transition_job(job_id, ["queued"], "running", remote_dir=f"/tmp/hwledger-job-{job_id}-Ab12Cd")
    return job_id


def test_the_migration_makes_the_tables(store):
    tables = {row[0] for row in store._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"job_logs", "job_log_cursors"} <= tables
    assert store._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_append_moves_the_cursor_only_from_where_it_was_expected(store):
    job_id = _running_job(store)
    first = LogCursor(DIR, 0, 10, 8, 2)
    assert store.append_job_log(job_id, None, first, [("stdout", b"hello\n"), ("stderr", b"e\n")])
    # A second writer that read from the old position is refused, and changes nothing.
    assert not store.append_job_log(job_id, None, LogCursor(DIR, 0, 10), [("stdout", b"hello\n")])
    assert store.append_job_log(job_id, first, LogCursor(DIR, 0, 20, 12, 2), [("stdout", b"more")])
    view = store.read_job_log(job_id)
    assert [(e.seq, e.stream, e.data) for e in view.entries] == [
        (1, "stdout", b"hello\n"), (2, "stderr", b"e\n"), (3, "stdout", b"more")]
    assert view.cursor == LogCursor(DIR, 0, 20, 12, 2) and view.dropped_bytes == 0
    assert [e.seq for e in store.read_job_log(job_id, after_seq=2).entries] == [3]


def test_the_log_is_bounded_per_job_oldest_first_and_the_drop_is_counted(store, monkeypatch):
    monkeypatch.setattr(job_logs, "LOG_KEPT_BYTES", 1000)
    job_id = _running_job(store)
    cursor = None
    for index in range(50):
        new = LogCursor(DIR, 0, (index + 1) * 100, (index + 1) * 100)
        assert store.append_job_log(job_id, cursor, new, [("stdout", bytes([65 + index % 26]) * 100)])
        cursor = new
    rows, size = store.job_log_size(job_id)
    assert size <= 1000 and rows == 10
    view = store.read_job_log(job_id)
    assert view.dropped_bytes == 4000 and view.dropped_to_seq == 40
    assert view.entries[0].seq == 41 and view.entries[-1].seq == 50  # the newest kept, in order


def test_a_read_is_bounded_and_says_there_is_more(store):
    job_id = _running_job(store)
    store.append_job_log(job_id, None, LogCursor(DIR), [("stdout", b"a" * 600), ("stderr", b"b" * 600)])
    view = store.read_job_log(job_id, max_bytes=1000)
    assert [e.seq for e in view.entries] == [1] and view.more


def test_no_job_reads_as_none_and_the_log_goes_with_its_job(store):
    assert store.read_job_log(str(uuid.uuid4())) is None
    job_id = _running_job(store)
    store.append_job_log(job_id, None, LogCursor(DIR), [("stdout", b"x")])
    with store._write() as conn:
        conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
    assert store.job_log_size(job_id) == (0, 0) and store.job_log_cursor(job_id) is None


def test_running_jobs_are_listed_with_their_cursors(store):
    job_id = _running_job(store)
    [running] = store.running_job_logs()
    assert running.job_id == job_id and running.cursor is None and running.agent == "gpu1"
    store.append_job_log(job_id, None, LogCursor(running.remote_dir, 1, 5), [])
    assert store.running_job_logs()[0].cursor == LogCursor(running.remote_dir, 1, 5)
