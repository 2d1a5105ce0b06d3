"""`hwledger fleet serve`: the heartbeat loop, agent states, the job dispatcher and its workers.

One tick (every `--interval`, never overlapping; an overrun is recorded and the next tick starts at
once):
1. read ssh-agents.toml again (registrations and removals apply without a restart; a file that is
   missing or does not parse keeps the last good list of agents);
2. run one heartbeat over every agent that is not blocked (`host_key_changed`) through the
   heartbeat transport (pluggable: `AnsibleHeartbeat` runs the `hwledger.fleet.heartbeat` playbook
   through the app's ansible-runner wrapper; a faster transport can take its place);
3. record every host's snapshot or failure and its new state in one store transaction;
4. hand queued jobs of agents that answered to the job workers (threads, so heartbeats keep their
   cadence; one job per agent at a time), and pending remote clean-ups likewise.

Job states, each committed to the store *before* it is acted on:
    queued -> dispatched -> running -> succeeded | failed | timed_out | cancelled | lost
`dispatched` means handed to a worker, nothing started: a `dispatched` job found at start-up is simply
run. `running` is written before the job playbook starts; the run's private dir is recorded before
ansible-playbook starts, so after a crash the old run (an orphan that may still be fetching the result)
is found by that exact path and waited for. Then the controller results dir decides: a valid result
file gives the job its state from the result (the file is deleted once that is committed: the store
holds the result); none gives `lost` and a pending clean-up of the remote temp dir. A job is never
started twice. SIGTERM stops a running job's playbook at once: the job ends `lost` and the next server
cleans its remote temp dir. A cancel of a `dispatched` job ends it at once (`cancelled`), and the
worker's dispatched -> running compare-and-set then fails, so it never starts.

One server per store: `run` holds an flock on `<data dir>/serve.lock` for the process's life.

Agent states: `pending` (registered, never answered), `online`, `stale` (1 or 2 missed heartbeats),
`offline` (3 or more), `error` (the host answers but its GPU tool fails, or no host key is pinned for
it: the message says to register it), `host_key_changed` (the host presented another key than the
pinned one: no heartbeat, no job, until it is registered again).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import jobs as jobs_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import probe

from hwledger import paths
from hwledger.agents_file import read_agents
from hwledger.ansible_runs import AnsibleRuns, HostEvent, PlaybookRun, processes_using, terminate_processes_using
from hwledger.display import printable
from hwledger.errors import UserError
from hwledger.store import (
    JOB_ACTIVE_STATES,
    AgentRecord,
    AgentRow,
    AgentUpdate,
    HeartbeatRecord,
    JobRow,
    StateChange,
    Store,
    StoreError,
    age_seconds,
    utc_now,
)

log = logging.getLogger("hwledger.server")

DEFAULT_INTERVAL_S = 5.0
DEFAULT_QUERY_TIMEOUT_S = 10
OFFLINE_AFTER_MISSES = 3
DEFAULT_MAX_PARALLEL_JOBS = 4
STOP_GRACE_S = 1.5
# Beyond the job's own async limit: time for connection set-up, copying, fetching and clean-up.
JOB_CONTROLLER_GRACE_S = 120
CANCEL_CHECK_S = 0.5
EVENT_THROTTLE_S = 60.0

HEARTBEAT_PLAYBOOK = "hwledger.fleet.heartbeat"
JOB_PLAYBOOK = "hwledger.fleet.job"
INVENTORY_GROUP = agents_schema.GROUP_ALL

# Reasons that mean the host itself did not answer (a miss), as opposed to a GPU tool failing on a
# host that did answer.
MISS_REASONS = frozenset({"unreachable", "no_answer"})
BLOCKING_REASONS = frozenset({"host_key_changed"})
# No key is pinned for the host (ssh: "No ... host key is known"): nothing is blocked, since nothing was
# ever trusted, but the agent cannot be reached until someone registers it (the message says how).
HOST_KEY_UNKNOWN = "host_key_unknown"
HOST_KEY_UNKNOWN_MSG = "no pinned host key: run hwledger fleet register-ssh (--replace) for this agent"

CRASH_ENV = "HWLEDGER_CRASH_AT"
CRASH_POINTS = ("dispatched", "running", "remote_dir", "fetched", "finished")


def crash_point(name: str) -> None:
    """Test hook for the crash-safety matrix: SIGKILL ourselves right after the named step.

    Set HWLEDGER_CRASH_AT to one of CRASH_POINTS. A real `kill -9`, not an exception: nothing runs
    after it, exactly as when the machine or the OOM killer stops the server.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The fleet's files and settings


