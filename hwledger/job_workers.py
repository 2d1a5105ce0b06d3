"""The server's job workers: run a dispatched job, follow a job a previous server lost track of
(reconcile), clean up after a run that was cut off. Each runs in a thread of the server's pool with its
own store connection.

Why each step is where it is:
- `dispatched` means handed to a worker, nothing started: the worker's dispatched -> running
  compare-and-set is what starts it, so a cancel that got there first wins and nothing runs.
- `running` is written before the playbook starts; the run's private dir (on this side) before
  ansible-playbook starts; the job's remote dir as soon as the role made it; the launch of its command
  (`record_launch`: the attempt counts) as soon as the role's launch task starts. A crash at any point leaves enough
  for the next server to find the run: it kills a dead server's ansible-playbook processes and
  reconciles the job with its host (`reconcile_job`).
- The role refuses to start a job whose private dir or runner is already on the host
  (`job_already_started`): the worker then reconciles instead, so one job never runs twice.
- A run can be stopped three ways (CancelCheck): the server stops (the job ends `lost`, its remote dir
  is cleaned by the next server), a user cancels (`cancelled`, then the clean-up stops the runner on the
  host), or its agent went offline (`lost`, reason `agent_offline`, cleaned up when the agent answers).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent

from hwledger.display import printable
from hwledger.job_runs import (
    ALREADY_STARTED,
    AnsibleJobs,
    JobRunOutcome,
    crash_point,
    launched_by,
    remote_dir_of,
    runner_seen,
)
from hwledger.job_settle import settle_job
from hwledger.store import JOB_ACTIVE_STATES, JobRow, Store, env_redacted, utc_now

log = logging.getLogger("hwledger.jobs")

CANCEL_CHECK_S = 0.5
SERVER_STOPPED = "server_stopped: the server was stopped while the job ran; its remote dir is removed by the next server"
RECONCILE_RETRY = "retry"  # a reconcile that could not ask the host: the server tries again later


class JobWorkers:
    """Runs a dispatched job, reconciles a job left by a previous server, and cleans up a settled one."""

    def __init__(self, open_store: Callable[[], Store], jobs: AnsibleJobs, results_dir: Path,
                 stop: threading.Event):
        self.open_store = open_store
        self.jobs = jobs
        self.results_dir = results_dir
        self.stop = stop
        # job id -> why its run must stop now (its agent went offline); read by the run's CancelCheck.
        self._abandoned: dict[str, str] = {}

    def abandon(self, job_id: str, why: str) -> None:
        """Stop the run of a job (its worker settles it `lost` with `why`)."""
        self._abandoned[job_id] = why

    def handing_out(self, job_id: str) -> None:
        """A worker is about to run (or reconcile) the job: a stop meant for an earlier run of it, which
        ended before it saw the stop, must not stop this one. (The server's thread calls this and
        `abandon`, so the two never race.)"""
        self._abandoned.pop(job_id, None)

    # -- a dispatched job ------------------------------------------------------------------

    def run_job(self, job_id: str, agent: Agent) -> None:
        """dispatched -> running -> the job's terminal state, or another attempt (then its clean-up)."""
        with self.open_store() as store:
            job = store.get_job(job_id)
            if job is None or job.state != "dispatched":
                return
            if job.cancel_requested:
                store.transition_job(job_id, ["dispatched"], "cancelled", error="cancelled: cancelled before it started")
                return
            if env_redacted(job.spec):
                store.transition_job(job_id, ["dispatched"], "failed", error=(
                    "env_redacted: the job's env values were removed from the store after its last attempt "
                    "launched, so it cannot run again; submit it again"))
                return
            if not store.transition_job(job_id, ["dispatched"], "running", started_at=utc_now()):
                return
            crash_point("running")
            log.info("job %s running on %s", job_id, agent.name)
            cancel = CancelCheck(store, job_id, self.stop, self._abandoned)
            try:
                outcome = self.jobs.run(job, agent, cancel=cancel, on_event=_RunEvents(store, job_id),
                                        on_private_dir=lambda path: store.update_job(job_id, run_dir=str(path)))
            except Exception as exc:  # pylint: disable=broad-exception-caught
                # Every path ends in a terminal state: a job must never stay "running" with no run.
                log.exception("job %s: the run failed in the controller", job_id)
                outcome = JobRunOutcome("error", f"controller_error: {type(exc).__name__}: {exc}")
            crash_point("fetched")
            if outcome.reason == ALREADY_STARTED and not cancel.stopped_by_us:
                # Something of this job is on the host already (an earlier attempt, a run started by hand):
                # never start a second one; find out what it is and follow it.
                log.warning("job %s: already started on %s; following that run", job_id, agent.name)
                self._reconcile(store, store.get_job(job_id) or job, agent, cancel)
                return
            self._settle(store, job, agent, outcome, cancel)

    # -- a job left by a previous server ---------------------------------------------------

    def reconcile_job(self, job_id: str, agent: Agent) -> str | None:
        """Settle a `running` job whose run a previous server lost, from what its host shows. Returns
        RECONCILE_RETRY when the host could not be asked (the job stays `running`)."""
        with self.open_store() as store:
            job = store.get_job(job_id)
            if job is None or job.state != "running":
                return None
            return self._reconcile(store, job, agent, CancelCheck(store, job_id, self.stop, self._abandoned))

    def _reconcile(self, store: Store, job: JobRow, agent: Agent, cancel: "CancelCheck") -> str | None:
        log.info("job %s: asking %s what became of it", job.id, agent.name)
        try:
            outcome = self.jobs.reconcile(job, agent, cancel=cancel,
                                          on_private_dir=lambda path: store.update_job(job.id, run_dir=str(path)))
        except Exception as exc:  # pylint: disable=broad-exception-caught
            log.exception("job %s: the reconcile failed in the controller", job.id)
            outcome = JobRunOutcome("error", f"controller_error: {type(exc).__name__}: {exc}")
        if outcome.launched:
            store.record_launch(job.id)  # the attempt counts, if it was not counted before the crash
        report = outcome.report
        if not report and outcome.kind not in ("failed", "cancelled"):
            log.warning("job %s: could not ask %s (%s); trying again later", job.id, agent.name,
                        printable(outcome.msg, limit=300))
            return RECONCILE_RETRY
        if report.get("running"):
            store.update_job(job.id, remote_dir=report["dir"])
            outcome = JobRunOutcome("completed", "runner_overran: the job's runner still ran past the job's time "
                                                 "limit; it is stopped by the clean-up", launched=True)
        elif report and not report.get("found"):
            outcome = JobRunOutcome("completed", "nothing_on_host: nothing of the job was found on its host (no "
                                                 "private dir, no runner, no result)", launched=outcome.launched)
        elif report and not report.get("result") and outcome.kind != "failed":
            outcome = JobRunOutcome("completed", "no_result: the job's runner ended without leaving a result",
                                    launched=outcome.launched)
        self._settle(store, job, agent, outcome, cancel, removed=bool(report) and not report.get("running"))
        return None

    # -- settling and cleaning up ----------------------------------------------------------

    def _settle(self, store: Store, job: JobRow, agent: Agent, outcome: JobRunOutcome, cancel: "CancelCheck",
                *, removed: bool = False) -> None:
        interrupted = cancel.why_stopped() if outcome.kind == "cancelled" else None
        if outcome.kind == "completed" and outcome.msg and interrupted is None:
            interrupted = outcome.msg  # a reconcile's finding: the reason the job is lost, if no result decides
        state = settle_job(store, store.get_job(job.id) or job, self.results_dir, outcome, interrupted=interrupted)
        crash_point("finished")
        store.update_job(job.id, run_dir=None)
        abandoned = self._abandoned.pop(job.id, None)
        log.info("job %s on %s: %s", job.id, agent.name, state)
        settled = store.get_job(job.id)
        if settled is None or not settled.cleanup_pending:
            return
        if removed:
            # The reconcile removed the job's dir on the host (its runner was gone): nothing left to clean.
            store.update_job(job.id, cleanup_pending=False)
        elif settled.terminal and not self.stop.is_set() and abandoned is None:
            # (After a stop, the next server cleans up; an offline agent is cleaned up when it answers.)
            self._cleanup(store, settled, agent)

    def clean_up(self, job_id: str, agent: Agent) -> None:
        """Remove the remote private dir of a job settled (or queued again) with a clean-up pending."""
        with self.open_store() as store:
            job = store.get_job(job_id)
            if job is not None and job.cleanup_pending and job.state not in JOB_ACTIVE_STATES:
                self._cleanup(store, job, agent)

    def _cleanup(self, store: Store, job: JobRow, agent: Agent) -> None:
        outcome = self.jobs.cleanup(job.id, agent, job.remote_dir, cancel=self.stop.is_set)
        if outcome.kind == "completed":
            store.update_job(job.id, cleanup_pending=False)
            store.add_event("job_cleanup", agent=agent.name, job_id=job.id, remote_dir=job.remote_dir)
        else:
            log.warning("job %s: remote clean-up on %s did not finish (%s); will retry", job.id, agent.name,
                        printable(outcome.msg, limit=300))


