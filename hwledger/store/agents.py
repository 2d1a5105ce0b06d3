"""The agents table and their heartbeat snapshots."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from collections.abc import Callable, Mapping

from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome
from ansible_collections.hwledger.fleet.plugins.plugin_utils.tool_parsing import clean_text, clean_tree

from hwledger.store.records import (
    AGENT_COLUMNS,
    AGENT_FIELDS,
    AgentRecord,
    AgentRow,
    AgentUpdate,
    SnapshotRow,
    StateChange,
    parse_time,
    snapshot_row,
    utc_now,
)
from hwledger.store.schema import AGENT_STATES


# A flapping agent gets at most one agent_state event per this many seconds (the rest are counted).
STATE_EVENT_WINDOW_S = 300.0


def _text(value: str | None) -> str | None:
    """A string from a host made safe to bind (invalid bytes escaped); see tool_parsing.clean_text."""
    return clean_text(value) if isinstance(value, str) else value


class AgentTables:
    """Agents: registration, removal, states, and recording heartbeats (mixed into `Store`)."""

    def upsert_agent(self, record: AgentRecord) -> None:
        """Record a (re-)registration. A previously removed agent of that name starts afresh."""
        now = utc_now()
        with self._write() as conn:
            conn.execute(
                """
                INSERT INTO agents (name, hostname, ip, port, ssh_user, key_path, key_fingerprint,
                                    host_key_fingerprint, bastion, bastion_host_key_fingerprint,
                                    registered_at, state, state_since)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)
                ON CONFLICT (name) DO UPDATE SET
                    hostname = excluded.hostname, ip = excluded.ip, port = excluded.port,
                    ssh_user = excluded.ssh_user, key_path = excluded.key_path,
                    key_fingerprint = excluded.key_fingerprint,
                    host_key_fingerprint = excluded.host_key_fingerprint,
                    bastion = excluded.bastion,
                    bastion_host_key_fingerprint = excluded.bastion_host_key_fingerprint,
                    registered_at = excluded.registered_at, state = 'pending', state_since = excluded.state_since,
                    state_reason = NULL, state_msg = NULL, consecutive_misses = 0, removed_at = NULL,
                    next_attempt_at = NULL, expected_gpus = NULL
                """,
                (record.name, record.hostname, record.ip, record.port, record.ssh_user, record.key_path,
                 record.key_fingerprint, record.host_key_fingerprint, record.bastion,
                 record.bastion_host_key_fingerprint, now, now),
            )
            self._event(conn, "agent_registered", agent=record.name, at=now,
                        hostname=record.hostname, port=record.port, ssh_user=record.ssh_user, ip=record.ip,
                        key_fingerprint=record.key_fingerprint, host_key_fingerprint=record.host_key_fingerprint,
                        bastion=record.bastion)

    def mark_agent_removed(self, name: str) -> bool:
        """Mark the agent removed (its row and history stay; its snapshots go). False if unknown."""
        now = utc_now()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE agents SET state = 'removed', state_since = ?, removed_at = ?, last_snapshot_id = NULL "
                "WHERE name = ? AND state != 'removed'",
                (now, now, name),
            )
            if cur.rowcount == 0:
                return False
            conn.execute("DELETE FROM snapshots WHERE agent = ?", (name,))
            self._event(conn, "agent_removed", agent=name, at=now)
            return True

    def get_agent(self, name: str) -> AgentRow | None:
        row = self._conn.execute(f"SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)).fetchone()
        return AgentRow(*row) if row else None

    def list_agents(self, *, include_removed: bool = False) -> list[AgentRow]:
        where = "" if include_removed else " WHERE state != 'removed'"
        return [AgentRow(*r) for r in self._conn.execute(f"SELECT {AGENT_COLUMNS} FROM agents{where} ORDER BY name")]

    def set_agent_state(self, name: str, state: str, *, reason: str | None = None, msg: str | None = None) -> bool:
        if state not in AGENT_STATES:
            raise ValueError(f"unknown agent state {state!r}")
        now = utc_now()
        with self._write() as conn:
            old = conn.execute("SELECT state FROM agents WHERE name = ?", (name,)).fetchone()
            if old is None or old[0] == "removed":
                return False
            reason, msg = _text(reason), _text(msg)
            conn.execute(
                "UPDATE agents SET state = ?, state_reason = ?, state_msg = ?, state_since = "
                "CASE WHEN state = ? THEN state_since ELSE ? END WHERE name = ?",
                (state, reason, msg, state, now, name),
            )
            if old[0] != state:
                self._event(conn, "agent_state", agent=name, at=now, old=old[0], new=state, reason=reason, msg=msg)
            return True

    def record_heartbeats(
        self,
        outcomes: Mapping[str, ProbeOutcome],
        decide: Callable[[AgentRow, ProbeOutcome], AgentUpdate],
    ) -> list[StateChange]:
        """Record one tick's outcomes ({agent name: outcome}) in one transaction and apply the server's
        state decisions.

        `decide(current_row, outcome)` runs under the write lock, so the read-modify-write of the
        miss counter cannot race another writer. Agents removed meanwhile are skipped. Each host is
        written under its own savepoint: whatever one host sent, it can never keep the others' answers
        out of the store (that host is recorded as `unrecordable` instead).
        """
        now = utc_now()
        changes: list[StateChange] = []
        with self._write() as conn:
            for name, outcome in outcomes.items():
                conn.execute("SAVEPOINT host")
                try:
                    change = self._record_one(conn, name, outcome, decide, now)
                except (sqlite3.Error, ValueError, TypeError) as exc:
                    conn.execute("ROLLBACK TO host")
                    fallback = ProbeOutcome(False, reason="unrecordable",
                                            msg=f"hwledger could not record this host's answer: {type(exc).__name__}: "
                                                f"{clean_text(str(exc))[:300]}")
                    change = self._record_one(conn, name, fallback, decide, now)
                conn.execute("RELEASE host")
                if change is not None:
                    changes.append(change)
        return changes

    def _record_one(self, conn: sqlite3.Connection, name: str, outcome: ProbeOutcome,
                    decide: Callable[[AgentRow, ProbeOutcome], AgentUpdate], now: str) -> StateChange | None:
        row = conn.execute(f"SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)).fetchone()
        if row is None or row[AGENT_FIELDS.index("state")] == "removed":
            return None
        current = AgentRow(*row)
        update = decide(current, outcome)
        reason, msg = _text(update.reason), _text(update.msg)
        snapshot_id = conn.execute(
            "INSERT INTO snapshots (agent, recorded_at, ok, reason, msg, data) VALUES (?, ?, ?, ?, ?, ?)",
            (name, now, int(outcome.ok), _text(outcome.reason), _text(outcome.msg) or None,
             # ensure_ascii: a string the host sent is escaped, never refused by the encoder.
             json.dumps(clean_tree(outcome.snapshot), sort_keys=True, ensure_ascii=True)
             if outcome.snapshot is not None
             else None),
        ).lastrowid
        conn.execute(
            """
            UPDATE agents SET state = ?, state_reason = ?, state_msg = ?,
                state_since = CASE WHEN state = ? THEN state_since ELSE ? END,
                consecutive_misses = ?, last_attempt = ?,
                last_seen = CASE WHEN ? THEN ? ELSE last_seen END,
                last_snapshot_id = CASE WHEN ? THEN ? ELSE last_snapshot_id END,
                next_attempt_at = ?,
                expected_gpus = COALESCE(?, expected_gpus)
            WHERE name = ?
            """,
            (update.state, reason, msg, update.state, now, update.consecutive_misses, now,
             int(update.seen), now, int(outcome.ok and outcome.snapshot is not None), snapshot_id,
             update.next_attempt_at, update.expected_gpus, name),
        )
        self._prune_snapshots(conn, name)
        if current.state == update.state:
            return None
        self._state_event(conn, current, update.state, reason, msg, now)
        return StateChange(name, current.state, update.state, reason, msg)

    def _state_event(self, conn: sqlite3.Connection, current: AgentRow, new: str, reason: str | None,
                     msg: str | None, now: str) -> None:
        """An `agent_state` event, unless the agent is flapping: a change it already made (the same old ->
        new pair) within STATE_EVENT_WINDOW_S is only counted, and the next event says how many were folded
        into it. A host that degrades (online -> stale -> offline) gets every step recorded; a host whose
        tool flaps between ok and error every tick gets a couple of events per window, not some 17,000 a
        day in a log that is append-only."""
        since = (parse_time(now) - timedelta(seconds=STATE_EVENT_WINDOW_S)).isoformat(timespec="milliseconds")
        repeat = conn.execute(
            "SELECT 1 FROM events WHERE agent = ? AND kind = 'agent_state' AND at > ? "
            "AND json_extract(detail, '$.old') = ? AND json_extract(detail, '$.new') = ? LIMIT 1",
            (current.name, since, current.state, new),
        ).fetchone()
        if repeat is not None:
            conn.execute("UPDATE agents SET state_events_coalesced = state_events_coalesced + 1 WHERE name = ?",
                         (current.name,))
            return
        detail = {"old": current.state, "new": new, "reason": reason, "msg": msg}
        if current.state_events_coalesced:
            detail["coalesced"] = current.state_events_coalesced
        self._event(conn, "agent_state", agent=current.name, at=now, **detail)
        conn.execute("UPDATE agents SET state_events_coalesced = 0 WHERE name = ?", (current.name,))

    def _prune_snapshots(self, conn: sqlite3.Connection, agent: str) -> None:
        """Keep the newest `snapshots_kept` rows per agent, plus the latest good one (status needs it)."""
        conn.execute(
            """
            DELETE FROM snapshots WHERE agent = ?1 AND id <= (
                SELECT id FROM snapshots WHERE agent = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)
              AND id IS NOT (SELECT last_snapshot_id FROM agents WHERE name = ?1)
            """,
            (agent, self.snapshots_kept),
        )

    def latest_snapshot(self, agent: str) -> SnapshotRow | None:
        """The latest good snapshot (GPU data) of the agent, whatever happened after it."""
        row = self._conn.execute(
            "SELECT s.id, s.agent, s.recorded_at, s.ok, s.reason, s.msg, s.data FROM snapshots s "
            "JOIN agents a ON a.last_snapshot_id = s.id WHERE a.name = ?",
            (agent,),
        ).fetchone()
        return snapshot_row(row) if row else None

    def list_snapshots(self, agent: str, *, limit: int = 100) -> list[SnapshotRow]:
        rows = self._conn.execute(
            "SELECT id, agent, recorded_at, ok, reason, msg, data FROM snapshots WHERE agent = ? "
            "ORDER BY id DESC LIMIT ?",
            (agent, limit),
        )
        return [snapshot_row(r) for r in rows]
