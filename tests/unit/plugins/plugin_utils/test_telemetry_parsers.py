"""Parser behaviour beyond the captures: line ends, markers, hostile output, speed."""

from __future__ import annotations

import json
import time

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import telemetry, tool_parsing
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

MIB = 1048576
DEFAULT_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
TWO_GPUS = "0, NVIDIA A100-SXM4-80GB, 81920 MiB, 81000 MiB\n1, NVIDIA A100-SXM4-80GB, 81920 MiB, 1024 MiB\n"


def parse(stdout: str, cmd: str = DEFAULT_CMD, rc: int = 0, stderr: str = "", backend: str = "auto"):
    return telemetry.parse_gpus(cmd, stdout, stderr, rc, backend)


def failure(stdout: str, cmd: str = DEFAULT_CMD, rc: int = 0, stderr: str = "") -> telemetry.QueryFailure:
    with pytest.raises(telemetry.QueryFailure) as caught:
        parse(stdout, cmd, rc, stderr)
    return caught.value


# --------------------------------------------------------------------------------------------------
# nvidia-smi CSV


def test_default_query():
    gpus = parse(TWO_GPUS)
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[1] == {
        "index": 1, "name": "NVIDIA A100-SXM4-80GB", "uuid": None,
        "memory_total_bytes": 81920 * MIB, "memory_used_bytes": (81920 - 1024) * MIB,
        "memory_free_bytes": 1024 * MIB, "utilization_gpu_percent": None, "temperature_c": None,
        "power_draw_w": None, "health": "ok",
        "fields": {"index": "1", "name": "NVIDIA A100-SXM4-80GB", "memory.total": "81920 MiB",
                   "memory.free": "1024 MiB"},
    }


def test_crlf_and_blank_lines_are_tolerated():
    messy = "\r\n\r\n" + TWO_GPUS.replace("\n", "\r\n\r\n") + "\n\n"
    assert parse(messy) == parse(TWO_GPUS)


def test_header_with_units_and_nounits():
    with_units = "index, memory.used [MiB], power.draw [W], utilization.gpu [%]\n0, 10 MiB, 70.25 W, 5 %\n"
    nounits = "index, memory.used [MiB], power.draw [W], utilization.gpu [%]\n0, 10, 70.25, 5\n"
    cmd = "nvidia-smi --query-gpu=index,memory.used,power.draw,utilization.gpu --format=csv"
    for text, fmt in ((with_units, cmd), (nounits, cmd + ",nounits")):
        (gpu,) = parse(text, fmt)
        assert (gpu["memory_used_bytes"], gpu["power_draw_w"], gpu["utilization_gpu_percent"]) == (10 * MIB, 70.25, 5)
        assert set(gpu["fields"]) == {"index", "memory.used", "power.draw", "utilization.gpu"}


def test_used_is_total_minus_free_and_free_is_total_minus_used():
    (derived_used,) = parse("0, GPU, 100 MiB, 40 MiB\n")
    assert derived_used["memory_used_bytes"] == 60 * MIB
    (derived_free,) = parse("100 MiB, 40 MiB\n", "nvidia-smi --query-gpu=memory.total,memory.used --format=csv,noheader")
    assert derived_free["memory_free_bytes"] == 60 * MIB


def test_inconsistent_memory_derives_nothing():
    (gpu,) = parse("0, GPU, 100 MiB, 400 MiB\n")
    assert gpu["memory_used_bytes"] is None


@pytest.mark.parametrize("marker", [
    "[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", "[Requested functionality has been deprecated]",
    "[Function Not Found]", "[Insufficient Permissions]", "[Some Future Marker]", "", "ERR!",
])
def test_unavailable_markers_become_null_and_leave_health_ok(marker):
    (gpu,) = parse("0, GPU, %s, 1 MiB\n" % marker)
    assert gpu["memory_total_bytes"] is None
    assert gpu["fields"]["memory.total"] is None
    assert gpu["health"] == "ok"


def test_a_fault_marker_marks_only_its_gpu():
    cmd = "nvidia-smi --query-gpu=index,temperature.gpu,memory.total,memory.free --format=csv,noheader"
    gpus = parse("0, [GPU requires reset], 100 MiB, 100 MiB\n1, 40, 100 MiB, 90 MiB\n", cmd)
    assert gpus[0]["health"] == "GPU requires reset"
    assert gpus[0]["temperature_c"] is None
    assert gpus[1]["health"] == "ok"
    assert gpus[1]["temperature_c"] == 40 and gpus[1]["memory_used_bytes"] == 10 * MIB


