"""kill -9 the server at each job transition, start it again: every job ends in exactly the state it must,
no job runs twice, no fetched result is lost, the dead server's ansible-playbook runs are stopped, and the
job's remote dir is removed.

The server kills itself with a real SIGKILL right after the named step when HWLEDGER_CRASH_AT is set
(hwledger.job_runs.crash_point): nothing of it runs after that point, as with kill -9 from outside.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema as jobs_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils.processes import mentioning as processes_mentioning
from hwledger.job_runs import CRASH_POINTS
from hwledger.store import JOB_TERMINAL_STATES
from tests.integration.fleet_support import wait_for

# Each job runs the real job playbook (several seconds); deselect with -m 'not slow' while iterating.
pytestmark = pytest.mark.slow

# What each crash point leaves, and why the restarted server must end the job `succeeded` every time:
#   dispatched: handed to a worker, nothing started    -> run (once)
#   running:    committed, the job playbook not started -> nothing ran: queued again, run (once)
#   remote_dir: mid-playbook (the remote dir exists)    -> the old run is stopped and the host asked: its
#               result if the runner was launched, else the dir is removed and the job queued again
#   launched:   the runner started on the host          -> reconciled: its result read on the host
#   fetched:    result fetched, state not yet written   -> the result decides
#   finished:   terminal state written                  -> nothing changes
# (the job takes no time: whatever the old run did, the job ran exactly once and succeeded.)
EXPECTED_PATHS = {
    "dispatched": [["queued", "dispatched", "running", "succeeded"]],
    "running": [["queued", "dispatched", "running", "queued", "dispatched", "running", "succeeded"]],
    "remote_dir": [["queued", "dispatched", "running", "succeeded"],
                   ["queued", "dispatched", "running", "queued", "dispatched", "running", "succeeded"]],
    "launched": [["queued", "dispatched", "running", "succeeded"]],
    "fetched": [["queued", "dispatched", "running", "succeeded"]],
    "finished": [["queued", "dispatched", "running", "succeeded"]],
}


@pytest.fixture(scope="module")
def python_host(lab):
    host = lab.add_loopback_host(lab.unique_name("crash"), python=True)
    yield host
    host.stop()


def test_every_crash_point_is_covered():
    assert set(EXPECTED_PATHS) == set(CRASH_POINTS)


def _crash(fleet_env, point: str, *command: str, timeout: str = "60") -> str:
    """Submit a job, let a server run it until it kills itself at `point`; returns the job id."""
    submit = fleet_env.hw("job", "submit", "--agent", "crash", "--timeout", timeout, "--", *command)
    assert submit.returncode == 0, submit.stderr
    crashed = fleet_env.serve("--interval", "0.5", "--log-level", "DEBUG", extra_env={"HWLEDGER_CRASH_AT": point})
    try:
        assert crashed.wait(90) == -signal.SIGKILL, fleet_env.server_log()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server never reached {point}:\n{fleet_env.server_log()[-6000:]}") from None
    return submit.stdout.strip()


def _settle_after_restart(fleet_env, job_id: str):
    """Start a server again and wait until the job is settled and cleaned up; returns (job, history)."""
    with fleet_env.store() as store:
        attempted_before = store.get_agent("crash").last_attempt
    restarted = fleet_env.serve("--interval", "0.5")
    with fleet_env.store() as store:
        # The restarted server has ticked (so it has done its start-up recovery) ...
        wait_for(lambda: store.get_agent("crash").last_attempt != attempted_before, timeout=60,
                 what="the restarted server's first tick")
        job = wait_for(lambda: (j := store.get_job(job_id)).terminal and not j.cleanup_pending and j,
                       timeout=180, what="the job to settle after the restart")
        history = [e.detail["new"] for e in store.list_events(job_id=job_id) if e.kind == "job_state"]
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(10) == 0, fleet_env.server_log()
    return job, history


def _nothing_left(fleet_env, job) -> None:
    """No remote dir, no process of any run (the dead server's included), no run dir."""
    if job.remote_dir:
        assert not os.path.exists(job.remote_dir), job.remote_dir
    runs_dir = fleet_env.data_dir / "runs"
    assert processes_mentioning(runs_dir) == {}
    assert list(runs_dir.iterdir()) == []
    assert processes_mentioning(f"hwledger-job-{job.id}") == {}


def _hang_the_dead_servers_runs(fleet_env) -> list[int]:
    """SIGSTOP what is left of the dead server's runs: as when they hang on the pipe to the dead server
    (the issue this reproduces), so only the restarted server can settle the job, from what the host shows."""
    pids = list(processes_mentioning(fleet_env.data_dir / "runs"))
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_at_a_transition_then_restart(point, fleet_env, python_host, tmp_path):
    fleet_env.register(python_host, name="crash")
    marker = tmp_path / "ran.log"
    job_id = _crash(fleet_env, point, "sh", "-c", f"echo ran >> {marker}; echo result-out")
    with fleet_env.store() as store:
        at_crash = store.get_job(job_id)
    assert at_crash.state in ({"finished": JOB_TERMINAL_STATES}.get(point, {"dispatched", "running"}))

    job, history = _settle_after_restart(fleet_env, job_id)
    print(f"crash at {point}: {at_crash.state} -> {job.state} ({job.error}) via {history}")
    assert history in EXPECTED_PATHS[point], (history, job.error, fleet_env.server_log(0), fleet_env.server_log())
    assert job.state == "succeeded" and job.exit_code == 0 and job.attempts == 1
    assert job.result["stdout_tail"].strip() == "result-out"
    assert marker.read_text().splitlines() == ["ran"]  # exactly once
    # The result is in the store; its file was deleted once that was committed (or at the restart).
    assert not jobs_schema.result_path(fleet_env.data_dir / "results", job_id).exists()
    _nothing_left(fleet_env, job)


def test_a_job_that_finished_while_the_server_was_dead_gets_its_real_exit_code(fleet_env, python_host, tmp_path):
    fleet_env.register(python_host, name="crash")
    marker = tmp_path / "ran.log"
    job_id = _crash(fleet_env, "launched", "sh", "-c", f"echo ran >> {marker}; sleep 2; echo done >> {marker}; exit 7")
    hung = _hang_the_dead_servers_runs(fleet_env)
    with fleet_env.store() as store:
        remote_dir = Path(store.get_job(job_id).remote_dir)
    # The job ends on the host while no server listens: its result waits there.
    wait_for((remote_dir / "result.json").exists, timeout=60, what="the job to finish on the host")
    assert marker.read_text().splitlines() == ["ran", "done"]

    job, history = _settle_after_restart(fleet_env, job_id)
    assert history == ["queued", "dispatched", "running", "failed"], (history, job.error)
    assert (job.state, job.exit_code, job.attempts) == ("failed", 7, 1)
    assert marker.read_text().splitlines() == ["ran", "done"]
    assert all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
               for pid in hung)  # the dead server's runs were stopped by the new server
    _nothing_left(fleet_env, job)


def test_a_job_still_running_after_the_restart_is_followed_to_its_end(fleet_env, python_host, tmp_path):
    fleet_env.register(python_host, name="crash")
    marker = tmp_path / "ran.log"
    job_id = _crash(fleet_env, "launched", "sh", "-c", f"echo ran >> {marker}; sleep 6; echo done >> {marker}; echo out")
    _hang_the_dead_servers_runs(fleet_env)
    # "launched" is job_start's answer: the runner was started detached, and its command may take a moment.
    wait_for(marker.exists, timeout=30, what="the job's command to run on the host")
    assert marker.read_text().splitlines() == ["ran"]  # still running when the new server starts

    job, history = _settle_after_restart(fleet_env, job_id)
    assert history == ["queued", "dispatched", "running", "succeeded"], (history, job.error)
    assert (job.state, job.exit_code, job.attempts) == ("succeeded", 0, 1)
    assert job.result["stdout_tail"] == "out\n"
    assert marker.read_text().splitlines() == ["ran", "done"]  # followed to its end, never started again
    _nothing_left(fleet_env, job)
