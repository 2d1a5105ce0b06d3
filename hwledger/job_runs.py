"""Jobs on the agents: the `hwledger.fleet.job` playbook runs, their workers, settling a job from its
result, and cleaning up after a run that was cut off.

Job states, each committed to the store *before* it is acted on:
    queued -> dispatched -> running -> succeeded | failed | timed_out | cancelled | lost
`dispatched` means handed to a worker, nothing started: a `dispatched` job found at start-up is simply
run. `running` is written before the job playbook starts; the run's private dir is recorded before
ansible-playbook starts, so after a crash the old run (an orphan that may still be fetching the result)
is found by that exact path and waited for. Then the controller results dir decides: a valid result
file gives the job its state from the result (the file is deleted once that is committed: the store
holds the result); none gives `lost` and a pending clean-up of the remote temp dir (the
`hwledger.fleet.job_cleanup` playbook). A job is never started twice. A stop of the server stops a
running job's playbook at once: the job ends `lost` and the next server cleans its remote temp dir. A
cancel of a `dispatched` job ends it at once (`cancelled`), and the worker's dispatched -> running
compare-and-set then fails, so it never starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import hostvars, job_schema, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent

from hwledger.ansible_runs import AnsibleRuns, HostEvent, PlaybookRun
from hwledger.display import printable
from hwledger.job_logs import finish_log
from hwledger.placement import launch_spec
from hwledger.store import JOB_ACTIVE_STATES, JobRow, Store, StoreError, utc_now

log = logging.getLogger("hwledger.jobs")

JOB_PLAYBOOK = "hwledger.fleet.job"
CLEANUP_PLAYBOOK = "hwledger.fleet.job_cleanup"
# Beyond the job's own async limit: time for connection set-up, copying, fetching and clean-up.
JOB_CONTROLLER_GRACE_S = 120
CLEANUP_TIMEOUT_S = 120
CANCEL_CHECK_S = 0.5

CRASH_ENV = "HWLEDGER_CRASH_AT"
CRASH_POINTS = ("dispatched", "running", "remote_dir", "fetched", "finished")


def crash_point(name: str) -> None:
    """Test hook for the crash-safety matrix: SIGKILL ourselves right after the named step.

    Set HWLEDGER_CRASH_AT to one of CRASH_POINTS. A real `kill -9`, not an exception: nothing runs
    after it, exactly as when the machine or the OOM killer stops the server.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def job_deadline_s(job: JobRow) -> float:
    """How long the controller's run of a job may take, from its start."""
    return float(job_schema.async_seconds(job.spec) + JOB_CONTROLLER_GRACE_S)


@dataclass
class JobRunOutcome:
    """What the job playbook run said, beside the result file (which alone says how the job ended)."""

    kind: str            # completed | cancelled | unreachable | failed | error
    msg: str = ""


class AnsibleJobs:
    """Jobs through the `hwledger.fleet.job` playbook, via the app's runner wrapper."""

    def __init__(self, runs: AnsibleRuns, policy: ssh.SshPolicy, results_dir: Path):
        self.runs = runs
        self.policy = policy
        self.results_dir = results_dir

    def run(self, job: JobRow, agent: Agent, *, cancel: Callable[[], bool],
            on_event: Callable[[HostEvent], None], on_private_dir: Callable[[Path], None]) -> JobRunOutcome:
        def extravars(private_dir: Path) -> dict:
            # The spec goes by file: the role reads it as data. As a variable, its strings would be
            # templated once by Ansible (a "{{ ... }}" in a job argument would run on the controller).
            # With the GPUs placement chose for it shown to it (hwledger.placement.launch_spec).
            spec_file = AnsibleRuns.write_private_json(private_dir / "job.json", launch_spec(job.spec, job.placement))
            return {"hwledger_job_file": str(spec_file), "hwledger_results_dir": str(self.results_dir),
                    # The result file says how the job went; the run fails only when it could not run it.
                    "hwledger_job_fail_on_error": False}

        run = self.runs.run_playbook(
            JOB_PLAYBOOK,
            inventory=hostvars.inventory([agent], self.policy),
            extravars=extravars,
            limit=agent.name,
            cancel=cancel,
            on_event=on_event,
            on_private_dir=on_private_dir,
            timeout_s=job_deadline_s(job),
            label=f"job-{job.id}",
        )
        return self._outcome(run, agent.name)

    def cleanup(self, job_id: str, agent: Agent, remote_dir: str | None, *,
                cancel: Callable[[], bool]) -> JobRunOutcome:
        """Remove an interrupted job's private dir on the remote (the role's `always:` did not run)."""
        if remote_dir is None:
            # The run was interrupted before the remote dir was created (or known): nothing to remove;
            # the role's stale-dir sweep removes anything older than its limit at the next job.
            return JobRunOutcome("completed", "no remote dir was recorded")
        if not is_job_dir(remote_dir):
            return JobRunOutcome("completed", f"refusing to remove {remote_dir!r}: not an hwledger job dir")
        run = self.runs.run_playbook(
            CLEANUP_PLAYBOOK, inventory=hostvars.inventory([agent], self.policy),
            extravars={"hwledger_job_dir": remote_dir}, limit=agent.name, cancel=cancel,
            timeout_s=CLEANUP_TIMEOUT_S, label=f"cleanup-{job_id}",
        )
        return self._outcome(run, agent.name)

    @staticmethod
    def _outcome(run: PlaybookRun, host: str) -> JobRunOutcome:
        if run.status == "canceled":
            return JobRunOutcome("cancelled", "the run was stopped")
        events = run.host_events.get(host, [])
        for event in events:
            if event.event == "runner_on_unreachable":
                return JobRunOutcome("unreachable", str(event.res.get("msg") or "host unreachable")[:2000])
        for event in events:
            if event.event == "runner_on_failed" and not event.res.get("_ansible_ignore_errors"):
                return JobRunOutcome("failed", f"{event.task}: {str(event.res.get('msg') or '')[:2000]}")
        if run.status == "successful":
            return JobRunOutcome("completed")
        if run.status == "timeout":
            return JobRunOutcome("error", "the job playbook ran past its deadline and was stopped")
        return JobRunOutcome("error", run.failure_text()[:2000])


