"""Every real capture in tests/fixtures/gpu parses to its hand-written expectation (capture_expectations.py).

The test enumerates the fixture directory, so a capture added without an expectation row fails
``test_every_capture_has_an_expectation``; each row then checks the GPU count and, per GPU, every
standard snapshot key (index, name, uuid, memory total/used/free, utilisation, temperature, power,
health, the nulls included) and a few ``fields`` entries, or, for a failure capture, the reason.
"""

from __future__ import annotations

import json

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import telemetry
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import parse_header
from tests.unit.plugins.plugin_utils.capture_expectations import EXPECTATIONS, Capture
from tests.toolchains import REPO

FIXTURES = REPO / "tests" / "fixtures" / "gpu"

STANDARD = {
    "index": "index",
    "name": "name",
    "uuid": "uuid",
    "memory_total_bytes": "total",
    "memory_used_bytes": "used",
    "memory_free_bytes": "free",
    "utilization_gpu_percent": "util",
    "temperature_c": "temp",
    "power_draw_w": "power",
    "health": "health",
}


def capture_files() -> list[str]:
    return sorted(
        path.relative_to(FIXTURES).as_posix()
        for path in FIXTURES.rglob("*")
        if path.is_file() and path.suffix != ".md"
    )


def read_capture(name: str) -> str:
    # Captures are UTF-8 text (the amd-smi table has a degree sign); bytes kept exactly, no newline translation.
    return (FIXTURES / name).read_bytes().decode("utf-8")


def command_for(name: str, expect: Capture, text: str) -> str:
    if "{header}" not in expect.cmd:
        return expect.cmd
    header = parse_header(text.split("\n", 1)[0])
    assert header is not None, "%s: first line is not a header" % name
    return expect.cmd.format(header=",".join(field for field, _unit in header))


def run(name: str, expect: Capture, cmd: str | None = None):
    text = read_capture(name)
    cmd = command_for(name, expect, text) if cmd is None else cmd
    stdout, stderr = (text, "") if expect.stream == "stdout" else ("", text)
    return cmd, stdout, telemetry.parse_gpus(cmd, stdout, stderr, expect.rc)


def test_fixture_directory_is_there():
    assert len(capture_files()) >= 48, "the capture set in tests/fixtures/gpu looks incomplete"


def test_every_capture_has_an_expectation():
    files = set(capture_files())
    missing = sorted(files - set(EXPECTATIONS))
    stale = sorted(set(EXPECTATIONS) - files)
    assert not missing, "captures without an expectation row in capture_expectations.py: %s" % missing
    assert not stale, "expectation rows for captures that do not exist: %s" % stale


def assert_gpus_match(name: str, gpus: list[dict], expect: Capture) -> None:
    assert len(gpus) == len(expect.gpus), "%s: GPU count" % name
    for position, (gpu, want) in enumerate(zip(gpus, expect.gpus)):
        where = "%s, GPU #%d" % (name, position)
        assert tuple(gpu) == telemetry.GPU_KEYS, where
        for key, attr in STANDARD.items():
            expected = getattr(want, attr)
            assert gpu[key] == expected, "%s: %s is %r, expected %r" % (where, key, gpu[key], expected)
            if expected is not None and key.startswith("memory_"):
                assert isinstance(gpu[key], int), "%s: %s must be an exact integer" % (where, key)
        for field, expected in want.fields.items():
            assert field in gpu["fields"], "%s: fields has no %r" % (where, field)
            assert gpu["fields"][field] == expected, "%s: fields[%r]" % (where, field)


@pytest.mark.parametrize("name", sorted(EXPECTATIONS))
def test_capture(name):
    expect = EXPECTATIONS[name]
    assert (FIXTURES / name).is_file(), "%s is listed but missing" % name
    if expect.reason is not None:
        with pytest.raises(telemetry.QueryFailure) as caught:
            run(name, expect)
        failure = caught.value
        assert failure.reason == expect.reason, "%s: %s" % (name, failure.msg)
        for text in expect.msg_has:
            assert text in failure.msg, "%s: %r not in %r" % (name, text, failure.msg)
        assert failure.rc == expect.rc
        assert failure.output_head.strip(), "%s: the failure keeps the first lines of the output" % name
        return
    cmd, stdout, gpus = run(name, expect)
    assert telemetry.detect_backend(cmd, stdout) == expect.backend
    assert_gpus_match(name, gpus, expect)
    snapshot = telemetry.build_snapshot(agent="a", backend=expect.backend, gpus=gpus,
                                        captured_at="2026-01-01T00:00:00Z", query_ms=1.0)
    assert json.loads(json.dumps(snapshot)) == snapshot


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTATIONS.items() if e.reason is None))
def test_capture_without_the_command(name):
    """`hwledger gpu parse FILE` without --cmd: backend and layout are told from the output alone,
    except for noheader CSV, whose columns exist only in the command (a clear failure then)."""
    expect = EXPECTATIONS[name]
    if expect.cmd.startswith(("nvidia-smi", "./nvidia-smi")) and "noheader" in expect.cmd:
        with pytest.raises(telemetry.QueryFailure) as caught:
            run(name, expect, cmd="")
        assert caught.value.reason == "unparseable"
        assert "--query-gpu=" in caught.value.msg
        return
    _cmd, stdout, gpus = run(name, expect, cmd="")
    assert telemetry.detect_backend("", stdout) == expect.backend
    assert_gpus_match(name, gpus, expect)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTATIONS.items() if e.reason == "unparseable"))
def test_unread_formats_are_told_from_the_output_alone(name):
    """nvidia-smi's table, -q, -q -x, dmon and process lists fail the same way without the command: the
    output itself says what it is, and the message says what to run instead."""
    expect = EXPECTATIONS[name]
    with pytest.raises(telemetry.QueryFailure) as caught:
        run(name, expect, cmd="")
    assert caught.value.reason == "unparseable"
    for text in expect.msg_has:
        assert text in caught.value.msg, "%s: %r not in %r" % (name, text, caught.value.msg)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTATIONS.items() if e.reason in (None, "unparseable")))
def test_only_headerless_csv_needs_the_command(name):
    """`hwledger gpu parse` asks for --cmd exactly when the output does not name its own columns (it asks
    only about output that did not parse, so the tools' error messages are not in question here)."""
    expect = EXPECTATIONS[name]
    headerless = expect.cmd.startswith(("nvidia-smi", "./nvidia-smi")) and "noheader" in expect.cmd
    text = read_capture(name)
    stdout = text if expect.stream == "stdout" else ""
    assert telemetry.needs_command(stdout) is (headerless and expect.reason is None), name


def test_crlf_copies_of_every_capture_parse_the_same():
    """Windows line ends (whether nvidia-smi.exe writes them is unknown, FORMATS.md) change nothing."""
    for name, expect in EXPECTATIONS.items():
        if expect.reason is not None:
            continue
        text = read_capture(name)
        cmd = command_for(name, expect, text)
        gpus = telemetry.parse_gpus(cmd, text.replace("\n", "\r\n"), "", 0)
        assert gpus == telemetry.parse_gpus(cmd, text, "", 0), name
