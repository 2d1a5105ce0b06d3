"""`hwledger gpu parse`: a tool's output in, the snapshot (or the failure) out, as a heartbeat would see it."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import telemetry
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD
from hwledger.cli import main
from tests.toolchains import REPO
from tests.unit.plugins.plugin_utils.capture_expectations import EXPECTATIONS
from tests.unit.plugins.plugin_utils.test_telemetry_captures import assert_gpus_match

FIXTURES = REPO / "tests" / "fixtures" / "gpu"
MIB = 1048576
A800 = FIXTURES / "nvidia" / "csv-header-index-name-memtotal-memfree-driver-computecap-8xA800-SXM4-80GB.txt"
A800_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap --format=csv"


def test_prints_the_snapshot(capsys):
    assert main(["gpu", "parse", "--cmd", A800_CMD, "--agent", "a800-box", str(A800)]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    assert snapshot["agent"] == "a800-box" and snapshot["backend"] == "nvidia"
    assert len(snapshot["gpus"]) == 8
    # Hand-checked against the capture's first row: 81920 MiB total, 8404 MiB free.
    assert snapshot["gpus"][0]["memory_total_bytes"] == 81920 * MIB
    assert snapshot["gpus"][0]["memory_free_bytes"] == 8404 * MIB
    assert snapshot["gpus"][0]["memory_used_bytes"] == (81920 - 8404) * MIB
    assert snapshot.get("host") is None  # no host metrics from a file


def test_reads_stdin_with_the_command(capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"0, NVIDIA L40S, 46068 MiB, 45000 MiB\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["gpu", "parse", "--cmd", DEFAULT_GPU_QUERY_CMD, "-"]) == 0
    gpus = json.loads(capsys.readouterr().out)["gpus"]
    assert [(g["index"], g["name"], g["memory_total_bytes"]) for g in gpus] == [(0, "NVIDIA L40S", 46068 * MIB)]


def test_headerless_csv_without_the_command_asks_for_it(capsys, monkeypatch):
    """The default query's own output is no exception: without a header, only --cmd names the columns."""
    stdin = io.TextIOWrapper(io.BytesIO(b"0, NVIDIA L40S, 46068 MiB, 45000 MiB\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["gpu", "parse", "-"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "without a header line" in captured.err and "--cmd 'nvidia-smi --query-gpu=" in captured.err
    assert "Traceback" not in captured.err


def in_snapshot_order(gpus: list[dict]) -> list[dict]:
    """The printed JSON has sorted keys; the snapshot's own order is GPU_KEYS (checked as a set here)."""
    assert all(set(gpu) == set(telemetry.GPU_KEYS) for gpu in gpus)
    return [{key: gpu[key] for key in telemetry.GPU_KEYS} for gpu in gpus]


def _capture_argv(name: str, expect) -> list[str]:
    argv = ["gpu", "parse", "--rc", str(expect.rc)]
    if expect.stream == "stderr":
        return [*argv, "--stderr", str(FIXTURES / name), os.devnull]
    return [*argv, str(FIXTURES / name)]


@pytest.mark.parametrize("name", sorted(EXPECTATIONS))
def test_every_capture_without_the_command(name, capsys):
    """`hwledger gpu parse FILE` with no --cmd: every format that names its own columns gives the snapshot
    its expectation row describes; headerless CSV asks for --cmd (exit 2); a failure gives its reason (exit 1)."""
    expect = EXPECTATIONS[name]
    headerless = expect.cmd.startswith(("nvidia-smi", "./nvidia-smi")) and "noheader" in expect.cmd
    rc = main(_capture_argv(name, expect))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if expect.reason is not None:
        assert rc == 1, captured.err
        failure = json.loads(captured.out)
        assert failure["reason"] == expect.reason
        assert all(text in failure["msg"] for text in expect.msg_has if "exit status" not in text), failure["msg"]
    elif headerless:
        assert rc == 2 and captured.out == ""
        assert "--cmd" in captured.err and "without a header line" in captured.err
    else:
        assert rc == 0, captured.err
        snapshot = json.loads(captured.out)
        assert snapshot["backend"] == expect.backend
        assert_gpus_match(name, in_snapshot_order(snapshot["gpus"]), expect)


def test_headerless_csv_with_the_command(capsys):
    name = "nvidia/csv-noheader-name-pcideviceid-1xH100-NVL.txt"
    assert main(["gpu", "parse", "--cmd", EXPECTATIONS[name].cmd, str(FIXTURES / name)]) == 0
    assert_gpus_match(name, in_snapshot_order(json.loads(capsys.readouterr().out)["gpus"]), EXPECTATIONS[name])


def test_an_empty_cmd_is_refused(capsys):
    assert main(["gpu", "parse", "--cmd", " ", str(A800)]) == 2
    assert "--cmd is empty" in capsys.readouterr().err


def test_help_says_when_cmd_is_needed(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gpu", "parse", "--help"])
    assert exc.value.code == 0
    assert "noheader" in capsys.readouterr().out


def test_a_failure_prints_the_reason_and_exits_1(capsys):
    path = FIXTURES / "nvidia" / "failure-nvml-driver-library-version-mismatch.txt"
    assert main(["gpu", "parse", "--rc", "18", str(path)]) == 1
    captured = capsys.readouterr()
    failure = json.loads(captured.out)
    assert failure["failed"] is True and failure["reason"] == "nvml_error" and failure["rc"] == 18
    assert captured.err.startswith("hwledger: gpu parse: nvml_error: ")


def test_stderr_file_is_used(tmp_path, capsys):
    empty = tmp_path / "stdout.txt"
    empty.write_text("")
    stderr = tmp_path / "stderr.txt"
    stderr.write_text("sh: 1: nvidia-smi: not found\n")
    assert main(["gpu", "parse", "--rc", "127", "--stderr", str(stderr), str(empty)]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "tool_not_found"


def test_oversized_input_is_output_too_large(tmp_path, capsys):
    big = tmp_path / "big.txt"
    big.write_bytes(b"0, x, 1 MiB, 1 MiB\n" * (telemetry.MAX_OUTPUT_BYTES // 10))
    assert main(["gpu", "parse", str(big)]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "output_too_large"


def test_control_characters_in_the_message_are_escaped(tmp_path, capsys):
    hostile = tmp_path / "hostile.txt"
    hostile.write_text("\x1b[2K\rALL OK\n")
    assert main(["gpu", "parse", "--rc", "3", str(hostile)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err


def test_a_missing_file_is_a_user_error(tmp_path, capsys):
    assert main(["gpu", "parse", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_an_unknown_backend_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gpu", "parse", "--backend", "cuda", str(A800)])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
