"""What `hwledger fleet serve --http` reads besides agents, snapshots and jobs: the page's last hour of free
memory, jobs counted by state, and the finished-jobs totals (tables and triggers of schema v3)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from hwledger.store.schema import HISTORY_MINUTES, JOB_STATES, JOB_TERMINAL_STATES


@dataclass(frozen=True)
class MemoryPoint:
    minute: str  # "YYYY-MM-DDTHH:MM" (UTC)
    free_bytes: int | None  # the least free seen in that minute
    total_bytes: int | None


class WatchQueries:
    """Reads for the exporter and the status page (mixed into `Store`)."""

    def memory_history(self, agent: str, *, minutes: int = HISTORY_MINUTES,
                       now: datetime | None = None) -> dict[int, list[MemoryPoint]]:
        """{GPU index: its points of the last `minutes`, oldest first}."""
        since = ((now or datetime.now(timezone.utc)) - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M")
        series: dict[int, list[MemoryPoint]] = {}
        rows = self._conn.execute(
            "SELECT gpu, minute, free_bytes, total_bytes FROM gpu_memory_history WHERE agent = ? AND minute >= ? "
            "ORDER BY gpu, minute", (agent, since))
        for gpu, minute, free, total in rows:
            series.setdefault(int(gpu), []).append(MemoryPoint(minute, free, total))
        return series

    def job_counts(self) -> dict[str, int]:
        """Jobs in the store by state, every state present (0 when none)."""
        counts = dict.fromkeys(JOB_STATES, 0)
        for state, count in self._conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
            counts[state] = int(count)
        return counts

    def finished_job_totals(self) -> dict[str, int]:
        """Jobs that ever finished, by final state (not lowered by pruning), every final state present."""
        totals = dict.fromkeys(sorted(JOB_TERMINAL_STATES), 0)
        for state, count in self._conn.execute("SELECT state, finished FROM job_totals"):
            totals[state] = int(count)
        return totals
