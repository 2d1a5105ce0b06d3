"""The fleet and its jobs as plain data: what `hwledger fleet status --json` and `hwledger job list --json`
print, and what `hwledger fleet serve --http` serves as /api/fleet and /api/jobs (one definition for both,
so the API and the CLI cannot drift apart)."""

from __future__ import annotations

from datetime import datetime, timezone

from hwledger.job_runs import reason_of
from hwledger.store import JOB_ACTIVE_STATES, AgentRow, JobRow, Store, age_seconds, parse_time, shown_spec

DEFAULT_STALE_AFTER_S = 30.0


def effective_state(row: AgentRow, stale_after: float) -> str:
    """The state to show: the recorded one, except that an `online` nobody refreshed for `stale_after`
    seconds is `stale` (e.g. no server runs): old data must not look live. `fleet list`, `fleet status` and
    the API all show this one, so they never disagree."""
    age = age_seconds(row.last_seen)
    if row.state == "online" and (age is None or age > stale_after):
        return "stale"
    return row.state


def status_items(store: Store, stale_after: float) -> list[dict]:
    """Every registered agent: its state (an `online` one not heard from for `stale_after` seconds shows as
    `stale`), when it was last seen, its latest GPU data and its queued/active job counts."""
    jobs_by_agent: dict[str, dict[str, int]] = {}
    for job in store.list_jobs(states=["queued", *JOB_ACTIVE_STATES]):
        counts = jobs_by_agent.setdefault(job.agent, {})
        counts[job.state] = counts.get(job.state, 0) + 1
    items = []
    for row in store.list_agents():
        snapshot_row = store.latest_snapshot(row.name)
        snapshot = snapshot_row.data if snapshot_row else None
        gpus = (snapshot or {}).get("gpus") or []
        age = age_seconds(row.last_seen)
        state = effective_state(row, stale_after)
        totals = [g.get("memory_total_bytes") for g in gpus]
        frees = [g.get("memory_free_bytes") for g in gpus]
        items.append({
            "name": row.name,
            "state": state,
            "recorded_state": row.state,
            "reason": row.state_reason,
            "msg": row.state_msg,
            "state_since": row.state_since,
            "last_seen": row.last_seen,
            "last_seen_age_s": round(age, 1) if age is not None else None,
            "consecutive_misses": row.consecutive_misses,
            # An offline agent is dialled again only after its backoff (30 s doubling to 5 min).
            "next_attempt_at": row.next_attempt_at,
            "next_attempt_in_s": _seconds_until(row.next_attempt_at),
            "snapshot_recorded_at": snapshot_row.recorded_at if snapshot_row else None,
            "snapshot_age_s": round(age_seconds(snapshot_row.recorded_at), 1) if snapshot_row else None,
            "captured_at": (snapshot or {}).get("captured_at"),
            "backend": (snapshot or {}).get("backend"),
            "gpus": [{k: g.get(k) for k in ("index", "name", "uuid", "memory_total_bytes", "memory_free_bytes",
                                            "memory_used_bytes", "utilization_gpu_percent", "temperature_c",
                                            "power_draw_w", "health")} for g in gpus],
            "memory_total_bytes": sum(totals) if gpus and None not in totals else None,
            "memory_free_bytes": sum(frees) if gpus and None not in frees else None,
            "jobs": jobs_by_agent.get(row.name, {}),
        })
    return items


def _seconds_until(when: str | None) -> float | None:
    moment = parse_time(when)
    if moment is None:
        return None
    return round(max(0.0, (moment - datetime.now(timezone.utc)).total_seconds()), 1)


DEFAULT_JOB_LIMIT = 200


def job_list(store: Store, *, agent: str | None = None, states: list[str] | None = None,
             limit: int = DEFAULT_JOB_LIMIT) -> list[dict]:
    """The newest `limit` jobs (of an agent, in some states), oldest first: `hwledger job list --json`."""
    return [job_to_dict(job) for job in store.list_jobs(agent=agent, states=states, newest=limit)]


def job_to_dict(job: JobRow) -> dict:
    """A job as `hwledger job list --json` prints it and /api/jobs serves it. Env values never: `***` in
    their place (docs/fleet-server.md)."""
    return {
        "job_id": job.id, "agent": job.agent, "state": job.state, "spec": shown_spec(job.spec),
        "created_at": job.created_at, "updated_at": job.updated_at, "dispatched_at": job.dispatched_at,
        "started_at": job.started_at, "launched_at": job.launched_at, "finished_at": job.finished_at,
        "attempts": job.attempts, "max_attempts": job.max_attempts,
        "timeout_s": job.timeout_s, "cancel_requested": job.cancel_requested, "exit_code": job.exit_code,
        "reason": reason_of(job.error), "error": job.error, "result": job.result, "remote_dir": job.remote_dir,
        "cleanup_pending": job.cleanup_pending,
        # Where a job with `resources` was placed and why (its GPUs, their environment); why it waits.
        "placement": job.placement, "placement_note": job.placement_note,
    }
