"""Jobs on the agents as Ansible runs: the `hwledger.fleet.job` playbook (run a job), the
`hwledger.fleet.job_reconcile` playbook (find out what became of a job a previous server lost track of) and
the `hwledger.fleet.job_cleanup` playbook (remove the remote dir of a run that was cut off), and what their
events say (the job's remote dir, its launch, why a run failed).

Job states, each committed to the store *before* it is acted on (`hwledger.job_workers` runs them,
`hwledger.job_settle` gives a job its end):
    queued -> dispatched -> running -> succeeded | failed | timed_out | cancelled | lost
                                    -> queued (another attempt: job_settle's attempt rule)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import hostvars, job_schema, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent

from hwledger.ansible_runs import AnsibleRuns, HostEvent, PlaybookRun
from hwledger.placement import launch_spec
from hwledger.store import JobRow, age_seconds

JOB_PLAYBOOK = "hwledger.fleet.job"
RECONCILE_PLAYBOOK = "hwledger.fleet.job_reconcile"
CLEANUP_PLAYBOOK = "hwledger.fleet.job_cleanup"
# Beyond the job's own async limit: time for connection set-up, copying, fetching and clean-up.
JOB_CONTROLLER_GRACE_S = 120
CLEANUP_TIMEOUT_S = 120
RECONCILE_POLL_S = 2
# The role refuses to start a job whose private dir (or runner) is already on the host (I65).
ALREADY_STARTED = "job_already_started"
# The role's task that launches the runner (the hwledger.fleet.job_start task of roles/job/tasks/main.yml; a
# unit test checks the name). Its start counts as the job's launch: from then on the command may be running on
# the host, and a job is never run more often than it may, so a run cut off at that task counts as an attempt
# even if the runner never began.
LAUNCH_TASK = "Start the job on the remote (private dir, job.json, runner, detached; one exec)"

CRASH_ENV = "HWLEDGER_CRASH_AT"
CRASH_POINTS = ("dispatched", "running", "remote_dir", "launched", "fetched", "finished")


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


def follow_for_s(job: JobRow) -> float:
    """How long a reconcile may wait for a runner still running on the host: until the job's own async
    limit from its launch (the runner ends the job by then), and never less than one poll."""
    since = age_seconds(job.launched_at or job.started_at) or 0.0
    return max(float(RECONCILE_POLL_S), job_schema.async_seconds(job.spec) - since)


_REASON_RE = re.compile(r"^([a-z][a-z0-9_]{2,40})(?::| -) ")


def reason_of(text: str | None) -> str | None:
    """The machine-readable reason at the head of a message (`reason: message` or `reason - message`)."""
    match = _REASON_RE.match(text or "")
    return match.group(1) if match else None


@dataclass
class JobRunOutcome:
    """What a playbook run said, beside the result file (which alone says how the job ended)."""

    kind: str            # completed | cancelled | unreachable | failed | error
    msg: str = ""
    reason: str | None = None   # machine-readable, when the run failed for a known reason
    launched: bool = False      # the job's command was seen started on the host
    report: dict = field(default_factory=dict)  # what a reconcile found (see AnsibleJobs.reconcile)


class AnsibleJobs:
    """Jobs through the `hwledger.fleet.job` playbook, via the app's runner wrapper."""

    def __init__(self, runs: AnsibleRuns, policy: ssh.SshPolicy, results_dir: Path):
        self.runs = runs
        self.policy = policy
        self.results_dir = results_dir

    def run(self, job: JobRow, agent: Agent, *, cancel: Callable[[], bool],
            on_event: Callable[[HostEvent], None], on_private_dir: Callable[[Path], None]) -> JobRunOutcome:
        """Run the job once. `on_event` sees the run's host events (`remote_dir_of`, `launched_by`)."""
        spec_files: list[Path] = []

        def extravars(private_dir: Path) -> dict:
            # The spec goes by file: the role reads it as data. As a variable, its strings would be
            # templated once by Ansible (a "{{ ... }}" in a job argument would run on the controller).
            # With the GPUs placement chose for it shown to it (hwledger.placement.launch_spec).
            spec_files.append(AnsibleRuns.write_private_json(private_dir / "job.json", launch_spec(job.spec, job.placement)))
            return {"hwledger_job_file": str(spec_files[0]), "hwledger_results_dir": str(self.results_dir),
                    # The result file says how the job went; the run fails only when it could not run it.
                    "hwledger_job_fail_on_error": False}

        def on_run_event(event: HostEvent) -> None:
            if spec_files and event.action.endswith("job_spec") and event.event != "runner_on_start":
                # job_spec has read the spec (env values included) into the play: the file on this side is
                # not needed any more, so the values do not sit on the controller's disk while the job runs.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spec_files[0])
            on_event(event)

        run = self.runs.run_playbook(
            JOB_PLAYBOOK,
            inventory=hostvars.inventory([agent], self.policy),
            extravars=extravars,
            limit=agent.name,
            cancel=cancel,
            on_event=on_run_event,
            on_private_dir=on_private_dir,
            timeout_s=job_deadline_s(job),
            label=f"job-{job.id}",
        )
        outcome = self._outcome(run, agent.name)
        outcome.launched = any(launched_by(event) for event in run.host_events.get(agent.name, []))
        return outcome

    def reconcile(self, job: JobRow, agent: Agent, *, cancel: Callable[[], bool],
                  on_private_dir: Callable[[Path], None] | None = None) -> JobRunOutcome:
        """Find out on the host what became of a job whose run a previous server lost (role tasks
        `reconcile.yml`): its private dir by the job id; a runner still running is followed until it ends
        (at most until the job's own time limit); a result there is read bounded, validated and published to
        the results dir (which then decides the job's state); the dir is removed once its runner is gone.

        `report` holds what was found: `found` (a dir of the job), `dir`, `launched` (its command had been
        started), `running` (still running when the wait ended), `result` (a result was published)."""
        wait_s = follow_for_s(job)
        extravars = {"hwledger_job_id": job.id, "hwledger_results_dir": str(self.results_dir),
                     "hwledger_job_wait_s": int(math.ceil(wait_s)), "hwledger_job_poll_s": RECONCILE_POLL_S}
        if job.remote_dir and is_job_dir(job.remote_dir):
            extravars["hwledger_job_dir"] = job.remote_dir
        run = self.runs.run_playbook(
            RECONCILE_PLAYBOOK, inventory=hostvars.inventory([agent], self.policy), extravars=extravars,
            limit=agent.name, cancel=cancel, timeout_s=wait_s + CLEANUP_TIMEOUT_S, label=f"reconcile-{job.id}",
            on_private_dir=on_private_dir,
        )
        outcome = self._outcome(run, agent.name)
        for event in run.host_events.get(agent.name, []):
            facts = event.res.get("ansible_facts") if event.event == "runner_on_ok" else None
            report = facts.get("hwledger_job_reconciled") if isinstance(facts, dict) else None
            if isinstance(report, dict):
                outcome.report = _checked_report(report)
        outcome.launched = bool(outcome.report.get("launched"))
        return outcome

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
                msg = str(event.res.get("msg") or "host unreachable")[:2000]
                return JobRunOutcome("unreachable", f"unreachable: {msg}", reason="unreachable")
        for event in events:
            if event.event == "runner_on_failed" and not event.res.get("_ansible_ignore_errors"):
                return _failed(event)
        if run.status == "successful":
            return JobRunOutcome("completed")
        if run.status == "timeout":
            return JobRunOutcome("error", "playbook_timeout: the playbook ran past its deadline and was stopped",
                                 reason="playbook_timeout")
        return JobRunOutcome("error", f"playbook_error: {run.failure_text()[:2000]}", reason="playbook_error")


