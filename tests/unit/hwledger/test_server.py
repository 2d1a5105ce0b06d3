"""The server's decisions without SSH: agent states, result classification, job settling, the loop."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import jobs as jobs_schema
from hwledger import agents_file, paths
from hwledger import server as server_mod
from hwledger.errors import UserError
from hwledger.server import (
    HOST_KEY_UNKNOWN_MSG,
    OFFLINE_AFTER_MISSES,
    SERVE_LOCK_NAME,
    Fleet,
    HostOutcome,
    JobRunOutcome,
    Server,
    agent_record,
    decide_agent_state,
    discard_settled_results,
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


def test_no_pinned_host_key_is_an_error_that_says_what_to_do_and_blocks_nothing():
    update = decide_agent_state(_row("online", 1), HeartbeatRecord(
        "a", False, reason="host_key_unknown", msg="No ED25519 host key is known for hwledger-agent-a"))
    assert (update.state, update.consecutive_misses, update.seen) == ("error", 1, False)
    assert update.msg.startswith(HOST_KEY_UNKNOWN_MSG) and "No ED25519 host key is known" in update.msg
    assert "register-ssh" in update.msg
    # Not the blocking state: the next heartbeat still asks the host (after it is registered again).
    assert decide_agent_state(_row("error"), HeartbeatRecord("a", True, {})).state == "online"


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
    # No key pinned: ssh also ends with "Host key verification failed", but nothing changed.
    unknown = outcome_from_result({"msg": "Failed to connect to the host via ssh: No ED25519 host key is known for "
                                          "hwledger-agent-a and you have requested strict checking.\r\n"
                                          "Host key verification failed."}, unreachable=True)
    assert unknown.reason == "host_key_unknown"


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
    # Committed to the store: the file is gone, the store holds the result.
    assert not jobs_schema.result_path(results, job_id).exists()
    # Settled once: a second settle changes nothing.
    assert settle_job(store, job, results, None) is None
    assert store.get_job(job_id).result == job.result


def test_result_files_already_in_the_store_are_removed_at_start(store, tmp_path):
    results = tmp_path / "results"
    done, active = _running_job(store), _running_job(store)
    _write_result(results, done)
    settle_job(store, store.get_job(done), results, JobRunOutcome("completed"))
    # A server that stopped between committing the result and deleting the file left it behind ...
    result_bytes = jobs_schema.encode_result(store.get_job(done).result)
    jobs_schema.result_path(results, done).write_bytes(result_bytes)
    # ... and a running job's file, not committed yet, must stay: it decides that job's state.
    _write_result(results, active)
    assert discard_settled_results(store, results) == 1
    assert not jobs_schema.result_path(results, done).exists()
    assert jobs_schema.result_path(results, active).exists()


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


def test_a_second_server_on_the_same_store_is_refused_naming_the_first(fleet):
    made: list[Server] = []

    def serve() -> None:  # a store connection is used by the thread that opened it
        made.append(Server(fleet, interval_s=0.05, transport=_SlowTransport(delay=0)))
        made[0].run()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        lock = fleet.db.parent / SERVE_LOCK_NAME
        deadline = time.monotonic() + 10
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
        second = Server(fleet, interval_s=0.05, transport=_SlowTransport(delay=0))
        with pytest.raises(UserError, match=f"another `hwledger fleet serve` \\(pid {os.getpid()}\\)"):
            second.run(once=True)
    finally:
        while thread.is_alive() and not made:
            time.sleep(0.01)
        made[0].request_stop()
        thread.join(10)
    # Released with the server: the next one starts.
    assert Server(fleet, interval_s=0.05, transport=_SlowTransport(delay=0)).run(once=True) == 0


def test_a_vanished_or_broken_agents_file_removes_no_agent(fleet):
    transport = _SlowTransport(delay=0)
    server = Server(fleet, interval_s=1, transport=transport)
    try:
        assert server.tick().asked == 1
        good = fleet.config.read_text()
        fleet.config.unlink()
        for _tick in range(3):
            report = server.tick()
            assert report.asked == 1 and report.outcomes["a"].ok  # still heartbeated
        fleet.config.write_text("[[agents]]\nname = \n")
        fleet.config.chmod(0o600)
        server.tick()
        with Store.open(fleet.db) as store:
            assert store.get_agent("a").state == "online"
            errors = [e.detail["msg"] for e in store.list_events(kind="config_error")]
        # Once per problem (then at most once a minute), each saying what is wrong.
        assert len(errors) == 2, errors
        assert "does not exist" in errors[0] and str(fleet.config) in errors[0]
        fleet.config.write_text(good)
        fleet.config.chmod(0o600)
        assert server.tick().asked == 1
        # A file that parses and no longer lists the agent is a removal, as before.
        fleet.config.write_text(agents_file.NEW_FILE_HEADER)
        fleet.config.chmod(0o600)
        assert server.tick().asked == 0
        with Store.open(fleet.db) as store:
            assert store.get_agent("a").state == "removed"
    finally:
        server.close()


class _CompletingJobs:
    """Job runs that end at once as completed (no SSH), and clean-ups that do nothing."""

    def run(self, job, agent, *, cancel, on_event, on_private_dir):
        return JobRunOutcome("completed")

    def cleanup(self, job_id, agent, remote_dir, *, cancel):
        return JobRunOutcome("completed")


def test_a_job_worker_that_dies_after_running_does_not_leave_the_job_running(fleet, monkeypatch):
    real_settle = server_mod.settle_job

    def settle_failing_in_workers(*args, **kwargs):
        if threading.current_thread().name.startswith("hwledger-job"):
            raise RuntimeError("store exploded")
        return real_settle(*args, **kwargs)

    monkeypatch.setattr(server_mod, "settle_job", settle_failing_in_workers)
    with Store.open(fleet.db) as store:
        job_id = store.submit_job("a", jobs_schema.new_job(["true"])).id
    server = Server(fleet, interval_s=1, transport=_SlowTransport(delay=0), jobs=_CompletingJobs())
    try:
        assert server.tick().dispatched == [job_id]
        server.wait_for_workers(timeout=10)
    finally:
        server.close()
    with Store.open(fleet.db) as store:
        job = store.get_job(job_id)
        history = [e.detail["new"] for e in store.list_events(job_id=job_id) if e.kind == "job_state"]
    assert job.state == "lost" and job.cleanup_pending and "worker failed" in job.error
    assert history == ["queued", "dispatched", "running", "lost"]