class _RunEvents:
    """A job run's event hook: records the job's remote dir and the launch of its command as they happen."""

    def __init__(self, store: Store, job_id: str):
        self.store, self.job_id = store, job_id
        self.launched = self.seen = False

    def __call__(self, event) -> None:
        remote_dir = remote_dir_of(event)
        if remote_dir:
            self.store.update_job(self.job_id, remote_dir=remote_dir)
            crash_point("remote_dir")
        if not self.launched and launched_by(event):
            self.launched = True
            self.store.record_launch(self.job_id)
        if not self.seen and runner_seen(event):
            self.seen = True
            crash_point("launched")  # the runner demonstrably runs on the host


class CancelCheck:
    """The cancel callback of a run: server stopping, the job's agent gone offline, or `hwledger job cancel`
    (polled, bounded)."""

    def __init__(self, store: Store, job_id: str, stop: threading.Event, abandoned: Mapping[str, str]):
        self.store, self.job_id, self.stop, self.abandoned = store, job_id, stop, abandoned
        self.user_cancelled = False
        self._next = 0.0

    @property
    def stopped_by_us(self) -> bool:
        """The run was stopped by the server (stopping, or the agent went offline), not by a user."""
        return self.stop.is_set() or self.job_id in self.abandoned

    def why_stopped(self) -> str | None:
        """Why the server stopped the run, None when it did not (a user's cancel, or no stop at all)."""
        if self.user_cancelled:
            return None
        if self.job_id in self.abandoned:
            return self.abandoned[self.job_id]
        if self.stop.is_set():
            return SERVER_STOPPED
        return None

    def __call__(self) -> bool:
        if self.stopped_by_us:
            return True
        now = time.monotonic()
        if now >= self._next:
            self._next = now + CANCEL_CHECK_S
            self.user_cancelled = self.store.cancel_requested(self.job_id)
        return self.user_cancelled
