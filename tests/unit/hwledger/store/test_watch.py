"""The exporter's and the page's reads (hwledger/store/watch.py): the bounded hour of free memory per GPU,
jobs by state, and the finished-jobs counter."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger.heartbeat import record_outcomes
from hwledger.store import AgentRecord, Store, StoreError


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "s" / "fleet.db") as opened:
        opened.upsert_agent(AgentRecord(name="gpu1", hostname="10.0.0.1", port=22, ssh_user="root", key_path="/k"))
        yield opened


def _gpu(index, free, total=1000):
    return {"index": index, "name": "X", "memory_free_bytes": free, "memory_total_bytes": total}


def _snapshot(db, recorded_at: datetime, gpus, ok=True) -> None:
    """A snapshot row at a chosen time (the trigger under test sees exactly what the store writes)."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("INSERT INTO snapshots (agent, recorded_at, ok, data) VALUES ('gpu1', ?, ?, ?)",
                     (recorded_at.isoformat(timespec="milliseconds"), int(ok),
                      json.dumps({"gpus": gpus}) if ok else None))


def test_heartbeats_feed_the_history_one_point_per_minute_the_least_free(store):
    for free in (700, 300, 500):
        record_outcomes(store, {"gpu1": ProbeOutcome.success({"gpus": [_gpu(0, free), _gpu(1, None)]})})
    history = store.memory_history("gpu1")
    assert sorted(history) == [0, 1]
    assert [p.free_bytes for p in history[0]] in ([300], [700, 300], [300, 500])  # a minute may turn meanwhile
    assert min(p.free_bytes for p in history[0]) == 300
    assert all(p.free_bytes is None and p.total_bytes == 1000 for p in history[1])  # not reported: absent


def test_the_history_is_bounded_to_the_last_hour_per_agent(store):
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for minute in range(0, 180, 1):
        _snapshot(store.path, start + timedelta(minutes=minute), [_gpu(0, minute)])
    _snapshot(store.path, start + timedelta(minutes=181), [], ok=False)  # a failure adds nothing
    with sqlite3.connect(store.path) as conn:
        rows = conn.execute("SELECT min(minute), max(minute), count(*) FROM gpu_memory_history").fetchone()
    assert rows == ("2026-01-01T01:59", "2026-01-01T02:59", 61)
    points = store.memory_history("gpu1", now=start + timedelta(minutes=180))
    assert [p.free_bytes for p in points[0]] == list(range(120, 180))


def test_job_counts_cover_every_state_and_totals_count_each_finish_once(store):
    first = store.submit_job("gpu1", {"command": ["a"]})
    second = store.submit_job("gpu1", {"command": ["b"]})
    store.request_cancel(first.id)
    store.request_cancel(first.id)  # already finished: not counted again
    counts = store.job_counts()
    assert counts["queued"] == 1 and counts["cancelled"] == 1 and counts["running"] == 0
    assert store.finished_job_totals() == {"cancelled": 1, "failed": 0, "lost": 0, "succeeded": 0, "timed_out": 0}
    assert store.transition_job(second.id, ["queued"], "dispatched")
    assert store.transition_job(second.id, ["dispatched"], "running")
    assert store.transition_job(second.id, ["running"], "succeeded")
    assert store.finished_job_totals()["succeeded"] == 1


def test_a_read_only_connection_refuses_writes(store):
    with Store.open(store.path, read_only=True) as reader:
        assert [a.name for a in reader.list_agents()] == ["gpu1"]
        with pytest.raises(StoreError, match="readonly"):
            reader.add_event("x")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._conn.execute("DELETE FROM snapshots")  # pylint: disable=protected-access
