"""The retention policy (hwledger/pruning.py): ages, and the prune `serve` runs beside its loop."""

from __future__ import annotations

from datetime import timedelta

import pytest

from hwledger.errors import UserError
from hwledger.fleet import Fleet
from hwledger.pruning import HourlyPrune, parse_age
from hwledger.store import AgentRecord, Store


@pytest.mark.parametrize(("text", "age"), [("30d", timedelta(days=30)), ("2w", timedelta(weeks=2)),
                                           ("36h", timedelta(hours=36)), ("1440m", timedelta(days=1)),
                                           ("never", None), (" NEVER ", None)])
def test_ages(text, age):
    assert parse_age(text, "--x") == age


@pytest.mark.parametrize("text", ["", "30", "d30", "1.5d", "30 d", "23h", "-1d", "9999999d"])
def test_bad_ages(text):
    with pytest.raises(UserError, match="--x"):
        parse_age(text, "--x")


def test_the_hourly_prune_runs_at_start_reports_and_stops(tmp_path):
    fleet = Fleet(tmp_path / "a.toml", tmp_path / "kh", tmp_path / "d" / "fleet.db")
    with Store.open(fleet.db) as store:
        store.upsert_agent(AgentRecord(name="gpu1", hostname="h", port=22, ssh_user="u", key_path="/k"))
    reports = []
    prune = HourlyPrune(fleet, jobs_age=timedelta(days=30), events_age=None, on_pruned=reports.append, every_s=3600)
    prune.start()
    try:
        for _attempt in range(100):
            if reports:
                break
            prune._stop.wait(0.05)  # pylint: disable=protected-access
    finally:
        prune.stop()
    assert len(reports) == 1 and reports[0].jobs == 0 and reports[0].events_before is None
    assert not prune._thread.is_alive()  # pylint: disable=protected-access
