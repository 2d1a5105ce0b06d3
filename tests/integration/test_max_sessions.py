"""Hosts that allow few sessions per connection (checklist I60): hardened bastions and shared clusters
set sshd's `MaxSessions` to 1 or 2. A job and the heartbeats share one master connection per host; when
the host refuses another session on it ("Session open refused by peer"), OpenSSH opens a connection of
its own for that command instead, so the host is never reported down for it and the job runs (each
command then pays a full SSH handshake: slower, never failed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh

from tests.integration.fleet_support import wait_for


def _states_seen(fleet_env, agent: str) -> list[str]:
    with fleet_env.store() as store:
        return [e.detail["new"] for e in store.list_events(agent=agent, kind="agent_state")]


@pytest.mark.parametrize("transport", ["fanout", "ansible"])
def test_a_job_and_the_heartbeats_share_a_host_that_allows_one_session(lab, fleet_env, transport):
    host = lab.add_loopback_host(lab.unique_name("one-session"), python=True, max_sessions=1)
    holder = None
    try:
        fleet_env.register(host)
        # Another user's long session on the same master takes the host's only session first.
        fleet = fleet_env.fleet()
        agent = fleet.load_agents()[0]
        ssh.prepare_control_dir(fleet.policy())
        mark = host.log_mark()
        # It holds it until the job has ended, so every session of the job and the heartbeats is refused
        # on the shared connection.
        holder = subprocess.Popen(ssh.ssh_argv(agent, fleet.policy(), "sleep 300"), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        proc = fleet_env.hw("job", "submit", "--agent", host.name, "--timeout", "120", "--", "sh", "-c",
                            "sleep 2; echo done-on-one-session")
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip()
        fleet_env.serve("--interval", "1", "--transport", transport)
        with fleet_env.store() as store:
            job = wait_for(lambda: (j := store.get_job(job_id)).terminal and j, timeout=300, what="the job to end")
        assert holder.poll() is None  # the shared connection's only session was taken all along
        refused = host.log_text(mark).count("no more sessions")
    finally:
        if holder is not None and holder.poll() is None:
            os.killpg(holder.pid, signal.SIGTERM)
            holder.wait(30)
        fleet_env.stop_servers()
        host.stop()
    assert refused >= 1  # sshd really refused sessions on the shared connection
    assert job.state == "succeeded", job
    assert job.exit_code == 0
    # Every tick while the job ran found the host: it never left `online`.
    assert _states_seen(fleet_env, host.name) == ["online"], fleet_env.server_log()


def test_agents_behind_a_bastion_that_allows_one_session(lab, fleet_env):
    """Each agent's hop through its bastion is a connection of its own (`ssh -W`, one session), so a
    bastion's MaxSessions 1 never refuses it; this pins that design (a shared bastion connection would
    have to stay under the bastion's MaxSessions)."""
    bastion, first = lab.add_bastion_pair(lab.unique_name("hardened"))
    try:
        bastion.stop()
        bastion.max_sessions = 1
        bastion.start()
        fleet_env.register(first)
        server = fleet_env.serve("--interval", "1")
        with fleet_env.store() as store:
            wait_for(lambda: store.get_agent(first.name).state == "online", timeout=60, what="the agent online")
        time.sleep(3)  # a few more ticks, each through the bastion's single session
        assert server.poll() is None, fleet_env.server_log()
    finally:
        fleet_env.stop_servers()
        first.stop()
        bastion.stop()
    assert _states_seen(fleet_env, first.name) == ["online"], fleet_env.server_log()
