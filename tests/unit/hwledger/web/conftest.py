"""A store with agents in known states for the web package's tests (no network)."""

from __future__ import annotations

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger.heartbeat import record_outcomes
from hwledger.store import AgentRecord, Store

H200 = {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-00000000-0000-0000-0000-000000000000",
        "memory_total_bytes": 143771 * 1048576, "memory_used_bytes": 32362 * 1048576,
        "memory_free_bytes": 110796 * 1048576, "utilization_gpu_percent": 100.0, "temperature_c": 52.0,
        "power_draw_w": 627.4, "health": "ok"}
SPARSE = {"index": 0, "name": "<script>alert(1)</script>", "uuid": None, "memory_total_bytes": 8188 * 1048576,
          "memory_used_bytes": None, "memory_free_bytes": 7948 * 1048576, "utilization_gpu_percent": None,
          "temperature_c": None, "power_draw_w": None, "health": "ok"}
HOST = {"cpu_count": 2, "load1": 0.5, "load5": 0.4, "load15": 0.3, "mem_total_bytes": 25_000_000_000,
        "mem_available_bytes": 24_000_000_000}


def snapshot(gpus, backend="nvidia"):
    return {"schema_version": 1, "backend": backend, "query_ms": 9.8, "gpus": gpus, "host": HOST}


@pytest.fixture
def fleet_store(tmp_path):
    """h200 (online), sparse (online, a GPU that reports little, an HTML-ish name), gone (offline after it
    answered once), and new (pending)."""
    with Store.open(tmp_path / "d" / "fleet.db") as store:
        for name in ("h200", "sparse", "gone", "new"):
            store.upsert_agent(AgentRecord(name=name, hostname="192.0.2.1", port=22, ssh_user="root",
                                           key_path=f"/secret/keys/{name}"))
        record_outcomes(store, {"h200": ProbeOutcome.success(snapshot([H200])),
                                "sparse": ProbeOutcome.success(snapshot([SPARSE])),
                                "gone": ProbeOutcome.success(snapshot([H200]))})
        for _miss in range(3):
            record_outcomes(store, {"gone": ProbeOutcome.unreachable(
                "ssh: Warning: Identity file /secret/keys/gone not accessible", agent="gone")})
        yield store
