"""`hwledger fleet serve`: the serve loop. One tick (every `--interval`, never overlapping; an overrun is
recorded and the next tick starts at once):

1. read ssh-agents.toml again (registrations and removals apply without a restart; a file that is
   missing or does not parse keeps the last good list of agents);
2. run one heartbeat over every agent that is not blocked (`host_key_changed`) through the heartbeat
   transport (`hwledger.heartbeat`: the resident fan-out by default, or the Ansible playbook), writing
   each host's outcome and new state to the store as it arrives;
3. hand queued jobs to the job workers (`hwledger.job_runs`; threads, so heartbeats keep their cadence):
   `hwledger.job_dispatch` decides which go and where (a job without `resources` holds its whole agent, one
   with `resources` only the GPUs `hwledger.placement` chose for it), and pending remote clean-ups likewise.

Running jobs' logs are read at every tick, in the heartbeat's exec where the transport can
(`hwledger.job_logs`).

At start-up it settles what a previous server left behind (`recover`): it stops the dead server's
ansible-playbook runs and reconciles each job they were running with its host. While a job runs, its
agent going `offline` (missed heartbeats) stops the run: the job ends `lost` (`agent_offline`) instead of
waiting for its time limit. One server per store: `run` holds an flock on `<data dir>/serve.lock` for the
process's life.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema, private_files
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger.ansible_runs import AnsibleRuns, terminate_processes_using
from hwledger.display import printable
from hwledger.errors import UserError
from hwledger.fleet import Fleet, agent_record
from hwledger.heartbeat import (
    DEFAULT_QUERY_TIMEOUT_S,
    AnsibleHeartbeat,
    HeartbeatRunError,
    HeartbeatTransport,
    QueryPacing,
    TickRecorder,
)
from hwledger.job_dispatch import DispatchRound
from hwledger.job_logs import LogFollower
from hwledger.job_runs import AnsibleJobs
from hwledger.job_settle import discard_settled_results, settle_job
from hwledger.job_workers import RECONCILE_RETRY, JobWorkers
from hwledger.store import AgentRow, JobRow, StateChange, StoreError, parse_time

log = logging.getLogger("hwledger.server")

DEFAULT_INTERVAL_S = 5.0
DEFAULT_MAX_PARALLEL_JOBS = 4
STOP_GRACE_S = 1.5
EVENT_THROTTLE_S = 60.0
# A job with resources is placed only on agents whose latest snapshot is younger than this many intervals.
PLACEMENT_MAX_AGE_INTERVALS = 2
SERVE_LOCK_NAME = "serve.lock"
# `hwledger fleet serve` exits with this when its store cannot be used any more (deleted, replaced,
# read-only, disk full, damaged): nothing it does could be recorded.
EXIT_STORE_FAILED = 4
# The end states of a job that may leave its remote dir behind (its clean-up pending).
CLEANUP_STATES = ("cancelled", "lost", "failed")
# A job left by a previous server whose host could not be asked this many times (on ticks at which its
# agent answered the heartbeat) ends `lost`, its remote dir cleaned up later.
MAX_RECONCILE_TRIES = 3


@dataclass
class TickReport:
    started: float
    duration_s: float = 0.0
    asked: int = 0
    outcomes: dict[str, ProbeOutcome] = field(default_factory=dict)
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


class ServeCompanion(Protocol):
    """Something that runs beside the loop in threads of its own (`serve --http`, the hourly prune): started
    once the server holds the store's lock, told the end of every tick, stopped when the loop ends. It must
    never block: the loop calls it between ticks."""

    def start(self) -> None:
        ...

    def tick_done(self, report: TickReport, *, elapsed_s: float, overran: bool) -> None:
        ...

    def stop(self) -> None:
        ...


_DIAL_ORDER = {state: rank for rank, state in enumerate(("online", "degraded", "error", "stale", "pending", "offline"))}


def _due(row: AgentRow, now: datetime) -> bool:
    """Whether an agent is asked this tick: not while its host key is refused (blocked until re-keyed),
    and an offline agent only once its backoff is over (heartbeat.next_attempt)."""
    if row.state == "host_key_changed":
        return False
    due = parse_time(row.next_attempt_at)
    return due is None or due <= now


def take_serve_lock(data_dir: Path) -> int:
    """An exclusive lock on `<data dir>/serve.lock`, held as long as the returned descriptor is open.

    Why: two servers on one store would both heartbeat every host, race for the same jobs, and each take
    the other's running jobs for a crashed server's leftovers when it starts. The kernel releases the
    lock when the process dies, however it dies, so a stale lock never blocks a restart.
    """
    path = data_dir / SERVE_LOCK_NAME
    try:
        return private_files.acquire_lock(path, blocking=False, note=f"{os.getpid()}\n")
    except private_files.LockHeld as exc:
        raise UserError(f"another `hwledger fleet serve` (pid {exc.holder or 'unknown'}) already serves the store in "
                        f"{data_dir} (it holds {path}); stop it first, or give this one another --db") from None
    except private_files.PrivatePathError as exc:
        raise UserError(f"cannot take the server lock: {exc}") from None


class Server:
    """The serve loop over one fleet (see the module's notes). `run` until stopped; `tick` once."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        transport: HeartbeatTransport | None = None,
        jobs: AnsibleJobs | None = None,
        max_parallel_jobs: int = DEFAULT_MAX_PARALLEL_JOBS,
        query_timeout_s: int = DEFAULT_QUERY_TIMEOUT_S,
        companions: Sequence[ServeCompanion] = (),
    ):
        self.fleet = fleet
        self.companions = list(companions)
        self.interval_s = interval_s
        self.policy = fleet.policy()
        self.runs = AnsibleRuns(runs_dir=fleet.runs_dir)
        self.results_dir = fleet.results_dir
        self.transport = transport or AnsibleHeartbeat(self.runs, self.policy, query_timeout_s=query_timeout_s)
        self.jobs = jobs or AnsibleJobs(self.runs, self.policy, self.results_dir)
        self.store = fleet.open_store()
        self.stop_event = threading.Event()
        self.workers = JobWorkers(fleet.open_store, self.jobs, self.results_dir, self.stop_event)
        self._pacing = QueryPacing()
        self.logs = LogFollower(self.policy)
        self.max_parallel_jobs = max_parallel_jobs
        self._pool = ThreadPoolExecutor(max_workers=max_parallel_jobs, thread_name_prefix="hwledger-job")
        # Work in flight: a job's worker (its run or its reconcile) by the job's id, an agent's remote clean-up
        # by _cleanup_key(agent).
        self._busy: dict[str, Future] = {}
        self._reconcile: dict[str, int] = {}  # running jobs a previous server left -> failed tries to ask
        self._agents: dict[str, Agent] = {}
        self._config_error: str | None = None
        self._config_error_logged_at: float | None = None
        self._config_signature: tuple | None = None
        self._job_workers: dict[str, tuple[str, str]] = {}  # job id -> (its agent, "run" | "reconcile")
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
        stop_in_flight = getattr(self.transport, "stop_in_flight", None)
        if stop_in_flight is not None:
            stop_in_flight()  # execs of new connections still in flight go too (masters stay, ControlPersist)
        self.logs.close()
        try:
            for kind, (_last, count) in self._event_windows.items():
                if count:  # occurrences not recorded yet
                    self.store.add_event(kind, occurrences=count)
        except StoreError as exc:  # the store may be why we stop
            log.warning("could not record the last server events: %s", exc)
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
            for started_count, companion in enumerate(self.companions):
                try:
                    companion.start()
                except BaseException:
                    self.companions = self.companions[:started_count]  # stop only those that started
                    raise
            self.recover()
            log.info("serving the agents of %s every %.1f s (store %s)", self.fleet.config, self.interval_s,
                     self.fleet.db)
            ticks = 0
            while not self.stop_event.is_set():
                started = time.monotonic()
                try:
                    self.store.check_file()
                    report = self.tick()
                except StoreError as exc:
                    if exc.transient:
                        log.warning("tick skipped: %s", exc)
                        report = TickReport(started=started)
                    else:
                        # Nothing the server does can be recorded: stopping is the only honest thing left
                        # (a supervisor restarts it against a store that works, or a person looks).
                        log.critical("stopping: %s", exc)
                        return EXIT_STORE_FAILED
                except Exception as exc:  # pylint: disable=broad-exception-caught
                    # A daemon keeps its cadence through a bad tick (store busy too long, a bug in one
                    # host's data...): say it, record it, try again next tick.
                    log.exception("tick failed: %s", exc)
                    self._throttled_event("tick_failed", msg=f"{type(exc).__name__}: {exc}"[:2000])
                    report = TickReport(started=started)
                ticks += 1
                log.log(logging.INFO if once else logging.DEBUG, "tick %d: %s", ticks, report.summary())
                elapsed = time.monotonic() - started
                self._tell_companions(report, elapsed)
                if self.stop_event.is_set():
                    break
                if once or (max_ticks is not None and ticks >= max_ticks):
                    self.wait_for_workers()
                    break
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
            for companion in reversed(self.companions):
                try:
                    companion.stop()
                except Exception:  # pylint: disable=broad-exception-caught
                    log.exception("stopping %s failed", type(companion).__name__)
            self.close()
        return 0

    def _tell_companions(self, report: TickReport, elapsed: float) -> None:
        for companion in self.companions:
            try:
                companion.tick_done(report, elapsed_s=elapsed, overran=elapsed > self.interval_s)
            except Exception:  # pylint: disable=broad-exception-caught
                # Watching the fleet must never stop serving it.
                log.exception("%s failed after a tick", type(companion).__name__)

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

        `running` jobs: the dead server's ansible-playbook for it (found by its private dir on the command
        line; its workers live in sessions of their own and would wait forever on the dead server) is
        stopped; it can no longer tell this server anything. Then a result file it fetched decides; a job
        whose playbook never started (no run dir, no remote dir, no launch) is settled at once (nothing ran:
        another attempt); every other one is reconciled with its host at the first tick its agent answers
        (`JobWorkers.reconcile_job`). `dispatched` jobs never started anything and are simply run.
        """
        for job in self.store.list_jobs(states=["running"]):
            if job.run_dir:
                terminate_processes_using(job.run_dir)
                self.runs.remove_private_dir(Path(job.run_dir))
                self.store.update_job(job.id, run_dir=None)
            if job_schema.result_path(self.results_dir, job.id).exists():
                state = settle_job(self.store, job, self.results_dir, None,
                                   interrupted="server_stopped: the server stopped after fetching the result")
            elif job.run_dir is None and job.remote_dir is None and job.launched_at is None:
                state = settle_job(self.store, job, self.results_dir, None, interrupted=(
                    "server_stopped: the server stopped before the job's playbook started (nothing ran on the host)"))
            else:
                self._reconcile[job.id] = 0
                state = "to reconcile with its host"
            log.warning("job %s was running when the previous server stopped: %s", job.id, state)
        removed = self.runs.sweep()
        if removed:
            log.info("removed %d run dir(s) left by a previous server", len(removed))
        discarded = discard_settled_results(self.store, self.results_dir)
        if discarded:
            log.info("removed %d result file(s) already recorded in the store", discarded)

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
        self.store.truncate_wal_if_owed()
        self._reload_agents()
        rows = {row.name: row for row in self.store.list_agents()}
        now = datetime.now(timezone.utc)
        targets = [agent for name, agent in self._agents.items() if name in rows and _due(rows[name], now)]
        # Hosts that answered lately first: when new connections are rationed (a restarted server, a
        # network blip), dead and never-seen hosts must not take the slots of the healthy ones.
        targets.sort(key=lambda agent: _DIAL_ORDER.get(rows[agent.name].state, len(_DIAL_ORDER)))
        report.asked = len(targets)
        recorder = TickRecorder(self.store, {agent.name: agent for agent in targets})
        liveness = self._pacing.liveness_only(targets)
        log_reads = self.logs.reads(self.store, [agent.name for agent in targets])
        same_exec = bool(getattr(self.transport, "reads_job_logs", False))
        outcomes: dict = {}
        try:
            outcomes = self.transport.tick(targets, cancel=self.stop_event.is_set, on_outcome=recorder.on_outcome,
                                           on_progress=recorder.on_progress, budget_s=self.interval_s,
                                           liveness=liveness, **({"log_reads": log_reads} if same_exec else {}))
            self._pacing.note(outcomes, liveness)
        except HeartbeatRunError as exc:
            report.error = str(exc)
            self._throttled_event("heartbeat_failed", msg=str(exc)[:2000], hosts=len(targets))
            log.error("heartbeat run failed (no host state changed): %s", printable(exc))
        if self.stop_event.is_set():
            report.duration_s = time.monotonic() - report.started
            return report
        report.outcomes = recorder.finish(outcomes, self.policy)
        self.logs.record(self.store, outcomes, log_reads, agents=self._agents, same_exec=same_exec,
                         cancel=self.stop_event.is_set)
        report.changes = recorder.changes
        for change in report.changes:
            log.info("agent %s: %s -> %s%s", change.agent, change.old, change.new,
                     f" ({change.reason}: {printable(change.msg, limit=300)})" if change.reason else "")
        if self._job_workers or self._reconcile:
            self._stop_jobs_that_cannot_go_on()
        if report.outcomes:
            # Jobs go to agents that answered and are `online` now: not to one whose GPU fell off the bus
            # (`degraded`) nor to one that only answered another poller's busy tool.
            online = {row.name for row in self.store.list_agents() if row.state == "online"}
            report.dispatched = self._dispatch([name for name, o in report.outcomes.items()
                                                if o.ok and name in online])
        report.duration_s = time.monotonic() - report.started
        return report

    # -- dispatch --------------------------------------------------------------------------

    def _reap(self) -> None:
        """Forget finished workers. A job worker that died of an exception may have left its job active,
        with no run behind it: such a job is settled here (its result file, if one was fetched, else
        `lost` with its remote clean-up pending), so no job stays `running` forever."""
        for key, future in list(self._busy.items()):
            if future.done():
                del self._busy[key]
                agent, kind = self._job_workers.pop(key, (None, None))
                exc = future.exception()
                if exc is not None:
                    log.error("worker for %s failed: %s", agent or key,
                              printable(f"{type(exc).__name__}: {exc}", limit=600))
                    if agent is not None:
                        self._unsettled.add(key)
                        self._reconcile.pop(key, None)
                elif kind == "reconcile":
                    self._reconciled(key, future.result())
        for job_id in list(self._unsettled):
            self._settle_failed_worker_job(job_id)

    def _reconciled(self, job_id: str, verdict: str | None) -> None:
        """A reconcile worker ended: done, or (its host could not be asked) tried again at a later tick, up to
        MAX_RECONCILE_TRIES times; then the job is `lost` and its remote dir cleaned up later."""
        if verdict != RECONCILE_RETRY:
            self._reconcile.pop(job_id, None)
            return
        self._reconcile[job_id] = self._reconcile.get(job_id, 0) + 1
        if self._reconcile[job_id] < MAX_RECONCILE_TRIES:
            return
        del self._reconcile[job_id]
        job = self.store.get_job(job_id)
        if job is not None and not job.terminal:
            state = settle_job(self.store, job, self.results_dir, None, interrupted=(
                f"reconcile_failed: the host could not be asked what became of the job ({MAX_RECONCILE_TRIES} tries)"))
            log.warning("job %s: its host could not be asked; now %s", job_id, state)

    def _stop_jobs_that_cannot_go_on(self) -> None:
        """A job whose agent went offline (missed OFFLINE_AFTER_MISSES heartbeats) while it ran ends `lost` now,
        not at its time limit (the job playbook would poll a dead host until then); its remote dir is cleaned
        up when the agent answers again. A job left by a previous server that waits to be reconciled goes the
        same way, and so does one cancelled while its agent is no longer in the agents file (no reconcile
        will ever reach it)."""
        offline = {row.name: row for row in self.store.list_agents() if row.state == "offline"}
        for job_id, (name, _kind) in list(self._job_workers.items()):
            if name in offline:
                self.workers.abandon(job_id, _offline_reason(offline[name]))
        busy_jobs = set(self._job_workers)
        for job_id in list(self._reconcile):
            job = self.store.get_job(job_id)
            if job is None or job.terminal:
                del self._reconcile[job_id]
                continue
            if job_id in busy_jobs:
                continue
            if job.agent in offline:
                why: str | None = _offline_reason(offline[job.agent])
            elif job.cancel_requested and job.agent not in self._agents:
                why = None  # settle_job: cancelled
            else:
                continue
            del self._reconcile[job_id]
            state = settle_job(self.store, job, self.results_dir, None, interrupted=why)
            log.warning("job %s (left by a previous server, agent %s): now %s", job_id, job.agent, state)

    def _settle_failed_worker_job(self, job_id: str) -> None:
        try:
            job = self.store.get_job(job_id)
            if job is not None and not job.terminal:
                state = settle_job(self.store, job, self.results_dir, None,
                                   interrupted="worker_failed: the server's job worker failed; see the server log")
                log.warning("job %s: its worker failed, now %s", job_id, state)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            # E.g. the store stayed busy: try again at the next tick rather than forget the job.
            log.error("job %s: cannot settle it yet: %s", job_id, exc)
            return
        self._unsettled.discard(job_id)

    def _dispatch(self, answered: Sequence[str]) -> list[str]:
        """Hand work to workers, for agents that answered this tick. First what must happen before anything
        new runs on an agent: a job a previous server left running is reconciled with its host, and a job
        queued again after an attempt that left its remote dir has that dir removed (its runner stopped). Then
        the jobs that may start now (`hwledger.job_dispatch`: its own agent for a job without resources, the
        GPUs placement picks for one with), then a pending clean-up of a finished job."""
        if self.stop_event.is_set():
            return []
        answered = [name for name in answered if name in self._agents]
        # Every job with a remote clean-up pending, in one query for all agents (oldest first).
        cleanups = self.store.list_jobs(states=["queued", *CLEANUP_STATES], cleanup_pending=True)
        closed = self._prepare_agents(answered, [job for job in cleanups if job.state == "queued"])
        started = []
        dispatches = DispatchRound(
            self.store, configured=self._agents, answered=answered, in_workers=self._job_workers,
            capacity=self.max_parallel_jobs - len(self._busy), workers_max=self.max_parallel_jobs,
            max_age_s=PLACEMENT_MAX_AGE_INTERVALS * self.interval_s, stop=self.stop_event.is_set, closed=closed,
        ).run()
        for dispatch in dispatches:
            log.info("job %s dispatched to %s", dispatch.job_id, dispatch.agent)
            self.workers.handing_out(dispatch.job_id)
            self._busy[dispatch.job_id] = self._pool.submit(self.workers.run_job, dispatch.job_id,
                                                            self._agents[dispatch.agent])
            self._job_workers[dispatch.job_id] = (dispatch.agent, "run")
            started.append(dispatch.job_id)
        # A job whose worker still runs does its own clean-up.
        finished = _first_per_agent(job for job in cleanups
                                    if job.state != "queued" and job.id not in self._job_workers)
        for name in answered:
            key = _cleanup_key(name)
            if self.stop_event.is_set() or len(self._busy) >= self.max_parallel_jobs:
                break
            if key not in self._busy and name in finished:
                self._busy[key] = self._pool.submit(self.workers.clean_up, finished[name].id, self._agents[name])
        return started

    def _prepare_agents(self, answered: Sequence[str], queued_again: Sequence[JobRow]) -> dict[str, str]:
        """Start the reconciles and the clean-ups before another attempt (see _dispatch) of the agents that
        answered (`queued_again`: the queued jobs with a clean-up pending); returns the agents closed to new
        jobs meanwhile, with the reason (`job show` shows it)."""
        closed: dict[str, str] = {}
        for job_id in list(self._reconcile):
            job = self.store.get_job(job_id)
            if job is None or job.terminal:
                continue  # _stop_jobs_that_cannot_go_on forgets it
            closed[job.agent] = f"first asks its host what became of job {job_id} (left by a previous server)"
            if job_id in self._busy or job.agent not in answered or len(self._busy) >= self.max_parallel_jobs:
                continue
            self.workers.handing_out(job_id)
            self._busy[job_id] = self._pool.submit(self.workers.reconcile_job, job_id, self._agents[job.agent])
            self._job_workers[job_id] = (job.agent, "reconcile")
        first_again = _first_per_agent(queued_again)
        for name in answered:
            again = first_again.get(name)
            if again is None:
                continue
            closed.setdefault(name, f"first removes what an earlier attempt of job {again.id} left on the host")
            key = _cleanup_key(name)
            if key not in self._busy and len(self._busy) < self.max_parallel_jobs:
                self._busy[key] = self._pool.submit(self.workers.clean_up, again.id, self._agents[name])
        return closed


def _first_per_agent(jobs: Iterable[JobRow]) -> dict[str, JobRow]:
    """The first (oldest) of `jobs` for each agent."""
    first: dict[str, JobRow] = {}
    for job in jobs:
        first.setdefault(job.agent, job)
    return first


def _cleanup_key(agent: str) -> str:
    """The key of an agent's clean-up in flight among the server's work (job ids are UUIDs: no clash)."""
    return f"cleanup:{agent}"


def _offline_reason(row: AgentRow) -> str:
    why = f" ({row.state_reason})" if row.state_reason else ""
    return (f"agent_offline: the agent {row.name} missed {row.consecutive_misses} heartbeats in a row{why} while "
            "the job ran; its remote dir is cleaned up when the agent answers again")
