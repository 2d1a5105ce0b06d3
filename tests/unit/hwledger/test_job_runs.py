"""Job runs without SSH: which remote paths may be cleaned up, and how a job is settled from its result
file (or the lack of one)."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema as jobs_schema

from hwledger.job_runs import JobRunOutcome, discard_settled_results, is_job_dir, read_result, settle_job
from hwledger.store import Store


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
