"""The gpu_query action plugin with its connection mocked.

``_low_level_execute_command`` is replaced by a function that runs the script with the local /bin/sh and
a fake GPU tool, so the whole path (options, script, exec, evaluation, facts) runs for real except SSH.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import yaml
from ansible.errors import AnsibleActionFail, AnsibleConnectionFailure
from ansible.playbook.task import Task

from ansible_collections.hwledger.fleet.plugins.action import gpu_query
from ansible_collections.hwledger.fleet.plugins.modules import gpu_query as gpu_query_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import probe
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import DEFAULT_GPU_QUERY_CMD

MIB = 1048576
NOHEADER_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"


class LocalShell:
    """Stands in for ``_low_level_execute_command``: runs the command with /bin/sh -c locally."""

    def __init__(self, bin_dir: Path, tmp_dir: Path):
        self.env = {"PATH": "%s:/usr/bin:/bin" % bin_dir, "TMPDIR": str(tmp_dir), "HOME": str(tmp_dir)}
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append((cmd, kwargs))
        proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, env=self.env, timeout=60, check=False)
        out = proc.stdout.decode("utf-8", "replace")
        err = proc.stderr.decode("utf-8", "replace")
        return {"rc": proc.returncode, "stdout": out, "stdout_lines": out.splitlines(),
                "stderr": err, "stderr_lines": err.splitlines()}


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    return path


@pytest.fixture
def shell(bin_dir: Path, tmp_path: Path) -> LocalShell:
    remote_tmp = tmp_path / "remote-tmp"
    remote_tmp.mkdir()
    return LocalShell(bin_dir, remote_tmp)


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    tool = bin_dir / name
    tool.write_text("#!/bin/sh\n" + body + "\n")
    tool.chmod(0o755)


def make_action(args: dict, executor, *, check_mode: bool = False) -> gpu_query.ActionModule:
    task = MagicMock(Task)
    task.args = args
    task.async_val = 0
    task.check_mode = check_mode
    task.action = "hwledger.fleet.gpu_query"
    action = gpu_query.ActionModule(task=task, connection=MagicMock(), play_context=MagicMock(),
                                    loader=MagicMock(), templar=MagicMock(), shared_loader_obj=None)
    action._low_level_execute_command = executor
    return action


TASK_VARS = {"inventory_hostname": "gpu-box-1", "hwledger_gpu_query_cmd": NOHEADER_CMD}


def test_host_command_runs_and_facts_come_back(bin_dir, shell):
    fake_tool(bin_dir, "nvidia-smi", "printf '0, NVIDIA H100 80GB HBM3, 81559 MiB, 81000 MiB\\n'")
    result = make_action({}, shell).run(task_vars=dict(TASK_VARS))
    assert result.get("failed") is not True, result
    assert result["changed"] is False
    snapshot = result["ansible_facts"]["hwledger_snapshot"]
    assert snapshot["agent"] == "gpu-box-1"
    assert snapshot["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert snapshot["gpus"][0]["memory_total_bytes"] == 81559 * MIB
    assert snapshot["gpus"][0]["memory_used_bytes"] == 559 * MIB
    assert snapshot["host"]["cpu_count"] == len(os.sched_getaffinity(0))
    # One exec, no become and no pseudo-terminal.
    assert len(shell.calls) == 1
    assert shell.calls[0][1].get("sudoable") is False
    assert "'%s'" % NOHEADER_CMD in shell.calls[0][0]


def test_agent_name_comes_from_hwledger_agent(bin_dir, shell):
    fake_tool(bin_dir, "nvidia-smi", "printf '0, GPU, 1024 MiB, 1024 MiB\\n'")
    task_vars = dict(TASK_VARS, hwledger_agent={"name": "box-from-toml"})
    result = make_action({}, shell).run(task_vars=task_vars)
    assert result["ansible_facts"]["hwledger_snapshot"]["agent"] == "box-from-toml"


def test_cmd_option_overrides_the_host_variable(bin_dir, shell):
    fake_tool(bin_dir, "mygpus", "printf 'index, name, memory.total [MiB], memory.free [MiB]\\n3, X, 2048 MiB, 1024 MiB\\n'")
    result = make_action({"cmd": "mygpus --query-gpu=index,name,memory.total,memory.free --format=csv",
                          "backend": "nvidia"}, shell).run(task_vars=dict(TASK_VARS))
    assert [g["index"] for g in result["ansible_facts"]["hwledger_snapshot"]["gpus"]] == [3]


def test_default_command_when_the_host_has_none(shell):
    make_action({}, shell).run(task_vars={"inventory_hostname": "h"})
    assert "'%s'" % DEFAULT_GPU_QUERY_CMD in shell.calls[0][0]


def test_host_variable_is_used_verbatim(shell):
    hostile = "echo '{{ lookup(\"pipe\", \"id\") }}'"
    make_action({}, shell).run(task_vars={"inventory_hostname": "h", "hwledger_gpu_query_cmd": hostile})
    cmd = shell.calls[0][0]
    assert re.search(r"^C='echo '\"'\"'\{\{ lookup\(\"pipe\", \"id\"\) \}\}'\"'\"''$", cmd, re.M)


def test_host_metrics_can_be_turned_off(bin_dir, shell):
    fake_tool(bin_dir, "nvidia-smi", "printf '0, GPU, 1024 MiB, 1024 MiB\\n'")
    result = make_action({"host_metrics": False}, shell).run(task_vars=dict(TASK_VARS))
    assert result["ansible_facts"]["hwledger_snapshot"].get("host") is None
    assert "/proc/loadavg" in shell.calls[0][0]  # the script has the code ...
    assert re.search(r"^M=0$", shell.calls[0][0], re.M)  # ... but it is switched off


def test_failure_is_reported_with_reason_and_host(shell):
    result = make_action({}, shell).run(task_vars=dict(TASK_VARS))  # no nvidia-smi on PATH
    assert result["failed"] is True
    assert result["reason"] == "tool_not_found"
    assert result["rc"] == 127
    assert result["changed"] is False
    assert "ansible_facts" not in result
    assert result["host"]["mem_total_bytes"] > 0


def test_a_hung_tool_ends_in_timeout_within_the_timeout(bin_dir, shell, monkeypatch):
    # The host's watchdog ends it at the timeout (1 s), long before the controller's own deadline, which is
    # moved far away here (1 + 30 s) so that the two cannot be mistaken for each other on a loaded machine.
    monkeypatch.setattr(probe, "CONTROLLER_GRACE_S", 30.0)
    fake_tool(bin_dir, "nvidia-smi", "sleep 600")
    started = time.monotonic()
    result = make_action({"timeout": 1}, shell).run(task_vars=dict(TASK_VARS))
    assert time.monotonic() - started < 1 + 10
    assert result["failed"] is True and result["reason"] == "timeout"
    assert "no answer within" not in result["msg"]  # the watchdog answered, not the controller's deadline


def test_runs_in_check_mode(bin_dir, shell):
    fake_tool(bin_dir, "nvidia-smi", "printf '0, GPU, 1024 MiB, 1024 MiB\\n'")
    result = make_action({}, shell, check_mode=True).run(task_vars=dict(TASK_VARS))
    assert "ansible_facts" in result


@pytest.mark.parametrize("args, fragment", [
    ({"backend": "cuda"}, "backend"),
    ({"timeout": "soon"}, "timeout"),
    ({"bogus": 1}, "bogus"),
])
def test_invalid_options_are_refused(args, fragment, shell):
    with pytest.raises(AnsibleActionFail, match=fragment):
        make_action(args, shell).run(task_vars=dict(TASK_VARS))
    assert shell.calls == []


@pytest.mark.parametrize("args, var, fragment", [
    ({"timeout": 0}, NOHEADER_CMD, "timeout"),
    ({"timeout": 100000}, NOHEADER_CMD, "timeout"),
    ({"cmd": "  "}, NOHEADER_CMD, "empty"),
    ({}, ["not", "a", "string"], "hwledger_gpu_query_cmd"),
])
def test_bad_values_fail_the_task_with_a_message(args, var, fragment, shell):
    result = make_action(args, shell).run(task_vars={"inventory_hostname": "h", "hwledger_gpu_query_cmd": var})
    assert result["failed"] is True
    assert fragment in result["msg"]
    assert shell.calls == []


def test_connection_failures_propagate_as_unreachable(shell):
    def unreachable(cmd, **kwargs):
        raise AnsibleConnectionFailure("Failed to connect to the host via ssh: Connection refused")

    with pytest.raises(AnsibleConnectionFailure, match="Connection refused"):
        make_action({}, unreachable).run(task_vars=dict(TASK_VARS))


def test_the_controller_stops_waiting_at_the_deadline_and_ends_its_ssh(monkeypatch):
    """A remote that never answers (and an ssh client that never exits) cannot hold the task."""
    monkeypatch.setattr(probe, "CONTROLLER_GRACE_S", 0.5)
    children: list[subprocess.Popen] = []
    release = threading.Event()

    def never_answers(cmd, **kwargs):
        # Stands for the ssh client: a child process of this (worker) process that does not exit.
        child = subprocess.Popen(["sleep", "120"])
        children.append(child)
        child.wait()
        release.wait(5)
        return {"rc": 0, "stdout": "", "stderr": ""}

    started = time.monotonic()
    try:
        result = make_action({"timeout": 1}, never_answers).run(task_vars=dict(TASK_VARS))
        elapsed = time.monotonic() - started
    finally:
        release.set()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert result["failed"] is True and result["reason"] == "timeout"
    assert "no answer within 1.5 s" in result["msg"]
    assert 1.5 <= elapsed < 1.5 + 10  # cut at the deadline; the stand-in would take 120 s
    # The stand-in ssh client was terminated by the action, not by the finally block above.
    assert children and children[0].returncode == -signal.SIGTERM


def test_an_exec_that_answers_in_time_does_not_scan_the_process_table(bin_dir, shell, monkeypatch):
    """Scanning /proc costs milliseconds per exec with a thousand ssh masters: only a late exec pays it."""
    scans: list[int] = []
    monkeypatch.setattr(gpu_query.processes, "children", lambda _pid: scans.append(1) or set())
    fake_tool(bin_dir, "nvidia-smi", "printf '0, GPU A, 1024 MiB, 1000 MiB\\n'")
    result = make_action({}, shell).run(task_vars=dict(TASK_VARS))
    assert not result.get("failed"), result
    assert scans == []


def test_backend_choices_are_the_documented_ones():
    """The choices come from the parsers (telemetry.BACKENDS); the module documentation must list the same."""
    documented = yaml.safe_load(gpu_query_doc.DOCUMENTATION)["options"]["backend"]["choices"]
    assert gpu_query.ARGUMENT_SPEC["backend"]["choices"] == documented


def test_results_are_plain_data(bin_dir, shell):
    name = "{{ lookup('pipe', 'touch /tmp/x') }}"
    (bin_dir / "out.txt").write_text("0, %s, 1024 MiB, 1024 MiB\n" % name)
    fake_tool(bin_dir, "nvidia-smi", 'cat "%s"' % (bin_dir / "out.txt"))
    result = make_action({}, shell).run(task_vars=dict(TASK_VARS))
    gpu = result["ansible_facts"]["hwledger_snapshot"]["gpus"][0]
    assert gpu["name"] == name
    assert isinstance(gpu["name"], str)


# --- knobs read from the host's variables, and the summary line ----------------------------------------


def test_knobs_come_from_the_host_variables_when_the_task_gives_none(bin_dir, shell):
    """The playbooks template nothing per host: the action reads hwledger_gpu_query_timeout and
    hwledger_host_metrics itself (as -e k=v strings too)."""
    fake_tool(bin_dir, "nvidia-smi", "printf '0, GPU, 1024 MiB, 1024 MiB\\n'")
    task_vars = dict(TASK_VARS, hwledger_gpu_query_timeout="7", hwledger_host_metrics="false")
    result = make_action({}, shell).run(task_vars=task_vars)
    assert result["ansible_facts"]["hwledger_snapshot"].get("host") is None
    assert re.search(r"^M=0$", shell.calls[0][0], re.M)
    assert re.search(r"^T=7$", shell.calls[0][0], re.M), shell.calls[0][0][:400]
    # The task's own options win over the variables.
    make_action({"timeout": 3, "host_metrics": True}, shell).run(task_vars=task_vars)
    assert re.search(r"^T=3$", shell.calls[1][0], re.M) and re.search(r"^M=1$", shell.calls[1][0], re.M)


def test_a_bad_knob_is_a_clear_failure_and_nothing_runs(shell):
    result = make_action({}, shell).run(task_vars=dict(TASK_VARS, hwledger_gpu_query_timeout="soon"))
    assert result["failed"] is True
    assert "hwledger_gpu_query_timeout must be a number, got 'soon'" in result["msg"]
    assert shell.calls == []


def test_summary_line_of_a_host_that_answered(bin_dir, shell):
    fake_tool(bin_dir, "nvidia-smi", "printf '0, NVIDIA H100 80GB HBM3, 81559 MiB, 81000 MiB\\n1, {{ x }}, [N/A], [N/A]\\n'")
    result = make_action({}, shell).run(task_vars=dict(TASK_VARS))
    line = result["summary"]
    assert line.startswith("gpu-box-1: 2 GPU(s) (nvidia, ")
    assert "; [0] NVIDIA H100 80GB HBM3: 81000 of 81559 MiB free; [1] {{ x }}: memory unknown; load " in line
    assert re.search(r"; load \d+(\.\d+)? on \d+ CPUs, \d+(\.\d+)? of \d+(\.\d+)? GiB memory available$", line)


def test_summary_line_of_a_failure_names_the_reason_once(shell):
    result = make_action({}, shell).run(task_vars=dict(TASK_VARS))  # no nvidia-smi on PATH
    assert result["summary"].startswith("gpu-box-1: FAILED (tool_not_found): 'nvidia-smi' was not found")
    assert result["summary"].count("gpu-box-1") == 1