def test_mig_style_row_with_na_memory():
    cmd = "nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader"
    (gpu,) = parse("0, NVIDIA H100L-2-24C, [N/A], 24576 MiB\n", cmd)
    assert gpu["memory_total_bytes"] is None and gpu["memory_used_bytes"] == 24576 * MIB


def test_noheader_aliases_print_under_the_header_name():
    (gpu,) = parse("GPU X, GPU-1, 00000000:01:00.0\n", "nvidia-smi --query-gpu=gpu_name,gpu_uuid,gpu_bus_id --format=csv,noheader")
    assert gpu["name"] == "GPU X" and gpu["uuid"] == "GPU-1"
    assert list(gpu["fields"]) == ["name", "uuid", "pci.bus_id"]


def test_query_list_in_quotes_and_behind_wrappers():
    cmd = "sudo -n srun --jobid=7 sh -c 'nvidia-smi --query-gpu=\"index, name\" --format=csv,noheader'"
    (gpu,) = parse("3, GPU Z\n", cmd)
    assert (gpu["index"], gpu["name"]) == (3, "GPU Z")


def test_a_name_containing_the_separator_is_kept_whole():
    (gpu,) = parse("0, Vendor, Inc. Model, 100 MiB, 50 MiB\n")
    assert gpu["name"] == "Vendor, Inc. Model"
    assert gpu["memory_free_bytes"] == 50 * MIB


def test_a_short_row_is_unparseable():
    assert "line 1 has 3 values but the query has 4 columns" in failure("0, GPU, 100 MiB\n").msg


def test_header_expected_but_missing():
    err = failure("0, GPU, 100 MiB, 40 MiB\n", "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv")
    assert "expected nvidia-smi's header line" in err.msg and "noheader" in err.msg


def test_noheader_without_a_query_list_says_what_to_do():
    err = failure("0, GPU, 100 MiB, 40 MiB\n", cmd="")
    assert err.reason == "unparseable" and "--query-gpu=" in err.msg


def test_empty_output():
    assert failure("", rc=0).reason == "unparseable"
    assert failure("\n\n", rc=0).reason == "unparseable"


def test_a_non_numeric_memory_value_is_unparseable_and_named():
    err = failure("0, GPU, lots MiB, 40 MiB\n")
    assert err.reason == "unparseable" and "memory.total" in err.msg


def test_fractional_mib_is_refused_memory_is_integers_only():
    assert failure("0, GPU, 100.5 MiB, 40 MiB\n").reason == "unparseable"


def test_process_list_from_header_alone():
    text = "pid, process_name, used_gpu_memory [MiB]\n42, python, 100 MiB\n"
    err = failure(text, cmd="")
    assert "process list" in err.msg


def test_windows_exe_path_is_recognised():
    cmd = r"C:\Windows\System32\nvidia-smi.exe --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
    assert telemetry.detect_backend(cmd, "") == "nvidia"
    assert len(parse(TWO_GPUS, cmd)) == 2


# --------------------------------------------------------------------------------------------------
# Untrusted output


@pytest.mark.parametrize("name", [
    "{{ lookup('pipe', 'touch /tmp/pwned') }}",
    "{% for x in range(10) %}x{% endfor %}",
    "ansible_facts",
    "discovered_interpreter_python",
    "A100\x1b[2K\rALL OK",
])
def test_names_are_returned_literally(name):
    (gpu,) = parse("0, %s, 100 MiB, 40 MiB\n" % name)
    assert gpu["name"] == name
    snapshot = telemetry.build_snapshot(agent="a", backend="nvidia", gpus=[gpu], captured_at="t", query_ms=1.0)
    assert snapshot["gpus"][0]["name"] == name
    assert set(snapshot) == {"schema_version", "agent", "backend", "captured_at", "query_ms", "gpus"}
    assert tuple(snapshot["gpus"][0]) == telemetry.GPU_KEYS


