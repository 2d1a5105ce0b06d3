"""One dispatch round of the serve loop: which queued jobs start now, where, and why the others wait.

The rules per agent (docs/jobs.md, "Placement"):
- a job without `resources` holds its whole agent, as every job did before placement: it starts on a tick at
  which its agent answered and nothing else is active there, and while it is active nothing else starts
  there. The oldest such job waiting for its agent keeps the agent free of newer jobs (named or `auto`)
  until it has started: first come, first served per agent, so a stream of GPU jobs cannot starve it;
- a job with `resources` holds only the GPUs `hwledger.placement` chose for it (its claim, written with its
  dispatch): other such jobs run on the same agent's other GPUs at the same time. `--agent NAME` places it
  on that agent's GPUs, `auto` on any agent's. A job that does not fit waits and does not block the others
  (placement is greedy: a big request can wait while smaller ones that fit go ahead).

Each job that goes is committed `dispatched` (with its agent and placement) before it is handed to a worker;
each that waits gets the reason on its row, written only when the reason changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from hwledger.job_runs import crash_point
from hwledger.placement import AUTO, AgentView, Choice, Claim, NoFit, Request, choose, claims_of
from hwledger.store import JobRow, Store, parse_time, utc_now


@dataclass(frozen=True)
class Dispatch:
    """A job to hand to a worker (committed `dispatched` on `agent`)."""

    job_id: str
    agent: str


@dataclass
class _Agent:
    active: int = 0
    whole: bool = False        # an active job holds the whole agent
    kept_free: bool = False    # an older job that needs the whole agent waits for it
    claims: list[Claim] = field(default_factory=list)
    blocked: str | None = None  # the server does something there first (a reconcile, a clean-up)

    def closed(self) -> str | None:
        if self.blocked:
            return self.blocked
        if self.whole:
            return "runs a job that holds the whole agent (it asked for no GPU)"
        if self.kept_free:
            return "is kept free for an older job that needs the whole agent"
        return None


class DispatchRound:
    """One round over the active and queued jobs (see the module's notes). `configured`: the agents of the
    agents file (a job can only run on one of them); `answered`: those that answered this tick and are
    `online`; `in_workers`: the jobs a worker of this server already runs; `capacity`: how many more jobs a
    worker may take now (`workers_max` in all); `closed`: agents on which nothing new starts this round, with
    the reason (the server first reconciles a job a previous server left there, or removes what an earlier
    attempt of a job queued again left on the host). A queued job with a clean-up pending waits for it."""

    def __init__(self, store: Store, *, configured: Collection[str], answered: Collection[str],
                 in_workers: Collection[str], capacity: int, workers_max: int, max_age_s: float,
                 stop: Callable[[], bool] = lambda: False, now: datetime | None = None,
                 closed: Mapping[str, str] | None = None):
        self.store = store
        self.configured = set(configured)
        self.answered = set(answered)
        self.in_workers = set(in_workers)
        self.capacity = capacity
        self.workers_max = workers_max
        self.max_age_s = max_age_s
        self.stop = stop
        self.now = now or datetime.now(timezone.utc)
        self.agents: dict[str, _Agent] = {name: _Agent(blocked=why) for name, why in (closed or {}).items()}
        self._views: dict[str, AgentView] | None = None
        self._memo: dict[tuple, Choice | NoFit] = {}

    def run(self) -> list[Dispatch]:
        out: list[Dispatch] = []
        for job in self.store.list_jobs(states=["dispatched", "running"]):
            agent = self.agents.setdefault(job.agent, _Agent())
            agent.active += 1
            if job.placement is None:
                agent.whole = True
            agent.claims += claims_of(job.placement, job.id)
            # Left `dispatched` by a previous server (nothing of it started): run it on its agent's next answer.
            if (job.state == "dispatched" and job.id not in self.in_workers and job.agent in self.answered
                    and job.agent in self.configured and not agent.blocked and self.capacity > 0):
                out.append(Dispatch(job.id, job.agent))
                self.capacity -= 1
        for job in self.store.list_jobs(states=["queued"]):
            if self.stop():
                break
            if job.cleanup_pending:  # queued again: the server first removes its earlier attempt's dir
                continue
            request = Request.of_spec(job.spec)
            if request is None:
                started = self._whole_agent(job)
            else:
                started = self._placed(job, request)
            if started is not None:
                out.append(started)
        return out

    # -- a job that holds its whole agent ----------------------------------------------------

    def _whole_agent(self, job: JobRow) -> Dispatch | None:
        name = job.agent
        if name == AUTO:  # `job submit` refuses it; a hand-made row waits with the reason
            self.store.note_placement(job, NoFit("--agent auto needs resources (--gpus, --min-free-vram)").note())
            return None
        agent = self.agents.setdefault(name, _Agent())
        if (name not in self.answered or name not in self.configured or agent.kept_free or agent.blocked
                or self.capacity <= 0):
            return None
        if agent.active:
            agent.kept_free = True
            self._changed(name)
            self.store.note_placement(job, NoFit(
                f"waits for {name} to be free: {agent.active} job(s) active there, and this job holds its whole "
                "agent (it asks for no GPU)").note())
            return None
        if not self.store.transition_job(job.id, ["queued"], "dispatched", dispatched_at=utc_now()):
            return None  # cancelled meanwhile
        crash_point("dispatched")
        agent.active += 1
        agent.whole = True
        self._changed(name)
        self.capacity -= 1
        return Dispatch(job.id, name)

    # -- a job placed on GPUs ----------------------------------------------------------------

    def _placed(self, job: JobRow, request: Request) -> Dispatch | None:
        only = None if job.agent == AUTO else job.agent
        key = (request, only)
        result = self._memo.get(key)
        if result is None:
            claims = [claim for agent in self.agents.values() for claim in agent.claims]
            result = choose(request, list(self.views().values()), claims, now=self.now, max_age_s=self.max_age_s,
                            agent=only)
            self._memo[key] = result
        if isinstance(result, NoFit):
            self.store.note_placement(job, result.note())
            return None
        if self.capacity <= 0:
            gpus = ", ".join(str(gpu.index) for gpu in result.gpus)
            self.store.note_placement(job, NoFit(
                f"fits on {result.agent} (GPU {gpus}), but all {self.workers_max} job workers are busy "
                "(serve --max-parallel-jobs)").note())
            return None
        if not self.store.dispatch_placed(job.id, result.agent, result.placement(request)):
            return None  # cancelled meanwhile
        crash_point("dispatched")
        agent = self.agents.setdefault(result.agent, _Agent())
        agent.active += 1
        agent.claims += [Claim(result.agent, gpu.index, gpu.uuid, job.id) for gpu in result.gpus]
        self._changed(result.agent)
        self.capacity -= 1
        return Dispatch(job.id, result.agent)

    def views(self) -> dict[str, AgentView]:
        """Every agent of the agents file as placement sees it (its latest good snapshot read once a round)."""
        if self._views is None:
            self._views = {}
            for row in self.store.list_agents():
                if row.name not in self.configured:
                    continue
                snapshot = self.store.latest_snapshot(row.name) if row.state == "online" else None
                agent = self.agents.get(row.name) or _Agent()
                self._views[row.name] = AgentView.of_snapshot(
                    row.name, row.state, snapshot.data if snapshot else None,
                    parse_time(snapshot.recorded_at) if snapshot else None,
                    active_jobs=agent.active, closed=agent.closed())
        return self._views

    def _changed(self, name: str) -> None:
        """An agent's jobs changed: what placement knew of it, and every answer it gave, are out of date."""
        self._memo.clear()
        if self._views is not None and name in self._views:
            agent = self.agents[name]
            view = self._views[name]
            self._views[name] = AgentView(view.name, view.state, view.snapshot_at, view.backend, view.gpus,
                                          agent.active, agent.closed())
