"""Heartbeat outcomes and agent states without SSH: the 3-miss rule, blocking and unknown host keys, how
the Ansible transport's results are classified (the same way as the fan-out's), the backoff of offline
agents, a busy or stuck GPU tool, and GPUs that fall off the bus."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger.heartbeat import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    HOST_KEY_UNKNOWN_MSG,
    OFFLINE_AFTER_MISSES,
    decide_agent_state,
    next_attempt,
)
from hwledger.store import AgentRow


def _row(state="online", misses=0, last_seen="2026-01-01T00:00:00+00:00") -> AgentRow:
    return AgentRow("a", "h", None, 22, "u", "/k", None, None, None, None, "t", state, None, None, "t",
                    last_seen, None, misses, None, None)


@pytest.mark.parametrize(
    ("row", "record", "expected"),
    [
        (_row("offline", 5), ProbeOutcome(True, {}), ("online", 0)),
        (_row("online", 0), ProbeOutcome(False, reason="unreachable"), ("stale", 1)),
        (_row("stale", 1), ProbeOutcome(False, reason="unreachable"), ("stale", 2)),
        (_row("stale", 2), ProbeOutcome(False, reason="unreachable"), ("offline", 3)),
        (_row("pending", 0, last_seen=None), ProbeOutcome(False, reason="unreachable"), ("pending", 1)),
        (_row("stale", 2), ProbeOutcome(False, reason="no_answer"), ("offline", 3)),
        (_row("stale", 2), ProbeOutcome(False, reason="nvml_error"), ("error", 0)),
        (_row("online", 0), ProbeOutcome(False, reason="host_key_changed"), ("host_key_changed", 0)),
    ],
)
def test_agent_state_rules(row, record, expected):
    update = decide_agent_state(row, record)
    assert (update.state, update.consecutive_misses) == expected
    assert update.seen == (expected[0] in ("online", "error"))


def test_no_pinned_host_key_is_an_error_that_says_what_to_do_and_blocks_nothing():
    update = decide_agent_state(_row("online", 1), ProbeOutcome(
        False, reason="host_key_unknown", msg="No ED25519 host key is known for hwledger-agent-a"))
    assert (update.state, update.consecutive_misses, update.seen) == ("error", 1, False)
    assert update.msg.startswith(HOST_KEY_UNKNOWN_MSG) and "No ED25519 host key is known" in update.msg
    assert "register-ssh" in update.msg
    # Not the blocking state: the next heartbeat still asks the host (after it is registered again).
    assert decide_agent_state(_row("error"), ProbeOutcome(True, {})).state == "online"


def test_offline_takes_three_misses():
    assert OFFLINE_AFTER_MISSES == 3


def test_result_classification():
    """The Ansible transport rebuilds each host's outcome from the action's module result (or from
    Ansible's unreachable result) with the probe's own classification."""
    outcome_from_result = ProbeOutcome.from_module_result
    ok = outcome_from_result({"ansible_facts": {"hwledger_snapshot": {"gpus": []}}})
    assert ok.ok and ok.snapshot == {"gpus": []}
    tool = outcome_from_result({"failed": True, "reason": "driver_unavailable", "msg": "NVML", "rc": 9})
    assert (tool.ok, tool.reason) == (False, "driver_unavailable")
    hung_tool = outcome_from_result({"failed": True, "reason": "timeout", "rc": 124, "host": {}})
    assert hung_tool.reason == "timeout"
    hung_exec = outcome_from_result({"failed": True, "reason": "timeout", "rc": None, "msg": "no answer"})
    assert hung_exec.reason == "no_answer"
    changed = ProbeOutcome.unreachable("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@")
    assert changed.reason == "host_key_changed"
    down = ProbeOutcome.unreachable("Connection refused")
    assert down.reason == "unreachable"
    # No key pinned: ssh also ends with "Host key verification failed", but nothing changed.
    unknown = ProbeOutcome.unreachable("Failed to connect to the host via ssh: No ED25519 host key is known for "
                                       "hwledger-agent-a and you have requested strict checking.\r\n"
                                       "Host key verification failed.")
    assert unknown.reason == "host_key_unknown"


# -- single flight, backoff, missing GPUs --------------------------------------------------------

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def test_another_poller_running_the_tool_is_neither_a_miss_nor_a_state():
    for state, misses in (("online", 0), ("stale", 1), ("error", 0)):
        row = dataclasses.replace(_row(state, misses), state_reason="x", state_msg="y")
        update = decide_agent_state(row, ProbeOutcome(False, reason="probe_busy", msg="another probe"), NOW)
        assert (update.state, update.consecutive_misses, update.seen) == (state, misses, True)
        assert update.reason == "probe_busy"


def test_a_tool_left_stuck_by_an_earlier_probe_is_an_error_not_a_miss():
    update = decide_agent_state(_row("online"), ProbeOutcome(False, reason="tool_still_running", msg="stuck"), NOW)
    assert (update.state, update.consecutive_misses, update.reason) == ("error", 0, "tool_still_running")
    assert update.seen


def test_offline_agents_are_dialled_with_a_doubling_backoff():
    assert [next_attempt(m, NOW) for m in (1, 2)] == [None, None]  # every tick until offline
    delays = [(datetime.fromisoformat(next_attempt(m, NOW)) - NOW).total_seconds() for m in range(3, 12)]
    assert delays[:4] == [BACKOFF_FIRST_S, 2 * BACKOFF_FIRST_S, 4 * BACKOFF_FIRST_S, 8 * BACKOFF_FIRST_S]
    assert max(delays) == BACKOFF_MAX_S and delays == sorted(delays)
    update = decide_agent_state(_row("stale", 2), ProbeOutcome(False, reason="unreachable"), NOW)
    assert update.state == "offline" and update.next_attempt_at == next_attempt(3, NOW)
    # One answer resets it.
    back = decide_agent_state(dataclasses.replace(_row("offline", 7), next_attempt_at=update.next_attempt_at),
                              ProbeOutcome(True, {"gpus": []}), NOW + timedelta(minutes=5))
    assert (back.state, back.consecutive_misses, back.next_attempt_at) == ("online", 0, None)


def _snapshot(*gpus):
    return {"gpus": [dict(gpu) for gpu in gpus]}


H200 = [{"index": i, "name": "NVIDIA H200", "uuid": f"GPU-{i:08x}-aaaa"} for i in range(8)]


def test_the_gpus_an_agent_had_are_remembered_and_a_missing_one_is_named():
    first = decide_agent_state(_row("pending", last_seen=None), ProbeOutcome(True, _snapshot(*H200)), NOW)
    assert first.state == "online" and len(json.loads(first.expected_gpus)) == 8
    row = dataclasses.replace(_row("online"), expected_gpus=first.expected_gpus)
    # GPU 3 fell off the bus: nvidia-smi simply lists seven.
    seven = [gpu for gpu in H200 if gpu["index"] != 3]
    update = decide_agent_state(row, ProbeOutcome(True, _snapshot(*seven)), NOW)
    assert (update.state, update.reason, update.seen) == ("degraded", "gpu_missing", True)
    assert "1 of the 8 GPUs" in update.msg and "GPU 3 (NVIDIA H200, GPU-00000003-aaaa)" in update.msg
    assert update.expected_gpus is None  # the remembered set is not shrunk by a GPU that disappeared
    # A liveness answer (no GPU query) keeps the agent degraded; a full answer brings it back.
    degraded = dataclasses.replace(row, state="degraded", state_reason=update.reason, state_msg=update.msg)
    alive = decide_agent_state(degraded, ProbeOutcome(True, None), NOW)
    assert (alive.state, alive.reason) == ("degraded", "gpu_missing")
    assert decide_agent_state(degraded, ProbeOutcome(True, _snapshot(*H200)), NOW).state == "online"


def test_gpus_without_uuids_are_known_by_index_and_a_new_gpu_is_learned():
    two = [{"index": 0, "name": "RTX 4070"}, {"index": 1, "name": "RTX 5070 Ti"}]
    learned = decide_agent_state(_row("pending", last_seen=None), ProbeOutcome(True, _snapshot(*two)), NOW).expected_gpus
    row = dataclasses.replace(_row("online"), expected_gpus=learned)
    update = decide_agent_state(row, ProbeOutcome(True, _snapshot(two[0])), NOW)
    assert update.state == "degraded" and "GPU 1 (RTX 5070 Ti, index 1)" in update.msg
    three = [*two, {"index": 2, "name": "RTX 5090"}]
    grown = decide_agent_state(row, ProbeOutcome(True, _snapshot(*three)), NOW)
    assert grown.state == "online" and len(json.loads(grown.expected_gpus)) == 3


def test_query_pacing_runs_the_tool_once_per_interval_and_counts_no_miss_as_a_run():
    from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent

    from hwledger.heartbeat import QueryPacing

    clock = [1000.0]
    pacing = QueryPacing(clock=lambda: clock[0])
    paced = Agent(name="paced", hostname="h1", ssh_user="u", ssh_key_path="/k", min_query_interval_s=60)
    plain = Agent(name="plain", hostname="h2", ssh_user="u", ssh_key_path="/k")
    assert pacing.liveness_only([paced, plain]) == set()  # never queried: the tool runs
    pacing.note({"paced": ProbeOutcome(False, reason="unreachable")}, set())
    assert pacing.liveness_only([paced]) == set()  # a miss ran no tool
    pacing.note({"paced": ProbeOutcome(False, reason="timeout"), "plain": ProbeOutcome(True, {})}, set())
    clock[0] += 59
    assert pacing.liveness_only([paced, plain]) == {"paced"}  # a failing tool is paced too
    pacing.note({"paced": ProbeOutcome(True, None)}, {"paced"})  # a liveness answer is not a run
    clock[0] += 1
    assert pacing.liveness_only([paced, plain]) == set()


# --- AnsibleHeartbeat: what it asks ansible-runner for, and how it reads the answer -----------------------


class _FakeRuns:
    """Stands in for AnsibleRuns: records the call and answers with the given host events."""

    def __init__(self, host_events):
        self.calls = []
        self.host_events = host_events

    def run_playbook(self, playbook, **kwargs):
        from hwledger.ansible_runs import PlaybookRun  # pylint: disable=import-outside-toplevel

        self.calls.append((playbook, kwargs))
        return PlaybookRun(status="successful", rc=0, duration_s=0.1, host_events=self.host_events)


def test_the_ansible_transport_runs_the_lean_playbook_without_its_ci_play(tmp_path):
    from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh  # pylint: disable=import-outside-toplevel
    from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent  # pylint: disable=import-outside-toplevel

    from hwledger.ansible_runs import HostEvent  # pylint: disable=import-outside-toplevel
    from hwledger.heartbeat import AnsibleHeartbeat  # pylint: disable=import-outside-toplevel

    snapshot = {"agent": "up", "gpus": []}
    runs = _FakeRuns({
        "up": [HostEvent("runner_on_ok", "up", "Query", "hwledger.fleet.gpu_query",
                         {"ansible_facts": {"hwledger_snapshot": snapshot}})],
        "down": [HostEvent("runner_on_unreachable", "down", "Query", "hwledger.fleet.gpu_query",
                           {"msg": "Connection refused", "unreachable": True})],
    })
    agents = [Agent(name=name, hostname="192.0.2.1", ssh_user="u", ssh_key_path="/k") for name in ("up", "down")]
    policy = ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"), control_dir="/tmp/hwledger-cp-unit")  # not created
    outcomes = AnsibleHeartbeat(runs, policy, query_timeout_s=7, host_metrics=False).tick(agents, cancel=lambda: False)
    (playbook, kwargs), = runs.calls
    assert playbook == "hwledger.fleet.heartbeat_facts"
    assert kwargs["skip_tags"] == "hwledger_ci"  # the run-wide CI check is the caller's, not the server's
    assert kwargs["extravars"] == {"hwledger_gpu_query_timeout": 7, "hwledger_host_metrics": False}
    assert outcomes["up"].ok and outcomes["up"].snapshot == snapshot
    assert not outcomes["down"].ok and outcomes["down"].reason == "unreachable"
