"""`hwledger fleet serve` over real sshd hosts and real ansible-runner: agent states through a host going
down and coming back, a failing GPU tool, a changed host key, shutdown, and what is left on disk."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from hwledger import hostkeys
from hwledger.ansible_runs import AnsibleRuns
from hwledger.fanout import SshFanoutHeartbeat
from hwledger.heartbeat import BACKOFF_FIRST_S, HOST_KEY_UNKNOWN_MSG
from hwledger.server import Server
from hwledger.store import parse_time
from tests.integration.fleet_support import files_containing, wait_for
from ansible_collections.hwledger.fleet.plugins.plugin_utils.processes import mentioning as processes_mentioning


@pytest.fixture
def server_for(fleet_env):
    servers = []

    def make(**kw) -> Server:
        server = Server(fleet_env.fleet(), **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _states(fleet_env, *names):
    with fleet_env.store() as store:
        return tuple(store.get_agent(name).state for name in names)


def test_a_host_going_down_and_coming_back(fleet_env, server_for, lab, fresh_host):
    steady = lab.add_loopback_host(lab.unique_name("steady"))
    try:
        fleet_env.register(fresh_host)
        fleet_env.register(steady)
        server = server_for()
        server.tick()
        assert _states(fleet_env, fresh_host.name, steady.name) == ("online", "online")

        fresh_host.stop()
        seen = []
        for _miss in range(3):
            report = server.tick()
            assert report.outcomes[fresh_host.name].reason == "unreachable"
            seen.append(_states(fleet_env, fresh_host.name, steady.name))
        # The 3-miss rule: stale, stale, then offline; the other host is unaffected.
        assert seen == [("stale", "online"), ("stale", "online"), ("offline", "online")]
        with fleet_env.store() as store:
            row = store.get_agent(fresh_host.name)
            assert row.consecutive_misses == 3 and row.state_reason == "unreachable"
            gpus_before = store.latest_snapshot(fresh_host.name).data["gpus"]
            assert len(gpus_before) == 2  # the last good data is kept (shown with its age)

        # Offline: not dialled again before its backoff is over (30 s, doubling up to 5 minutes) ...
        with fleet_env.store() as store:
            due = parse_time(store.get_agent(fresh_host.name).next_attempt_at)
        assert 25 <= (due - datetime.now(timezone.utc)).total_seconds() <= BACKOFF_FIRST_S
        fresh_host.start()
        report = server.tick()
        assert fresh_host.name not in report.outcomes and steady.name in report.outcomes
        # ... and dialled once it is over.
        with sqlite3.connect(fleet_env.db) as raw:
            raw.execute("UPDATE agents SET next_attempt_at = ? WHERE name = ?",
                        ((datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat(), fresh_host.name))
        server.tick()
        assert _states(fleet_env, fresh_host.name, steady.name) == ("online", "online")
        with fleet_env.store() as store:
            assert store.get_agent(fresh_host.name).consecutive_misses == 0
            assert store.get_agent(fresh_host.name).next_attempt_at is None  # the backoff is reset
            state_events = store.list_events(agent=fresh_host.name, kind="agent_state")
            changes = [(e.detail["old"], e.detail["new"]) for e in state_events]
        assert changes == [("pending", "online"), ("online", "stale"), ("stale", "offline"), ("offline", "online")]
    finally:
        steady.stop()


def test_a_failing_gpu_tool_is_an_error_not_a_miss(fleet_env, server_for, fresh_host):
    fleet_env.register(fresh_host)
    server = server_for()
    fresh_host.set_tool(capture="nvidia/failure-nvml-driver-library-version-mismatch.txt", rc=18)
    server.tick()
    with fleet_env.store() as store:
        row = store.get_agent(fresh_host.name)
        assert (row.state, row.consecutive_misses) == ("error", 0)
        # The parser's reason for "Driver/library version mismatch", not a connection problem.
        assert row.state_reason == "nvml_error" and row.last_seen is not None
    fresh_host.set_tool()
    server.tick()
    assert _states(fleet_env, fresh_host.name) == ("online",)


def test_a_changed_host_key_blocks_the_host_until_it_is_registered_again(fleet_env, server_for, fresh_host):
    fleet_env.register(fresh_host)
    server = server_for()
    server.tick()
    fresh_host.rotate_host_key()
    report = server.tick()
    assert report.outcomes[fresh_host.name].reason == "host_key_changed"
    assert _states(fleet_env, fresh_host.name) == ("host_key_changed",)
    with fleet_env.store() as store:
        job = store.submit_job(fresh_host.name, {"job_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
                                                 "command": ["true"]},
                               job_id="0f8fad5b-d9cb-469f-a165-70867728950e")
    mark = fresh_host.log_mark()
    report = server.tick()
    assert fresh_host.name not in report.outcomes and report.dispatched == []
    assert "Connection from" not in fresh_host.log_text(mark)  # not even contacted
    with fleet_env.store() as store:
        assert store.get_job(job.id).state == "queued"

    proc = fleet_env.hw("fleet", "register-ssh", "--host", f"{fresh_host.user}@{fresh_host.address}:{fresh_host.port}",
                        "--key", str(fresh_host.lab.client_key), "--name", fresh_host.name, "--replace",
                        "--host-key-fingerprint", fresh_host.host_key_fingerprint, "--skip-heartbeat")
    assert proc.returncode == 0, proc.stderr
    with fleet_env.store() as store:
        store.request_cancel(job.id)
    server.tick()
    assert _states(fleet_env, fresh_host.name) == ("online",)


@pytest.mark.parametrize("transport", ["fanout", "ansible"])
def test_a_host_without_a_pinned_key_is_an_error_that_says_to_register_it(fleet_env, server_for, fresh_host,
                                                                          transport):
    fleet_env.register(fresh_host)  # --skip-heartbeat: no ssh master exists yet
    assert hostkeys.unpin(fleet_env.known_hosts, f"hwledger-agent-{fresh_host.name}")
    fleet = fleet_env.fleet()
    server = server_for(transport=SshFanoutHeartbeat(fleet.policy()) if transport == "fanout" else None)
    for _tick in range(2):  # not blocked: every tick asks again
        report = server.tick()
        assert report.outcomes[fresh_host.name].reason == "host_key_unknown"
    with fleet_env.store() as store:
        row = store.get_agent(fresh_host.name)
    assert (row.state, row.state_reason) == ("error", "host_key_unknown")
    assert row.state_msg.startswith(HOST_KEY_UNKNOWN_MSG)
    proc = fleet_env.hw("fleet", "register-ssh", "--host", f"{fresh_host.user}@{fresh_host.address}:{fresh_host.port}",
                        "--key", str(fresh_host.lab.client_key), "--name", fresh_host.name, "--replace",
                        "--host-key-fingerprint", fresh_host.host_key_fingerprint, "--skip-heartbeat")
    assert proc.returncode == 0, proc.stderr
    server.tick()
    assert _states(fleet_env, fresh_host.name) == ("online",)


def test_a_second_server_on_the_same_store_exits_naming_the_first(fleet_env, fresh_host):
    fleet_env.register(fresh_host)
    first = fleet_env.serve("--interval", "1")
    with fleet_env.store() as store:
        wait_for(lambda: store.get_agent(fresh_host.name).state == "online", timeout=30, what="first server ticking")
    second = fleet_env.hw("fleet", "serve", "--once", timeout=60)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"(pid {first.pid})" in second.stderr and "Traceback" not in second.stderr
    assert first.poll() is None, fleet_env.server_log()
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0
    # The lock went with the first server: a new one serves.
    assert fleet_env.hw("fleet", "serve", "--once", timeout=60).returncode == 0


def test_templates_and_escapes_from_the_config_or_the_host_stay_data(fleet_env, server_for, fresh_host, tmp_path):
    from_config = tmp_path / "PWNED-by-config"
    from_host = tmp_path / "PWNED-by-host"
    fleet_env.register(fresh_host, extra=(
        "--skip-heartbeat", "--gpu-query-cmd",
        "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader "
        f"# {{{{ lookup('pipe', 'touch {from_config}') }}}}"))
    evil_name = f"{{{{ lookup('pipe', 'touch {from_host}') }}}}\x1b[2K\rALL OK"
    fresh_host.set_tool(stdout=f"0, {evil_name}, 8192 MiB, 4096 MiB\n")
    server = server_for()
    report = server.tick()
    assert report.outcomes[fresh_host.name].ok, report.outcomes
    assert not from_config.exists() and not from_host.exists()
    with fleet_env.store() as store:
        assert store.latest_snapshot(fresh_host.name).data["gpus"][0]["name"] == evil_name
    table = fleet_env.hw("fleet", "status").stdout
    assert "online" in table and "\x1b" not in table and "\r" not in table
    raw = fleet_env.hw("fleet", "status", "--json").stdout
    assert "\x1b" not in raw and "\r" not in raw
    assert json.loads(raw)[0]["gpus"][0]["name"] == evil_name


def test_the_runner_wrapper_hands_inventory_and_extra_vars_over_as_data(fleet_env, tmp_path):
    """Ansible templates values of an inventory or extra-vars file it loads; ours are tagged unsafe."""
    by_inventory, by_extravars = tmp_path / "PWNED-inventory", tmp_path / "PWNED-extravars"
    play = [{"hosts": "all", "gather_facts": False, "tasks": [
        {"ansible.builtin.debug": {"msg": "{{ from_inventory }} {{ from_extravars }}"}}]}]
    inventory = {"all": {"hosts": {"local": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "from_inventory": f"{{{{ lookup('pipe', 'touch {by_inventory}') }}}}"}}}}
    playbook = tmp_path / "play.yml"
    playbook.write_text(json.dumps(play))  # JSON is YAML
    runs = AnsibleRuns(runs_dir=fleet_env.fleet().runs_dir)
    run = runs.run_playbook(str(playbook), inventory=inventory, cancel=lambda: False,
                            extravars={"from_extravars": f"{{{{ lookup('pipe', 'touch {by_extravars}') }}}}"})
    assert run.status == "successful", run.output_tail
    (event,) = run.host_events["local"]
    assert event.res["msg"].startswith("{{ lookup('pipe', 'touch ")
    assert not by_inventory.exists() and not by_extravars.exists()


def _ssh_clients_to(host) -> dict:
    return {pid: cmdline for pid, cmdline in processes_mentioning(f"{host.address}").items()
            if "[mux]" not in cmdline}


@pytest.mark.parametrize("transport", ["fanout", "ansible"])
def test_sigterm_stops_without_waiting_for_the_tick_leaving_only_ssh_masters(fleet_env, fresh_host, transport):
    fleet_env.register(fresh_host)
    fresh_host.set_tool(delay=20)  # a tick is in flight when the signal comes
    server = fleet_env.serve("--interval", "1", "--query-timeout", "30", "--transport", transport)
    runs = fleet_env.data_dir / "runs"
    if transport == "ansible":
        wait_for(lambda: processes_mentioning(runs), timeout=30, what="a heartbeat run in flight")
    else:
        wait_for(lambda: _ssh_clients_to(fresh_host), timeout=30, what="a heartbeat probe in flight")
    time.sleep(1.0)
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    rc = server.wait(30)
    took = time.monotonic() - started
    assert rc == 0, fleet_env.server_log()
    # It did not wait for the tick in flight (the tool answers after 20 s): well under a second normally;
    # how fast exactly is `make bench`'s business, not a test's.
    assert took < 10, f"stopping took {took:.2f} s"
    assert processes_mentioning(runs) == {}
    left = processes_mentioning(f"{fresh_host.address}")
    # Only ControlPersist masters may stay (they expire on their own); no ansible, no client ssh.
    assert all("[mux]" in cmdline for cmdline in left.values()), left
    assert list(runs.iterdir()) == []


def test_serve_leaves_no_secret_or_environment_on_disk_and_keeps_files_private(fleet_env, fresh_host):
    fleet_env.register(fresh_host)
    key_material = fresh_host.lab.client_key.read_bytes().splitlines()[1]  # a line of the private key body
    # The ansible-runner transport: its artifacts are where an environment dump would land.
    server = fleet_env.serve("--interval", "0.5", "--transport", "ansible")
    runs = fleet_env.data_dir / "runs"
    needles = [fleet_env.canary.encode(), key_material, b"PRIVATE KEY"]
    # Look inside the run dirs while runs are in flight (runner's env dump lives there), several times.
    inspected = 0
    deadline = time.monotonic() + 20
    while inspected < 3 and time.monotonic() < deadline:
        if any(runs.glob("run-*/artifacts/*/command")):
            assert files_containing(runs, needles) == []
            inspected += 1
        time.sleep(0.05)
    assert inspected >= 1, "never saw a run's artifacts"
    with fleet_env.store() as store:
        wait_for(lambda: store.get_agent(fresh_host.name).state == "online", timeout=20, what="online")
    for name in ("fleet.db", "fleet.db-wal", "fleet.db-shm"):
        path = fleet_env.data_dir / name
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert files_containing(fleet_env.root / "data", needles) == []
    assert files_containing(fleet_env.root / "cfg", needles) == []
