"""/metrics (hwledger/web/metrics.py): names and units, absent values, online-only GPU series, counters that
pruning does not lower, and the Grafana dashboard and the README naming only what is exported."""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hwledger.server import TickReport
from hwledger.web.metrics import FleetMetrics
from tests.unit.hwledger.web.conftest import H200

REPO = Path(__file__).resolve().parents[4]


def _scrape(store) -> dict[str, list]:
    metrics = FleetMetrics(lambda: nullcontext(store))
    metrics.tick_done(duration_s=0.4, asked=3, answered=2, overran=False)
    metrics.tick_done(duration_s=7.0, asked=3, answered=2, overran=True)
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _value(samples, metric, **labels):
    found = [s.value for s in samples.get(metric, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_gpu_series_carry_the_snapshot_in_base_units(fleet_store):
    samples = _scrape(fleet_store)
    labels = {"agent": "h200", "gpu": "0", "uuid": H200["uuid"], "name": "NVIDIA H200", "backend": "nvidia"}
    assert _value(samples, "hwledger_gpu_memory_free_bytes", **labels) == 110796 * 1048576
    assert _value(samples, "hwledger_gpu_memory_total_bytes", **labels) == 143771 * 1048576
    assert _value(samples, "hwledger_gpu_utilization_ratio", **labels) == 1.0
    assert _value(samples, "hwledger_gpu_temperature_celsius", **labels) == 52.0
    assert _value(samples, "hwledger_gpu_power_draw_watts", **labels) == 627.4


def test_a_value_the_gpu_did_not_report_is_absent_not_zero(fleet_store):
    samples = _scrape(fleet_store)
    assert _value(samples, "hwledger_gpu_memory_free_bytes", agent="sparse") == 7948 * 1048576
    for name in ("hwledger_gpu_utilization_ratio", "hwledger_gpu_temperature_celsius",
                 "hwledger_gpu_power_draw_watts", "hwledger_gpu_memory_used_bytes"):
        assert _value(samples, name, agent="sparse") is None, name
    # The HTML-ish name is a label value like any other (the text format escapes only what it must).
    assert _value(samples, "hwledger_gpu_memory_free_bytes", name="<script>alert(1)</script>") is not None


def test_agents_have_one_state_series_each_and_gpu_data_only_while_online(fleet_store):
    samples = _scrape(fleet_store)
    for agent, state in (("h200", "online"), ("sparse", "online"), ("gone", "offline"), ("new", "pending")):
        states = {s.labels["state"]: s.value for s in samples["hwledger_agent_state"] if s.labels["agent"] == agent}
        assert states[state] == 1 and sum(states.values()) == 1 and "removed" not in states
    assert _value(samples, "hwledger_gpu_memory_free_bytes", agent="gone") is None  # its old data is not live
    assert _value(samples, "hwledger_agent_consecutive_misses", agent="gone") == 3
    assert _value(samples, "hwledger_agent_last_seen_timestamp_seconds", agent="new") is None  # never seen
    assert 0 <= _value(samples, "hwledger_agent_last_seen_age_seconds", agent="h200") < 3600
    assert _value(samples, "hwledger_agent_query_duration_seconds", agent="h200") == pytest.approx(0.0098)
    assert _value(samples, "hwledger_agent_memory_available_bytes", agent="h200") == 24_000_000_000


def test_tick_and_job_series(fleet_store):
    job = fleet_store.submit_job("h200", {"command": ["true"]})
    fleet_store.request_cancel(job.id)
    fleet_store.submit_job("h200", {"command": ["true"]})
    samples = _scrape(fleet_store)
    assert _value(samples, "hwledger_tick_duration_seconds_count") == 2
    assert _value(samples, "hwledger_tick_duration_seconds_bucket", le="0.5") == 1
    assert _value(samples, "hwledger_ticks_overrun_total") == 1
    assert _value(samples, "hwledger_tick_hosts_asked") == 3 and _value(samples, "hwledger_tick_hosts_answered") == 2
    assert _value(samples, "hwledger_jobs", state="queued") == 1 and _value(samples, "hwledger_jobs", state="lost") == 0
    fleet_store.prune(jobs_before=datetime.now(timezone.utc) + timedelta(days=1), events_before=None)
    samples = _scrape(fleet_store)
    assert _value(samples, "hwledger_jobs", state="cancelled") == 0  # pruned ...
    assert _value(samples, "hwledger_jobs_finished_total", state="cancelled") == 1  # ... still counted
    assert not [name for name in samples if name.endswith("_created")]


def exported_names(store) -> set[str]:
    return set(_scrape(store))


def test_the_grafana_dashboard_queries_only_exported_metrics(fleet_store):
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("expr", "definition", "query"):  # panel queries and the template variable's
                if isinstance(node.get(key), str):
                    exprs.append(node[key])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    used = {name for expr in exprs for name in re.findall(r"\bhwledger_[a-z0-9_]+", expr)}
    assert len(exprs) >= 5 and used
    assert used <= exported_names(fleet_store), used - exported_names(fleet_store)


def test_the_readme_lists_every_hwledger_metric(fleet_store):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("Watch the fleet: `/metrics`"):]
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in exported_names(fleet_store)
                if name.startswith("hwledger_")}
    missing = sorted(name for name in families if f"`{name}" not in section)
    assert not missing
    unknown = set(re.findall(r"`(hwledger_[a-z0-9_]+)", section)) - families - {
        f"{name}_bucket" for name in families}
    assert not unknown, unknown


def test_the_tick_report_of_the_server_feeds_the_series(fleet_store):
    from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome  # noqa: PLC0415
    from hwledger.web.http import HttpOptions, WatchServer  # noqa: PLC0415

    metrics = FleetMetrics(lambda: nullcontext(fleet_store))
    server = WatchServer(HttpOptions("127.0.0.1", 0, None), None, metrics, interval_s=5)
    report = TickReport(started=0.0, asked=2, outcomes={"a": ProbeOutcome.success({"gpus": []}),
                                                        "b": ProbeOutcome.unreachable("down")})
    server.tick_done(report, elapsed_s=0.2, overran=False)
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples["hwledger_tick_hosts_answered"] == 1 and samples["hwledger_tick_hosts_asked"] == 2
