"""`hwledger job logs -f` against a real serve loop, real sshd hosts and the real job playbook, on both
heartbeat transports: lines come as the job prints them (in order, the first ones while it still runs),
escape sequences arrive escaped, and a job printing 50 MiB stays within the bounds on the host's disk and
in the store."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log

from hwledger.fanout import SshFanoutHeartbeat
from hwledger.server import Server
from hwledger.store import job_logs as store_job_logs
from tests.integration.fleet_support import wait_for

pytestmark = pytest.mark.slow

TRANSPORTS = ["fanout", "ansible"]
# The most a job's log takes on its host: its files, plus the one record that may pass the rotation size.
REMOTE_BOUND = job_log.KEEP_FILES * job_log.ROTATE_BYTES + job_log.MAX_RECORD_BYTES + job_log.MAX_HEADER_BYTES


@pytest.fixture
def python_host(lab):
    host = lab.add_loopback_host(lab.unique_name("logs"), python=True)
    yield host
    host.stop()


@pytest.fixture
def serving(fleet_env):
    """Start `serve` (its loop in a thread, one tick a second) with the transport asked for."""
    started: list[tuple[threading.Thread, list]] = []

    def start(transport: str) -> None:
        holder: list = []

        def loop() -> None:
            fleet = fleet_env.fleet()
            heartbeat = SshFanoutHeartbeat(fleet.policy()) if transport == "fanout" else None
            holder.append(Server(fleet, interval_s=1, transport=heartbeat))
            holder[0].run()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        wait_for(lambda: holder, timeout=60, what="the server to start")
        started.append((thread, holder))

    yield start
    for thread, holder in started:
        holder[0].request_stop()
        thread.join(timeout=120)


def _submit(fleet_env, agent: str, *command: str) -> str:
    proc = fleet_env.hw("job", "submit", "--agent", agent, "--timeout", "300", "--", *command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _job(fleet_env, job_id):
    with fleet_env.store() as store:
        return store.get_job(job_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_follow_shows_lines_as_they_come_escaped_and_exits_with_the_job_s_code(
        fleet_env, serving, python_host, transport):
    fleet_env.register(python_host)
    script = ("for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; echo err $i >&2; sleep 1; done; "
              r"printf '\033[2J\033]0;owned\007red\rfake\n'; exit 3")
    job_id = _submit(fleet_env, python_host.name, "sh", "-c", script)
    # The follower starts before the job does: it waits for it (and says so before the server starts).
    follower = subprocess.Popen([sys.executable, "-m", "hwledger", "job", "logs", "-f", job_id], env=fleet_env.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first_note = follower.stderr.readline().decode()
    assert first_note == f"hwledger: job {job_id} is queued; waiting for it to start\n", first_note
    serving(transport)
    lines, states_when_seen = [], []
    try:
        for raw in follower.stdout:
            lines.append(raw)
            states_when_seen.append(_job(fleet_env, job_id).state)
        code = follower.wait(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    err = first_note + follower.stderr.read().decode()
    assert lines == [f"line {n}\n".encode() for n in range(1, 11)] + [b"\\x1b[2J\\x1b]0;owned\\x07red\\x0dfake\n"]
    # The first lines came while the job still ran (not all at its end, from the result).
    assert states_when_seen[:3] == ["running"] * 3, states_when_seen
    assert code == 3
    assert [line for line in err.splitlines() if line.startswith("err ")] == [f"err {n}" for n in range(1, 11)]
    assert f"hwledger: job {job_id} failed (exit code 3)" in err and "waiting for it to start" in err
    assert "\x1b" not in err
    # Done: `job logs` on the finished job prints what was kept, the same.
    again = fleet_env.hw("job", "logs", "--stdout", job_id)
    assert again.returncode == 0 and again.stdout.encode() == b"".join(lines)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_job_printing_50_mib_stays_within_the_bounds_on_the_host_and_in_the_store(
        fleet_env, serving, python_host, transport, monkeypatch):
    # A small bound in the store (the server runs in this process), so that this job's output passes it: one
    # tick's read (128 KiB or more) and the end taken from the result (64 KiB) are already over it.
    kept = 128 * 1024
    monkeypatch.setattr(store_job_logs, "LOG_KEPT_BYTES", kept)
    fleet_env.register(python_host)
    # 50 MiB in lines, then time for the heartbeats to read what the rotating log still holds.
    printer = ("import sys, time\nline = b'0123456789abcdefghijklmnopqrstuvwxyz' * 28 + b'\\n'\n"
               "for _ in range(52428800 // len(line)): sys.stdout.buffer.write(line)\n"
               "sys.stdout.buffer.write(b'last line\\n'); sys.stdout.flush(); time.sleep(6)\n")
    job_id = _submit(fleet_env, python_host.name, "python3", "-c", printer)
    serving(transport)
    wait_for(lambda: (job := _job(fleet_env, job_id)).remote_dir and job, timeout=120, what="the job to start")
    remote_dir = Path(_job(fleet_env, job_id).remote_dir)  # the lab's host is this machine
    largest = 0
    deadline = time.monotonic() + 600  # the job takes seconds; this only stops a hang
    while not _job(fleet_env, job_id).terminal:
        # The job's log on the host, sampled as it grows and rotates.
        size = 0
        for entry in (remote_dir.glob(job_log.FILE_PREFIX + "*") if remote_dir.is_dir() else ()):
            try:
                size += entry.stat().st_size
            except FileNotFoundError:
                pass  # rotated away between the listing and the stat
        largest = max(largest, size)
        with fleet_env.store() as store:
            assert store.job_log_size(job_id)[1] <= kept
        time.sleep(0.05)
        assert time.monotonic() < deadline, "the job did not end"
    assert 0 < largest <= REMOTE_BOUND
    job = _job(fleet_env, job_id)
    assert job.state == "succeeded" and job.result["stdout_bytes"] == 52428800 // 1009 * 1009 + len("last line\n")
    with fleet_env.store() as store:
        rows, size = store.job_log_size(job_id)
    assert 0 < size <= kept
    shown = fleet_env.hw("job", "logs", job_id)
    assert shown.returncode == 0 and shown.stdout.endswith("\nlast line\n")
    assert "bytes of this job's output were dropped" in shown.stderr
    # The host's log rotated past what the ticks could read (256 KiB a tick at most): said, not hidden.
    assert "were lost here" in shown.stderr or "were not read before the job ended" in shown.stderr
