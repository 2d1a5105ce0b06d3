"""Failure classification, advice on known-bad commands, and the result/snapshot shapes."""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from ansible_collections.hwledger.fleet.plugins.modules import gpu_query as gpu_query_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import telemetry
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

DEFAULT_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
SPEC_ROCM_CMD = "rocm-smi --showtemp --showmeminfo --csv"
FIXED_ROCM_CMD = "rocm-smi --showtemp --showmeminfo vram --csv"
ARGPARSE_SHOWMEMINFO = (
    "usage: rocm-smi [-h] [-V] [-d DEVICE [DEVICE ...]] [--showmeminfo TYPE [TYPE ...]] ...\n"
    "rocm-smi: error: argument --showmeminfo: expected at least one argument\n"
)


def failure(cmd: str, *, stdout: str = "", stderr: str = "", rc: int = 0, backend: str = "auto"):
    with pytest.raises(telemetry.QueryFailure) as caught:
        telemetry.parse_gpus(cmd, stdout, stderr, rc, backend)
    return caught.value


@pytest.mark.parametrize("cmd, stdout, stderr, rc, reason, named", [
    # the shell could not find the tool: bash, dash, sudo, an absolute path, cmd.exe, no message at all
    (DEFAULT_CMD, "", "/bin/sh: nvidia-smi: command not found\n", 127, "tool_not_found", "nvidia-smi"),
    (DEFAULT_CMD, "", "sh: 1: nvidia-smi: not found\n", 127, "tool_not_found", "nvidia-smi"),
    (DEFAULT_CMD, "", "sudo: nvidia-smi: command not found\n", 1, "tool_not_found", "nvidia-smi"),
    ("/opt/rocm/bin/rocm-smi --json", "", "bash: line 1: /opt/rocm/bin/rocm-smi: No such file or directory\n",
     127, "tool_not_found", "/opt/rocm/bin/rocm-smi"),
    (DEFAULT_CMD, "", "'nvidia-smi' is not recognized as an internal or external command,\n", 1,
     "tool_not_found", "nvidia-smi"),
    ("rocm-smi --showuse --json", "", "", 127, "tool_not_found", "rocm-smi"),
    ("amd-smi metric --json", "", "sh: 1: /usr/bin/amd-smi: Permission denied\n", 126, "tool_not_found", "amd-smi"),
    # nvidia-smi's own messages
    (DEFAULT_CMD, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that "
     "the latest NVIDIA driver is installed and running.\n\n", "", 9, "driver_unavailable", "lsmod"),
    (DEFAULT_CMD, "", "", 9, "driver_unavailable", "not loaded"),
    (DEFAULT_CMD, "Failed to initialize NVML: Unknown Error\n", "", 255, "nvml_error", "Unknown Error"),
    (DEFAULT_CMD, "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 550.144\n",
     "", 18, "nvml_error", "550.144"),
    (DEFAULT_CMD, "", "", 12, "nvml_error", "NVML shared library"),
    (DEFAULT_CMD, "No devices were found\n", "", 6, "no_devices", "No devices were found"),
    ("nvidia-smi --query-gpu=index,device_minor --format=csv", 'Field "device_minor" is not a valid field to '
     "query.\n\n", "", 2, "invalid_query", "'device_minor'"),
    ("nvidia-smi --query-gpu=index,cuda_version --format=csv",
     "Field \u201ccuda_version\u201d is not a valid field to query.\n", "", 2, "invalid_query", "'cuda_version'"),
    ("nvidia-smi -q -x -i", "ERROR: Option -i is missing its value. Please run 'nvidia-smi -h' for help.\n\n", "",
     255, "invalid_arguments", "Option -i is missing its value"),
    ("nvidia-smi --query-gpu=index", "", "", 2, "invalid_arguments", "invalid argument or flag"),
    # rocm-smi
    ("rocm-smi --showuse --json", "ERROR: No DRM devices available. Exiting\n", "", 1, "no_devices", "amdgpu"),
    ("rocm-smi --showbogus --json", "", "usage: rocm-smi [-h] ...\nrocm-smi: error: unrecognized arguments: "
     "--showbogus\n", 2, "invalid_arguments", "unrecognized arguments: --showbogus"),
    ("amd-smi metric --bogus", "", "usage: amd-smi metric [-h] ...\namd-smi: error: unrecognized arguments: "
     "--bogus\n", 2, "invalid_arguments", "amd-smi --help"),
])
def test_failure_classification(cmd, stdout, stderr, rc, reason, named):
    err = failure(cmd, stdout=stdout, stderr=stderr, rc=rc)
    assert err.reason == reason, err.msg
    assert named in err.msg
    assert err.rc == rc


