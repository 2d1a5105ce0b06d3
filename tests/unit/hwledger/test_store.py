"""The SQLite store: schema versioning, file modes, transactions, job state machine, retention."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
import uuid

import pytest

from hwledger.errors import UserError
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger.store import (
    SCHEMA_VERSION,
    AgentRecord,
    AgentUpdate,
    Store,
    StoreError,
)


def _agent(name: str = "gpu1", **kw) -> AgentRecord:
    values = dict(name=name, hostname="10.0.0.1", port=22, ssh_user="root", key_path="/k/id_ed25519",
                  key_fingerprint="SHA256:client", host_key_fingerprint="SHA256:host")
    values.update(kw)
    return AgentRecord(**values)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "state" / "fleet.db"


@pytest.fixture
def store(db):
    with Store.open(db) as opened:
        yield opened


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_store_is_wal_versioned_and_private_under_a_loose_umask(db):
    old = os.umask(0o022)
    try:
        with Store.open(db) as store:
            store.upsert_agent(_agent())  # a write creates the -wal file
            files = [db, db.with_name("fleet.db-wal"), db.with_name("fleet.db-shm")]
            assert all(f.exists() for f in files)
            assert [_mode(f) for f in files] == [0o600, 0o600, 0o600]
            assert _mode(db.parent) == 0o700
            assert store.schema_version == SCHEMA_VERSION
            raw = sqlite3.connect(db)
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            raw.close()
    finally:
        os.umask(old)


def test_existing_loose_file_modes_are_tightened_on_open(db):
    Store.open(db).close()
    os.chmod(db, 0o644)
    Store.open(db).close()
    assert _mode(db) == 0o600


def test_reopening_keeps_data_and_does_not_migrate_again(db):
    with Store.open(db) as store:
        store.upsert_agent(_agent())
    with Store.open(db) as store:
        assert [a.name for a in store.list_agents()] == ["gpu1"]
        assert store.schema_version == SCHEMA_VERSION


def test_a_store_from_a_newer_hwledger_is_refused_with_advice(db):
    Store.open(db).close()
    raw = sqlite3.connect(db)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer than this hwledger"):
        Store.open(db)


def test_concurrent_first_opens_migrate_once(db):
    errors = []

    def open_it():
        try:
            Store.open(db).close()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    umask = os.umask(0o022)
    os.umask(umask)
    threads = [threading.Thread(target=open_it) for _thread in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.umask(umask) == umask  # each open's umask 077 was undone, in whatever order they ran
    with Store.open(db) as store:
        assert store.schema_version == SCHEMA_VERSION


def test_events_are_append_only(store):
    store.add_event("test", detail="x")
    conn = store._conn  # the rule must hold for any SQL, not only for the API
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE events SET kind = 'other'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM events")
    assert [e.kind for e in store.list_events()] == ["test"]


def test_removed_agent_is_hidden_and_re_registration_starts_afresh(store):
    store.upsert_agent(_agent())
    store.set_agent_state("gpu1", "offline", reason="unreachable")
    assert store.mark_agent_removed("gpu1") is True
    assert store.mark_agent_removed("gpu1") is False
    assert store.list_agents() == []
    assert store.get_agent("gpu1").state == "removed"
    store.upsert_agent(_agent(hostname="10.0.0.2"))
    row = store.get_agent("gpu1")
    assert (row.state, row.hostname, row.consecutive_misses, row.removed_at) == ("pending", "10.0.0.2", 0, None)
    kinds = [e.kind for e in store.list_events(agent="gpu1")]
    assert kinds == ["agent_registered", "agent_state", "agent_removed", "agent_registered"]


def _count_misses(row, record):
    if record.ok:
        return AgentUpdate("online", 0, seen=True)
    misses = row.consecutive_misses + 1
    return AgentUpdate("offline" if misses >= 3 else "stale", misses, record.reason, record.msg)


def test_heartbeats_update_state_misses_and_emit_events_only_on_change(store):
    store.upsert_agent(_agent())
    snap = {"gpus": [{"index": 0}]}
    changes = store.record_heartbeats({"gpu1": ProbeOutcome(True, snap)}, _count_misses)
    assert [(c.old, c.new) for c in changes] == [("pending", "online")]
    seen = store.get_agent("gpu1").last_seen
    assert seen is not None
    for expected in ("stale", "stale", "offline", "offline"):
        store.record_heartbeats({"gpu1": ProbeOutcome(False, reason="unreachable", msg="down")}, _count_misses)
        assert store.get_agent("gpu1").state == expected
    row = store.get_agent("gpu1")
    assert row.consecutive_misses == 4
    assert row.last_seen == seen  # a miss does not count as seen
    states = [(e.detail["old"], e.detail["new"]) for e in store.list_events(kind="agent_state")]
    assert states == [("pending", "online"), ("online", "stale"), ("stale", "offline")]
    assert store.latest_snapshot("gpu1").data == snap  # the last good data survives the misses


def test_heartbeats_for_an_agent_removed_meanwhile_are_dropped(store):
    store.upsert_agent(_agent())
    store.mark_agent_removed("gpu1")
    assert store.record_heartbeats({"gpu1": ProbeOutcome(True, {"gpus": []})}, _count_misses) == []
    assert store.get_agent("gpu1").state == "removed"
    assert store.list_snapshots("gpu1") == []


def test_snapshot_retention_is_bounded_and_keeps_the_last_good_snapshot(db):
    with Store.open(db, snapshots_kept=5) as store:
        store.upsert_agent(_agent())
        store.upsert_agent(_agent("gpu2"))
        store.record_heartbeats({"gpu1": ProbeOutcome(True, {"gpus": [], "n": "good"})}, _count_misses)
        for i in range(20):
            store.record_heartbeats({"gpu1": ProbeOutcome(False, reason="unreachable", msg=str(i)),
                                     "gpu2": ProbeOutcome(True, {"gpus": [], "n": i})}, _count_misses)
        gpu1 = store.list_snapshots("gpu1")
        gpu2 = store.list_snapshots("gpu2")
        assert len(gpu2) == 5 and [s.data["n"] for s in gpu2] == [19, 18, 17, 16, 15]
        assert len(gpu1) == 6  # the 5 newest failures plus the last good snapshot
        assert store.latest_snapshot("gpu1").data["n"] == "good"
        assert [s.msg for s in gpu1[:5]] == ["19", "18", "17", "16", "15"]


def test_job_transitions_are_compare_and_set_with_history(store):
    store.upsert_agent(_agent())
    job = store.submit_job("gpu1", {"command": ["true"]})
    assert job.state == "queued"
    assert store.transition_job(job.id, ["queued"], "dispatched") is True
    assert store.transition_job(job.id, ["queued"], "dispatched") is False  # someone else moved it
    assert store.transition_job(job.id, ["dispatched"], "running", attempts=1) is True
    assert store.transition_job(job.id, ["running"], "succeeded", exit_code=0, result={"state": "succeeded"}) is True
    done = store.get_job(job.id)
    assert (done.state, done.attempts, done.exit_code, done.result) == ("succeeded", 1, 0, {"state": "succeeded"})
    assert done.finished_at is not None and done.terminal
    assert store.transition_job(job.id, ["running"], "lost") is False
    history = [(e.detail["old"], e.detail["new"]) for e in store.list_events(job_id=job.id)]
    assert history == [(None, "queued"), ("queued", "dispatched"), ("dispatched", "running"), ("running", "succeeded")]
    with pytest.raises(ValueError):
        store.transition_job(job.id, ["succeeded"], "exploded")
    with pytest.raises(ValueError):
        store.transition_job(job.id, ["succeeded"], "lost", spec="{}")


def test_cancel_is_immediate_when_queued_and_a_request_when_active(store):
    store.upsert_agent(_agent())
    queued = store.submit_job("gpu1", {"command": ["a"]})
    running = store.submit_job("gpu1", {"command": ["b"]})
    store.transition_job(running.id, ["queued"], "dispatched")
    store.transition_job(running.id, ["dispatched"], "running")
    assert store.request_cancel(queued.id) == "cancelled"
    assert store.get_job(queued.id).state == "cancelled"
    assert store.request_cancel(running.id) == "running"
    assert store.get_job(running.id).state == "running"
    assert store.cancel_requested(running.id) is True
    assert store.request_cancel(queued.id) == "cancelled"  # already final: unchanged
    with pytest.raises(UserError):
        store.request_cancel(str(uuid.uuid4()))


def test_submit_needs_a_registered_agent_and_a_new_id(store):
    with pytest.raises(UserError, match="no registered agent"):
        store.submit_job("nope", {"command": ["x"]})
    store.upsert_agent(_agent())
    job = store.submit_job("gpu1", {"command": ["x"]})
    with pytest.raises(UserError, match="already exists"):
        store.submit_job("gpu1", {"command": ["x"]}, job_id=job.id)
    store.mark_agent_removed("gpu1")
    with pytest.raises(UserError, match="no registered agent"):
        store.submit_job("gpu1", {"command": ["x"]})


def test_find_job_by_unique_prefix(store):
    store.upsert_agent(_agent())
    a = store.submit_job("gpu1", {"command": ["x"]}, job_id="aaaa1111-0000-4000-8000-000000000001")
    store.submit_job("gpu1", {"command": ["x"]}, job_id="aaaa2222-0000-4000-8000-000000000002")
    assert store.find_job("aaaa1").id == a.id
    with pytest.raises(UserError, match="ambiguous"):
        store.find_job("aaaa")
    assert store.find_job("bbbb") is None
    assert store.find_job("aa") is None  # too short to search
    assert store.find_job("aaaa_") is None  # LIKE wildcards are literal


def test_a_writer_waits_for_another_writer_instead_of_failing(db):
    with Store.open(db) as first:
        first.upsert_agent(_agent())
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO events (at, kind) VALUES ('x', 'held')")
    released = threading.Event()

    def release_later():
        time.sleep(1.0)
        holder.execute("COMMIT")
        released.set()

    threading.Thread(target=release_later).start()
    with Store.open(db) as second:
        started = time.monotonic()
        job = second.submit_job("gpu1", {"command": ["x"]})
        waited = time.monotonic() - started
        assert released.is_set() and waited >= 0.8
        assert second.get_job(job.id) is not None
        assert [e.kind for e in second.list_events()][-2:] == ["held", "job_state"]
    holder.close()


def test_a_writer_gives_a_clear_error_when_the_lock_is_held_too_long(db):
    Store.open(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with Store.open(db, busy_timeout_s=0.3) as store:
            with pytest.raises(StoreError, match="busy"):
                store.add_event("x")
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_cancelling_a_dispatched_job_ends_it_and_the_worker_cannot_start_it(store):
    store.upsert_agent(_agent())
    job = store.submit_job("gpu1", {"command": ["true"]})
    store.transition_job(job.id, ["queued"], "dispatched")
    assert store.request_cancel(job.id) == "cancelled"
    cancelled = store.get_job(job.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    assert cancelled.error == "cancelled before it started"
    # The worker's compare-and-set from dispatched fails: the job never runs.
    assert store.transition_job(job.id, ["dispatched"], "running") is False
    history = [(e.detail["old"], e.detail["new"]) for e in store.list_events(job_id=job.id)]
    assert history == [(None, "queued"), ("queued", "dispatched"), ("dispatched", "cancelled")]


def test_list_jobs_newest_picks_the_last_n_in_sql_oldest_first(store):
    store.upsert_agent(_agent())
    store.upsert_agent(_agent("gpu2"))
    ids = []
    for number in range(5):
        ids.append(store.submit_job("gpu1", {"command": [str(number)]}).id)
        store.submit_job("gpu2", {"command": [str(number)]})
        time.sleep(0.002)  # distinct created_at (millisecond timestamps)
    assert [j.id for j in store.list_jobs(agent="gpu1", newest=2)] == ids[3:]
    assert [j.id for j in store.list_jobs(agent="gpu1", newest=50)] == ids
    assert [j.id for j in store.list_jobs(agent="gpu1")] == ids
    store.request_cancel(ids[4])
    assert [j.id for j in store.list_jobs(agent="gpu1", states=["queued"], newest=1)] == [ids[3]]
    # The server's one query for every pending remote clean-up, whatever the agent.
    store.transition_job(ids[1], ["queued"], "failed", cleanup_pending=True)
    store.transition_job(ids[2], ["queued"], "failed", cleanup_pending=False)
    assert [j.id for j in store.list_jobs(states=["failed", "cancelled"], cleanup_pending=True)] == [ids[1]]
    assert ids[1] not in [j.id for j in store.list_jobs(cleanup_pending=False)]


# -- attempts and env values ----------------------------------------------------------------------


def _db_bytes(db) -> bytes:
    return b"".join(p.read_bytes() for p in (db, db.with_name("fleet.db-wal"), db.with_name("fleet.db-shm"))
                    if p.exists())


def test_max_attempts_is_checked_and_attempts_count_at_launch_once(store):
    store.upsert_agent(_agent())
    for bad in (0, -1, 101, True, "2"):
        with pytest.raises(UserError, match="max attempts"):
            store.submit_job("gpu1", {"command": ["x"]}, max_attempts=bad)
    job = store.submit_job("gpu1", {"command": ["x"]}, max_attempts=3)
    assert (job.attempts, job.max_attempts, job.launched_at) == (0, 3, None)
    assert store.record_launch(job.id) is False  # not running
    store.transition_job(job.id, ["queued"], "dispatched")
    store.transition_job(job.id, ["dispatched"], "running")
    assert store.get_job(job.id).attempts == 0  # started is not launched: nothing ran on the host yet
    assert store.record_launch(job.id) is True
    assert store.record_launch(job.id) is False  # one launch per attempt
    launched = store.get_job(job.id)
    assert launched.attempts == 1 and launched.launched_at is not None
    assert [e.detail["attempt"] for e in store.list_events(job_id=job.id, kind="job_launched")] == [1]


def test_requeue_is_compare_and_set_and_resets_the_attempt(store):
    store.upsert_agent(_agent())
    job = store.submit_job("gpu1", {"command": ["x"]}, max_attempts=2)
    assert store.requeue_job(job.id, error="e", before_start=True, cleanup_pending=False) is False  # queued
    store.transition_job(job.id, ["queued"], "dispatched")
    store.transition_job(job.id, ["dispatched"], "running", started_at="2026-01-01T00:00:00.000+00:00")
    store.update_job(job.id, run_dir="/r", remote_dir="/tmp/hwledger-job-x")
    store.record_launch(job.id)
    assert store.requeue_job(job.id, error="agent_offline: x", before_start=False, cleanup_pending=True)
    again = store.get_job(job.id)
    assert (again.state, again.attempts, again.started_at, again.launched_at, again.run_dir) == (
        "queued", 1, None, None, None)
    assert again.remote_dir == "/tmp/hwledger-job-x" and again.cleanup_pending  # cleaned before it runs again
    assert store.start_failures(job.id) == 0
    assert store.next_queued_job("gpu1").id == job.id


@pytest.mark.parametrize("how", ["terminal", "last launch", "cancel while queued"])
def test_env_values_leave_the_store_files_when_no_attempt_needs_them(db, how):
    canary = f"HWL-CANARY-{uuid.uuid4().hex}"
    with Store.open(db) as store, Store.open(db) as reader:
        store.upsert_agent(_agent())
        job = store.submit_job("gpu1", {"command": ["x"], "env": {"TOKEN": canary, "MODE": "fast"}})
        reader.list_jobs()  # another connection has read the store (as the CLI does)
        assert canary.encode() in _db_bytes(db)  # queued: the value is needed
        if how == "cancel while queued":
            store.request_cancel(job.id)
        else:
            store.transition_job(job.id, ["queued"], "dispatched")
            store.transition_job(job.id, ["dispatched"], "running")
            if how == "last launch":
                store.record_launch(job.id)  # max_attempts 1: no later attempt can need the value
            else:
                store.transition_job(job.id, ["running"], "lost", error="gone")
        assert store.get_job(job.id).spec["env"] == {"TOKEN": None, "MODE": None}  # the names stay
        assert canary.encode() not in _db_bytes(db)
        assert store.truncate_wal_if_owed() is True


def test_env_values_stay_while_another_attempt_may_need_them(store):
    store.upsert_agent(_agent())
    job = store.submit_job("gpu1", {"command": ["x"], "env": {"TOKEN": "t"}}, max_attempts=2)
    store.transition_job(job.id, ["queued"], "dispatched")
    store.transition_job(job.id, ["dispatched"], "running")
    store.record_launch(job.id)  # attempt 1 of 2
    assert store.get_job(job.id).spec["env"] == {"TOKEN": "t"}


HOSTILE = "caf\udcc3 \udcff\udcfe \x1b[31m\x00 \ud800 NVML"  # undecodable bytes, a lone surrogate, ESC, NUL


def _strict_text(value) -> None:
    """Every string in a stored value encodes as strict UTF-8 (no surrogate survived)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            _strict_text(key)
            _strict_text(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _strict_text(item)


def test_hostile_text_in_every_field_is_recorded_escaped(store, db):
    store.upsert_agent(_agent())
    snapshot = {"gpus": [{"index": 0, "name": HOSTILE, "uuid": HOSTILE, HOSTILE: HOSTILE}], "tool": HOSTILE,
                "host": {"hostname": HOSTILE, "uptime_s": 1}}
    store.record_heartbeats({"gpu1": ProbeOutcome(True, snapshot)}, _count_misses)
    store.record_heartbeats({"gpu1": ProbeOutcome(False, reason="nvml_error", msg=HOSTILE, output_head=HOSTILE)},
                            _count_misses)
    store.set_agent_state("gpu1", "error", reason="nvml_error", msg=HOSTILE)
    good, failed = store.list_snapshots("gpu1")[1], store.list_snapshots("gpu1")[0]
    _strict_text(good.data)
    assert good.data["gpus"][0]["name"].startswith("caf\\xc3 \\xff\\xfe")  # the bytes stay visible
    _strict_text(failed.msg)
    assert "\\xff\\xfe" in failed.msg
    row = store.get_agent("gpu1")
    _strict_text(row.state_msg)
    for event in store.list_events(agent="gpu1"):
        _strict_text(event.detail)
    # And the file itself holds nothing a strict reader refuses.
    raw = sqlite3.connect(db)
    raw.text_factory = bytes
    for table in ("agents", "snapshots", "events"):
        for record in raw.execute(f"SELECT * FROM {table}"):  # noqa: S608 - fixed table names
            for cell in record:
                if isinstance(cell, bytes):
                    cell.decode("utf-8")
    raw.close()


def test_one_host_whose_answer_cannot_be_recorded_never_keeps_the_others_out(store):
    for name in ("gpu1", "gpu2", "gpu3"):
        store.upsert_agent(_agent(name))
    unserialisable = {"gpus": [{"index": 0, "name": {"a", "set"}}]}  # json.dumps refuses a set
    changes = store.record_heartbeats({"gpu1": ProbeOutcome(True, {"gpus": []}),
                                       "gpu2": ProbeOutcome(True, unserialisable),
                                       "gpu3": ProbeOutcome(True, {"gpus": []})}, _count_misses)
    assert {c.agent: c.new for c in changes} == {"gpu1": "online", "gpu2": "stale", "gpu3": "online"}
    bad = store.get_agent("gpu2")
    assert bad.state_reason == "unrecordable" and "could not record this host's answer" in bad.state_msg, bad
    assert store.latest_snapshot("gpu1") is not None and store.latest_snapshot("gpu3") is not None


def _ok_or_error(row, outcome):
    if outcome.ok:
        return AgentUpdate("online", 0, seen=True)
    return AgentUpdate("error", 0, outcome.reason, outcome.msg)


def test_a_flapping_host_adds_a_few_events_per_window_not_one_per_tick(store, monkeypatch):
    from datetime import datetime, timedelta, timezone

    from hwledger.store import agents as agent_tables

    clock = [datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)]
    monkeypatch.setattr(agent_tables, "utc_now", lambda: clock[0].isoformat(timespec="milliseconds"))
    store.upsert_agent(_agent())
    ticks = 0

    def flap(times: int) -> None:
        nonlocal ticks
        for _index in range(times):
            ok = ticks % 2 == 0
            ticks += 1
            outcome = ProbeOutcome(True, {"gpus": []}) if ok else ProbeOutcome(False, reason="nvml_error", msg="x")
            store.record_heartbeats({"gpu1": outcome}, _ok_or_error)
            clock[0] += timedelta(seconds=5)

    flap(60)  # five minutes of a tool that fails every other tick
    pairs = [(e.detail["old"], e.detail["new"]) for e in store.list_events(agent="gpu1", kind="agent_state")]
    assert sorted(pairs) == [("error", "online"), ("online", "error"), ("pending", "online")]
    assert store.get_agent("gpu1").state_events_coalesced == 58 - 1  # every later change was only counted
    clock[0] += timedelta(seconds=agent_tables.STATE_EVENT_WINDOW_S)
    flap(1)  # past the window: the next change is an event again and says how many it stands for
    latest = store.list_events(agent="gpu1", kind="agent_state")[-1]
    assert latest.detail["coalesced"] == 57 and store.get_agent("gpu1").state_events_coalesced == 0
    # A host that only degrades keeps every step.
    store.upsert_agent(_agent("gpu2"))
    for _index in range(4):
        store.record_heartbeats({"gpu2": ProbeOutcome(False, reason="unreachable", msg="down")}, _count_misses)
    assert [e.detail["new"] for e in store.list_events(agent="gpu2", kind="agent_state")] == ["stale", "offline"]
