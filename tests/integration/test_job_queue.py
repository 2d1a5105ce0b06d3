"""The job queue over real sshd hosts and the real job playbook: dispatch on the next heartbeat the agent
answers, one job per agent at a time, heartbeats keeping their cadence, cancel, and concurrent CLI writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# -- secrets, dead hosts, attempts, hostile results (issue 13) -------------------------------------------


# Why a run whose host died ends: the agent went offline (heartbeats), or job_wait could not reach the host.
LOST_REASONS = ("agent_offline: ", "unreachable: ")


def _agent_state(fleet_env, name: str) -> str:
    with fleet_env.store() as store:
        return store.get_agent(name).state


def _serve_until(fleet_env, job_id, predicate, *, timeout, what):
    return wait_for(lambda: (j := _job(fleet_env, job_id)) and predicate(j) and j, timeout=timeout, what=what)


def _cmdlines_with(needle: bytes) -> list[str]:
    """Every process whose command line holds `needle` (argv is readable by every local user)."""
    hits = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if needle in handle.read():
                        hits.append(entry)
            except OSError:
                continue
    return hits


def test_env_values_leave_the_store_and_no_file_log_or_argv_holds_them(fleet_env, python_host, tmp_path):
    """B8: a canary env value reaches the job, and then no byte of the store (-wal and -shm included), no
    file of the server (runs, results, logs) and no command line holds it; no command prints it."""
    import hashlib
    import secrets as secrets_mod

    fleet_env.register(python_host)
    canary = f"HWL-ENV-CANARY-{secrets_mod.token_hex(8)}"
    digest = hashlib.sha256(canary.encode()).hexdigest()
    check = f'test "$(printf %s "$TOKEN" | sha256sum)" = "{digest}  -" && sleep 8'
    # --env TOKEN takes the value from the environment: not even the CLI's own argv holds it.
    proc = fleet_env.hw("job", "submit", "--agent", python_host.name, "--env", "TOKEN", "--", "sh", "-c", check,
                        extra_env={"TOKEN": canary})
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    store_files = [fleet_env.db, Path(f"{fleet_env.db}-wal"), Path(f"{fleet_env.db}-shm")]
    assert any(canary.encode() in p.read_bytes() for p in store_files if p.exists())  # queued: still needed

    server = fleet_env.serve("--interval", "1")
    _serve_until(fleet_env, job_id, lambda j: j.launched_at is not None, timeout=60, what="the job's launch")
    # While the job runs: no command line, and no file on this side (the run's own dir included: the spec
    # file it was handed went as soon as the play had read it) holds the value any more.
    argv_hits = _cmdlines_with(canary.encode())
    runs_while_running = files_containing(fleet_env.data_dir / "runs", [canary.encode()])
    # The row is rewritten at the launch; the WAL checkpoint that follows it a moment later (same thread)
    # takes the old image out of fleet.db-wal.
    store_clean = wait_for(lambda: files_containing(fleet_env.data_dir, [canary.encode()]) == [], timeout=30,
                           what="the env value to leave the store's files")
    running = _job(fleet_env, job_id)
    assert running.spec["env"] == {"TOKEN": None}  # its last attempt launched: the value left the store
    assert not running.terminal, "the job ended before it could be looked at running"
    assert runs_while_running == [] and store_clean
    done = _serve_until(fleet_env, job_id, lambda j: j.terminal, timeout=90, what="the job to end")
    assert (done.state, done.exit_code) == ("succeeded", 0), done.error  # the job got the exact value
    shown = [fleet_env.hw(*argv).stdout for argv in (("job", "show", job_id, "--json"), ("job", "show", job_id),
                                                     ("job", "list", "--json"))]
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0

    assert argv_hits == []
    assert not any(canary in out for out in shown) and '"TOKEN": "***"' in shown[0]
    needles = [canary.encode()]
    assert [str(p) for p in store_files if p.exists() and canary.encode() in p.read_bytes()] == []
    assert files_containing(fleet_env.data_dir, needles) == []  # store, runs/, results/
    assert files_containing(fleet_env.root, needles) == []  # the server's logs too


def test_env_values_a_job_prints_reach_no_byte_of_the_store_nor_any_report(fleet_env, python_host):
    """The job prints its --env value (whole, split across two writes with a pause between, on stdout and on
    stderr): the runner on the host masks it, so neither the log the server reads at each tick, nor the
    result's tails, nor any byte of fleet.db, -wal or -shm, nor `job logs`, `job show --json` or the reports
    behind `/api/jobs` hold it (or the part written first); the rest of the output is intact."""
    import secrets as secrets_mod

    from hwledger.reports import job_to_dict

    fleet_env.register(python_host)
    canary = f"HWL-PRINTED-CANARY-{secrets_mod.token_hex(8)}"
    script = ('echo "before $TOKEN after"; printf %s "${TOKEN%????}"; sleep 3; echo "${TOKEN#${TOKEN%????}}|tail"; '
              'echo "err=$TOKEN" >&2; sleep 2; echo done')
    proc = fleet_env.hw("job", "submit", "--agent", python_host.name, "--env", "TOKEN", "--", "sh", "-c", script,
                        extra_env={"TOKEN": canary})
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    server = fleet_env.serve("--interval", "1")
    # While the job runs, its log (read from the host at each tick) already shows the first line, masked.
    wait_for(lambda: "before *** after" in fleet_env.hw("job", "logs", job_id).stdout, timeout=60,
             what="the job's first line in its log")
    done = _serve_until(fleet_env, job_id, lambda j: j.terminal, timeout=90, what="the job to end")
    assert (done.state, done.exit_code) == ("succeeded", 0), done.error
    logs = fleet_env.hw("job", "logs", job_id)
    shown = fleet_env.hw("job", "show", job_id, "--json")
    listed = fleet_env.hw("job", "list", "--json")
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0, fleet_env.server_log()

    assert logs.returncode == 0 and shown.returncode == 0 and listed.returncode == 0
    result = json.loads(shown.stdout)["result"]
    assert result["stdout_tail"] == "before *** after\n***|tail\ndone\n"
    assert result["stderr_tail"] == "err=***\n"
    assert logs.stdout == "before *** after\n***|tail\ndone\n" and logs.stderr.startswith("err=***\n")
    with fleet_env.store() as store:
        reported = json.dumps([job_to_dict(store.get_job(job_id))])
        entries = store.read_job_log(job_id).entries
    logged = b"".join(entry.data for entry in entries)
    assert "before *** after" in reported
    assert b"".join(entry.data for entry in entries if entry.stream == "stdout") == b"before *** after\n***|tail\ndone\n"
    assert b"".join(entry.data for entry in entries if entry.stream == "stderr") == b"err=***\n"
    needles = [canary, canary[:-4]]  # the value, and the part of it the job wrote before its pause
    for text in (logs.stdout, logs.stderr, shown.stdout, listed.stdout, reported, logged.decode("utf-8", "replace")):
        assert not any(needle in text for needle in needles)
    # The raw bytes of the store's files (the server stopped: its last checkpoint is done).
    store_files = [fleet_env.db, Path(f"{fleet_env.db}-wal"), Path(f"{fleet_env.db}-shm")]
    assert [str(p) for p in store_files if p.exists() and any(n.encode() in p.read_bytes() for n in needles)] == []
    assert files_containing(fleet_env.data_dir, [n.encode() for n in needles]) == []


def test_a_host_that_dies_during_a_job_ends_it_lost_long_before_its_timeout(fleet_env, python_host, tmp_path):
    """Item 7: the job's host goes away (sshd and everything it ran killed) during an hour-long job: after
    the missed heartbeats that make its agent offline, the job ends `lost`, not an hour later; its remote
    dir is removed once the host answers again."""
    fleet_env.register(python_host)
    marker = tmp_path / "long.log"
    proc = fleet_env.hw("job", "submit", "--agent", python_host.name, "--timeout", "3600", "--",
                        "sh", "-c", f"echo started >> {marker}; sleep 3000")
    job_id = proc.stdout.strip()
    server = fleet_env.serve("--interval", "1")
    try:
        running = _serve_until(fleet_env, job_id, lambda j: j.launched_at is not None and j.remote_dir,
                               timeout=60, what="the job's launch")
        wait_for(marker.exists, timeout=60, what="the job to run on the host")
        python_host.stop()
        stopped_at = time.monotonic()
        # "Did not hang": far less than the hour the job's timeout would have taken.
        job = _serve_until(fleet_env, job_id, lambda j: j.terminal, timeout=180, what="the job to end")
        assert time.monotonic() - stopped_at < 600
        # Whichever notices first: the heartbeats (the agent goes offline, the run is stopped) or the run's own
        # job_wait, which gives up after CONNECTION_RETRIES polls the host refused. Both end the job lost.
        assert job.state == "lost" and job.error.startswith(LOST_REASONS), job.error
        assert job.cleanup_pending and job.attempts == 1
        wait_for(lambda: _agent_state(fleet_env, python_host.name) == "offline", timeout=120, what="the agent offline")
        assert os.path.isdir(running.remote_dir)  # the host could not be cleaned yet

        python_host.start()
        _serve_until(fleet_env, job_id, lambda j: not j.cleanup_pending, timeout=600, what="the remote clean-up")
        assert not os.path.exists(running.remote_dir)
    finally:
        python_host.start()
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    assert marker.read_text().splitlines() == ["started"]


def test_max_attempts_runs_a_lost_job_again_after_cleaning_up(fleet_env, python_host, tmp_path):
    """J72: a job lost after its launch (its host died) with attempts left is queued again; its old remote dir
    is removed before the second attempt starts; attempts count launches only."""
    fleet_env.register(python_host)
    marker = tmp_path / "attempts.log"
    go_on = tmp_path / "go-on"  # the second attempt finds it and ends at once
    proc = fleet_env.hw("job", "submit", "--agent", python_host.name, "--max-attempts", "2", "--timeout", "3600",
                        "--", "sh", "-c", f"echo run >> {marker}; [ -e {go_on} ] || sleep 3000; echo finished")
    job_id = proc.stdout.strip()
    server = fleet_env.serve("--interval", "1")
    try:
        first = _serve_until(fleet_env, job_id, lambda j: j.launched_at is not None and j.remote_dir,
                             timeout=60, what="the first attempt's launch")
        wait_for(marker.exists, timeout=60, what="the first attempt to run on the host")
        python_host.stop()
        requeued = _serve_until(fleet_env, job_id, lambda j: j.state == "queued", timeout=180, what="a requeue")
        assert requeued.attempts == 1 and requeued.error.startswith(LOST_REASONS), requeued.error
        assert "attempt 1 of 2" in requeued.error and requeued.cleanup_pending
        go_on.touch()
        python_host.start()
        done = _serve_until(fleet_env, job_id, lambda j: j.terminal, timeout=600, what="the second attempt")
    finally:
        python_host.start()
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    assert (done.state, done.attempts, done.result["stdout_tail"]) == ("succeeded", 2, "finished\n"), done.error
    assert not os.path.exists(first.remote_dir)  # removed before the second attempt started
    assert marker.read_text().splitlines() == ["run", "run"]
    shown = json.loads(fleet_env.hw("job", "show", job_id, "--json").stdout)
    assert (shown["attempts"], shown["max_attempts"]) == (2, 2)
    assert [e["new"] for e in shown["events"] if e["kind"] == "job_state"] == [
        "queued", "dispatched", "running", "queued", "dispatched", "running", "succeeded"]


def test_a_result_that_is_not_utf8_fails_the_job_with_its_reason(fleet_env, server, python_host):
    """Item 7: the host's runner writes a result.json with invalid UTF-8 in it: the job fails with the
    reason `result_not_json`, not an empty one."""
    fleet_env.register(python_host)
    fake = python_host.bin_dir / "hwledger"  # the role runs `hwledger run JOB --output RESULT` when it is there
    fake.write_bytes(b'#!/bin/sh\nprintf \'{"job_id": "\\377\\376"}\\n\' > "$4"\n')
    fake.chmod(0o755)
    try:
        job_id = _submit(fleet_env, python_host.name, "true")
        srv = server()
        assert srv.tick().dispatched == [job_id]
        job = _wait_terminal(fleet_env, job_id)
    finally:
        fake.unlink()
    assert job.state == "failed" and job.error.startswith("result_not_json: "), job.error
    shown = json.loads(fleet_env.hw("job", "show", job_id, "--json").stdout)
    assert shown["reason"] == "result_not_json"
