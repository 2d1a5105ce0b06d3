"""The job queue over real sshd hosts and the real job playbook: dispatch on the next heartbeat the agent
answers, one job per agent at a time, heartbeats keeping their cadence, cancel, and concurrent CLI writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hwledger.server import Server
from tests.integration.fleet_support import files_containing, wait_for
from ansible_collections.hwledger.fleet.plugins.plugin_utils.processes import mentioning as processes_mentioning

# Each job runs the real job playbook (several seconds); deselect with -m 'not slow' while iterating.
pytestmark = pytest.mark.slow


@pytest.fixture
def python_host(lab):
    host = lab.add_loopback_host(lab.unique_name("jobs"), python=True)
    yield host
    host.stop()


@pytest.fixture
def server(fleet_env):
    made = []

    def make(**kw) -> Server:
        made.append(Server(fleet_env.fleet(), **kw))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


def _submit(fleet_env, agent: str, *command: str) -> str:
    proc = fleet_env.hw("job", "submit", "--agent", agent, "--timeout", "120", "--", *command)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _job(fleet_env, job_id):
    with fleet_env.store() as store:
        return store.get_job(job_id)


def _wait_terminal(fleet_env, job_id, timeout=90):
    return wait_for(lambda: (j := _job(fleet_env, job_id)).terminal and j, timeout=timeout, what=f"job {job_id} to end")


def test_jobs_go_on_the_next_answered_heartbeat_one_per_agent_while_heartbeats_go_on(
        fleet_env, server, python_host, tmp_path):
    fleet_env.register(python_host)
    marker = tmp_path / "runs.log"  # the "remote" is this machine: the jobs append here
    first = _submit(fleet_env, python_host.name, "sh", "-c", f"echo first >> {marker}; sleep 4; echo out-first")
    second = _submit(fleet_env, python_host.name, "sh", "-c", f"echo second >> {marker}; exit 4")
    srv = server(interval_s=1)

    python_host.stop()
    report = srv.tick()
    assert report.dispatched == [] and _job(fleet_env, first).state == "queued"

    python_host.start()
    report = srv.tick()
    assert report.dispatched == [first]  # the host answered this tick: its oldest job goes, alone
    wait_for(lambda: _job(fleet_env, first).state == "running", timeout=30, what="first job running")
    # The job run's private dir (runner's artifacts, the spec file) holds no secret of ours.
    runs = fleet_env.data_dir / "runs"
    wait_for(lambda: any(runs.glob("run-job-*/artifacts/*/command")), timeout=30, what="the job run's artifacts")
    secrets_ = [fleet_env.canary.encode(), python_host.lab.client_key.read_bytes().splitlines()[1], b"PRIVATE KEY"]
    assert files_containing(runs, secrets_) == []
    # While it runs, heartbeats go on (the job runs in a worker) and the second job waits its turn.
    during = srv.tick()
    assert during.outcomes[python_host.name].ok and during.dispatched == []
    assert not _job(fleet_env, first).terminal  # the tick did not wait for the job
    assert _job(fleet_env, second).state == "queued"

    done = _wait_terminal(fleet_env, first)
    assert done.state == "succeeded" and done.exit_code == 0
    assert done.result["stdout_tail"].strip() == "out-first"
    # The store holds the result: the fetched file does not pile up in results/.
    assert not (fleet_env.data_dir / "results" / f"{first}.json").exists()
    assert done.attempts == 1 and not done.cleanup_pending

    srv.wait_for_workers(timeout=60)
    report = srv.tick()
    assert report.dispatched == [second]
    failed = _wait_terminal(fleet_env, second)
    assert (failed.state, failed.exit_code) == ("failed", 4)
    assert marker.read_text().splitlines() == ["first", "second"]  # each ran exactly once

    assert files_containing(fleet_env.root, secrets_) == []
    shown = json.loads(fleet_env.hw("job", "show", first, "--json").stdout)
    assert [e["new"] for e in shown["events"] if e["kind"] == "job_state"] == [
        "queued", "dispatched", "running", "succeeded"]


def test_a_host_without_python_fails_the_job_with_the_reason(fleet_env, server, fresh_host):
    fleet_env.register(fresh_host)  # the default lab host has no python3
    job_id = _submit(fleet_env, fresh_host.name, "true")
    srv = server()
    assert srv.tick().dispatched == [job_id]
    job = _wait_terminal(fleet_env, job_id)
    assert job.state == "failed" and "python3" in job.error


def test_cancel_a_queued_job_and_a_running_one(fleet_env, server, python_host, tmp_path):
    fleet_env.register(python_host)
    marker = tmp_path / "cancel.log"
    running = _submit(fleet_env, python_host.name, "sh", "-c",
                      f"echo started >> {marker}; sleep 60; echo done >> {marker}")
    queued = _submit(fleet_env, python_host.name, "sh", "-c", f"echo never >> {marker}")
    assert fleet_env.hw("job", "cancel", queued).returncode == 0
    assert _job(fleet_env, queued).state == "cancelled"

    srv = server()
    assert srv.tick().dispatched == [running]
    wait_for(lambda: marker.exists() and "started" in marker.read_text(), timeout=30, what="job started")
    remote_dir = _job(fleet_env, running).remote_dir
    assert remote_dir and remote_dir.startswith("/") and os.path.isdir(remote_dir)
    assert processes_mentioning(f"{remote_dir}/job.json"), "the remote runner should be running"

    started = time.monotonic()
    proc = fleet_env.hw("job", "cancel", running)
    assert proc.returncode == 0 and "stops it" in proc.stdout
    job = _wait_terminal(fleet_env, running, timeout=30)
    assert job.state == "cancelled" and time.monotonic() - started < 20
    # The remote side: runner stopped (and with it the job's sleep), private dir removed.
    wait_for(lambda: not _job(fleet_env, running).cleanup_pending, timeout=60, what="remote clean-up")
    wait_for(lambda: not processes_mentioning(f"{remote_dir}/job.json"), timeout=30, what="remote runner to stop")
    assert not os.path.exists(remote_dir)
    assert marker.read_text().splitlines() == ["started"]  # never "done", never the cancelled queued job


def test_sigterm_during_a_job_stops_in_time_and_the_next_server_cleans_up(fleet_env, python_host, tmp_path):
    fleet_env.register(python_host)
    marker = tmp_path / "long.log"
    job_id = _submit(fleet_env, python_host.name, "sh", "-c",
                     f"echo started >> {marker}; sleep 60; echo done >> {marker}")
    server = fleet_env.serve("--interval", "1")
    wait_for(marker.exists, timeout=60, what="the job to start on the host")
    remote_dir = wait_for(lambda: _job(fleet_env, job_id).remote_dir, timeout=30, what="the remote dir")
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0, fleet_env.server_log()
    assert time.monotonic() - started < 10  # did not wait for the job (60 s)
    runs = fleet_env.data_dir / "runs"
    assert processes_mentioning(runs) == {}  # no ansible-playbook, worker or ssh client of the server
    job = _job(fleet_env, job_id)
    assert job.state == "lost" and "stopped" in job.error and job.cleanup_pending

    restarted = fleet_env.serve("--interval", "1")
    wait_for(lambda: not _job(fleet_env, job_id).cleanup_pending, timeout=60, what="remote clean-up")
    wait_for(lambda: not processes_mentioning(f"{remote_dir}/job.json"), timeout=30, what="remote runner to stop")
    assert not os.path.exists(remote_dir)
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(10) == 0
    assert marker.read_text().splitlines() == ["started"]
    with fleet_env.store() as store:
        history = [e.detail["new"] for e in store.list_events(job_id=job_id) if e.kind == "job_state"]
    assert history == ["queued", "dispatched", "running", "lost"]


def test_cli_submissions_while_the_server_writes_lose_no_row(fleet_env, lab):
    down = lab.add_loopback_host(lab.unique_name("down"))
    up = lab.add_loopback_host(lab.unique_name("up"))
    try:
        fleet_env.register(down)
        fleet_env.register(up)
        down.stop()  # its jobs stay queued; its misses are written every tick
        server = fleet_env.serve("--interval", "0.2")
        with fleet_env.store() as store:
            wait_for(lambda: store.get_agent(up.name).state == "online", timeout=30, what="server ticking")
            snapshot_before = store.list_snapshots(up.name, limit=1)[0].id
        script = (
            "import sys\n"
            "from hwledger.cli import main\n"
            "for _ in range(5):\n"
            f"    assert main(['job', 'submit', '--agent', {down.name!r}, '--', 'true']) == 0\n"
        )
        writers = [subprocess.Popen([sys.executable, "-c", script], env=fleet_env.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _writer in range(8)]
        results = [(w.wait(120), w.stdout.read(), w.stderr.read()) for w in writers]
        assert all(rc == 0 for rc, _out, _err in results), [err for _rc, _out, err in results]
        submitted = [line for _rc, out, _err in results for line in out.split()]
        assert len(submitted) == 40 and len(set(submitted)) == 40
        time.sleep(1)  # a few more ticks write meanwhile
        with fleet_env.store() as store:
            jobs = store.list_jobs(agent=down.name)
            assert sorted(j.id for j in jobs) == sorted(submitted)
            assert all(j.state == "queued" for j in jobs)
            queued_events = [e for e in store.list_events(kind="job_state") if e.detail.get("new") == "queued"]
            assert len(queued_events) == 40
            # The server kept writing meanwhile: each tick adds one snapshot row per agent.
            assert store.list_snapshots(up.name, limit=1)[0].id >= snapshot_before + 2
            assert store.get_agent(down.name).consecutive_misses >= 1
        assert server.poll() is None, fleet_env.server_log()
    finally:
        down.stop()
        up.stop()
