"""The server's decisions without SSH: agent states, result classification, job settling, the loop."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import jobs as jobs_schema
from hwledger import agents_file, paths
from hwledger.server import (
    OFFLINE_AFTER_MISSES,
    Fleet,
    HostOutcome,
    JobRunOutcome,
    Server,
    agent_record,
    decide_agent_state,
    is_job_dir,
    outcome_from_result,
    read_result,
    settle_job,
)
from hwledger.store import AgentRow, HeartbeatRecord, Store


def _row(state="online", misses=0, last_seen="2026-01-01T00:00:00+00:00") -> AgentRow:
    return AgentRow("a", "h", None, 22, "u", "/k", None, None, None, None, "t", state, None, None, "t",
                    last_seen, None, misses, None, None)


@pytest.mark.parametrize(
    ("row", "record", "expected"),
    [
        (_row("offline", 5), HeartbeatRecord("a", True, {}), ("online", 0)),
        (_row("online", 0), HeartbeatRecord("a", False, reason="unreachable"), ("stale", 1)),
        (_row("stale", 1), HeartbeatRecord("a", False, reason="unreachable"), ("stale", 2)),
        (_row("stale", 2), HeartbeatRecord("a", False, reason="unreachable"), ("offline", 3)),
        (_row("pending", 0, last_seen=None), HeartbeatRecord("a", False, reason="unreachable"), ("pending", 1)),
        (_row("stale", 2), HeartbeatRecord("a", False, reason="no_answer"), ("offline", 3)),
        (_row("stale", 2), HeartbeatRecord("a", False, reason="nvml_error"), ("error", 0)),
        (_row("online", 0), HeartbeatRecord("a", False, reason="host_key_changed"), ("host_key_changed", 0)),
    ],
)
def test_agent_state_rules(row, record, expected):
    update = decide_agent_state(row, record)
    assert (update.state, update.consecutive_misses) == expected
    assert update.seen == (expected[0] in ("online", "error"))


def test_offline_takes_three_misses():
    assert OFFLINE_AFTER_MISSES == 3


def test_result_classification():
    ok = outcome_from_result({"ansible_facts": {"hwledger_snapshot": {"gpus": []}}})
    assert ok.ok and ok.snapshot == {"gpus": []}
    tool = outcome_from_result({"failed": True, "reason": "driver_unavailable", "msg": "NVML", "rc": 9})
    assert (tool.ok, tool.reason) == (False, "driver_unavailable")
    hung_tool = outcome_from_result({"failed": True, "reason": "timeout", "rc": 124, "host": {}})
    assert hung_tool.reason == "timeout"
    hung_exec = outcome_from_result({"failed": True, "reason": "timeout", "rc": None, "msg": "no answer"})
    assert hung_exec.reason == "no_answer"
    changed = outcome_from_result({"msg": "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@"}, unreachable=True)
    assert changed.reason == "host_key_changed"
    down = outcome_from_result({"msg": "Connection refused"}, unreachable=True)
    assert down.reason == "unreachable"


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/tmp/hwledger-job-abc_12", True),
        ("/home/u/.cache/hwledger-job-x", True),
        ("/tmp/../etc/hwledger-job-x", False),
        ("relative/hwledger-job-x", False),
        ("/tmp/hwledger-job-{{ lookup('pipe','id') }}", False),
        ("/tmp/other", False),
        ("/", False),
    ],
)
def test_is_job_dir(path, ok):
    assert is_job_dir(path) is ok


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "fleet.db") as opened:
        from hwledger.store import AgentRecord

        opened.upsert_agent(AgentRecord(name="a", hostname="h", port=22, ssh_user="u", key_path="/k"))
        yield opened


def _running_job(store: Store) -> str:
    job_id = str(uuid.uuid4())
    store.submit_job("a", jobs_schema.new_job(["true"], job_id=job_id), job_id=job_id)
    store.transition_job(job_id, ["queued"], "dispatched")
    store.transition_job(job_id, ["dispatched"], "running")
    return job_id


def _write_result(results, job_id, state="succeeded", exit_code=0):
    result = jobs_schema.make_result(job_id, state, started=time.time() - 1, finished=time.time(),
                                     exit_code=exit_code, stdout=b"out")
    results.mkdir(exist_ok=True)
    jobs_schema.result_path(results, job_id).write_bytes(jobs_schema.encode_result(result))


def test_a_result_file_decides_whatever_the_run_said(store, tmp_path):
    results = tmp_path / "results"
    job_id = _running_job(store)
    _write_result(results, job_id, "failed", exit_code=7)
    state = settle_job(store, store.get_job(job_id), results, JobRunOutcome("unreachable", "gone"))
    job = store.get_job(job_id)
    assert state == "failed" and job.exit_code == 7 and job.result["stdout_tail"] == "out"
    assert not job.cleanup_pending
    # Settled once: a second settle changes nothing.
    assert settle_job(store, job, results, None) is None


def test_without_a_result_the_job_is_lost_and_its_remote_dir_cleaned_later(store, tmp_path):
    job_id = _running_job(store)
    assert settle_job(store, store.get_job(job_id), tmp_path, None, interrupted="crash") == "lost"
    job = store.get_job(job_id)
    assert job.error == "crash" and job.cleanup_pending


def test_a_cancel_request_settles_as_cancelled(store, tmp_path):
    job_id = _running_job(store)
    store.request_cancel(job_id)
    assert settle_job(store, store.get_job(job_id), tmp_path, JobRunOutcome("cancelled")) == "cancelled"


def test_a_failed_playbook_without_result_is_a_failed_job(store, tmp_path):
    job_id = _running_job(store)
    assert settle_job(store, store.get_job(job_id), tmp_path, JobRunOutcome("failed", "no python3")) == "failed"
    assert store.get_job(job_id).error == "no python3"


def test_a_forged_result_is_rejected(store, tmp_path):
    results = tmp_path / "results"
    job_id = _running_job(store)
    other = str(uuid.uuid4())
    _write_result(results, other)
    os.rename(jobs_schema.result_path(results, other), jobs_schema.result_path(results, job_id))
    result, why = read_result(results, job_id)
    assert result is None and "result_wrong_job" in why
    assert settle_job(store, store.get_job(job_id), results, JobRunOutcome("completed")) == "failed"
    assert "rejected" in store.get_job(job_id).error


def test_a_symlinked_result_is_not_followed(store, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    job_id = _running_job(store)
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({}))
    jobs_schema.result_path(results, job_id).symlink_to(target)
    result, why = read_result(results, job_id)
    assert result is None and why is not None


# -- the loop, with a stand-in transport -------------------------------------------------------


class _SlowTransport:
    """Answers every agent as online after `delay` seconds; records overlapping calls."""

    def __init__(self, delay: float):
        self.delay = delay
        self.calls: list[tuple[float, float]] = []
        self._inside = threading.Lock()
        self.overlapped = False

    def tick(self, agents, *, cancel):
        if not self._inside.acquire(blocking=False):
            self.overlapped = True
            return {}
        try:
            start = time.monotonic()
            while time.monotonic() - start < self.delay and not cancel():
                time.sleep(0.01)
            self.calls.append((start, time.monotonic()))
            return {a.name: HostOutcome(True, snapshot={"gpus": []}) for a in agents}
        finally:
            self._inside.release()


@pytest.fixture
def fleet(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir(mode=0o700)
    fleet = Fleet(cfg / "ssh-agents.toml", cfg / "known_hosts", tmp_path / "d" / "fleet.db")
    agent = agents_schema.Agent(name="a", hostname="192.0.2.1", ssh_user="u", ssh_key_path="/k")
    agents_file.append_agent(fleet.config, agent)
    with Store.open(fleet.db) as store:
        store.upsert_agent(agent_record(agent))
    yield fleet
    directory = paths.control_dir(fleet.db)
    if directory.parent == Path("/tmp") / f"hwledger-{os.getuid()}":
        shutil.rmtree(directory, ignore_errors=True)


def test_ticks_never_overlap_and_an_overrun_is_recorded(fleet):
    transport = _SlowTransport(delay=0.3)
    server = Server(fleet, interval_s=0.2, transport=transport)
    server.run(max_ticks=3)
    assert len(transport.calls) == 3 and not transport.overlapped
    for (_prev_start, end), (start, _next_end) in zip(transport.calls, transport.calls[1:]):
        assert start >= end  # the next tick started after the previous one ended ...
        assert start - end < 0.15  # ... at once, not an interval later
    with Store.open(fleet.db) as store:
        overruns = store.list_events(kind="tick_overrun")
        # Recorded at once, then counted (at most one row a minute), the count written at shutdown;
        # the last tick is not followed by another, so it is no overrun.
        assert [e.detail["occurrences"] for e in overruns] == [1, 1]
        assert overruns[0].detail["duration_s"] >= 0.3
        assert store.get_agent("a").state == "online"


def test_ticks_keep_their_cadence(fleet):
    transport = _SlowTransport(delay=0.05)
    server = Server(fleet, interval_s=0.3, transport=transport)
    server.run(max_ticks=3)
    starts = [start for start, _end in transport.calls]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0.25 < gap < 0.45 for gap in gaps), gaps


def test_stop_interrupts_a_tick_quickly(fleet):
    transport = _SlowTransport(delay=30)
    server = Server(fleet, interval_s=1, transport=transport)
    threading.Timer(0.3, server.request_stop).start()
    started = time.monotonic()
    server.run()
    assert time.monotonic() - started < 2.0
