"""Settling a job: its one terminal state from its result file (or the lack of one), or another attempt.

A valid result file decides, whatever else happened (no fetched result is ever lost). Without one:
`cancelled` when asked for, `failed` when the playbook failed on a reachable host, `lost` when nobody can
say what happened on the host. Then the attempt rule (J72, docs/fleet-server.md "Attempts"):

- an attempt counts when the job's command was launched on the host (`record_launch`: as soon as the role's
  task that starts the runner begins; when in doubt, an attempt counts);
- a job `lost` after its launch is queued again while `attempts < max_attempts`;
- a job that failed or was lost *before* its launch (unreachable, its private dir could not be made, the
  upload failed, the server stopped first) is queued again without counting an attempt, up to
  MAX_START_FAILURES times (then it ends with the last failure); failures that another try cannot mend
  (no runner on the host, an invalid job, an unsafe results dir) end it at once;
- a job whose command ran and ended (`succeeded`, `failed`, `timed_out`) is never run again: its exit code
  is the answer.

Job errors read `reason: message`; the reasons are listed in docs/fleet-server.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema

from hwledger.job_logs import finish_log
from hwledger.job_runs import JobRunOutcome, reason_of
from hwledger.store import JOB_ACTIVE_STATES, JobRow, Store, StoreError, env_redacted

log = logging.getLogger("hwledger.jobs")

# A job that keeps failing before its command starts is given up after this many tries (each on a tick at
# which its agent answered, so a dead host is not dialled for it: the agent's own backoff applies).
MAX_START_FAILURES = 5
# Failures before the launch that no retry can mend.
PERMANENT_START_FAILURES = frozenset({"runner_unavailable", "invalid_job", "results_dir_unsafe", "env_redacted"})

_RESULT_STATE_TO_JOB = {"succeeded": "succeeded", "failed": "failed", "timed_out": "timed_out", "error": "failed"}


def read_result(results_dir: Path, job_id: str) -> tuple[dict | None, str | None]:
    """(validated result, None), (None, why it was rejected) or (None, None) when there is none."""
    path = job_schema.result_path(results_dir, job_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"result_unreadable: result file {path} cannot be read: {exc.strerror}"
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(job_schema.RESULT_MAX_BYTES + 1)
    try:
        return job_schema.validate_result(raw, expected_job_id=job_id), None
    except job_schema.ResultError as exc:
        return None, f"{exc.reason}: result file rejected: {exc}"


def settle_job(store: Store, job: JobRow, results_dir: Path, outcome: JobRunOutcome | None,
               *, interrupted: str | None = None) -> str | None:
    """Give an active job its one terminal state, or queue it again (see the module's notes). Returns the
    state it went to (`queued` when requeued; None when another writer got there first)."""
    result, rejected = read_result(results_dir, job.id)
    current = store.get_job(job.id)
    if current is None or current.terminal:
        if current is not None and result is not None and current.result == result:
            _discard_result_file(results_dir, job.id)  # committed earlier, deleted before a crash
        return None
    if outcome is not None and outcome.launched and current.launched_at is None:
        store.record_launch(job.id)  # seen by the run, not recorded yet (the run ended before its first poll)
        current = store.get_job(job.id) or current
    if result is not None:
        return _settle_from_result(store, current, result, results_dir)
    if rejected is not None:
        ok = store.transition_job(job.id, JOB_ACTIVE_STATES, "failed", error=rejected, cleanup_pending=True)
        return "failed" if ok else None
    if current.cancel_requested or (outcome is not None and outcome.kind == "cancelled" and interrupted is None):
        ok = store.transition_job(job.id, JOB_ACTIVE_STATES, "cancelled", error="cancelled: cancelled by request",
                                  cleanup_pending=True)
        return "cancelled" if ok else None
    if outcome is not None and outcome.kind == "failed" and interrupted is None:
        state, error = "failed", outcome.msg
    else:
        state = "lost"
        error = interrupted or (outcome.msg if outcome else "") or "no_result: no result was fetched"
    requeued = _requeue(store, current, state, error, outcome)
    if requeued is not None:
        return requeued
    ok = store.transition_job(job.id, JOB_ACTIVE_STATES, state, error=error, cleanup_pending=True)
    return state if ok else None


def _settle_from_result(store: Store, job: JobRow, result: dict, results_dir: Path) -> str | None:
    state = _RESULT_STATE_TO_JOB[result["state"]]
    error = None
    if result.get("error"):
        error = f"{result['error']['reason']}: {result['error']['message']}"
    elif state == "timed_out":
        error = "timed_out: the job ran past its timeout and was killed on the host"
    try:
        # Before the state: a follower (`hwledger job logs -f`) that sees the job ended has all of its output.
        finish_log(store, job.id, result)
    except (StoreError, ValueError) as exc:
        log.warning("job %s: the end of its output was not added to its log: %s", job.id, exc)
    ok = store.transition_job(job.id, JOB_ACTIVE_STATES, state, result=result,
                              exit_code=result.get("exit_code"), error=error)
    if ok:
        _discard_result_file(results_dir, job.id)
    return state if ok else None


def _requeue(store: Store, job: JobRow, state: str, error: str, outcome: JobRunOutcome | None) -> str | None:
    """Queue the job again when the attempt rule allows it; returns "queued", or None to settle it."""
    launched = job.launched_at is not None
    if env_redacted(job.spec):
        return None  # its env values are gone: another attempt could not get them
    if launched:
        if state != "lost" or job.attempts >= job.max_attempts:
            return None
        why = f"{error} (attempt {job.attempts} of {job.max_attempts}; queued again)"
        ok = store.requeue_job(job.id, error=why, before_start=False, cleanup_pending=True)
        return "queued" if ok else None
    reason = (outcome.reason if outcome is not None else None) or reason_of(error)
    if reason in PERMANENT_START_FAILURES:
        return None
    failures = store.start_failures(job.id)
    if failures >= MAX_START_FAILURES:
        return None
    why = (f"{error} (before the command started, so no attempt was counted; queued again, "
           f"{failures + 1} of {MAX_START_FAILURES} such tries)")
    ok = store.requeue_job(job.id, error=why, before_start=True, cleanup_pending=job.remote_dir is not None)
    return "queued" if ok else None


def _discard_result_file(results_dir: Path, job_id: str) -> None:
    """Delete a result file whose content is committed in the store (the one copy that counts)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(job_schema.result_path(results_dir, job_id))


def discard_settled_results(store: Store, results_dir: Path) -> int:
    """Delete result files left by a server that stopped between committing a result and deleting its
    file. Only files whose exact result the store holds for a finished job; the others are kept."""
    removed = 0
    for entry in results_dir.glob("*.json"):
        job = store.get_job(entry.stem)
        if job is None or not job.terminal or job.result is None:
            continue
        result, _rejected = read_result(results_dir, job.id)
        if result is not None and result == job.result:
            _discard_result_file(results_dir, job.id)
            removed += 1
    return removed