def test_tool_not_found_says_where_the_tool_must_be():
    err = failure("rocm-smi --showuse --json", rc=127)
    assert "PATH" in err.msg and "full path" in err.msg


def test_the_specs_rocm_example_fails_with_the_fixed_command():
    err = failure(SPEC_ROCM_CMD, stderr=ARGPARSE_SHOWMEMINFO, rc=2)
    assert err.reason == "invalid_arguments"
    assert "--showmeminfo needs a memory type" in err.msg
    assert "`%s`" % FIXED_ROCM_CMD in err.msg
    assert err.output_head.startswith("usage: rocm-smi")


def test_the_showmeminfo_error_is_recognised_on_stdout_too():
    err = failure(SPEC_ROCM_CMD, stdout="rocm-smi: error: argument --showmeminfo: expected at least one argument\n",
                  rc=2)
    assert FIXED_ROCM_CMD in err.msg


def test_an_unexplained_exit_status_is_not_trusted():
    err = failure(DEFAULT_CMD, stdout="0, GPU, 1 MiB, 1 MiB\n", rc=15)
    assert err.reason == "unparseable"
    assert "status 15" in err.msg and "fallen off the bus" in err.msg


def test_a_working_tools_output_mentioning_not_found_is_still_parsed():
    (gpu,) = telemetry.parse_gpus(DEFAULT_CMD, "0, x: command not found, 1 MiB, 1 MiB\n", "", 0)
    assert gpu["name"] == "x: command not found"


def test_output_head_is_bounded():
    err = failure(DEFAULT_CMD, stdout="line\n" * 5000, rc=3)
    assert err.output_head.count("\n") < telemetry.OUTPUT_HEAD_LINES
    assert len(err.output_head) <= telemetry.OUTPUT_HEAD_CHARS


# --------------------------------------------------------------------------------------------------
# command_warnings


def test_command_warnings_for_the_specs_rocm_example():
    (warning,) = telemetry.command_warnings(SPEC_ROCM_CMD)
    assert "--showmeminfo needs a memory type" in warning
    assert "`%s`" % FIXED_ROCM_CMD in warning


@pytest.mark.parametrize("cmd, fixed", [
    ("rocm-smi --showmeminfo", "rocm-smi --showmeminfo vram"),
    ("rocm-smi --showmeminfo --json", "rocm-smi --showmeminfo vram --json"),
    ("sudo /opt/rocm/bin/rocm-smi --showmeminfo -t --csv", "sudo /opt/rocm/bin/rocm-smi --showmeminfo vram -t --csv"),
])
def test_command_warnings_fix_showmeminfo_wherever_it_is(cmd, fixed):
    assert telemetry.fix_showmeminfo(cmd) == fixed
    assert any(fixed in warning for warning in telemetry.command_warnings(cmd))


@pytest.mark.parametrize("cmd", [
    DEFAULT_CMD,
    "nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader,nounits",
    FIXED_ROCM_CMD,
    "rocm-smi --showmeminfo vram gtt --json",
    "rocm-smi --showmeminfo=vram --json",
    "amd-smi metric --json",
    "/usr/local/bin/my-gpu-report",
])
def test_good_commands_get_no_warning(cmd):
    assert telemetry.command_warnings(cmd) == []


@pytest.mark.parametrize("cmd, advice", [
    ("nvidia-smi", "human table"),
    ("nvidia-smi --query-compute-apps=pid,used_memory --format=csv", "lists processes"),
    ("nvidia-smi --query-gpu=index,name", "--format=csv,noheader"),
    ("amd-smi metric --csv", "--json"),
])
def test_other_known_bad_commands(cmd, advice):
    (warning,) = telemetry.command_warnings(cmd)
    assert advice in warning


# --------------------------------------------------------------------------------------------------
# Results


