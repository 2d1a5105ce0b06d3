"""The retention policy: how old a finished job or an event may get (`--jobs-older-than 30d`,
`--events-older-than 90d`), shared by `hwledger fleet prune` and `hwledger fleet serve`, which applies it
once an hour in a thread of its own (`HourlyPrune`). The deleting itself is the store's
(`hwledger.store.retention`).
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import datetime, timedelta, timezone

from hwledger.errors import UserError
from hwledger.fleet import Fleet
from hwledger.store import PruneReport, StoreError
from hwledger.store.schema import MIN_EVENT_AGE_DAYS

log = logging.getLogger("hwledger.pruning")

DEFAULT_JOBS_OLDER_THAN = "30d"
DEFAULT_EVENTS_OLDER_THAN = "90d"
PRUNE_EVERY_S = 3600.0
NEVER = "never"
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"^([0-9]{1,6})([mhdw])$")


def parse_age(text: str, option: str) -> timedelta | None:
    """'30d' -> 30 days; 'never' -> None (keep for ever). At least a day: younger rows are what people look
    at, and the store refuses to prune events younger than that anyway."""
    value = text.strip().lower()
    if value == NEVER:
        return None
    match = _AGE.match(value)
    if not match:
        raise UserError(f"{option} {text!r}: write an age as a number and a unit, m (minutes), h (hours), "
                        f"d (days) or w (weeks), e.g. 30d; or '{NEVER}' to keep them all")
    age = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if age < timedelta(days=MIN_EVENT_AGE_DAYS):
        raise UserError(f"{option} {text!r}: at least {MIN_EVENT_AGE_DAYS}d; recent history is never pruned")
    return age


def cuts(jobs_age: timedelta | None, events_age: timedelta | None,
         now: datetime | None = None) -> tuple[datetime | None, datetime | None]:
    now = now or datetime.now(timezone.utc)
    return (now - jobs_age if jobs_age else None), (now - events_age if events_age else None)


class HourlyPrune:
    """`serve`'s companion that prunes at start and then every `every_s` seconds, with its own store
    connection, in batches (a tick's writes wait one batch at most). It never rewrites a whole store
    (a full VACUUM would hold the write lock for its duration); `hwledger fleet prune` does that once for a
    store from before incremental auto-vacuum, which the log says."""

    def __init__(self, fleet: Fleet, *, jobs_age: timedelta | None, events_age: timedelta | None,
                 on_pruned=None, every_s: float = PRUNE_EVERY_S):
        self.fleet = fleet
        self.jobs_age = jobs_age
        self.events_age = events_age
        self.on_pruned = on_pruned  # called with each PruneReport (the exporter counts the rows)
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._told_full_vacuum = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hwledger-prune", daemon=True)
        self._thread.start()

    def tick_done(self, report, *, elapsed_s: float, overran: bool) -> None:
        del report, elapsed_s, overran  # time-driven, not tick-driven

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # it stops between two batches; a daemon thread past that

    def _run(self) -> None:
        while not self._stop.is_set():
            self.prune_once()
            self._stop.wait(self.every_s)

    def prune_once(self) -> PruneReport | None:
        jobs_before, events_before = cuts(self.jobs_age, self.events_age)
        try:
            with self.fleet.open_store() as store:
                report = store.prune(jobs_before=jobs_before, events_before=events_before,
                                     keep_going=lambda: not self._stop.is_set())
        except (StoreError, OSError, ValueError) as exc:
            log.error("pruning the store failed (tried again in %.0f s): %s", self.every_s, exc)
            return None
        if report.jobs or report.events:
            log.info("pruned %d finished job(s) older than %s and %d event(s) older than %s in %.1f s",
                     report.jobs, report.jobs_before or NEVER, report.events, report.events_before or NEVER,
                     report.seconds)
        if report.needs_full_vacuum and not self._told_full_vacuum:
            self._told_full_vacuum = True
            log.warning("the store %s predates incremental vacuum: pruned space is reused but the file does not "
                        "shrink until `hwledger fleet prune` rewrites it once (stop the server first for a big "
                        "store)", self.fleet.db)
        if self.on_pruned is not None:
            self.on_pruned(report)
        return report
