"""Heartbeat outcomes and agent states without SSH: the 3-miss rule, blocking and unknown host keys, and
how the Ansible transport's results are classified (the same way as the fan-out's)."""

from __future__ import annotations

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe import ProbeOutcome

from hwledger.heartbeat import HOST_KEY_UNKNOWN_MSG, OFFLINE_AFTER_MISSES, decide_agent_state
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