@dataclass
class Fleet:
    """Where this hwledger's files are and how it talks ssh; shared by the CLI and the server."""

    config: Path
    known_hosts: Path
    db: Path

    @classmethod
    def from_options(cls, *, config: str | None = None, known_hosts: str | None = None,
                     db: str | None = None) -> "Fleet":
        return cls(paths.config_path(config).absolute(), paths.known_hosts_path(known_hosts).absolute(),
                   paths.db_path(db).absolute())

    @property
    def results_dir(self) -> Path:
        self.check_data_dir()  # before anything is made inside it
        return paths.ensure_private_dir(paths.results_dir(self.db))

    @property
    def runs_dir(self) -> Path:
        self.check_data_dir()
        return paths.ensure_private_dir(paths.runs_dir(self.db))

    def check_data_dir(self) -> Path:
        """The store's directory, created 0700 or checked (see `paths.ensure_data_dir`)."""
        return paths.ensure_data_dir(paths.data_dir(self.db))

    def policy(self) -> agents_schema.SshPolicy:
        try:
            policy = agents_schema.SshPolicy(known_hosts=str(self.known_hosts), host_key_checking="yes",
                                             control_dir=str(paths.control_dir(self.db)))
            agents_schema.prepare_control_dir(policy)
        except (ValueError, agents_schema.SshPolicyError) as exc:
            raise UserError(str(exc)) from None
        return policy

    def load_agents(self, *, missing_ok: bool = True) -> list[agents_schema.Agent]:
        return read_agents(self.config, missing_ok=missing_ok)

    def open_store(self) -> Store:
        return Store.open(self.db)

    def runs(self, *, forks: int = 50) -> AnsibleRuns:
        return AnsibleRuns(runs_dir=self.runs_dir, control_dir=paths.control_dir(self.db), forks=forks)


def agent_record(agent: agents_schema.Agent, *, ip: str | None = None, key_fingerprint: str | None = None,
                 bastion_host_key_fingerprint: str | None = None) -> AgentRecord:
    bastion = None
    if agent.bastion is not None:
        b = agent.bastion
        bastion = f"{b.ssh_user}@{b.hostname}:{b.ssh_port}"
    return AgentRecord(
        name=agent.name, hostname=agent.hostname, port=agent.ssh_port, ssh_user=agent.ssh_user,
        key_path=agent.ssh_key_path, ip=ip, key_fingerprint=key_fingerprint,
        host_key_fingerprint=agent.host_key_fingerprint, bastion=bastion,
        bastion_host_key_fingerprint=bastion_host_key_fingerprint,
    )


def inventory_for(agents: Sequence[agents_schema.Agent], policy: agents_schema.SshPolicy) -> dict:
    hosts = {agent.name: agents_schema.host_vars(agent, policy) for agent in agents}
    return {"all": {"children": {INVENTORY_GROUP: {"hosts": hosts}}}}


# ---------------------------------------------------------------------------------------------
# Heartbeat transports


@dataclass(frozen=True)
class HostOutcome:
    """One host's answer to one heartbeat."""

    ok: bool
    snapshot: dict | None = None
    reason: str | None = None
    msg: str = ""


class HeartbeatTransport(Protocol):
    """Runs one heartbeat over a set of agents. Hosts missing from the answer were not asked (run
    cancelled, controller failure) and keep their state."""

    def tick(self, agents: Sequence[agents_schema.Agent], *, cancel: Callable[[], bool]) -> dict[str, HostOutcome]:
        ...


class HeartbeatRunError(Exception):
    """The heartbeat run itself failed (no host was asked): a controller problem, not a host's."""


def outcome_from_result(res: dict, *, unreachable: bool = False) -> HostOutcome:
    """Classify a gpu_query result (or an unreachable result) into a HostOutcome."""
    full_msg = str(res.get("msg") or "")
    msg = full_msg[:2000]
    if unreachable:
        # The one classifier of ssh's host key messages (the fan-out transport's probe uses it too).
        return HostOutcome(False, reason=probe.classify_ssh_failure(full_msg) or "unreachable", msg=msg)
    facts = res.get("ansible_facts") or {}
    snapshot = facts.get("hwledger_snapshot") if isinstance(facts, dict) else None
    if not res.get("failed") and isinstance(snapshot, dict):
        return HostOutcome(True, snapshot=snapshot)
    reason = str(res.get("reason") or "error")
    if reason == "timeout" and res.get("rc") is None and "host" not in res:
        # The exec itself never came back (the controller gave up): the host did not answer.
        return HostOutcome(False, reason="no_answer", msg=msg)
    return HostOutcome(False, reason=reason, msg=msg)