def test_header_names_only_ever_become_fields_keys():
    text = ("index, ansible_facts, discovered_interpreter_python, health, memory_total_bytes, fields\n"
            "0, {{ evil }}, /tmp/x, broken, 1, x\n")
    (gpu,) = parse(text, cmd="nvidia-smi --query-gpu=x --format=csv")
    assert tuple(gpu) == telemetry.GPU_KEYS
    assert gpu["health"] == "ok" and gpu["memory_total_bytes"] is None
    assert gpu["fields"]["ansible_facts"] == "{{ evil }}"
    assert gpu["fields"]["fields"] == "x"


def test_a_header_that_is_not_field_names_is_refused():
    err = failure("index, {{ x }}\n0, 1\n", cmd="nvidia-smi --query-gpu=index,x --format=csv")
    assert err.reason == "unparseable"


def test_huge_output_is_refused_quickly():
    huge = "0, GPU, 1 MiB, 1 MiB\n" * 200_000  # 4 MB
    started = time.perf_counter()
    err = failure(huge)
    assert err.reason == "output_too_large"
    # Refused by its size, in milliseconds; the bound only proves that it did not hang on the 4 MB.
    assert time.perf_counter() - started < 10
    assert len(err.output_head) <= telemetry.OUTPUT_HEAD_CHARS


