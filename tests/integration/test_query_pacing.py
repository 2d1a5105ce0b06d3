"""Per-agent query pacing (checklist H47/H48): `query_timeout_s` bounds one agent's GPU tool whatever the
server's default, and `min_query_interval_s` runs the tool at most that often, a cheap liveness check
(the same exec without the tool) answering the heartbeats in between, so a dead host is still noticed
within the usual three missed heartbeats."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from hwledger.ansible_runs import AnsibleRuns
from hwledger.fanout import SshFanoutHeartbeat
from hwledger.heartbeat import AnsibleHeartbeat
from hwledger.server import Server
from lab.pinning import pinned_fleet


def make_transport(kind: str, fleet, query_timeout_s: int):
    """The same pacing through either heartbeat transport: the fan-out asks the probe itself; the Ansible
    one passes the agent's timeout and the liveness check to gpu_query as host variables."""
    if kind == "fanout":
        return SshFanoutHeartbeat(fleet.policy(), query_timeout_s=query_timeout_s)
    return AnsibleHeartbeat(AnsibleRuns(runs_dir=fleet.runs_dir), fleet.policy(), query_timeout_s=query_timeout_s)


@pytest.fixture(params=["fanout", "ansible"])
def transport_kind(request):
    return request.param


@pytest.fixture
def short_data_dir():
    path = Path(tempfile.mkdtemp(prefix="hwlp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_gpu_tool_runs_at_its_own_pace_and_liveness_fills_the_ticks(
        lab, tmp_path, short_data_dir, transport_kind):
    paced = lab.add_loopback_host(lab.unique_name("paced"))
    every_tick = lab.add_loopback_host(lab.unique_name("every"))
    try:
        fleet = pinned_fleet(tmp_path, short_data_dir, [paced, every_tick],
                             overrides={paced.name: {"min_query_interval_s": 3600}})
        server = Server(fleet, transport=make_transport(transport_kind, fleet, 20), query_timeout_s=20)
        try:
            for _index in range(4):
                report = server.tick()
                assert report.outcomes[paced.name].ok and report.outcomes[every_tick.name].ok
            assert len(paced.tool_calls()) == 1 and len(every_tick.tool_calls()) == 4
            row = server.store.get_agent(paced.name)
            assert row.state == "online" and server.store.latest_snapshot(paced.name).data["gpus"]
            # Between two tool runs the liveness check still finds a host that went away.
            paced.stop()
            for _index in range(3):
                server.tick()
            row = server.store.get_agent(paced.name)
        finally:
            server.close()
        assert (row.state, row.state_reason, row.consecutive_misses) == ("offline", "unreachable", 3), row
        assert len(paced.tool_calls()) == 1
    finally:
        paced.stop()
        every_tick.stop()


def test_an_agents_own_query_timeout_bounds_its_tool(lab, tmp_path, short_data_dir, transport_kind):
    slow = lab.add_loopback_host(lab.unique_name("slow"), delay=30)
    try:
        fleet = pinned_fleet(tmp_path, short_data_dir, [slow], overrides={slow.name: {"query_timeout_s": 1}})
        # The server's default would wait 60 s for the tool; the agent's own 1 s applies.
        server = Server(fleet, transport=make_transport(transport_kind, fleet, 60), query_timeout_s=60)
        try:
            outcome = server.tick().outcomes[slow.name]
        finally:
            server.close()
        assert (outcome.ok, outcome.reason) == (False, "timeout"), outcome
        assert "within its timeout and was killed on the host" in outcome.msg
    finally:
        slow.stop()