# The role's reasons that the server's jobs give under another name (docs/fleet-server.md): job_start's
# no_runner (no usable python3 and no hwledger on the host) is runner_unavailable, a permanent start failure.
_SERVER_REASONS = {"no_runner": "runner_unavailable"}


def _failed(event: HostEvent) -> JobRunOutcome:
    """A failed task: its reason (the action's `reason`, or the one the role's message starts with) first,
    then the task, then its message. A task whose result was hidden (no_log) still says which task failed."""
    msg = str(event.res.get("msg") or event.res.get("censored") or "no message")[:2000]
    reason = event.res.get("reason") if isinstance(event.res.get("reason"), str) else None
    reason = reason_of(reason + ": ") if reason else reason_of(msg)
    reason = _SERVER_REASONS.get(reason or "", reason) or "task_failed"
    return JobRunOutcome("failed", f"{reason}: {event.task}: {msg}", reason=reason)


def _checked_report(report: dict) -> dict:
    """The reconcile's report, as data: booleans, and a dir only when it can be nothing but a job dir."""
    checked = {key: _true(report.get(key)) for key in ("found", "launched", "running", "result")}
    directory = report.get("dir")
    checked["dir"] = directory if isinstance(directory, str) and is_job_dir(directory) else None
    return checked


# ---------------------------------------------------------------------------------------------
# Reading the runs' events


_JOB_DIR_RE = re.compile(r"^/(?:[A-Za-z0-9._-]+/)*hwledger-job-[A-Za-z0-9._-]+$")


def is_job_dir(path: str) -> bool:
    """A remote path that can only be a job's private dir (it came from the remote: check it strictly;
    no braces, so Ansible cannot template it, no '..', absolute)."""
    return bool(_JOB_DIR_RE.match(path)) and "/../" not in f"{path}/" and "/./" not in f"{path}/"


def _true(value: object) -> bool:
    """A boolean the role set: a bool, or its text where ansible-core templated it to a string (2.18)."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def launched_by(event: HostEvent) -> bool:
    """Whether this event shows the job's launch: the start of the role's launch task, or (proof that the
    runner runs) `runner_seen`."""
    return (event.event == "runner_on_start" and event.task == LAUNCH_TASK) or runner_seen(event)


def runner_seen(event: HostEvent) -> bool:
    """Whether this event proves the runner started on the host: job_start answered with the detached
    runner's pid and the private dir, or job_wait (which only runs on a started job) answered at all (its
    result is no_log, so only the event says so)."""
    if event.action.endswith("job_start"):
        return event.event == "runner_on_ok" and isinstance(event.res.get("pid"), int) \
            and not isinstance(event.res.get("pid"), bool) and remote_dir_of(event) is not None
    return event.action.endswith("job_wait") and event.event in ("runner_on_ok", "runner_on_failed")


def remote_dir_of(event: HostEvent) -> str | None:
    """The job's remote private dir, when this event is the role's job_start task that created it."""
    if event.event != "runner_on_ok" or not event.action.endswith("job_start"):
        return None
    path = event.res.get("path")
    if isinstance(path, str) and is_job_dir(path):
        return path
    return None