def test_output_exactly_at_the_limit_is_not_too_large():
    line = "0, GPU, 1 MiB, 1 MiB\n"
    text = line * (telemetry.MAX_OUTPUT_BYTES // len(line))
    assert len(text) <= telemetry.MAX_OUTPUT_BYTES
    assert failure(text).reason == "unparseable"  # too many GPU rows, but not "too large"


def test_multibyte_output_is_measured_in_bytes():
    text = "0, " + "\u00e9" * (telemetry.MAX_OUTPUT_BYTES // 2 + 10) + ", 1 MiB, 1 MiB\n"
    assert len(text) < telemetry.MAX_OUTPUT_BYTES
    assert failure(text).reason == "output_too_large"


@pytest.mark.parametrize("garbage", [
    "\x7fELF\x02\x01\x01\x00\x00\x00\x00",
    "0, GPU\x00, 1 MiB, 1 MiB\n",
    "0, \udc8f\udcff, 1 MiB, 1 MiB\n",       # undecodable bytes under surrogateescape
    "0, \ufffd\ufffd, 1 MiB, 1 MiB\n",       # ... under errors="replace"
])
def test_binary_garbage_is_unparseable(garbage):
    err = failure(garbage)
    assert err.reason == "unparseable" and "binary" in err.msg
    json.dumps(ProbeOutcome.from_query_failure(err, agent="a").module_result())  # the head is serialisable
    err.output_head.encode("utf-8")


def test_100000_digit_number_is_refused_without_burning_cpu():
    # "too long": refused by the length check, before any conversion of the digits (which is what would burn
    # the CPU); speed itself is measured by `make bench`, not here.
    err = failure("0, GPU, %s MiB, 1 MiB\n" % ("9" * 100_000))
    assert err.reason == "unparseable" and "too long" in err.msg
    assert "9" * 1000 not in err.msg  # the number is not echoed back whole either


def test_long_numbers_in_json_are_refused():
    big = "9" * 5000
    with pytest.raises(telemetry.QueryFailure) as caught:
        parse('{"card0": {"VRAM Total Memory (B)": %s}}' % big, cmd="rocm-smi --json")
    assert caught.value.reason == "unparseable"
    with pytest.raises(telemetry.QueryFailure):
        parse('{"card0": {"VRAM Total Memory (B)": "%s"}}' % big, cmd="rocm-smi --json")


def test_deeply_nested_json_is_unparseable():
    for cmd, text in (("rocm-smi --json", "[" * 100_000 + "]" * 100_000),
                      ("amd-smi metric --json", "[" * 100_000 + "]" * 100_000)):
        with pytest.raises(telemetry.QueryFailure) as caught:
            parse(text, cmd=cmd)
        assert caught.value.reason == "unparseable"


def test_too_many_gpu_rows():
    text = "".join("%d, G, 1 MiB, 1 MiB\n" % i for i in range(tool_parsing.MAX_GPUS + 1))
    assert "is not a GPU list" in failure(text).msg


def test_pathological_table_lines_stay_fast():
    rocm = "GPU[0]\t\t: " + ":" * 3000 + " x" + " " * 1000 + "\n"
    amd = "GPU  POWER\n  0  " + ("a " + " " * 50) * 60 + "\n"
    started = time.perf_counter()
    for cmd, text in (("rocm-smi --showpower", rocm * 200), ("amd-smi monitor", amd * 200)):
        try:
            parse(text, cmd=cmd)
        except telemetry.QueryFailure:
            pass
    # Did not backtrack catastrophically: ~0.1 s normally, minutes if a template's regex went exponential.
    assert time.perf_counter() - started < 20


def test_default_query_of_eight_gpus_parses_the_same_every_time():
    """The parse's speed (well under a millisecond for 8 GPUs) is measured by `make bench` (parse phase);
    here: repeated parses of the same output (the command cache warm) give the same, right snapshot."""
    eight = "".join("%d, NVIDIA H100 80GB HBM3, 81559 MiB, %d MiB\n" % (i, 1000 * i) for i in range(8))
    first = parse(eight)
    for _round in range(200):
        assert parse(eight) == first
    assert [gpu["memory_free_bytes"] for gpu in first] == [1000 * i * 1048576 for i in range(8)]
    assert all(gpu["memory_total_bytes"] == 81559 * 1048576 for gpu in first)


# --------------------------------------------------------------------------------------------------
# rocm-smi


ROCM_CSV = ("device,Device Name,Temperature (Sensor edge) (C),VRAM Total Memory (B),VRAM Total Used Memory (B)\n"
            "card0,Radeon RX 7900 XTX,31.0,25753026560,27947008\n"
            "card1,Radeon RX 7900 XTX,N/A,25753026560,27947008\n")


def test_rocm_warning_lines_are_skipped():
    warning = "WARNING: AMD GPU device(s) is/are in a low-power state. Check power control/runtime_status\n\n"
    gpus = parse(warning + ROCM_CSV, cmd="rocm-smi --showtemp --showmeminfo vram --csv")
    assert [g["memory_free_bytes"] for g in gpus] == [25753026560 - 27947008] * 2
    assert gpus[1]["temperature_c"] is None


def test_rocm_json_one_line_like_the_tool_prints_it():
    line = json.dumps({"card0": {"GPU use (%)": "7", "VRAM Total Memory (B)": "100", "VRAM Total Used Memory (B)": "40",
                                 "Card Series": "MI300X"}, "system": {"Driver version": "6.8"}})
    (gpu,) = parse("WARNING: No AMD GPUs specified\n" + line + "\n\n", cmd="rocm-smi --json")
    assert (gpu["index"], gpu["name"], gpu["utilization_gpu_percent"], gpu["memory_free_bytes"]) == (0, "MI300X", 7, 60)


def test_rocm_csv_cut_off_mid_row_is_unparseable():
    err = failure(ROCM_CSV + "card2,Radeon RX 79", cmd="rocm-smi --csv")
    assert "cut off" in err.msg


def test_rocm_csv_followed_by_the_system_block():
    text = ROCM_CSV + '\nname, value\n"Driver version", "6.8.5"\n'
    gpus = parse(text, cmd="rocm-smi --showdriverversion --showmeminfo vram --csv")
    assert len(gpus) == 2 and "Driver version" not in gpus[0]["fields"]


def test_rocm_new_style_system_csv_has_no_gpus():
    err = failure('name, value\n"Driver version", "6.8.5"\n', cmd="rocm-smi --showdriverversion --csv")
    assert "no per-GPU values" in err.msg


def test_rocm_table_with_old_spacing_and_error_lines():
    text = ("========================= ROCm System Management Interface =========================\n"
            "GPU[0] \t\t: GPU ID: 0x687f\n"
            "ERROR: GPU[1] \t\t: Unable to get GPU memory use.\n"
            "GPU[1] \t\t: Unable to get voltage curve\n"
            "GPU[1] \t\t: VRAM Total Memory (B): 8\n"
            "=============================== End of ROCm SMI Log ================================\n")
    gpus = parse(text, cmd="rocm-smi -i")
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["fields"] == {"GPU ID": "0x687f"}
    assert gpus[1]["memory_total_bytes"] == 8


def test_rocm_concise_table_is_not_half_read():
    text = "============ ROCm System Management Interface ============\nDevice  Node  IDs  Temp\n0       1     0x74  31.0C\n"
    err = failure(text, cmd="rocm-smi")
    assert err.reason == "unparseable" and "Device  Node" in err.msg


def test_textfsm_missing_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(tool_parsing, "textfsm", None)
    err = failure("GPU[0]\t\t: GPU use (%): 1\n", cmd="rocm-smi --showuse")
    assert "textfsm" in err.msg and "--json" in err.msg


# --------------------------------------------------------------------------------------------------
# amd-smi


def test_amdsmi_json_memory_temperature_and_name():
    data = [{"gpu": 3, "asic": {"market_name": "AMD Instinct MI300X"},
             "usage": {"gfx_activity": {"value": 42, "unit": "%"}, "vcn_activity": [{"value": 0, "unit": "%"}, "N/A"]},
             "temperature": {"edge": "N/A", "hotspot": {"value": 40, "unit": "\u00b0C"}},
             "mem_usage": {"total_vram": {"value": 196592, "unit": "MB"}, "used_vram": {"value": 292, "unit": "MB"}}}]
    (gpu,) = parse(json.dumps(data, indent=4), cmd="amd-smi metric --json")
    assert gpu["index"] == 3 and gpu["name"] == "AMD Instinct MI300X"
    assert gpu["utilization_gpu_percent"] == 42 and gpu["temperature_c"] == 40
    assert gpu["memory_total_bytes"] == 196592 * MIB
    assert gpu["memory_free_bytes"] == (196592 - 292) * MIB
    assert gpu["fields"]["usage.vcn_activity.0"] == "0 %"
    assert gpu["fields"]["usage.vcn_activity.1"] is None
    assert gpu["fields"]["temperature.edge"] is None


def test_amdsmi_unknown_memory_unit_is_unparseable():
    data = [{"gpu": 0, "mem_usage": {"total_vram": {"value": 1, "unit": "PB"}}}]
    assert failure(json.dumps(data), cmd="amd-smi metric -m --json").reason == "unparseable"


def test_amdsmi_monitor_row_with_missing_cells():
    text = "GPU  POWER  GPU_TEMP\n  0  171 W\n"
    err = failure(text, cmd="amd-smi monitor -pt")
    assert "1 values for 2 columns" in err.msg


def test_amdsmi_monitor_na_cells():
    (gpu,) = parse("GPU  POWER  GPU_TEMP  VRAM_USED  VRAM_TOTAL\n  0    N/A     N/A     10 MB     100 MB\n",
                   cmd="amd-smi monitor")
    assert gpu["power_draw_w"] is None and gpu["temperature_c"] is None
    assert gpu["memory_free_bytes"] == 90 * MIB


# --------------------------------------------------------------------------------------------------
# backend detection


@pytest.mark.parametrize("cmd, stdout, backend", [
    ("nvidia-smi --query-gpu=index --format=csv,noheader", "", "nvidia"),
    ("/opt/rocm/bin/rocm-smi --json", "", "rocm"),
    ("amd-smi metric --json", "", "amdsmi"),
    ("/usr/local/bin/gpu-report", '{"card0": {}}', "rocm"),
    ("/usr/local/bin/gpu-report", "WARNING: x\ndevice,GPU use (%)\n", "rocm"),
    ("/usr/local/bin/gpu-report", "GPU[0]\t\t: GPU use (%): 0\n", "rocm"),
    ("/usr/local/bin/gpu-report", '[{"gpu": 0}]', "amdsmi"),
    ("/usr/local/bin/gpu-report", "GPU  POWER  GPU_TEMP\n", "amdsmi"),
    ("/usr/local/bin/gpu-report", "0, GPU, 1 MiB, 1 MiB\n", "nvidia"),
])
def test_detect_backend(cmd, stdout, backend):
    assert telemetry.detect_backend(cmd, stdout) == backend


def test_explicit_backend_wins_over_detection():
    with pytest.raises(telemetry.QueryFailure) as caught:
        parse(TWO_GPUS, cmd=DEFAULT_CMD, backend="rocm")
    assert caught.value.reason == "unparseable"
    with pytest.raises(ValueError):
        parse(TWO_GPUS, backend="intel")
