"""Settling a job without SSH: from its result file (or the lack of one), and the attempt rule (another
attempt after a loss, failures before the launch not counted, bounded)."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema as jobs_schema

from hwledger.job_runs import JobRunOutcome
from hwledger.job_settle import discard_settled_results, read_result, settle_job
from hwledger.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "fleet.db") as opened:
        from hwledger.store import AgentRecord

        opened.upsert_agent(AgentRecord(name="a", hostname="h", port=22, ssh_user="u", key_path="/k"))
        yield opened


def _running_job(store: Store, *, launched: bool = False, max_attempts: int = 1, env: dict | None = None) -> str:
    job_id = str(uuid.uuid4())
    store.submit_job("a", jobs_schema.new_job(["true"], job_id=job_id, env=env or {}), job_id=job_id,
                     max_attempts=max_attempts)
    _start(store, job_id, launched=launched)
    return job_id


def _start(store: Store, job_id: str, *, launched: bool) -> None:
    assert store.transition_job(job_id, ["queued"], "dispatched")
    assert store.transition_job(job_id, ["dispatched"], "running")
    if launched:
        assert store.record_launch(job_id)


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
    job_id = _running_job(store, launched=True)
    assert settle_job(store, store.get_job(job_id), tmp_path, None, interrupted="crash") == "lost"
    job = store.get_job(job_id)
    assert job.error == "crash" and job.cleanup_pending


def test_a_cancel_request_settles_as_cancelled(store, tmp_path):
    job_id = _running_job(store)
    store.request_cancel(job_id)
    assert settle_job(store, store.get_job(job_id), tmp_path, JobRunOutcome("cancelled")) == "cancelled"


def test_a_failed_playbook_without_result_is_a_failed_job(store, tmp_path):
    job_id = _running_job(store)
    outcome = JobRunOutcome("failed", "runner_unavailable: no python3", reason="runner_unavailable")
    assert settle_job(store, store.get_job(job_id), tmp_path, outcome) == "failed"
    assert store.get_job(job_id).error == "runner_unavailable: no python3"


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


# -- the attempt rule ---------------------------------------------------------------------------


def _history(store: Store, job_id: str) -> list[str]:
    return [e.detail["new"] for e in store.list_events(job_id=job_id, kind="job_state")]


def test_a_job_lost_after_its_launch_runs_again_while_attempts_remain(store, tmp_path):
    job_id = _running_job(store, launched=True, max_attempts=2, env={"TOKEN": "secret-1"})
    assert settle_job(store, store.get_job(job_id), tmp_path, None, interrupted="agent_offline: gone") == "queued"
    job = store.get_job(job_id)
    assert (job.state, job.attempts, job.launched_at, job.cleanup_pending) == ("queued", 1, None, True)
    assert job.error.startswith("agent_offline: gone (attempt 1 of 2")
    assert job.spec["env"] == {"TOKEN": "secret-1"}  # the next attempt needs it
    _start(store, job_id, launched=True)  # the last attempt: its values leave the store at its launch
    assert store.get_job(job_id).spec["env"] == {"TOKEN": None}
    assert settle_job(store, store.get_job(job_id), tmp_path, None, interrupted="agent_offline: gone") == "lost"
    job = store.get_job(job_id)
    assert (job.state, job.attempts) == ("lost", 2)
    assert _history(store, job_id) == ["queued", "dispatched", "running", "queued", "dispatched", "running", "lost"]


def test_a_job_whose_command_ran_is_never_run_again(store, tmp_path):
    results = tmp_path / "results"
    job_id = _running_job(store, launched=True, max_attempts=3)
    _write_result(results, job_id, "failed", exit_code=2)
    assert settle_job(store, store.get_job(job_id), results, None) == "failed"
    assert store.get_job(job_id).exit_code == 2


def test_failures_before_the_launch_count_no_attempt_and_are_bounded(store, tmp_path):
    from hwledger.job_settle import MAX_START_FAILURES

    job_id = _running_job(store)
    unreachable = JobRunOutcome("unreachable", "unreachable: ssh: connect refused", reason="unreachable")
    for _try in range(MAX_START_FAILURES):
        assert settle_job(store, store.get_job(job_id), tmp_path, unreachable) == "queued"
        job = store.get_job(job_id)
        assert job.attempts == 0 and "no attempt was counted" in job.error
        _start(store, job_id, launched=False)
    # Given up after MAX_START_FAILURES: the job ends with the last reason.
    assert settle_job(store, store.get_job(job_id), tmp_path, unreachable) == "lost"
    job = store.get_job(job_id)
    assert job.error.startswith("unreachable: ") and job.attempts == 0
    assert store.start_failures(job_id) == MAX_START_FAILURES


def test_a_failure_no_retry_can_mend_ends_the_job_at_once(store, tmp_path):
    job_id = _running_job(store)
    dir_failed = JobRunOutcome("failed", "task_failed: Create the job's private directory: disk full")
    assert settle_job(store, store.get_job(job_id), tmp_path, dir_failed) == "queued"  # may work next time
    _start(store, job_id, launched=False)
    no_runner = JobRunOutcome("failed", "runner_unavailable: python3 is not on its PATH", reason="runner_unavailable")
    assert settle_job(store, store.get_job(job_id), tmp_path, no_runner) == "failed"


def test_a_launch_seen_by_the_run_counts_even_if_it_was_not_recorded(store, tmp_path):
    job_id = _running_job(store)
    outcome = JobRunOutcome("completed", launched=True)
    assert settle_job(store, store.get_job(job_id), tmp_path, outcome, interrupted="no_result: gone") == "lost"