# ---------------------------------------------------------------------------------------------
# Results and settling


_JOB_DIR_RE = re.compile(r"^/(?:[A-Za-z0-9._-]+/)*hwledger-job-[A-Za-z0-9._-]+$")


def is_job_dir(path: str) -> bool:
    """A remote path that can only be a job's private dir (it came from the remote: check it strictly;
    no braces, so Ansible cannot template it, no '..', absolute)."""
    return bool(_JOB_DIR_RE.match(path)) and "/../" not in f"{path}/" and "/./" not in f"{path}/"


_RESULT_STATE_TO_JOB = {"succeeded": "succeeded", "failed": "failed", "timed_out": "timed_out", "error": "failed"}


def read_result(results_dir: Path, job_id: str) -> tuple[dict | None, str | None]:
    """(validated result, None), (None, why it was rejected) or (None, None) when there is none."""
    path = job_schema.result_path(results_dir, job_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"result file {path} cannot be read: {exc.strerror}"
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(job_schema.RESULT_MAX_BYTES + 1)
    try:
        return job_schema.validate_result(raw, expected_job_id=job_id), None
    except job_schema.ResultError as exc:
        return None, f"result file rejected ({exc.reason}): {exc}"


def settle_job(store: Store, job: JobRow, results_dir: Path, outcome: JobRunOutcome | None,
               *, interrupted: str | None = None) -> str | None:
    """Give an active job its one terminal state. Returns it (None when another writer got there first).

    A valid result file decides, whatever else happened (no fetched result is ever lost). Once the
    result is committed with the job's state, the file is deleted: the store holds it. Otherwise:
    cancelled when a cancel was asked for, failed when the playbook failed on a reachable host, lost
    when nobody can say what happened on the host (its temp dir is then cleaned up later).
    """
    result, rejected = read_result(results_dir, job.id)
    current = store.get_job(job.id)
    if current is None or current.terminal:
        if current is not None and result is not None and current.result == result:
            _discard_result_file(results_dir, job.id)  # committed earlier, deleted before a crash
        return None
    if result is not None:
        state = _RESULT_STATE_TO_JOB[result["state"]]
        error = None
        if result.get("error"):
            error = f"{result['error']['reason']}: {result['error']['message']}"
        elif state == "timed_out":
            error = "the job ran past its timeout and was killed on the host"
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
    if rejected is not None:
        ok = store.transition_job(job.id, JOB_ACTIVE_STATES, "failed", error=rejected, cleanup_pending=True)
        return "failed" if ok else None
    if current.cancel_requested or (outcome is not None and outcome.kind == "cancelled" and interrupted is None):
        ok = store.transition_job(job.id, JOB_ACTIVE_STATES, "cancelled", error="cancelled by request",
                                  cleanup_pending=True)
        return "cancelled" if ok else None
    if outcome is not None and outcome.kind == "failed":
        ok = store.transition_job(job.id, JOB_ACTIVE_STATES, "failed", error=outcome.msg, cleanup_pending=True)
        return "failed" if ok else None
    why = interrupted or (outcome.msg if outcome else "") or "no result was fetched"
    ok = store.transition_job(job.id, JOB_ACTIVE_STATES, "lost", error=why, cleanup_pending=True)
    return "lost" if ok else None


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


# ---------------------------------------------------------------------------------------------
# Workers: each runs in a thread of the server's pool, with its own store connection


class JobWorkers:
    """Runs a dispatched job, and the remote clean-up of a settled one, on behalf of the server."""

    def __init__(self, open_store: Callable[[], Store], jobs: AnsibleJobs, results_dir: Path,
                 stop: threading.Event):
        self.open_store = open_store
        self.jobs = jobs
        self.results_dir = results_dir
        self.stop = stop

    def run_job(self, job_id: str, agent: Agent) -> None:
        """dispatched -> running -> the job's terminal state (then its clean-up when one is pending)."""
        with self.open_store() as store:
            job = store.get_job(job_id)
            if job is None or job.state != "dispatched":
                return
            if job.cancel_requested:
                store.transition_job(job_id, ["dispatched"], "cancelled", error="cancelled before it started")
                return
            if not store.transition_job(job_id, ["dispatched"], "running", started_at=utc_now(),
                                        attempts=job.attempts + 1):
                return
            crash_point("running")
            log.info("job %s running on %s", job_id, agent.name)
            cancel = CancelCheck(store, job_id, self.stop)

            def on_event(event: HostEvent) -> None:
                remote_dir = _remote_dir_of(event)
                if remote_dir:
                    store.update_job(job_id, remote_dir=remote_dir)
                    crash_point("remote_dir")

            try:
                outcome = self.jobs.run(job, agent, cancel=cancel, on_event=on_event,
                                        on_private_dir=lambda path: store.update_job(job_id, run_dir=str(path)))
            except Exception as exc:  # pylint: disable=broad-exception-caught
                # Every path ends in a terminal state: a job must never stay "running" with no run.
                log.exception("job %s: the run failed in the controller", job_id)
                outcome = JobRunOutcome("error", f"controller error while running the job: {type(exc).__name__}: {exc}")
            crash_point("fetched")
            interrupted = None
            if self.stop.is_set() and not cancel.user_cancelled and outcome.kind == "cancelled":
                interrupted = "the server was stopped while the job ran"
            state = settle_job(store, store.get_job(job_id) or job, self.results_dir, outcome, interrupted=interrupted)
            crash_point("finished")
            store.update_job(job_id, run_dir=None)
            log.info("job %s on %s: %s", job_id, agent.name, state)
            settled = store.get_job(job_id)
            if settled and settled.cleanup_pending and not self.stop.is_set():
                self._cleanup(store, settled, agent)

    def clean_up(self, job_id: str, agent: Agent) -> None:
        """Remove the remote private dir of a job settled with a clean-up pending."""
        with self.open_store() as store:
            job = store.get_job(job_id)
            if job is not None and job.cleanup_pending:
                self._cleanup(store, job, agent)

    def _cleanup(self, store: Store, job: JobRow, agent: Agent) -> None:
        outcome = self.jobs.cleanup(job.id, agent, job.remote_dir, cancel=self.stop.is_set)
        if outcome.kind == "completed":
            store.update_job(job.id, cleanup_pending=False)
            store.add_event("job_cleanup", agent=agent.name, job_id=job.id, remote_dir=job.remote_dir)
        else:
            log.warning("job %s: remote clean-up on %s did not finish (%s); will retry", job.id, agent.name,
                        printable(outcome.msg, limit=300))


class CancelCheck:
    """The cancel callback of a job run: server stopping, or `hwledger job cancel` (polled, bounded)."""

    def __init__(self, store: Store, job_id: str, stop: threading.Event):
        self.store, self.job_id, self.stop = store, job_id, stop
        self.user_cancelled = False
        self._next = 0.0

    def __call__(self) -> bool:
        if self.stop.is_set():
            return True
        now = time.monotonic()
        if now >= self._next:
            self._next = now + CANCEL_CHECK_S
            self.user_cancelled = self.store.cancel_requested(self.job_id)
        return self.user_cancelled


def _remote_dir_of(event: HostEvent) -> str | None:
    """The job's remote private dir, when this event is the role's job_start task that created it."""
    if event.event != "runner_on_ok" or not event.action.endswith("job_start"):
        return None
    path = event.res.get("path")
    if isinstance(path, str) and is_job_dir(path):
        return path
    return None