def test_failure_result_shape_and_agent_prefix():
    """A parser's failure becomes the module result gpu_query returns (probe.ProbeOutcome.module_result)."""
    err = telemetry.QueryFailure("no_devices", "nothing there", rc=6, output_head="No devices were found")
    assert ProbeOutcome.from_query_failure(err, agent="gpu-1").module_result() == {
        "failed": True, "msg": "gpu-1: nothing there", "reason": "no_devices", "rc": 6,
        "output_head": "No devices were found", "answered": True,
    }
    already = telemetry.QueryFailure("timeout", "gpu-1: took too long")
    assert ProbeOutcome.from_query_failure(already, agent="gpu-1").module_result()["msg"] == "gpu-1: took too long"


def test_unknown_reason_is_a_programming_error():
    with pytest.raises(ValueError):
        raise telemetry.QueryFailure("oops", "x")


def test_reasons_are_the_documented_set():
    assert telemetry.REASONS == {
        "tool_not_found", "driver_unavailable", "nvml_error", "no_devices", "invalid_query", "invalid_arguments",
        "timeout", "tool_still_running", "probe_busy", "unparseable", "output_too_large", "host_key_changed",
        "host_key_unknown", "unreachable"}


def test_every_reason_is_documented_in_the_module():
    """The gpu_query documentation lists each reason twice: RETURN's reason and the notes."""
    returned = yaml.safe_load(gpu_query_doc.RETURN)["reason"]["description"]
    notes = yaml.safe_load(gpu_query_doc.DOCUMENTATION)["notes"]
    assert set(re.findall(r"V\(([a-z_]+)\)", " ".join(returned))) == telemetry.REASONS
    assert set(re.findall(r"C\(([a-z_]+)\) \(", " ".join(notes))) >= telemetry.REASONS


def test_build_snapshot_has_exactly_the_design_keys():
    gpus = telemetry.parse_gpus(DEFAULT_CMD, "0, GPU, 10 MiB, 4 MiB\n", "", 0)
    gpus[0]["extra"] = "dropped"
    snapshot = telemetry.build_snapshot(agent="gpu-1", backend="nvidia", gpus=gpus,
                                        captured_at="2026-05-01T12:00:00.000Z", query_ms=12.5)
    assert snapshot == {
        "schema_version": 1, "agent": "gpu-1", "backend": "nvidia", "captured_at": "2026-05-01T12:00:00.000Z",
        "query_ms": 12.5,
        "gpus": [{"index": 0, "name": "GPU", "uuid": None, "memory_total_bytes": 10485760,
                  "memory_used_bytes": 6291456, "memory_free_bytes": 4194304, "utilization_gpu_percent": None,
                  "temperature_c": None, "power_draw_w": None, "health": "ok",
                  "fields": {"index": "0", "name": "GPU", "memory.total": "10 MiB", "memory.free": "4 MiB"}}],
    }
    json.dumps(snapshot)


def test_build_snapshot_host_only_when_given():
    host = {"cpu_count": 8, "load1": 0.5, "load5": 0.4, "load15": 0.3, "mem_total_bytes": 1, "mem_available_bytes": 1}
    snapshot = telemetry.build_snapshot(agent="a", backend="rocm", gpus=[], captured_at="t", query_ms=1.0, host=host)
    assert snapshot["host"] == host
    with pytest.raises(ValueError):
        telemetry.build_snapshot(agent="a", backend="auto", gpus=[], captured_at="t", query_ms=1.0)


@pytest.mark.parametrize("stderr", [
    "x" * (1 << 20) + ": command not found\n",
    "\n" * (1 << 20) + "Please run 'nvidia-smi -h' for help.\n",
    ("Failed to initialize NVML: " + "\t" * 300 + "\n") * 3000,
    "a: error: " * 100_000,
])
def test_hostile_error_output_is_classified_quickly(stderr):
    stderr = stderr[:telemetry.MAX_OUTPUT_BYTES]
    started = time.perf_counter()
    with pytest.raises(telemetry.QueryFailure):
        telemetry.parse_gpus(DEFAULT_CMD, "", stderr, 1)
    # Did not backtrack catastrophically: ~0.1 s normally, minutes if a classifying regex went exponential.
    assert time.perf_counter() - started < 20