class AnsibleHeartbeat:
    """The heartbeat as `ansible-playbook hwledger.fleet.heartbeat`, through the app's runner wrapper."""

    def __init__(self, runs: AnsibleRuns, policy: agents_schema.SshPolicy, *,
                 query_timeout_s: int = DEFAULT_QUERY_TIMEOUT_S, host_metrics: bool = True):
        self.runs = runs
        self.policy = policy
        self.query_timeout_s = query_timeout_s
        self.host_metrics = host_metrics

    def tick(self, agents: Sequence[agents_schema.Agent], *, cancel: Callable[[], bool]) -> dict[str, HostOutcome]:
        if not agents:
            return {}
        run = self.runs.run_playbook(
            HEARTBEAT_PLAYBOOK,
            inventory=inventory_for(agents, self.policy),
            extravars={"hwledger_gpu_query_timeout": self.query_timeout_s,
                       "hwledger_host_metrics": self.host_metrics},
            cancel=cancel,
            label="heartbeat",
        )
        outcomes = self.outcomes(run)
        if not outcomes and run.status not in ("canceled",):
            raise HeartbeatRunError(_run_failure_text(run))
        return outcomes

    @staticmethod
    def outcomes(run: PlaybookRun) -> dict[str, HostOutcome]:
        found: dict[str, HostOutcome] = {}
        for host, events in run.host_events.items():
            for event in events:
                if event.action.endswith("gpu_query") or event.event == "runner_on_unreachable":
                    found[host] = outcome_from_result(event.res, unreachable=event.event == "runner_on_unreachable")
                    break
        return found


def _run_failure_text(run: PlaybookRun) -> str:
    if run.error:
        return run.error
    tail = [line for line in run.output_tail.splitlines() if line.strip()]
    return f"ansible-playbook ended {run.status} (rc {run.rc}): " + " / ".join(tail[-3:])


# ---------------------------------------------------------------------------------------------
# Agent states


def decide_agent_state(row: AgentRow, record: HeartbeatRecord) -> AgentUpdate:
    """The 3-miss rule and friends: the state an agent moves to after one heartbeat."""
    if record.ok:
        return AgentUpdate("online", 0, seen=True)
    reason = record.reason or "error"
    if reason in BLOCKING_REASONS:
        return AgentUpdate("host_key_changed", row.consecutive_misses, reason, record.msg)
    if reason == HOST_KEY_UNKNOWN:
        detail = f" ({record.msg})" if record.msg else ""
        return AgentUpdate("error", row.consecutive_misses, reason, HOST_KEY_UNKNOWN_MSG + detail)
    if reason in MISS_REASONS:
        misses = row.consecutive_misses + 1
        if misses >= OFFLINE_AFTER_MISSES:
            state = "offline"
        elif row.last_seen is None:
            state = "pending"
        else:
            state = "stale"
        return AgentUpdate(state, misses, reason, record.msg)
    # The host answered; its GPU tool failed.
    return AgentUpdate("error", 0, reason, record.msg, seen=True)


def record_outcomes(store: Store, outcomes: dict[str, HostOutcome]) -> list[StateChange]:
    records = [HeartbeatRecord(name, o.ok, o.snapshot, o.reason, o.msg or None) for name, o in outcomes.items()]
    return store.record_heartbeats(records, decide_agent_state)


class _TickRecorder:
    """Writes a tick's outcomes to the store while the tick runs, in batches at most FLUSH_EVERY_S
    apart, for transports that report outcomes as they come (`on_outcome` / `on_progress`, the
    fan-out). A host that hangs until its deadline then no longer holds back the others' snapshots:
    they are in the store within a fraction of a second of their answer, not at the end of the tick."""

    FLUSH_EVERY_S = 0.25

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: dict[str, HostOutcome] = {}
        self.recorded: set[str] = set()
        self.changes: list[StateChange] = []
        self._last_flush = time.monotonic()

    def attach(self, transport: object) -> Callable[[], None]:
        """Hook into a streaming transport; returns the function that unhooks it (a no-op otherwise)."""
        if not hasattr(transport, "on_outcome") or not hasattr(transport, "on_progress"):
            return lambda: None
        previous = transport.on_outcome

        def on_outcome(name: str, outcome: HostOutcome) -> None:
            self.pending[name] = outcome
            if previous is not None:
                previous(name, outcome)

        transport.on_outcome, transport.on_progress = on_outcome, self.flush_due

        def detach() -> None:
            transport.on_outcome, transport.on_progress = previous, None
        return detach

    def flush_due(self) -> None:
        if self.pending and time.monotonic() - self._last_flush >= self.FLUSH_EVERY_S:
            try:
                self.flush()
            except StoreError as exc:  # the end of the tick records what is still pending
                log.warning("recording heartbeats during the tick failed (retried at its end): %s", exc)

    def flush(self) -> None:
        batch = self.pending
        self._last_flush = time.monotonic()
        if batch:
            self.changes += record_outcomes(self.store, batch)
            self.pending = {}
            self.recorded.update(batch)


