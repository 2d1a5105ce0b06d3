"""Placed jobs in the store: the queued -> dispatched step of a job placed on GPUs (with its claim), and the
note that says why a queued job waits (hwledger.placement decides both; see schema v4)."""

from __future__ import annotations

import json

from hwledger.store.records import JobRow, utc_now


def _json(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, ensure_ascii=True)


class PlacementTables:
    """Placement (mixed into `Store`)."""

    def dispatch_placed(self, job_id: str, agent: str, placement: dict) -> bool:
        """Compare-and-set queued -> dispatched for a job placed on `agent`'s GPUs: its agent (an `auto` job
        gets one here), its placement (the claim on those GPUs while it is active) and the dispatch time, in
        one committed transaction with its event. False, changing nothing, when the job is no longer queued
        (cancelled meanwhile)."""
        now = utc_now()
        with self._write() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] != "queued":
                return False
            conn.execute(
                "UPDATE jobs SET state = 'dispatched', agent = ?, placement = ?, placement_note = NULL, "
                "dispatched_at = ?, updated_at = ? WHERE id = ?",
                (agent, _json(placement), now, now, job_id))
            self._event(conn, "job_state", agent=agent, job_id=job_id, at=now, old="queued", new="dispatched",
                        gpus=[gpu["index"] for gpu in placement.get("gpus") or []])
        return True

    def note_placement(self, job: JobRow, note: dict | None) -> bool:
        """Record why a queued job is not placed (None: no reason to give). Written only when it differs from
        the job's stored note, and only while the job is queued. True when it was written."""
        if note == job.placement_note:
            return False
        with self._write() as conn:
            cur = conn.execute("UPDATE jobs SET placement_note = ? WHERE id = ? AND state = 'queued'",
                               (_json(note), job.id))
            return cur.rowcount == 1
