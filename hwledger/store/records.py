"""The store's records: what goes in (AgentRecord, AgentUpdate) and what comes out (rows), timestamps, and
the conversions between rows and records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from hwledger.store.schema import JOB_TERMINAL_STATES


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds, the one timestamp format in the store."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def age_seconds(value: str | None, now: datetime | None = None) -> float | None:
    when = parse_time(value)
    if when is None:
        return None
    return max(0.0, ((now or datetime.now(timezone.utc)) - when).total_seconds())


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class AgentRecord:
    """What `register-ssh` knows about an agent."""

    name: str
    hostname: str
    port: int
    ssh_user: str
    key_path: str
    ip: str | None = None
    key_fingerprint: str | None = None
    host_key_fingerprint: str | None = None
    bastion: str | None = None
    bastion_host_key_fingerprint: str | None = None


@dataclass(frozen=True)
class AgentRow:
    name: str
    hostname: str
    ip: str | None
    port: int
    ssh_user: str
    key_path: str
    key_fingerprint: str | None
    host_key_fingerprint: str | None
    bastion: str | None
    bastion_host_key_fingerprint: str | None
    registered_at: str
    state: str
    state_reason: str | None
    state_msg: str | None
    state_since: str
    last_seen: str | None
    last_attempt: str | None
    consecutive_misses: int
    last_snapshot_id: int | None
    removed_at: str | None
    next_attempt_at: str | None = None         # an offline agent is not dialled before this (backoff)
    state_events_coalesced: int = 0            # state changes since the last agent_state event
    expected_gpus: str | None = None           # JSON: the GPUs the agent answered with when it was whole


@dataclass(frozen=True)
class JobRow:
    id: str
    agent: str
    spec: dict
    state: str
    created_at: str
    updated_at: str
    dispatched_at: str | None
    started_at: str | None
    finished_at: str | None
    attempts: int
    timeout_s: float | None
    cancel_requested: bool
    exit_code: int | None
    result: dict | None
    error: str | None
    run_dir: str | None
    remote_dir: str | None
    cleanup_pending: bool
    max_attempts: int = 1
    launched_at: str | None = None
    placement: dict | None = None              # where the job was placed and why; its GPU claim while active
    placement_note: dict | None = None         # why a queued job is not placed yet

    @property
    def terminal(self) -> bool:
        return self.state in JOB_TERMINAL_STATES


@dataclass(frozen=True)
class SnapshotRow:
    id: int
    agent: str
    recorded_at: str
    ok: bool
    reason: str | None
    msg: str | None
    data: dict | None


@dataclass(frozen=True)
class EventRow:
    id: int
    at: str
    kind: str
    agent: str | None
    job_id: str | None
    detail: dict


@dataclass(frozen=True)
class AgentUpdate:
    """The server's decision for one agent after a heartbeat (see `Store.record_heartbeats`)."""

    state: str
    consecutive_misses: int
    reason: str | None = None
    msg: str | None = None
    seen: bool = False  # the host answered (even if its GPU tool failed)
    next_attempt_at: str | None = None  # when an offline agent may be dialled again; None: every tick
    expected_gpus: str | None = None  # the GPUs to expect from now on (JSON); None keeps what was there


@dataclass(frozen=True)
class StateChange:
    agent: str
    old: str
    new: str
    reason: str | None
    msg: str | None


JOB_UPDATABLE = {
    "dispatched_at", "started_at", "finished_at", "attempts", "exit_code", "result", "error", "run_dir",
    "remote_dir", "cleanup_pending", "cancel_requested", "launched_at",
}


# ---------------------------------------------------------------------------------------------
# Row helpers

AGENT_FIELDS = [f.name for f in AgentRow.__dataclass_fields__.values()]
AGENT_COLUMNS = ", ".join(AGENT_FIELDS)
JOB_FIELDS = [f.name for f in JobRow.__dataclass_fields__.values()]
JOB_COLUMNS = ", ".join(JOB_FIELDS)


def job_row(row: Sequence[Any]) -> JobRow:
    values = dict(zip(JOB_FIELDS, row))
    values["spec"] = json.loads(values["spec"])
    values["result"] = json.loads(values["result"]) if values["result"] else None
    for key in ("placement", "placement_note"):
        values[key] = json.loads(values[key]) if values.get(key) else None
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["cleanup_pending"] = bool(values["cleanup_pending"])
    return JobRow(**values)


def job_value(key: str, value: Any) -> Any:
    if key == "result" and value is not None:
        return json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return int(value)
    return value


def snapshot_row(row: Sequence[Any]) -> SnapshotRow:
    return SnapshotRow(row[0], row[1], row[2], bool(row[3]), row[4], row[5], json.loads(row[6]) if row[6] else None)


def where(**equals: Any) -> tuple[str, list[Any]]:
    parts = [(k, v) for k, v in equals.items() if v is not None]
    if not parts:
        return "", []
    return " WHERE " + " AND ".join(f"{k} = ?" for k, _value in parts), [v for _key, v in parts]
