"""kill -9 the server at each job transition, start it again: every job ends in exactly one terminal
state, no job runs twice, no fetched result is lost, and an interrupted job's remote dir is removed.

The server kills itself with a real SIGKILL right after the named step when HWLEDGER_CRASH_AT is set
(hwledger.server.crash_point): nothing of it runs after that point, as with kill -9 from outside.
"""

from __future__ import annotations

import os
import signal

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema as jobs_schema
from hwledger.job_runs import CRASH_POINTS
from hwledger.store import JOB_TERMINAL_STATES
from tests.integration.fleet_support import wait_for
from ansible_collections.hwledger.fleet.plugins.plugin_utils.processes import mentioning as processes_mentioning

# Each job runs the real job playbook (several seconds); deselect with -m 'not slow' while iterating.
pytestmark = pytest.mark.slow

# What each crash point leaves, and how the restarted server must settle it.
#   dispatched: handed to a worker, nothing started    -> the restarted server runs it once
#   running:    committed, the job playbook not started -> lost (nothing ran), nothing to clean
#   remote_dir: mid-playbook (the remote dir exists)    -> the old run's result if it got one, else lost
#   fetched:    result fetched, state not yet written   -> the result decides (succeeded)
#   finished:   terminal state written                  -> nothing changes
EXPECTED = {
    "dispatched": {"succeeded"},
    "running": {"lost"},
    "remote_dir": {"succeeded", "lost"},
    "fetched": {"succeeded"},
    "finished": {"succeeded"},
}


@pytest.fixture(scope="module")
def python_host(lab):
    host = lab.add_loopback_host(lab.unique_name("crash"), python=True)
    yield host
    host.stop()


def test_every_crash_point_is_covered():
    assert set(EXPECTED) == set(CRASH_POINTS)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_at_a_transition_then_restart(point, fleet_env, python_host, tmp_path):
    fleet_env.register(python_host, name="crash")
    marker = tmp_path / "ran.log"
    submit = fleet_env.hw("job", "submit", "--agent", "crash", "--timeout", "60", "--",
                          "sh", "-c", f"echo ran >> {marker}; echo result-out")
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()

    crashed = fleet_env.serve("--interval", "0.5", extra_env={"HWLEDGER_CRASH_AT": point})
    assert crashed.wait(90) == -signal.SIGKILL, fleet_env.server_log()
    with fleet_env.store() as store:
        at_crash = store.get_job(job_id)
    assert at_crash.state in ({"finished": JOB_TERMINAL_STATES}.get(point, {"dispatched", "running"}))

    with fleet_env.store() as store:
        attempts_before = store.get_agent("crash").last_attempt
    restarted = fleet_env.serve("--interval", "0.5")
    with fleet_env.store() as store:
        # The restarted server has ticked (so it has done its start-up recovery) ...
        wait_for(lambda: store.get_agent("crash").last_attempt != attempts_before, timeout=60,
                 what="the restarted server's first tick")
        # ... and settled the job and its clean-up.
        job = wait_for(lambda: (j := store.get_job(job_id)).terminal and not j.cleanup_pending and j,
                       timeout=120, what=f"job to settle after a crash at {point}")
        history = [e for e in store.list_events(job_id=job_id) if e.kind == "job_state"]
    print(f"crash at {point}: {at_crash.state} -> {job.state} ({job.error})")
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(10) == 0, fleet_env.server_log()

    assert job.state in EXPECTED[point], (job.state, job.error, fleet_env.server_log(0), fleet_env.server_log())
    # Exactly one terminal state, reached once, and transitions only ever move forward.
    terminal = [e for e in history if e.detail["new"] in JOB_TERMINAL_STATES]
    assert len(terminal) == 1 and terminal[0].detail["new"] == job.state
    order = ["queued", "dispatched", "running"]
    steps = [e.detail["new"] for e in history[:-1]]
    assert steps == order[:len(steps)], steps
    # Never twice.
    runs = marker.read_text().splitlines() if marker.exists() else []
    assert len(runs) <= 1
    if point == "running":
        assert runs == []  # the playbook never started
    if job.state == "succeeded":
        assert runs == ["ran"]
        assert job.result["stdout_tail"].strip() == "result-out"
        # The result is in the store; its file was deleted once that was committed (or at the restart).
        assert not jobs_schema.result_path(fleet_env.data_dir / "results", job_id).exists()
        assert job.attempts == 1
    # Nothing left behind: the remote dir, the old run's processes and its private dir.
    if job.remote_dir:
        assert not os.path.exists(job.remote_dir), job.remote_dir
    runs_dir = fleet_env.data_dir / "runs"
    assert processes_mentioning(runs_dir) == {}
    assert list(runs_dir.iterdir()) == []
