"""`/api/fleet` and `/api/jobs`: the JSON of `hwledger fleet status --json` and `hwledger job list --json`
(the very functions of `hwledger.reports`), minus what is never served.

Never served: key paths and job environment values. A job's `env` keeps its names with every value replaced
by "<hidden>"; and since an ssh error can quote a key path and a job's output can echo its environment,
every string served (messages, commands, output tails) has those values masked too, as long as the store
holds them: a job's env values leave the store once no attempt of it can need them (the launch of its last
attempt, or its end; hwledger.store.job_env). What the job printed is masked at its source first: the
runner puts `***` in place of the values in its output tails, its log and its error messages
(job_runner.masked_values), so what reaches the store holds none; this masking is the second layer (for
strings that did not come through the runner, such as a failed launch quoting the environment). Values
shorter than MIN_SECRET_CHARS are masked only inside `env` itself (masking "1" or "true" everywhere would
garble the rest and protect nothing).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema

from hwledger.errors import UserError
from hwledger.fleet import Fleet
from hwledger.reports import DEFAULT_JOB_LIMIT, job_to_dict, status_items
from hwledger.store import JOB_STATES, Store

HIDDEN = "<hidden>"
MIN_SECRET_CHARS = job_schema.MIN_SECRET_CHARS  # the runner's limit too: one rule for both layers
MAX_JOB_LIMIT = 1000  # a job can carry two 64 KiB output tails: keep one answer bounded


class BadRequest(ValueError):
    """A query the API refuses (status 400), said in words."""


class Secrets:
    """Strings that must not leave the process, and the masking of them in anything JSON-like."""

    def __init__(self, values: Iterable[str] = ()):
        self.values = sorted({v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_CHARS},
                             key=len, reverse=True)  # longest first: a value containing another goes whole

    def __add__(self, other: "Secrets") -> "Secrets":
        return Secrets([*self.values, *other.values])

    def text(self, value: str) -> str:
        for secret in self.values:
            if secret in value:
                value = value.replace(secret, HIDDEN)
        return value

    def scrub(self, data: Any) -> Any:
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, dict):
            return {key: self.scrub(value) for key, value in data.items()}
        if isinstance(data, list):
            return [self.scrub(value) for value in data]
        return data


def key_paths(fleet: Fleet, store: Store) -> Secrets:
    """Every key path hwledger knows of: the store's (as registered) and the agents file's, bastions too, as
    written and expanded (ssh quotes the expanded one)."""
    paths = {row.key_path for row in store.list_agents(include_removed=True)}
    try:
        for agent in fleet.load_agents():
            paths.add(agent.ssh_key_path)
            if agent.bastion is not None:
                paths.add(agent.bastion.ssh_key_path)
    except (UserError, OSError):
        pass  # unreadable now: the server says so in its log; the store's paths still apply
    expanded = {os.path.expanduser(path) for path in paths}
    return Secrets(paths | expanded | {os.path.realpath(path) for path in expanded})


def hide_env(job: dict) -> tuple[dict, Secrets]:
    """The job (a `job_to_dict` item) with its env values replaced, and those values."""
    spec = job.get("spec") or {}
    env = spec.get("env") or {}
    if not env:
        return job, Secrets()
    hidden = dict(job, spec=dict(spec, env={name: HIDDEN for name in env}))
    return hidden, Secrets(str(value) for value in env.values())


def served_jobs(jobs: list[dict], secrets: Secrets) -> list[dict]:
    """Jobs as served: env values hidden, and every env value and secret masked in every string."""
    hidden, found = [], Secrets()
    for job in jobs:
        item, values = hide_env(job)
        hidden.append(item)
        found = found + values
    return (secrets + found).scrub(hidden)


def fleet_items(store: Store, secrets: Secrets, *, stale_after: float) -> list[dict]:
    """`/api/fleet`: `hwledger fleet status --json`."""
    return secrets.scrub(status_items(store, stale_after))


def job_items(store: Store, secrets: Secrets, query: str) -> list[dict]:
    """`/api/jobs?agent=NAME&state=STATE&limit=N`: `hwledger job list --json` with the same options."""
    params = parse_qs(query, keep_blank_values=True, max_num_fields=32)
    unknown = sorted(set(params) - {"agent", "state", "limit"})
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; known: agent, state, limit")
    agents = params.get("agent") or []
    if len(agents) > 1:
        raise BadRequest("give at most one agent")
    states = params.get("state") or []
    bad = [s for s in states if s not in JOB_STATES]
    if bad:
        raise BadRequest(f"unknown state {bad[0]!r}; known: {', '.join(JOB_STATES)}")
    limit = DEFAULT_JOB_LIMIT
    if params.get("limit"):
        text = params["limit"][-1]
        if not text.isdigit() or not 1 <= int(text) <= MAX_JOB_LIMIT:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_JOB_LIMIT}")
        limit = int(text)
    return stored_jobs(store, secrets, agent=agents[0] if agents else None, states=states or None, limit=limit)


def stored_jobs(store: Store, secrets: Secrets, *, agent: str | None = None, states: list[str] | None = None,
                limit: int = DEFAULT_JOB_LIMIT) -> list[dict]:
    """`job_list`'s jobs as served. job_to_dict shows `***` for env values: the values to mask in the other
    strings come from the stored specs, which hold them only while an attempt of the job may still need them
    (hwledger.store.job_env)."""
    rows = store.list_jobs(agent=agent, states=states, newest=limit)
    stored = Secrets(value for row in rows for value in ((row.spec or {}).get("env") or {}).values())
    return served_jobs([job_to_dict(row) for row in rows], secrets + stored)