# ---------------------------------------------------------------------------------------------
# Jobs


@dataclass
class JobRunOutcome:
    """What the job playbook run said, beside the result file (which alone says how the job ended)."""

    kind: str            # completed | cancelled | unreachable | failed | error
    msg: str = ""


class AnsibleJobs:
    """Jobs through the `hwledger.fleet.job` playbook (contract E), via the app's runner wrapper."""

    def __init__(self, runs: AnsibleRuns, policy: agents_schema.SshPolicy, results_dir: Path):
        self.runs = runs
        self.policy = policy
        self.results_dir = results_dir

    def run(self, job: JobRow, agent: agents_schema.Agent, *, cancel: Callable[[], bool],
            on_event: Callable[[HostEvent], None], on_private_dir: Callable[[Path], None]) -> JobRunOutcome:
        timeout = jobs_schema.async_seconds(job.spec) + JOB_CONTROLLER_GRACE_S

        def extravars(private_dir: Path) -> dict:
            # The spec goes by file: the role reads it as data. As a variable, its strings would be
            # templated once by Ansible (a "{{ ... }}" in a job argument would run on the controller).
            spec_file = AnsibleRuns.write_private_json(private_dir / "job.json", job.spec)
            return {"hwledger_job_file": str(spec_file), "hwledger_results_dir": str(self.results_dir),
                    # The result file says how the job went; the run fails only when it could not run it.
                    "hwledger_job_fail_on_error": False}

        run = self.runs.run_playbook(
            JOB_PLAYBOOK,
            inventory=inventory_for([agent], self.policy),
            extravars=extravars,
            limit=agent.name,
            cancel=cancel,
            on_event=on_event,
            on_private_dir=on_private_dir,
            timeout_s=timeout,
            label=f"job-{job.id}",
        )
        return self._outcome(run, agent.name)

    def cleanup(self, job_id: str, agent: agents_schema.Agent, remote_dir: str | None, *,
                cancel: Callable[[], bool]) -> JobRunOutcome:
        """Remove an interrupted job's private dir on the remote (the role's `always:` did not run)."""
        if remote_dir is None:
            # The run was interrupted before the remote dir was created (or known): nothing to remove;
            # the role's stale-dir sweep removes anything older than its limit at the next job.
            return JobRunOutcome("completed", "no remote dir was recorded")
        if not is_job_dir(remote_dir):
            return JobRunOutcome("completed", f"refusing to remove {remote_dir!r}: not an hwledger job dir")
        play = [{
            "name": "Remove an interrupted hwledger job's private directory",
            "hosts": INVENTORY_GROUP,
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Stop the job's runner if it still runs (it then stops the job's processes)",
                    "ansible.builtin.command": {"argv": ["sh", "-c", _STOP_RUNNER_SH, "sh", "{{ hwledger_job_dir }}"]},
                    "changed_when": False,
                },
                {
                    "name": "Remove the job's private directory",
                    "ansible.builtin.file": {"path": "{{ hwledger_job_dir }}", "state": "absent"},
                },
            ],
        }]
        run = self.runs.run_playbook(
            play, inventory=inventory_for([agent], self.policy), extravars={"hwledger_job_dir": remote_dir},
            limit=agent.name, cancel=cancel, timeout_s=120, label=f"cleanup-{job_id}",
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
        return JobRunOutcome("error", _run_failure_text(run)[:2000])


# Sends SIGTERM to this user's processes whose command line names the job's spec file inside its private
# dir ($1): the runner (`hwledger run DIR/job.json` or `python3 DIR/jobs.py run DIR/job.json`), which then
# kills the job's whole process tree. An exact, random path: no other process can match it.
_STOP_RUNNER_SH = r"""
spec="$1/job.json"
for proc in /proc/[0-9]*; do
  [ -O "$proc" ] || continue
  if tr '\000' '\n' < "$proc/cmdline" 2>/dev/null | grep -qxF -- "$spec"; then
    kill -TERM "${proc#/proc/}" 2>/dev/null || true
  fi
done
exit 0
"""

_JOB_DIR_RE = re.compile(r"^/(?:[A-Za-z0-9._-]+/)*hwledger-job-[A-Za-z0-9._-]+$")


def is_job_dir(path: str) -> bool:
    """A remote path that can only be a job's private dir (it came from the remote: check it strictly;
    no braces, so Ansible cannot template it, no '..', absolute)."""
    return bool(_JOB_DIR_RE.match(path)) and "/../" not in f"{path}/" and "/./" not in f"{path}/"


_RESULT_STATE_TO_JOB = {"succeeded": "succeeded", "failed": "failed", "timed_out": "timed_out", "error": "failed"}


def read_result(results_dir: Path, job_id: str) -> tuple[dict | None, str | None]:
    """(validated result, None), (None, why it was rejected) or (None, None) when there is none."""
    path = jobs_schema.result_path(results_dir, job_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"result file {path} cannot be read: {exc.strerror}"
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(jobs_schema.RESULT_MAX_BYTES + 1)
    try:
        return jobs_schema.validate_result(raw, expected_job_id=job_id), None
    except jobs_schema.ResultError as exc:
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
        os.unlink(jobs_schema.result_path(results_dir, job_id))


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
# The server


@dataclass
class TickReport:
    started: float
    duration_s: float = 0.0
    asked: int = 0
    outcomes: dict[str, HostOutcome] = field(default_factory=dict)
    changes: list[StateChange] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        answered = sum(1 for o in self.outcomes.values() if o.ok)
        failed = {}
        for outcome in self.outcomes.values():
            if not outcome.ok:
                failed[outcome.reason] = failed.get(outcome.reason, 0) + 1
        parts = [f"{self.asked} agent(s) asked, {answered} answered"]
        parts += [f"{count} {reason}" for reason, count in sorted(failed.items())]
        if self.dispatched:
            parts.append(f"{len(self.dispatched)} job(s) dispatched")
        if self.error:
            parts.append(f"heartbeat run failed: {printable(self.error, limit=200)}")
        return ", ".join(parts) + f" ({self.duration_s:.2f} s)"


@dataclass
class _Orphan:
    job_id: str
    run_dir: str
    deadline: float


SERVE_LOCK_NAME = "serve.lock"


def take_serve_lock(data_dir: Path) -> int:
    """An exclusive lock on `<data dir>/serve.lock`, held as long as the returned descriptor is open.

    Why: two servers on one store would both heartbeat every host, race for the same jobs, and each take
    the other's running jobs for a crashed server's leftovers when it starts. flock is released by the kernel when the
    process dies, however it dies, so a stale lock never blocks a restart. The descriptor is not
    inherited (O_CLOEXEC), so an ssh ControlPersist master that outlives the server cannot hold it.
    """
    path = data_dir / SERVE_LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UserError(f"cannot open the server lock {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise UserError(f"another `hwledger fleet serve` (pid {holder or 'unknown'}) already serves the store in "
                        f"{data_dir} (it holds {path}); stop it first, or give this one another --db") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Server:
    def __init__(
        self,
        fleet: Fleet,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        transport: HeartbeatTransport | None = None,
        jobs: AnsibleJobs | None = None,
        max_parallel_jobs: int = DEFAULT_MAX_PARALLEL_JOBS,
        query_timeout_s: int = DEFAULT_QUERY_TIMEOUT_S,
    ):
        self.fleet = fleet
        self.interval_s = interval_s
        self.policy = fleet.policy()
        self.runs = fleet.runs()
        self.results_dir = fleet.results_dir
        self.transport = transport or AnsibleHeartbeat(self.runs, self.policy, query_timeout_s=query_timeout_s)
        self.jobs = jobs or AnsibleJobs(self.runs, self.policy, self.results_dir)
        self.store = fleet.open_store()
        self.stop_event = threading.Event()
        self.max_parallel_jobs = max_parallel_jobs
        self._pool = ThreadPoolExecutor(max_workers=max_parallel_jobs, thread_name_prefix="hwledger-job")
        self._busy: dict[str, Future] = {}  # agent name -> its job or clean-up in flight
        self._orphans: dict[str, _Orphan] = {}
        self._agents: dict[str, agents_schema.Agent] = {}
        self._config_error: str | None = None
        self._config_error_logged_at: float | None = None
        self._config_signature: tuple | None = None
        self._job_workers: dict[str, str] = {}  # agent name -> id of the job its worker runs
        self._unsettled: set[str] = set()  # jobs whose worker failed, to settle (retried each tick)
        self._lock_fd: int | None = None
        self._event_windows: dict[str, tuple[float | None, int]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self, *_args: object) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + STOP_GRACE_S
        for future in list(self._busy.values()):
            remaining = deadline - time.monotonic()
            if remaining > 0:
                try:
                    future.result(timeout=remaining)
                except Exception:  # pylint: disable=broad-exception-caught
                    pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        for kind, (_last, count) in self._event_windows.items():
            if count:  # occurrences not recorded yet
                self.store.add_event(kind, occurrences=count)
        self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases serve.lock
            self._lock_fd = None

    def run(self, *, once: bool = False, max_ticks: int | None = None) -> int:
        """Run ticks until stopped (SIGTERM/SIGINT), or one tick with `once`."""
        installed = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                installed.append((sig, signal.signal(sig, self.request_stop)))
        try:
            self._lock_fd = take_serve_lock(self.fleet.check_data_dir())
            self.recover()
            log.info("serving the agents of %s every %.1f s (store %s)", self.fleet.config, self.interval_s,
                     self.fleet.db)
            ticks = 0
            while not self.stop_event.is_set():
                started = time.monotonic()
                try:
                    report = self.tick()
                except Exception as exc:  # pylint: disable=broad-exception-caught
                    # A daemon keeps its cadence through a bad tick (store busy too long, a bug in one
                    # host's data...): say it, record it, try again next tick.
                    log.exception("tick failed: %s", exc)
                    self._throttled_event("tick_failed", msg=f"{type(exc).__name__}: {exc}"[:2000])
                    report = TickReport(started=started)
                ticks += 1
                log.log(logging.INFO if once else logging.DEBUG, "tick %d: %s", ticks, report.summary())
                if self.stop_event.is_set():
                    break
                if once or (max_ticks is not None and ticks >= max_ticks):
                    self.wait_for_workers()
                    break
                elapsed = time.monotonic() - started
                if elapsed > self.interval_s:
                    # Never overlap, never queue up: record the overrun and start the next tick now.
                    self._throttled_event("tick_overrun", duration_s=round(elapsed, 3), interval_s=self.interval_s,
                                          hosts=report.asked)
                    log.warning("tick took %.2f s, longer than the %.2f s interval; next tick starts now",
                                elapsed, self.interval_s)
                    continue
                self.stop_event.wait(self.interval_s - elapsed)
        finally:
            for sig, previous in installed:
                signal.signal(sig, previous)
            self.close()
        return 0

    def _throttled_event(self, kind: str, **detail: object) -> None:
        """Record a recurring server event at most once per EVENT_THROTTLE_S, with how often it happened
        meanwhile: the event log is append-only, and a slow fleet would otherwise add one row per tick."""
        now = time.monotonic()
        last, count = self._event_windows.get(kind, (None, 0))
        count += 1
        if last is not None and now - last < EVENT_THROTTLE_S:
            self._event_windows[kind] = (last, count)
            return
        self.store.add_event(kind, occurrences=count, **detail)
        self._event_windows[kind] = (now, 0)

    def wait_for_workers(self, timeout: float | None = None) -> None:
        """Wait until every job and clean-up handed to a worker has ended (then forget them)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in list(self._busy.values()):
            future.exception(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._reap()

    # -- start-up recovery -----------------------------------------------------------------

    def recover(self) -> None:
        """Settle what a previous server left behind, before the first tick.

        `running` jobs: if the old run's ansible-playbook still runs (found by its private dir), wait
        for it (it may still fetch the result); otherwise settle from the results dir. `dispatched`
        jobs never started anything and are simply run again by the dispatcher.
        """
        keep = []
        for job in self.store.list_jobs(states=["running"]):
            if job.run_dir and processes_using(job.run_dir):
                ran_for = age_seconds(job.started_at) or 0.0
                remaining = max(0.0, self._job_deadline_s(job) - ran_for)
                self._orphans[job.id] = _Orphan(job.id, job.run_dir, time.monotonic() + remaining)
                keep.append(job.run_dir)
                log.warning("job %s: the previous server's run is still going; waiting for it", job.id)
                continue
            why = ("the server stopped before the job's playbook started (nothing ran on the host); submit it again"
                   if job.run_dir is None else "the server stopped while the job ran; no result was fetched")
            state = settle_job(self.store, job, self.results_dir, None, interrupted=why)
            log.warning("job %s was running when the previous server stopped: now %s", job.id, state)
        removed = self.runs.sweep(keep=keep)
        if removed:
            log.info("removed %d run dir(s) left by a previous server", len(removed))
        discarded = discard_settled_results(self.store, self.results_dir)
        if discarded:
            log.info("removed %d result file(s) already recorded in the store", discarded)

    @staticmethod
    def _job_deadline_s(job: JobRow) -> float:
        return float(jobs_schema.async_seconds(job.spec) + JOB_CONTROLLER_GRACE_S)

    def _check_orphans(self) -> None:
        for job_id, orphan in list(self._orphans.items()):
            pids = processes_using(orphan.run_dir)
            job = self.store.get_job(job_id)
            if pids and job is not None and (job.cancel_requested or time.monotonic() > orphan.deadline):
                terminate_processes_using(orphan.run_dir)
                pids = processes_using(orphan.run_dir)
            if pids:
                continue
            del self._orphans[job_id]
            if job is not None and not job.terminal:
                state = settle_job(self.store, job, self.results_dir, None,
                                   interrupted="the previous server's run ended without a result")
                log.info("job %s (left by the previous server) settled: %s", job_id, state)
            self.runs.remove_private_dir(Path(orphan.run_dir))

    # -- one tick --------------------------------------------------------------------------

    def _reload_agents(self) -> None:
        """Apply the agents file's additions and removals. A file that is missing or does not parse is an
        error (logged at most once a minute) and the agents of the last good read are kept: an agent is
        removed only when a file that parsed no longer lists it, never because the file vanished."""
        try:
            info = os.stat(self.fleet.config)
            signature: tuple | None = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode, info.st_uid)
        except OSError:
            signature = None
        if signature is not None and signature == self._config_signature:
            return  # unchanged since the last tick (edits are atomic renames: a new inode)
        try:
            agents = self.fleet.load_agents(missing_ok=False)
        except UserError as exc:
            self._config_problem(str(exc))
            return
        if self._config_error is not None:
            log.info("%s can be read again", self.fleet.config)
        self._config_error = self._config_error_logged_at = None
        self._config_signature = signature
        self._agents = {agent.name: agent for agent in agents}
        known = {row.name: row for row in self.store.list_agents(include_removed=True)}
        for agent in agents:
            row = known.get(agent.name)
            if row is None or row.state == "removed":
                # Added to the file by hand: record it so its state can be tracked.
                self.store.upsert_agent(agent_record(agent))
        for name, row in known.items():
            if row.state != "removed" and name not in self._agents:
                self.store.mark_agent_removed(name)

    def _config_problem(self, message: str) -> None:
        """Log and record an unreadable agents file: at once when the problem is new, then once a minute."""
        self._config_signature = None  # read it again next tick, whatever its signature
        now = time.monotonic()
        last = self._config_error_logged_at
        if message == self._config_error and last is not None and now - last < EVENT_THROTTLE_S:
            return
        self._config_error, self._config_error_logged_at = message, now
        self.store.add_event("config_error", msg=message[:2000])
        log.error("cannot read the agents file, keeping the %d agent(s) of the last good read: %s",
                  len(self._agents), printable(message, limit=600))

    def tick(self) -> TickReport:
        report = TickReport(started=time.monotonic())
        self._reap()
        self._check_orphans()
        self._reload_agents()
        rows = {row.name: row for row in self.store.list_agents()}
        targets = [a for name, a in self._agents.items() if rows.get(name) and rows[name].state != "host_key_changed"]
        report.asked = len(targets)
        recorder = _TickRecorder(self.store)
        detach = recorder.attach(self.transport)
        try:
            report.outcomes = self.transport.tick(targets, cancel=self.stop_event.is_set)
        except HeartbeatRunError as exc:
            report.error = str(exc)
            self._throttled_event("heartbeat_failed", msg=str(exc)[:2000], hosts=len(targets))
            log.error("heartbeat run failed (no host state changed): %s", printable(exc))
        finally:
            detach()
        report.changes = recorder.changes
        if report.outcomes and not self.stop_event.is_set():
            late = {name: o for name, o in report.outcomes.items() if name not in recorder.recorded}
            report.changes = report.changes + record_outcomes(self.store, late)
            for change in report.changes:
                log.info("agent %s: %s -> %s%s", change.agent, change.old, change.new,
                         f" ({change.reason}: {printable(change.msg, limit=300)})" if change.reason else "")
            report.dispatched = self._dispatch([name for name, o in report.outcomes.items() if o.ok])
        report.duration_s = time.monotonic() - report.started
        return report

    # -- dispatch --------------------------------------------------------------------------

    def _reap(self) -> None:
        """Forget finished workers. A job worker that died of an exception may have left its job active,
        with no run behind it: such a job is settled here (its result file, if one was fetched, else
        `lost` with its remote clean-up pending), so no job stays `running` forever."""
        for name, future in list(self._busy.items()):
            if future.done():
                del self._busy[name]
                job_id = self._job_workers.pop(name, None)
                exc = future.exception()
                if exc is not None:
                    log.error("worker for %s failed: %s", name, printable(f"{type(exc).__name__}: {exc}", limit=600))
                    if job_id is not None:
                        self._unsettled.add(job_id)
        for job_id in list(self._unsettled):
            self._settle_failed_worker_job(job_id)

    def _settle_failed_worker_job(self, job_id: str) -> None:
        try:
            job = self.store.get_job(job_id)
            if job is not None and not job.terminal:
                state = settle_job(self.store, job, self.results_dir, None,
                                   interrupted="the server's job worker failed; see the server log")
                log.warning("job %s: its worker failed, now %s", job_id, state)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # E.g. the store stayed busy: try again at the next tick rather than forget the job.
            log.error("job %s: cannot settle it yet: %s", job_id, exc)
            return
        self._unsettled.discard(job_id)

    def _dispatch(self, answered: Sequence[str]) -> list[str]:
        """Hand the next job (or a pending clean-up) of each agent that answered to a worker."""
        started = []
        for name in answered:
            if self.stop_event.is_set() or len(self._busy) >= self.max_parallel_jobs:
                break
            if name in self._busy or name not in self._agents:
                continue
            agent = self._agents[name]
            active = self.store.list_jobs(agent=name, states=["dispatched", "running"])
            if any(job.state == "running" or job.id in self._orphans for job in active):
                continue  # a previous server's run, still being settled
            job = active[0] if active else self.store.next_queued_job(name)
            if job is not None:
                if job.state == "queued":
                    if not self.store.transition_job(job.id, ["queued"], "dispatched", dispatched_at=utc_now()):
                        continue  # cancelled meanwhile
                    crash_point("dispatched")
                log.info("job %s dispatched to %s", job.id, name)
                self._busy[name] = self._pool.submit(self._job_worker, job.id, agent)
                self._job_workers[name] = job.id
                started.append(job.id)
                continue
            pending = self.store.list_jobs(agent=name, states=["cancelled", "lost", "failed"])
            pending = [j for j in pending if j.cleanup_pending]
            if pending:
                self._busy[name] = self._pool.submit(self._cleanup_worker, pending[0].id, agent)
        return started

    # -- workers (each in its own thread, with its own store connection) -------------------

    def _job_worker(self, job_id: str, agent: agents_schema.Agent) -> None:
        with self.fleet.open_store() as store:
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
            cancel = _CancelCheck(store, job_id, self.stop_event)

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
            if self.stop_event.is_set() and not cancel.user_cancelled and outcome.kind == "cancelled":
                interrupted = "the server was stopped while the job ran"
            state = settle_job(store, store.get_job(job_id) or job, self.results_dir, outcome, interrupted=interrupted)
            crash_point("finished")
            store.update_job(job_id, run_dir=None)
            log.info("job %s on %s: %s", job_id, agent.name, state)
            settled = store.get_job(job_id)
            if settled and settled.cleanup_pending and not self.stop_event.is_set():
                self._cleanup(store, settled, agent)

    def _cleanup_worker(self, job_id: str, agent: agents_schema.Agent) -> None:
        with self.fleet.open_store() as store:
            job = store.get_job(job_id)
            if job is not None and job.cleanup_pending:
                self._cleanup(store, job, agent)

    def _cleanup(self, store: Store, job: JobRow, agent: agents_schema.Agent) -> None:
        outcome = self.jobs.cleanup(job.id, agent, job.remote_dir, cancel=self.stop_event.is_set)
        if outcome.kind == "completed":
            store.update_job(job.id, cleanup_pending=False)
            store.add_event("job_cleanup", agent=agent.name, job_id=job.id, remote_dir=job.remote_dir)
        else:
            log.warning("job %s: remote clean-up on %s did not finish (%s); will retry", job.id, agent.name,
                        printable(outcome.msg, limit=300))


class _CancelCheck:
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
    """The job's remote private dir, when this event is the role's tempfile task that created it."""
    if event.event != "runner_on_ok" or not event.action.endswith("tempfile"):
        return None
    path = event.res.get("path")
    if isinstance(path, str) and is_job_dir(path):
        return path
    return None
