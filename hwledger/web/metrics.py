"""`/metrics`: the fleet in the Prometheus text format, written by the official client (prometheus-client),
never by hand.

Two sources:
- what the serve loop learns as it runs (tick durations, overruns, hosts asked and answered, rows pruned,
  HTTP connections): metric objects of prometheus-client, which are thread-safe, updated from the loop's
  and the HTTP server's threads;
- what the store holds (agents, their latest GPU data, jobs): `StoreCollector`, a custom collector that
  reads the store at each scrape through a read-only connection of its own, so a scrape shows what
  `hwledger fleet status` would, and costs the loop nothing.

Naming follows https://prometheus.io/docs/practices/naming/: the `hwledger_` prefix, base units in the
name (`_bytes`, `_seconds`, `_celsius`, `_watts`, `_ratio` for 0..1), `_total` on counters. A value the GPU
did not report (null in the snapshot) is absent, never 0. GPU and host series exist only for agents that
are `online` or `degraded` (they answered the latest heartbeat): a stale, offline or failing agent's last
data would look live on a graph, and
`hwledger_agent_state` says why they went. docs/metrics.md maps every name to nvidia_gpu_exporter's and
dcgm-exporter's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from hwledger.store import AGENT_STATES, Store, parse_time

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TICK_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GPU_LABELS = ("agent", "gpu", "uuid", "name", "backend")
SHOWN_AGENT_STATES = tuple(state for state in AGENT_STATES if state != "removed")  # removed agents are not listed
# The states whose latest snapshot is live: it came with the latest heartbeat (`degraded`: the host answered
# but a GPU it had is missing; the ones it still has are current).
LIVE_STATES = frozenset({"online", "degraded"})

# (metric name, help, snapshot key, scale): per GPU.
GPU_GAUGES = (
    ("hwledger_gpu_memory_total_bytes", "Total GPU memory.", "memory_total_bytes", 1),
    ("hwledger_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes", 1),
    ("hwledger_gpu_memory_free_bytes", "GPU memory free.", "memory_free_bytes", 1),
    ("hwledger_gpu_utilization_ratio", "GPU utilization, 0 to 1 (the tool's percentage / 100).",
     "utilization_gpu_percent", 0.01),
    ("hwledger_gpu_temperature_celsius", "GPU temperature.", "temperature_c", 1),
    ("hwledger_gpu_power_draw_watts", "GPU power draw.", "power_draw_w", 1),
)
# Per agent, from the host metrics that came back with the probe.
HOST_GAUGES = (
    ("hwledger_agent_load1", "Host load average over 1 minute.", "load1"),
    ("hwledger_agent_load5", "Host load average over 5 minutes.", "load5"),
    ("hwledger_agent_load15", "Host load average over 15 minutes.", "load15"),
    ("hwledger_agent_cpus", "CPUs the host reports.", "cpu_count"),
    ("hwledger_agent_memory_total_bytes", "Host memory (MemTotal).", "mem_total_bytes"),
    ("hwledger_agent_memory_available_bytes", "Host memory available (MemAvailable).", "mem_available_bytes"),
)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class StoreCollector(Collector):
    """Agents, GPUs and jobs, read from the store at each scrape."""

    def __init__(self, open_store: Callable[[], AbstractContextManager[Store]]):
        self.open_store = open_store

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        with self.open_store() as store:
            agents = store.list_agents()
            snapshots = {row.name: store.latest_snapshot(row.name) for row in agents if row.state in LIVE_STATES}
            job_counts = store.job_counts()
            finished = store.finished_job_totals()
            size = store.size_bytes()
        yield from self._agent_metrics(agents, snapshots, now)
        yield from self._gpu_metrics(snapshots)
        jobs = GaugeMetricFamily("hwledger_jobs", "Jobs in the store by state.", labels=["state"])
        for state, count in job_counts.items():
            jobs.add_metric([state], count)
        yield jobs
        done = CounterMetricFamily("hwledger_jobs_finished", "Jobs that finished, by final state (pruning old jobs "
                                   "does not lower it).", labels=["state"])
        for state, count in finished.items():
            done.add_metric([state], count)
        yield done
        yield GaugeMetricFamily("hwledger_store_size_bytes", "The store's file and write-ahead log on disk.",
                                value=size)

    @staticmethod
    def _agent_metrics(agents, snapshots, now: float) -> Iterator[Metric]:
        state = GaugeMetricFamily("hwledger_agent_state", "1 for the agent's current state, 0 for the others.",
                                  labels=["agent", "state"])
        seen = GaugeMetricFamily("hwledger_agent_last_seen_timestamp_seconds",
                                 "When the agent last answered a heartbeat (Unix time).", labels=["agent"])
        age = GaugeMetricFamily("hwledger_agent_last_seen_age_seconds", "Seconds since the agent last answered.",
                                labels=["agent"])
        misses = GaugeMetricFamily("hwledger_agent_consecutive_misses", "Heartbeats missed in a row.",
                                   labels=["agent"])
        query = GaugeMetricFamily("hwledger_agent_query_duration_seconds",
                                  "How long the agent's GPU tool took in its latest answer.", labels=["agent"])
        host = {name: GaugeMetricFamily(name, text, labels=["agent"]) for name, text, _key in HOST_GAUGES}
        for row in agents:
            for candidate in SHOWN_AGENT_STATES:
                state.add_metric([row.name, candidate], 1.0 if row.state == candidate else 0.0)
            misses.add_metric([row.name], row.consecutive_misses)
            when = parse_time(row.last_seen)
            if when is not None:
                seen.add_metric([row.name], when.timestamp())
                age.add_metric([row.name], max(0.0, now - when.timestamp()))
            snapshot = snapshots.get(row.name)
            data = snapshot.data if snapshot is not None else None
            if not data:
                continue
            query_ms = _number(data.get("query_ms"))
            if query_ms is not None:
                query.add_metric([row.name], query_ms / 1000.0)
            metrics = data.get("host") or {}
            for name, _text, key in HOST_GAUGES:
                value = _number(metrics.get(key))
                if value is not None:
                    host[name].add_metric([row.name], value)
        yield from (state, seen, age, misses, query, *host.values())

    @staticmethod
    def _gpu_metrics(snapshots) -> Iterator[Metric]:
        families = {name: GaugeMetricFamily(name, text, labels=list(GPU_LABELS)) for name, text, _k, _s in GPU_GAUGES}
        for agent, snapshot in sorted(snapshots.items()):
            data = snapshot.data if snapshot is not None else None
            if not data:
                continue
            backend = str(data.get("backend") or "")
            for gpu in data.get("gpus") or []:
                labels = [agent, str(gpu.get("index", "")), str(gpu.get("uuid") or ""), str(gpu.get("name") or ""),
                          backend]
                for name, _text, key, scale in GPU_GAUGES:
                    value = _number(gpu.get(key))
                    if value is not None:  # not reported: absent, not 0
                        families[name].add_metric(labels, value * scale)
        yield from families.values()


class FleetMetrics:
    """The registry behind `/metrics`: the loop's own series, the HTTP server's, and the store collector."""

    def __init__(self, open_store: Callable[[], AbstractContextManager[Store]]):
        # No `*_created` series: they double the output and no query of ours needs them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.tick_duration = Histogram("hwledger_tick_duration_seconds", "How long each heartbeat tick took.",
                                       buckets=TICK_BUCKETS_S, registry=self.registry)
        self.ticks_overrun = Counter("hwledger_ticks_overrun", "Ticks that took longer than the interval (the next "
                                     "one then starts at once).", registry=self.registry)
        self.hosts_asked = Gauge("hwledger_tick_hosts_asked", "Agents asked in the latest tick.",
                                 registry=self.registry)
        self.hosts_answered = Gauge("hwledger_tick_hosts_answered", "Agents that answered the latest tick with GPU "
                                    "data.", registry=self.registry)
        self.last_tick = Gauge("hwledger_last_tick_timestamp_seconds", "When the latest tick ended (Unix time).",
                               registry=self.registry)
        self.pruned = Counter("hwledger_pruned_rows", "Rows the hourly prune removed.", ["table"],
                              registry=self.registry)
        for table in ("jobs", "events"):
            self.pruned.labels(table)  # present from the start, at 0
        self.http_connections = Gauge("hwledger_http_connections", "HTTP connections being served now.",
                                      registry=self.registry)
        self.http_rejected = Counter("hwledger_http_rejected_connections", "HTTP connections turned away because "
                                     "too many were open.", registry=self.registry)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(StoreCollector(open_store))

    def tick_done(self, *, duration_s: float, asked: int, answered: int, overran: bool) -> None:
        self.tick_duration.observe(duration_s)
        if overran:
            self.ticks_overrun.inc()
        self.hosts_asked.set(asked)
        self.hosts_answered.set(answered)
        self.last_tick.set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)
