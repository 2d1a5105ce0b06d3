"""Reading job logs in the heartbeat's exec (job_log_read): the sh piece run for real with /bin/sh on real
files, its parser, and the checks on what goes into the script."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log, job_log_read, probe
from ansible_collections.hwledger.fleet.plugins.plugin_utils.job_log_read import LogRead

TOKEN = "hwl" + "ab" * 12


def _job_dir(tmp_path, job_id):
    path = tmp_path / f"hwledger-job-{job_id}-Ab12Cd"
    path.mkdir(mode=0o700)
    return path


def _run_piece(reads) -> bytes:
    script = f"B={TOKEN}\n" + job_log_read.script_piece(reads)
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True, timeout=60).stdout


def test_the_piece_reads_from_the_offset_and_the_parser_gets_the_exact_bytes(tmp_path):
    job_id = str(uuid.uuid4())
    directory = _job_dir(tmp_path, job_id)
    content = job_log.encode_record("o", 0, b"line\n\x1b[31m fake\n" + TOKEN.encode() + b" log x done\n")
    (directory / job_log.file_name(0)).write_bytes(content)
    read = LogRead(job_id, str(directory), 0, 3)
    chunks = job_log_read.parse(_run_piece([read]), TOKEN, [read])[job_id]
    assert len(chunks) == 1
    chunk = chunks[0]
    assert (chunk.kind, chunk.generation, chunk.offset, chunk.size) == ("data", 0, 3, len(content))
    assert chunk.data == content[3:] and chunk.remote_dir == str(directory)


def test_the_piece_reads_the_next_file_too_and_says_gone_and_none(tmp_path):
    job_id, other, ended = (str(uuid.uuid4()) for _id in range(3))
    directory = _job_dir(tmp_path, job_id)
    (directory / job_log.file_name(1)).write_bytes(b"A" * 10)
    (directory / job_log.file_name(2)).write_bytes(b"B" * 5)
    reads = [LogRead(job_id, str(directory), 0, 7),  # generation 0 rotated away: the oldest left, from 0
             LogRead(other, str(_job_dir(tmp_path, other))),
             LogRead(ended, str(tmp_path / f"hwledger-job-{ended}-Zz9999"))]
    found = job_log_read.parse(_run_piece(reads), TOKEN, reads)
    assert [(c.kind, c.generation, c.offset, c.data) for c in found[job_id]] == [
        ("data", 1, 0, b"A" * 10), ("data", 2, 0, b"B" * 5)]
    assert [c.kind for c in found[other]] == ["none"]
    assert [c.kind for c in found[ended]] == ["gone"]


def test_a_read_is_bounded_per_file_section(tmp_path):
    job_id = str(uuid.uuid4())
    directory = _job_dir(tmp_path, job_id)
    (directory / job_log.file_name(0)).write_bytes(b"x" * (job_log_read.READ_BYTES + 5000))
    read = LogRead(job_id, str(directory))
    output = _run_piece([read])
    assert len(output) <= job_log_read.max_output_bytes(1)
    [chunk] = job_log_read.parse(output, TOKEN, [read])[job_id]
    assert len(chunk.data) == job_log_read.READ_BYTES and chunk.size == job_log_read.READ_BYTES + 5000


@pytest.mark.parametrize("read", [
    LogRead("not-a-uuid", "/tmp/hwledger-job-not-a-uuid-Ab12Cd"),
    LogRead("0c0e3a4b-0000-4000-8000-000000000000", "/tmp/hwledger-job-0c0e3a4b-0000-4000-8000-000000000000-A; rm -rf ~"),
    LogRead("0c0e3a4b-0000-4000-8000-000000000000", "/tmp/hwledger-job-ffffffff-0000-4000-8000-000000000000-Ab12Cd"),
    LogRead("0c0e3a4b-0000-4000-8000-000000000000", "relative/hwledger-job-0c0e3a4b-0000-4000-8000-000000000000-Ab12Cd"),
    LogRead("0c0e3a4b-0000-4000-8000-000000000000", "/tmp/hwledger-job-0c0e3a4b-0000-4000-8000-000000000000-Ab12Cd", -1),
    LogRead("0c0e3a4b-0000-4000-8000-000000000000", "/tmp/hwledger-job-0c0e3a4b-0000-4000-8000-000000000000-Ab12Cd", 0, True),
])
def test_what_goes_into_the_script_is_checked(read):
    with pytest.raises(ValueError):
        job_log_read.script_piece([read])


def test_the_parser_takes_only_jobs_asked_and_stops_at_junk_or_a_cut():
    job_id, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    read = LogRead(job_id, f"/tmp/hwledger-job-{job_id}-Ab12Cd")
    head = f"{TOKEN} log {job_id} data 0 0 5 5\n".encode()
    good = head + b"hello\n"
    assert [c.data for c in job_log_read.parse(good, TOKEN, [read])[job_id]] == [b"hello"]
    assert job_log_read.parse(f"{TOKEN} log {stranger} none\n".encode(), TOKEN, [read]) == {}
    assert job_log_read.parse(head + b"hel", TOKEN, [read]) == {}  # cut: read again at the next tick
    other_token = good.replace(TOKEN.encode(), b"hwl" + b"cd" * 12)
    assert job_log_read.parse(other_token, TOKEN, [read]) == {}


def test_the_probe_runs_the_piece_after_done_and_evaluate_returns_its_chunks(tmp_path):
    job_id = str(uuid.uuid4())
    directory = _job_dir(tmp_path, job_id)
    (directory / job_log.file_name(0)).write_bytes(job_log.encode_record("o", 0, b"hi\n"))
    read = LogRead(job_id, str(directory))
    script = probe.remote_script("echo 'index, name'; echo '0, GPU'", timeout_s=5, host_metrics=False, query=False,
                                 log_reads=[read])
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=False, timeout=60)
    outcome = probe.evaluate(agent="a", cmd="x", backend="nvidia", exec_stdout=done.stdout.decode("utf-8", "surrogateescape"),
                             exec_stderr="", exec_rc=done.returncode, started=0.0, ended=1.0, host_metrics=False,
                             query=False, log_reads=[read])
    assert outcome.ok
    assert [(c.job_id, c.kind, c.data) for c in outcome.job_logs] == [
        (job_id, "data", job_log.encode_record("o", 0, b"hi\n"))]
