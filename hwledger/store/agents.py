"""The agents table and their heartbeat snapshots."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping

from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe import ProbeOutcome

from hwledger.store.records import (
    AGENT_COLUMNS,
    AGENT_FIELDS,
    AgentRecord,
    AgentRow,
    AgentUpdate,
    SnapshotRow,
    StateChange,
    snapshot_row,
    utc_now,
)
from hwledger.store.schema import AGENT_STATES


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
                    state_reason = NULL, state_msg = NULL, consecutive_misses = 0, removed_at = NULL
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
        miss counter cannot race another writer. Agents removed meanwhile are skipped.
        """
        now = utc_now()
        changes: list[StateChange] = []
        with self._write() as conn:
            for name, outcome in outcomes.items():
                row = conn.execute(f"SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?", (name,)).fetchone()
                if row is None or row[AGENT_FIELDS.index("state")] == "removed":
                    continue
                current = AgentRow(*row)
                update = decide(current, outcome)
                snapshot_id = conn.execute(
                    "INSERT INTO snapshots (agent, recorded_at, ok, reason, msg, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, now, int(outcome.ok), outcome.reason, outcome.msg or None,
                     json.dumps(outcome.snapshot, sort_keys=True) if outcome.snapshot is not None else None),
                ).lastrowid
                conn.execute(
                    """
                    UPDATE agents SET state = ?, state_reason = ?, state_msg = ?,
                        state_since = CASE WHEN state = ? THEN state_since ELSE ? END,
                        consecutive_misses = ?, last_attempt = ?,
                        last_seen = CASE WHEN ? THEN ? ELSE last_seen END,
                        last_snapshot_id = CASE WHEN ? THEN ? ELSE last_snapshot_id END
                    WHERE name = ?
                    """,
                    (update.state, update.reason, update.msg, update.state, now, update.consecutive_misses, now,
                     int(update.seen), now, int(outcome.ok and outcome.snapshot is not None), snapshot_id, name),
                )
                if current.state != update.state:
                    changes.append(StateChange(name, current.state, update.state, update.reason, update.msg))
                    self._event(conn, "agent_state", agent=name, at=now, old=current.state,
                                new=update.state, reason=update.reason, msg=update.msg)
                self._prune_snapshots(conn, name)
        return changes

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
