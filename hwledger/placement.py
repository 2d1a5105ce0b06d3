"""Placing a job on GPUs: a plain domain module (no store, no SSH), unit-tested with tables.

In: a job's request (`Request`, from the spec's `resources`), a view of each agent (`AgentView`: its state,
its latest good snapshot and when it was recorded, whether a job holds the whole agent) and the claims of
the jobs that are dispatched or running (`Claim`: which GPU each holds). Out: a `Choice` (the agent, its
GPUs, the environment that shows the job only those GPUs, and why) or a `NoFit` (why not, naming the best
candidate).

The rules (docs/jobs.md, "Placement"):
- an agent is a candidate while it is `online` (not degraded, stale, offline, error) and its latest snapshot
  is younger than `max_age_s` (the server passes two heartbeat intervals), and no job holds it whole;
- a GPU can be given when it is healthy, its name matches the request's glob, it reported its free memory
  (or the request asks none), that free memory covers the request, and no active job claims it. A claim
  lasts from the dispatch (written with it, so a restarted server keeps it) until the job ends: jobs get
  disjoint GPUs, so free memory a job was given between two heartbeats is never given again, whatever the
  next snapshot says before the job has allocated it;
- among the agents that fit: the most free memory (of the least free GPU of the set), then the fewest
  active jobs, then the name; on an agent, its GPUs with the most free memory, then the lowest index.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from ansible_collections.hwledger.fleet.plugins.plugin_utils.agent_values import RESERVED_AGENT_NAME

# `hwledger job submit --agent auto`: the job's agent until the server places it.
AUTO = RESERVED_AGENT_NAME

_GIB = 1 << 30
# Where a word of a GPU name starts (after a space or an opening bracket).
_WORD_START_RE = re.compile(r"[\s\[(]+")
_ROCM_UNIQUE_ID_RE = re.compile(r"^(?:0x)?([0-9a-fA-F]{1,16})$")
# How many unfit agents a "why not" names before it says "and N more".
_REASONS_SHOWN = 3


def size_text(value: int | None) -> str:
    """A size as the reasons print it: "40 GiB" for a whole number of GiB, else "22.3 GiB" (MiB below 1 GiB)."""
    if value is None:
        return "unknown"
    if value >= _GIB:
        return f"{value // _GIB} GiB" if value % _GIB == 0 else f"{value / _GIB:.1f} GiB"
    return f"{value / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class Request:
    """What a job asks of the GPUs it runs on (the spec's validated `resources`)."""

    gpus: int = 1
    min_free_bytes: int | None = None
    gpu_name: str | None = None

    @classmethod
    def of_spec(cls, spec: Mapping) -> "Request | None":
        """The request of a (validated) spec; None when it asks for no GPU (it then holds its whole agent)."""
        resources = spec.get("resources")
        if not isinstance(resources, Mapping):
            return None
        return cls(int(resources.get("gpus") or 1), resources.get("min_free_vram"), resources.get("gpu_name"))

    def describe(self) -> str:
        """"40 GiB free on one GPU", "2 free GPUs", "... named like 'H100*'"."""
        if self.min_free_bytes is not None:
            text = (f"{size_text(self.min_free_bytes)} free on one GPU" if self.gpus == 1 else
                    f"{size_text(self.min_free_bytes)} free on each of {self.gpus} GPUs")
        else:
            text = "a free GPU" if self.gpus == 1 else f"{self.gpus} free GPUs"
        if self.gpu_name is not None:
            text += f" named like {self.gpu_name!r}"
        return text

    def name_matches(self, name: str | None) -> bool:
        """The glob, case-insensitive, against the GPU's name from any of its words on: "NVIDIA H100 80GB HBM3"
        matches "H100*" and "nvidia h100*", "NVIDIA GeForce RTX 5070 Ti" matches "RTX 5070*", "Arcturus GL-XL
        [Instinct MI100]" matches "MI100*" (people name a GPU by its model, not by the vendor's prefix)."""
        if self.gpu_name is None:
            return True
        if not name:
            return False
        pattern = self.gpu_name.lower()
        lowered = name.lower().strip()
        starts = [0] + [m.end() for m in _WORD_START_RE.finditer(lowered)]
        return any(fnmatch.fnmatchcase(lowered[start:], pattern) for start in starts)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str | None = None
    name: str | None = None
    free_bytes: int | None = None
    healthy: bool = True
    total_bytes: int | None = None

    @classmethod
    def of_snapshot(cls, gpu: Mapping) -> "Gpu | None":
        index = gpu.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            return None
        free, total = gpu.get("memory_free_bytes"), gpu.get("memory_total_bytes")
        return cls(index, gpu.get("uuid") if isinstance(gpu.get("uuid"), str) else None,
                   gpu.get("name") if isinstance(gpu.get("name"), str) else None,
                   free if isinstance(free, int) and not isinstance(free, bool) else None,
                   gpu.get("health", "ok") == "ok",
                   total if isinstance(total, int) and not isinstance(total, bool) else None)

    def label(self) -> str:
        return f"GPU {self.index}"


@dataclass(frozen=True)
class AgentView:
    """An agent as placement sees it. `closed`: why no job may be placed there now, beside its state (a job
    holds it whole, or it is kept free for an older job that needs it whole)."""

    name: str
    state: str
    snapshot_at: datetime | None = None
    backend: str | None = None
    gpus: tuple[Gpu, ...] = ()
    active_jobs: int = 0
    closed: str | None = None

    @classmethod
    def of_snapshot(cls, name: str, state: str, snapshot: Mapping | None, snapshot_at: datetime | None, *,
                    active_jobs: int = 0, closed: str | None = None) -> "AgentView":
        gpus = tuple(g for g in (Gpu.of_snapshot(x) for x in (snapshot or {}).get("gpus") or []
                                 if isinstance(x, Mapping)) if g is not None)
        return cls(name, state, snapshot_at, (snapshot or {}).get("backend"), gpus, active_jobs, closed)


@dataclass(frozen=True)
class Claim:
    """A GPU held by an active job (from its placement)."""

    agent: str
    index: int
    uuid: str | None = None
    job_id: str = ""

    def holds(self, agent: str, gpu: Gpu) -> bool:
        if agent != self.agent:
            return False
        if self.uuid and gpu.uuid:
            return self.uuid == gpu.uuid  # a GPU keeps its UUID when the indices change (a reboot)
        return self.index == gpu.index


def claims_of(placement: Mapping | None, job_id: str = "") -> list[Claim]:
    """The claims a stored placement makes (see `Choice.placement`)."""
    if not isinstance(placement, Mapping):
        return []
    agent = placement.get("agent")
    return [Claim(agent, g["index"], g.get("uuid"), job_id) for g in placement.get("gpus") or []
            if isinstance(g, Mapping) and isinstance(g.get("index"), int) and isinstance(agent, str)]


@dataclass(frozen=True)
class Choice:
    agent: str
    backend: str | None
    gpus: tuple[Gpu, ...]
    env: dict
    why: str
    snapshot_at: datetime | None = None

    def placement(self, request: Request) -> dict:
        """What the store keeps on the job row: where, why, the environment, and (while the job is active)
        its claim on these GPUs."""
        return {
            "agent": self.agent, "backend": self.backend,
            "gpus": [{"index": g.index, "uuid": g.uuid, "name": g.name, "free_bytes": g.free_bytes} for g in self.gpus],
            "env": dict(self.env), "why": self.why,
            "snapshot_at": self.snapshot_at.isoformat(timespec="milliseconds") if self.snapshot_at else None,
            "request": {"gpus": request.gpus, "min_free_vram": request.min_free_bytes, "gpu_name": request.gpu_name},
        }


@dataclass(frozen=True)
class NoFit:
    """Why a job stays queued. `agent`: the best candidate's agent, whose snapshot age is shown after the text
    (computed when shown, so the stored reason only changes when the reason does)."""

    text: str
    agent: str | None = None

    def note(self) -> dict:
        return {"text": self.text, "agent": self.agent}


def note_text(note: Mapping | None, snapshot_age_s: float | None) -> str | None:
    """A stored note as people read it: its text, and the age of the best candidate's snapshot."""
    if not isinstance(note, Mapping) or not note.get("text"):
        return None
    text = str(note["text"])
    if note.get("agent") and snapshot_age_s is not None:
        text += f", {snapshot_age_s:.0f} s ago"
    return text


# ---------------------------------------------------------------------------------------------
# The environment that shows a job its GPUs


def _rocr_uuid(value: str | None) -> str | None:
    """rocm-smi's unique id (0x79ccd55167a2124a) as ROCR_VISIBLE_DEVICES takes it: GPU-<16 hex digits>."""
    match = _ROCM_UNIQUE_ID_RE.match(value or "")
    if match is None or int(match.group(1), 16) == 0:
        return None
    return f"GPU-{int(match.group(1), 16):016x}"


def _nvidia_uuid(value: str | None) -> str | None:
    return value if value and re.match(r"^(?:GPU|MIG)-[0-9A-Za-z/-]+$", value) else None


def visible_devices_env(backend: str | None, chosen: Sequence[Gpu], all_gpus: Sequence[Gpu]) -> dict:
    """CUDA_VISIBLE_DEVICES (NVIDIA) or ROCR_VISIBLE_DEVICES (AMD) naming the chosen GPUs: by UUID when every
    chosen GPU has one and the agent's UUIDs are distinct (a reordering of indices after a reboot cannot
    point the job at another GPU), else by index.

    AMD: ROCR_VISIBLE_DEVICES, the ROCm runtime's own filter, which HIP, OpenCL and every other ROCm user
    obeys and which takes UUIDs; not HIP_VISIBLE_DEVICES, which takes indices only and counts them among the
    devices ROCR already exposes (set both to the physical indices and the job would see the wrong GPUs)."""
    amd = backend in ("rocm", "amdsmi")
    convert = _rocr_uuid if amd else _nvidia_uuid
    uuids = [g.uuid for g in all_gpus]
    distinct = all(uuids) and len(set(uuids)) == len(uuids)
    ids = [convert(g.uuid) for g in chosen] if distinct else []
    value = ",".join(ids) if ids and all(ids) else ",".join(str(g.index) for g in chosen)
    return {"ROCR_VISIBLE_DEVICES" if amd else "CUDA_VISIBLE_DEVICES": value}


def launch_spec(spec: Mapping, placement: Mapping | None) -> dict:
    """The spec the runner gets: without `resources` (the server's business; an older runner on the host
    would refuse the key), with the placement's environment added to the job's own `env` (kept apart in the
    store, so nothing that edits the stored env, such as the removal of its values, touches it)."""
    launched = {key: value for key, value in spec.items() if key != "resources"}
    env = (placement or {}).get("env") if isinstance(placement, Mapping) else None
    if isinstance(env, Mapping) and env:
        launched["env"] = {**(launched.get("env") or {}), **env}
    return launched


# ---------------------------------------------------------------------------------------------
# Choosing


@dataclass
class _Candidate:
    agent: AgentView
    usable: list[Gpu] = field(default_factory=list)     # free to give, best first
    fitting: list[Gpu] = field(default_factory=list)    # usable and enough free memory
    held: int = 0
    other_name: int = 0
    unhealthy: int = 0
    unknown_free: int = 0


def _sort_key(gpu: Gpu) -> tuple:
    return (-(gpu.free_bytes if gpu.free_bytes is not None else -1), gpu.index)


def _closed_reason(view: AgentView, now: datetime, max_age_s: float) -> str | None:
    if view.state != "online":
        return f"{view.name} is {view.state}"
    if view.snapshot_at is None:
        return f"{view.name} has no GPU snapshot yet"
    age = max(0.0, (now - view.snapshot_at).total_seconds())
    if age > max_age_s:
        return f"{view.name}'s latest snapshot is {age:.0f} s old (placement wants one younger than {max_age_s:.0f} s)"
    return view.closed and f"{view.name} {view.closed}"


def _candidate(view: AgentView, request: Request, claims: Iterable[Claim]) -> _Candidate:
    candidate = _Candidate(view)
    claims = [c for c in claims if c.agent == view.name]
    for gpu in view.gpus:
        if any(claim.holds(view.name, gpu) for claim in claims):
            candidate.held += 1
        elif not request.name_matches(gpu.name):
            candidate.other_name += 1
        elif not gpu.healthy:
            candidate.unhealthy += 1
        elif gpu.free_bytes is None and request.min_free_bytes is not None:
            candidate.unknown_free += 1
        else:
            candidate.usable.append(gpu)
    candidate.usable.sort(key=_sort_key)
    candidate.fitting = [g for g in candidate.usable
                         if request.min_free_bytes is None or g.free_bytes >= request.min_free_bytes]
    return candidate


def _least_free(gpus: Sequence[Gpu]) -> int:
    return min((g.free_bytes if g.free_bytes is not None else -1) for g in gpus)


def _gpus_text(gpus: Sequence[Gpu]) -> str:
    if len(gpus) == 1:
        return f"GPU {gpus[0].index} with {size_text(gpus[0].free_bytes)}"
    return (f"GPUs {', '.join(str(g.index) for g in gpus)} with "
            f"{', '.join(size_text(g.free_bytes) for g in gpus)}")


def _age_text(view: AgentView, now: datetime) -> str:
    return f"{max(0.0, (now - view.snapshot_at).total_seconds()):.0f} s" if view.snapshot_at else "?"


def choose(request: Request, agents: Sequence[AgentView], claims: Iterable[Claim], *, now: datetime,
           max_age_s: float, agent: str | None = None) -> Choice | NoFit:
    """Where `request` goes now, or why nowhere. `agent`: place only on that agent (`--agent NAME` with
    resources); otherwise on any of `agents`."""
    claims = list(claims)
    views = [v for v in agents if agent is None or v.name == agent]
    if agent is not None and not views:
        return NoFit(f"{agent} is not in the agents file")
    if not views:
        return NoFit("no agent is registered")
    closed: list[str] = []
    candidates: list[_Candidate] = []
    for view in views:
        reason = _closed_reason(view, now, max_age_s)
        if reason:
            closed.append(reason)
        else:
            candidates.append(_candidate(view, request, claims))
    if not candidates:
        if agent is not None:
            return NoFit(closed[0])
        more = f"; and {len(closed) - _REASONS_SHOWN} more" if len(closed) > _REASONS_SHOWN else ""
        return NoFit(f"no online agent has a fresh snapshot: {'; '.join(closed[:_REASONS_SHOWN])}{more}")
    fits = [c for c in candidates if len(c.fitting) >= request.gpus]
    if fits:
        best = min(fits, key=lambda c: (-_least_free(c.fitting[:request.gpus]), c.agent.active_jobs, c.agent.name))
        chosen = tuple(best.fitting[:request.gpus])
        view = best.agent
        others = len(fits) - 1
        tie = [c for c in fits if c is not best and _least_free(c.fitting[:request.gpus]) == _least_free(chosen)]
        why = (f"asked {request.describe()}; {view.name} {_gpus_text(chosen)} free (snapshot {_age_text(view, now)} "
               f"old)")
        if others:
            why += f": the most free memory of {len(fits)} agents that fit"
            if tie:
                why += f", and the fewest active jobs ({view.active_jobs}) of those with as much"
        return Choice(view.name, view.backend, chosen, visible_devices_env(view.backend, chosen, view.gpus), why,
                      view.snapshot_at)
    return _no_fit(request, candidates, closed, agent)


def _no_fit(request: Request, candidates: list[_Candidate], closed: list[str], agent: str | None) -> NoFit:
    text = (f"{agent} does not have {request.describe()}" if agent is not None
            else f"no online agent has {request.describe()}")
    held = sum(c.held for c in candidates)
    other_name = sum(c.other_name for c in candidates)
    unhealthy = sum(c.unhealthy for c in candidates)
    unknown = sum(c.unknown_free for c in candidates)
    details = [f"{count} {what}" for count, what in (
        (held, "held by running jobs"), (other_name, "named otherwise"), (unhealthy, "not healthy"),
        (unknown, "without a free-memory reading")) if count]
    if details:
        text += f" ({', '.join(details)})"
    if closed and agent is None:
        text += f"; {len(closed)} other agent(s) offline, stale or busy"
    with_usable = [c for c in candidates if c.usable]
    if not with_usable:
        return NoFit(text)
    best = min(with_usable, key=lambda c: (
        -min(len(c.fitting), request.gpus), -_least_free(c.usable[:request.gpus]), c.agent.active_jobs, c.agent.name))
    shown = best.usable[:request.gpus]
    where = _gpus_text(shown) if agent is not None else f"{best.agent.name} {_gpus_text(shown)}"
    return NoFit(f"{text}; best: {where}", best.agent.name)


def never_fits(request: Request, agents: Sequence[AgentView]) -> str | None:
    """Why `request` could never be placed on any of `agents` (their latest snapshots, whatever their state
    and age), or None when one could hold it once its GPUs are free: more GPUs than any of them has, or more
    memory than any GPU's total. None too when no agent has a snapshot yet (nothing is known).
    `job submit` refuses such a job at once instead of queueing it forever."""
    known = [view for view in agents if view.gpus]
    if not known:
        return None
    named = [(view, [g for g in view.gpus if request.name_matches(g.name)]) for view in known]
    if request.gpu_name is not None and not any(gpus for _view, gpus in named):
        return f"no agent has a GPU named like {request.gpu_name!r}"
    most_view, most = max(named, key=lambda item: (len(item[1]), item[0].name))
    if len(most) < request.gpus:
        return f"no agent has {request.gpus} GPUs{_named(request)} (the most: {most_view.name} with {len(most)})"
    if request.min_free_bytes is None:
        return None
    big = [(view, [g for g in gpus if g.total_bytes is None or g.total_bytes >= request.min_free_bytes])
           for view, gpus in named]
    if all(len(gpus) < request.gpus for _view, gpus in big):
        largest = max((g.total_bytes for _view, gpus in named for g in gpus if g.total_bytes), default=None)
        each = "a GPU" if request.gpus == 1 else f"{request.gpus} GPUs"
        return (f"no agent has {each}{_named(request)} with {size_text(request.min_free_bytes)} of memory"
                + (f" (the largest has {size_text(largest)} in all)" if largest else ""))
    return None


def _named(request: Request) -> str:
    return f" named like {request.gpu_name!r}" if request.gpu_name is not None else ""
