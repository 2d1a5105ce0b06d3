"""The serve loop with a stand-in transport: cadence, overruns, stopping, one server per store, a broken
agents file, and a job worker that dies."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema as jobs_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger import agents_file
from hwledger import job_runs as job_runs_mod
from hwledger import job_workers as job_workers_mod
from hwledger.ansible_runs import HostEvent
from hwledger.errors import UserError
from hwledger.fleet import Fleet, agent_record
from hwledger.server import SERVE_LOCK_NAME, Server
from hwledger.store import Store


# -- the loop, with a stand-in transport -------------------------------------------------------


class _SlowTransport:
    """Answers every agent as online after `delay` seconds; records overlapping calls."""

    def __init__(self, delay: float):
        self.delay = delay
        self.calls: list[tuple[float, float]] = []
        self._inside = threading.Lock()
        self.overlapped = False

    def tick(self, agents, *, cancel, on_outcome=None, on_progress=None, budget_s=None, liveness=()):
        if not self._inside.acquire(blocking=False):
            self.overlapped = True
            return {}
        try:
            start = time.monotonic()
            while time.monotonic() - start < self.delay and not cancel():
                time.sleep(0.01)
            self.calls.append((start, time.monotonic()))
            return {a.name: ProbeOutcome(True, snapshot={"gpus": []}) for a in agents}
        finally:
            self._inside.release()


@pytest.fixture
def fleet(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir(mode=0o700)
    fleet = Fleet(cfg / "ssh-agents.toml", cfg / "known_hosts", tmp_path / "d" / "fleet.db")
    agent = agents_schema.Agent(name="a", hostname="192.0.2.1", ssh_user="u", ssh_key_path="/k")
    agents_file.append_agent(fleet.config, agent)
    with Store.open(fleet.db) as store:
        store.upsert_agent(agent_record(agent))
    yield fleet
    directory = fleet.control_dir
    if directory.parent == Path("/tmp") / f"hwledger-{os.getuid()}":
        shutil.rmtree(directory, ignore_errors=True)


def test_ticks_never_overlap_and_an_overrun_is_recorded(fleet):
    # Ticks that last longer than the interval. The wrong behaviours this tells apart are far from the
    # right one whatever the machine's load: an overlap (start < end), or a wait for the next interval
    # (a gap of at least 0.8 s here; the right gap is a thread wake-up, milliseconds).
    transport = _SlowTransport(delay=1.2)
    server = Server(fleet, interval_s=1.0, transport=transport)
    server.run(max_ticks=3)
    assert len(transport.calls) == 3 and not transport.overlapped
    for (_prev_start, end), (start, _next_end) in zip(transport.calls, transport.calls[1:]):
        assert start >= end  # the next tick started after the previous one ended ...
        assert start - end < 0.5  # ... at once, not at the next interval (0.8 s later)
    with Store.open(fleet.db) as store:
        overruns = store.list_events(kind="tick_overrun")
        # Recorded at once, then counted (at most one row a minute), the count written at shutdown;
        # the last tick is not followed by another, so it is no overrun.
        assert [e.detail["occurrences"] for e in overruns] == [1, 1]
        assert overruns[0].detail["duration_s"] >= 1.2
        assert store.get_agent("a").state == "online"


def test_ticks_keep_their_cadence(fleet):
    # Start to start is the interval (1.0 s), not the interval after the tick's end (1.6 s): the two are
    # 0.6 s apart, so a loaded machine (a late wake-up) cannot turn one into the other.
    transport = _SlowTransport(delay=0.6)
    server = Server(fleet, interval_s=1.0, transport=transport)
    server.run(max_ticks=3)
    starts = [start for start, _end in transport.calls]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0.95 < gap < 1.4 for gap in gaps), gaps


def test_stop_interrupts_a_tick_quickly(fleet):
    transport = _SlowTransport(delay=30)
    server = Server(fleet, interval_s=1, transport=transport)
    threading.Timer(0.3, server.request_stop).start()
    started = time.monotonic()
    server.run()
    # Did not wait for the tick (30 s): normally ~0.3 s; the bound is far from both.
    assert time.monotonic() - started < 10


def test_a_second_server_on_the_same_store_is_refused_naming_the_first(fleet):
    made: list[Server] = []

    def serve() -> None:  # a store connection is used by the thread that opened it
        made.append(Server(fleet, interval_s=0.05, transport=_SlowTransport(delay=0)))
        made[0].run()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        lock = fleet.db.parent / SERVE_LOCK_NAME
        deadline = time.monotonic() + 10
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
        second = Server(fleet, interval_s=0.05, transport=_SlowTransport(delay=0))
        with pytest.raises(UserError, match=f"another `hwledger fleet serve` \\(pid {os.getpid()}\\)"):
            second.run(once=True)
    finally:
        while thread.is_alive() and not made:
            time.sleep(0.01)
        made[0].request_stop()
        thread.join(10)
    # Released with the server: the next one starts.
    assert Server(fleet, interval_s=0.05, transport=_SlowTransport(delay=0)).run(once=True) == 0


def test_a_vanished_or_broken_agents_file_removes_no_agent(fleet):
    transport = _SlowTransport(delay=0)
    server = Server(fleet, interval_s=1, transport=transport)
    try:
        assert server.tick().asked == 1
        good = fleet.config.read_text()
        fleet.config.unlink()
        for _tick in range(3):
            report = server.tick()
            assert report.asked == 1 and report.outcomes["a"].ok  # still heartbeated
        fleet.config.write_text("[[agents]]\nname = \n")
        fleet.config.chmod(0o600)
        server.tick()
        with Store.open(fleet.db) as store:
            assert store.get_agent("a").state == "online"
            errors = [e.detail["msg"] for e in store.list_events(kind="config_error")]
        # Once per problem (then at most once a minute), each saying what is wrong.
        assert len(errors) == 2, errors
        assert "does not exist" in errors[0] and str(fleet.config) in errors[0]
        fleet.config.write_text(good)
        fleet.config.chmod(0o600)
        assert server.tick().asked == 1
        # A file that parses and no longer lists the agent is a removal, as before.
        fleet.config.write_text(agents_file.NEW_FILE_HEADER)
        fleet.config.chmod(0o600)
        assert server.tick().asked == 0
        with Store.open(fleet.db) as store:
            assert store.get_agent("a").state == "removed"
    finally:
        server.close()


# What the job playbook's job_start task answers: the job's command was launched.
LAUNCH_EVENT = HostEvent("runner_on_ok", "a", "Start the job on the remote", "hwledger.fleet.job_start",
                         {"changed": True, "path": "/tmp/hwledger-job-x-abcd1234", "pid": 4242, "runner": "staged"})


class _CompletingJobs:
    """Job runs that launch and end at once as completed (no SSH), and clean-ups that do nothing."""

    def __init__(self):
        self.cleanups = []

    def run(self, job, agent, *, cancel, on_event, on_private_dir):
        on_event(LAUNCH_EVENT)
        return job_runs_mod.JobRunOutcome("completed", launched=True)

    def cleanup(self, job_id, agent, remote_dir, *, cancel):
        self.cleanups.append(job_id)
        return job_runs_mod.JobRunOutcome("completed")


def test_a_job_worker_that_dies_after_running_does_not_leave_the_job_running(fleet, monkeypatch):
    real_settle = job_workers_mod.settle_job

    def settle_failing_in_workers(*args, **kwargs):
        if threading.current_thread().name.startswith("hwledger-job"):
            raise RuntimeError("store exploded")
        return real_settle(*args, **kwargs)

    monkeypatch.setattr(job_workers_mod, "settle_job", settle_failing_in_workers)
    with Store.open(fleet.db) as store:
        job_id = store.submit_job("a", jobs_schema.new_job(["true"])).id
    server = Server(fleet, interval_s=1, transport=_SlowTransport(delay=0), jobs=_CompletingJobs())
    try:
        assert server.tick().dispatched == [job_id]
        server.wait_for_workers(timeout=10)
    finally:
        server.close()
    with Store.open(fleet.db) as store:
        job = store.get_job(job_id)
        history = [e.detail["new"] for e in store.list_events(job_id=job_id) if e.kind == "job_state"]
    assert job.state == "lost" and job.cleanup_pending and "worker failed" in job.error
    assert history == ["queued", "dispatched", "running", "lost"]


# -- jobs a previous server left, and jobs of agents that went offline ------------------------------------


class _ScriptedJobs(_CompletingJobs):
    """Runs that wait for their cancel; reconciles that find a finished run with a result (exit 7)."""

    def __init__(self, results_dir):
        super().__init__()
        self.results_dir = results_dir
        self.calls: list[str] = []

    def run(self, job, agent, *, cancel, on_event, on_private_dir):
        self.calls.append("run")
        on_event(LAUNCH_EVENT)
        deadline = time.monotonic() + 30
        while not cancel() and time.monotonic() < deadline:
            time.sleep(0.01)
        return job_runs_mod.JobRunOutcome("cancelled", "the run was stopped", launched=True)

    def reconcile(self, job, agent, *, cancel, on_private_dir=None):
        self.calls.append("reconcile")
        result = jobs_schema.make_result(job.id, "failed", started=time.time() - 1, finished=time.time(), exit_code=7)
        jobs_schema.result_path(self.results_dir, job.id).write_bytes(jobs_schema.encode_result(result))
        return job_runs_mod.JobRunOutcome("completed", launched=True, report={
            "found": True, "dir": "/tmp/hwledger-job-x-1", "launched": True, "running": False, "result": True})


def test_a_restarted_server_stops_the_dead_servers_run_and_reconciles_its_job(fleet):
    import subprocess
    import sys

    with Store.open(fleet.db) as store:
        job_id = store.submit_job("a", jobs_schema.new_job(["true"], env={"TOKEN": "t"})).id
        store.transition_job(job_id, ["queued"], "dispatched")
        store.transition_job(job_id, ["dispatched"], "running")
        run_dir = Path(fleet.runs_dir) / "run-job-left-behind"
        run_dir.mkdir(mode=0o700)
        store.update_job(job_id, run_dir=str(run_dir), remote_dir="/tmp/hwledger-job-x-1")
    # The dead server's ansible-playbook: a process naming its run dir, in a session of its own.
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(run_dir)],
                              start_new_session=True)
    deadline = time.monotonic() + 10
    while str(run_dir).encode() not in Path(f"/proc/{orphan.pid}/cmdline").read_bytes():  # exec'd
        assert time.monotonic() < deadline
        time.sleep(0.01)
    jobs = _ScriptedJobs(fleet.results_dir)
    server = Server(fleet, interval_s=1, transport=_SlowTransport(delay=0), jobs=jobs)
    try:
        server.recover()
        assert orphan.wait(5) is not None and not run_dir.exists()
        assert server.tick().dispatched == []  # the host is asked about the old run before anything else
        server.wait_for_workers(timeout=10)
        server.tick()
    finally:
        server.close()
        if orphan.poll() is None:
            orphan.kill()
    job = Store.open(fleet.db).get_job(job_id)
    assert jobs.calls == ["reconcile"]  # never run a second time
    assert (job.state, job.exit_code, job.attempts, job.run_dir) == ("failed", 7, 1, None)
    assert job.spec["env"] == {"TOKEN": None}


def test_a_job_left_before_its_playbook_started_is_run_again(fleet):
    with Store.open(fleet.db) as store:
        job_id = store.submit_job("a", jobs_schema.new_job(["true"])).id
        store.transition_job(job_id, ["queued"], "dispatched")
        store.transition_job(job_id, ["dispatched"], "running")  # killed right after this commit
    server = Server(fleet, interval_s=1, transport=_SlowTransport(delay=0), jobs=_CompletingJobs())
    try:
        server.recover()
        with Store.open(fleet.db) as store:
            job = store.get_job(job_id)
            assert job.state == "queued" and job.error.startswith("server_stopped: ") and job.attempts == 0
        assert server.tick().dispatched == [job_id]
        server.wait_for_workers(timeout=10)
    finally:
        server.close()
    with Store.open(fleet.db) as store:
        assert store.get_job(job_id).attempts == 1


class _GoneAfter(_SlowTransport):
    """Answers `answered` ticks, then the host is gone (connection refused)."""

    def __init__(self, answered: int):
        super().__init__(delay=0)
        self.answered = answered

    def tick(self, agents, **kw):
        if self.answered > 0:
            self.answered -= 1
            return super().tick(agents, **kw)
        return {a.name: ProbeOutcome.unreachable("ssh: connect to host 192.0.2.1 port 22: Connection refused")
                for a in agents}


def test_a_job_whose_agent_goes_offline_ends_lost_at_once(fleet, monkeypatch):
    from hwledger import heartbeat

    monkeypatch.setattr(heartbeat, "explain", lambda agent, outcome: outcome)  # the fixture's key file is fake
    with Store.open(fleet.db) as store:
        job_id = store.submit_job("a", jobs_schema.new_job(["sleep", "3000"], timeout_s=3600)).id
    jobs = _ScriptedJobs(fleet.results_dir)
    server = Server(fleet, interval_s=1, transport=_GoneAfter(answered=1), jobs=jobs)
    try:
        assert server.tick().dispatched == [job_id]
        for _tick in range(3):  # three missed heartbeats: offline
            server.tick()
        server.wait_for_workers(timeout=10)
    finally:
        server.close()
    with Store.open(fleet.db) as store:
        job = store.get_job(job_id)
        assert store.get_agent("a").state == "offline"
    assert job.state == "lost" and job.error.startswith("agent_offline: ") and job.cleanup_pending


def test_every_connection_that_writes_job_transitions_syncs_fully(fleet):
    """synchronous=FULL (2): a job transition that returned has reached the disk, a power cut after it
    cannot undo it (WAL's default, NORMAL, may lose the last commits). The server's tick connection and
    each job worker's connection are checked, as the server makes them."""
    server = Server(fleet, interval_s=1, transport=_SlowTransport(delay=0))
    try:
        with server.workers.open_store() as worker_store:
            for store in (server.store, worker_store):
                conn = store._conn  # noqa: SLF001 - the pragma is what is under test
                assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        server.close()


def test_a_left_job_cancelled_after_its_agent_was_removed_is_not_left_running(fleet):
    with Store.open(fleet.db) as store:
        job_id = store.submit_job("a", jobs_schema.new_job(["true"])).id
        store.transition_job(job_id, ["queued"], "dispatched")
        store.transition_job(job_id, ["dispatched"], "running")
        store.update_job(job_id, remote_dir="/tmp/hwledger-job-x-1")
    jobs = _ScriptedJobs(fleet.results_dir)
    server = Server(fleet, interval_s=1, transport=_SlowTransport(delay=0), jobs=jobs)
    try:
        server.recover()  # to be reconciled at the agent's next answer ...
        fleet.config.write_text(agents_file.NEW_FILE_HEADER)  # ... which never comes: `fleet remove --force`
        fleet.config.chmod(0o600)
        with Store.open(fleet.db) as store:
            store.request_cancel(job_id)
        server.tick()
    finally:
        server.close()
    with Store.open(fleet.db) as store:
        job = store.get_job(job_id)
    assert job.state == "cancelled" and jobs.calls == []


class _Companion:
    def __init__(self, fail_on_tick: bool = False):
        self.calls: list[str] = []
        self.fail_on_tick = fail_on_tick

    def start(self):
        self.calls.append("start")

    def tick_done(self, report, *, elapsed_s, overran):
        self.calls.append(f"tick:{report.asked}:{overran}")
        if self.fail_on_tick:
            raise RuntimeError("a companion bug")

    def stop(self):
        self.calls.append("stop")


def test_companions_start_with_the_loop_hear_every_tick_and_stop_with_it(fleet):
    watcher, broken = _Companion(), _Companion(fail_on_tick=True)
    server = Server(fleet, interval_s=0.05, transport=_SlowTransport(delay=0.0), companions=[watcher, broken])
    server.run(max_ticks=3)
    assert watcher.calls == ["start", "tick:1:False", "tick:1:False", "tick:1:False", "stop"]
    assert broken.calls[-1] == "stop" and len(broken.calls) == 5  # its failures did not stop the loop


def test_a_companion_that_cannot_start_stops_the_server_with_its_error(fleet):
    class _Refuses(_Companion):
        def start(self):
            raise UserError("--http 127.0.0.1:9835: the address is in use")

    first, refusing = _Companion(), _Refuses()
    with pytest.raises(UserError, match="in use"):
        Server(fleet, interval_s=0.05, transport=_SlowTransport(delay=0.0), companions=[first, refusing]).run(once=True)
    assert first.calls == ["start", "stop"] and refusing.calls == []
