"""The job workers without SSH (a stand-in for the Ansible runs): the launch counts the attempt and removes
the env values when no attempt can need them, a second start is never made (the run is followed instead),
a reconcile's findings settle the job, and a run whose agent went offline ends `lost`."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema

from hwledger.ansible_runs import HostEvent
from hwledger.job_runs import ALREADY_STARTED, JobRunOutcome
from hwledger.job_workers import RECONCILE_RETRY, JobWorkers
from hwledger.store import AgentRecord, Store

AGENT = agents_schema.Agent(name="a", hostname="192.0.2.1", ssh_user="u", ssh_key_path="/k")
DIR = "/tmp/hwledger-job-x-abcd1234"
# job_start's answer: the runner was started in DIR.
LAUNCH = HostEvent("runner_on_ok", "a", "Start the job on the remote", "hwledger.fleet.job_start",
                   {"changed": True, "path": DIR, "pid": 4242, "runner": "staged"})


class FakeJobs:
    """Scripted runs: `runs` and `reconciles` are popped in order; each may be a callable taking the run's
    hooks (to emit events or wait for a cancel)."""

    def __init__(self, results_dir, *, runs=(), reconciles=()):
        self.results_dir = results_dir
        self.runs, self.reconciles = list(runs), list(reconciles)
        self.calls: list[str] = []

    def run(self, job, agent, *, cancel, on_event, on_private_dir):
        self.calls.append("run")
        step = self.runs.pop(0)
        return step(job, cancel, on_event) if callable(step) else step

    def reconcile(self, job, agent, *, cancel, on_private_dir=None):
        self.calls.append("reconcile")
        step = self.reconciles.pop(0)
        return step(job, cancel) if callable(step) else step

    def cleanup(self, job_id, agent, remote_dir, *, cancel):
        self.calls.append("cleanup")
        return JobRunOutcome("completed")


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "fleet.db"
    with Store.open(path) as store:
        store.upsert_agent(AgentRecord(name="a", hostname="192.0.2.1", port=22, ssh_user="u", key_path="/k"))
    return path


def _dispatched(db, *, env=None, max_attempts=1) -> str:
    with Store.open(db) as store:
        job = store.submit_job("a", job_schema.new_job(["true"], env=env or {}), max_attempts=max_attempts)
        store.transition_job(job.id, ["queued"], "dispatched")
        return job.id


def _workers(db, tmp_path, jobs) -> JobWorkers:
    return JobWorkers(lambda: Store.open(db), jobs, tmp_path / "results", threading.Event())


def _job(db, job_id):
    with Store.open(db) as store:
        return store.get_job(job_id)


def _write_result(results_dir, job_id, exit_code):
    results_dir.mkdir(exist_ok=True)
    state = "succeeded" if exit_code == 0 else "failed"
    result = job_schema.make_result(job_id, state, started=time.time() - 1, finished=time.time(), exit_code=exit_code)
    job_schema.result_path(results_dir, job_id).write_bytes(job_schema.encode_result(result))


def test_the_launch_counts_the_attempt_and_the_last_one_takes_the_env_values_out(db, tmp_path):
    job_id = _dispatched(db, env={"TOKEN": "secret"})
    seen = {}

    def run(job, cancel, on_event):
        seen["spec env"] = job.spec["env"]  # the run gets the values
        on_event(LAUNCH)
        seen["stored env"] = _job(db, job.id).spec["env"]
        _write_result(tmp_path / "results", job.id, 0)
        return JobRunOutcome("completed", launched=True)

    _workers(db, tmp_path, FakeJobs(tmp_path, runs=[run])).run_job(job_id, AGENT)
    job = _job(db, job_id)
    assert seen == {"spec env": {"TOKEN": "secret"}, "stored env": {"TOKEN": None}}
    assert (job.state, job.attempts, job.exit_code) == ("succeeded", 1, 0)


def test_a_second_start_is_refused_and_the_first_run_followed(db, tmp_path):
    job_id = _dispatched(db)
    refused = JobRunOutcome("failed", f"{ALREADY_STARTED}: Refuse: ...", reason=ALREADY_STARTED)

    def reconcile(job, cancel):
        _write_result(tmp_path / "results", job.id, 3)
        return JobRunOutcome("completed", report={"found": True, "dir": DIR, "launched": True, "running": False,
                                                  "result": True}, launched=True)

    jobs = FakeJobs(tmp_path, runs=[refused], reconciles=[reconcile])
    _workers(db, tmp_path, jobs).run_job(job_id, AGENT)
    job = _job(db, job_id)
    assert jobs.calls == ["run", "reconcile"]  # never a second run, nor a clean-up of the dir it followed
    assert (job.state, job.exit_code, job.attempts, job.cleanup_pending) == ("failed", 3, 1, False)


def _running(db) -> str:
    job_id = _dispatched(db)
    with Store.open(db) as store:
        store.transition_job(job_id, ["dispatched"], "running")
        store.update_job(job_id, remote_dir=DIR)
    return job_id


@pytest.mark.parametrize(
    ("report", "state", "reason", "cleanup"),
    [
        ({"found": False}, "queued", "nothing_on_host", False),  # nothing ran: another try, no attempt counted
        ({"found": True, "dir": DIR, "launched": True}, "lost", "no_result", False),
        ({"found": True, "dir": DIR, "launched": False}, "queued", "no_result", False),
        ({"found": True, "dir": DIR, "launched": True, "running": True}, "lost", "runner_overran", True),
    ],
)
def test_what_a_reconcile_found_settles_the_job(db, tmp_path, report, state, reason, cleanup):
    job_id = _running(db)
    report = {"found": False, "dir": None, "launched": False, "running": False, "result": False, **report}
    outcome = JobRunOutcome("completed", report=report, launched=report["launched"])
    jobs = FakeJobs(tmp_path, reconciles=[outcome])
    assert _workers(db, tmp_path, jobs).reconcile_job(job_id, AGENT) is None
    job = _job(db, job_id)
    assert job.state == state and job.error.startswith(f"{reason}: ")
    # The reconcile removed the dir when its runner was gone; a runner still running is stopped by the clean-up.
    assert ("cleanup" in jobs.calls) is cleanup and not job.cleanup_pending


def test_a_reconcile_that_could_not_ask_the_host_leaves_the_job_running(db, tmp_path):
    job_id = _running(db)
    jobs = FakeJobs(tmp_path, reconciles=[JobRunOutcome("unreachable", "unreachable: refused", reason="unreachable")])
    assert _workers(db, tmp_path, jobs).reconcile_job(job_id, AGENT) == RECONCILE_RETRY
    assert _job(db, job_id).state == "running"


def test_a_refused_result_found_by_a_reconcile_fails_the_job_with_its_reason(db, tmp_path):
    job_id = _running(db)
    outcome = JobRunOutcome("failed", "result_not_json: Validate the result: not ASCII", reason="result_not_json",
                            report={"found": True, "dir": DIR, "launched": True, "result": True}, launched=True)
    _workers(db, tmp_path, FakeJobs(tmp_path, reconciles=[outcome])).reconcile_job(job_id, AGENT)
    job = _job(db, job_id)
    assert (job.state, job.attempts) == ("failed", 1) and job.error.startswith("result_not_json: ")


def test_a_run_whose_agent_went_offline_stops_and_the_job_is_lost(db, tmp_path):
    job_id = _dispatched(db, max_attempts=1)
    stopped = threading.Event()

    def run(job, cancel, on_event):
        on_event(LAUNCH)
        deadline = time.monotonic() + 30
        while not cancel() and time.monotonic() < deadline:
            time.sleep(0.01)
        stopped.set()
        return JobRunOutcome("cancelled", "the run was stopped", launched=True)

    jobs = FakeJobs(tmp_path, runs=[run])
    workers = _workers(db, tmp_path, jobs)
    worker = threading.Thread(target=workers.run_job, args=(job_id, AGENT))
    worker.start()
    while _job(db, job_id).launched_at is None:
        time.sleep(0.01)
    workers.abandon(job_id, "agent_offline: the agent a missed 3 heartbeats in a row")
    worker.join(10)
    job = _job(db, job_id)
    assert stopped.is_set() and job.state == "lost" and job.error.startswith("agent_offline: ")
    assert job.cleanup_pending and "cleanup" not in jobs.calls  # cleaned when the agent answers again


def test_a_job_whose_env_values_are_gone_never_runs(db, tmp_path):
    job_id = _dispatched(db, env={"TOKEN": "t"})
    with Store.open(db) as store:  # as after the launch of its last attempt (a job put back by hand, say)
        store._conn.execute("UPDATE jobs SET spec = json_set(spec, '$.env.TOKEN', json('null')) WHERE id = ?",
                            (job_id,))
    jobs = FakeJobs(tmp_path)
    _workers(db, tmp_path, jobs).run_job(job_id, AGENT)
    job = _job(db, job_id)
    assert jobs.calls == [] and job.state == "failed" and job.error.startswith("env_redacted: ")


def test_unknown_ids_are_ignored(db, tmp_path):
    jobs = FakeJobs(tmp_path)
    workers = _workers(db, tmp_path, jobs)
    workers.run_job(str(uuid.uuid4()), AGENT)
    assert workers.reconcile_job(str(uuid.uuid4()), AGENT) is None and jobs.calls == []


def test_a_cancel_during_a_reconcile_settles_the_job_cancelled(db, tmp_path):
    job_id = _running(db)
    with Store.open(db) as store:
        store.request_cancel(job_id)

    def reconcile(job, cancel):
        assert cancel()  # the user's cancel stops the reconcile run
        return JobRunOutcome("cancelled", "the run was stopped")

    jobs = FakeJobs(tmp_path, reconciles=[reconcile])
    assert _workers(db, tmp_path, jobs).reconcile_job(job_id, AGENT) is None
    job = _job(db, job_id)
    assert job.state == "cancelled" and jobs.calls == ["reconcile", "cleanup"]
