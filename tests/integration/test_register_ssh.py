"""`hwledger fleet register-ssh` against real sshd hosts: host key confirmation, pinning, the TOML
append, the store row and the first heartbeat."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess

from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh
from hwledger import agents_file, hostkeys


def _register_args(host, *extra: str) -> list[str]:
    return ["fleet", "register-ssh", "--host", f"{host.user}@{host.address}:{host.port}",
            "--key", str(host.lab.client_key), "--name", host.name, *extra]


def _confirm_line(stderr: str) -> list[str]:
    line = next(ln for ln in stderr.splitlines() if ln.strip().startswith("hwledger fleet register-ssh"))
    return shlex.split(line)[1:]


def test_unconfirmed_key_is_shown_and_nothing_is_written_then_the_printed_command_registers(fleet_env, fresh_host):
    first = fleet_env.hw(*_register_args(fresh_host))
    assert first.returncode == 3, first.stderr
    assert fresh_host.host_key_fingerprint in first.stdout + first.stderr
    assert not fleet_env.config.exists() and not fleet_env.known_hosts.exists()
    with fleet_env.store() as store:
        assert store.get_agent(fresh_host.name) is None

    confirm = _confirm_line(first.stderr)
    assert confirm[confirm.index("--host-key-fingerprint") + 1] == fresh_host.host_key_fingerprint
    second = fleet_env.hw(*confirm)
    assert second.returncode == 0, second.stdout + second.stderr
    # The first heartbeat printed the GPUs the fake nvidia-smi replays (2 GPUs in the default capture).
    assert "first heartbeat: 2 GPU(s)" in second.stdout
    assert "NVIDIA GeForce RTX 4070 Laptop GPU" in second.stdout

    (agent,) = agents_file.read_agents(fleet_env.config)
    assert (agent.name, agent.hostname, agent.ssh_port, agent.ssh_user) == (
        fresh_host.name, fresh_host.address, fresh_host.port, fresh_host.user)
    assert agent.host_key_fingerprint == fresh_host.host_key_fingerprint
    assert stat.S_IMODE(os.stat(fleet_env.config).st_mode) == 0o600
    pinned = hostkeys.pinned_keys(fleet_env.known_hosts, ssh.known_hosts_alias(agent))
    assert [k.fingerprint for k in pinned] == [fresh_host.host_key_fingerprint]
    assert stat.S_IMODE(os.stat(fleet_env.known_hosts).st_mode) == 0o600
    with fleet_env.store() as store:
        row = store.get_agent(fresh_host.name)
        assert row.key_fingerprint == fresh_host.lab.client_key_fingerprint
        assert row.host_key_fingerprint == fresh_host.host_key_fingerprint
        assert row.ip == fresh_host.address
        assert row.state == "online"
        assert [e.kind for e in store.list_events(agent=fresh_host.name)][:1] == ["agent_registered"]


def test_a_wrong_fingerprint_is_refused_before_anything_is_pinned(fleet_env, fresh_host):
    wrong = "SHA256:" + "B" * 43
    proc = fleet_env.hw(*_register_args(fresh_host, "--host-key-fingerprint", wrong))
    assert proc.returncode == 2
    assert "not the expected" in proc.stderr and fresh_host.host_key_fingerprint in proc.stderr
    assert not fleet_env.config.exists() and not fleet_env.known_hosts.exists()


def test_the_key_is_learned_without_offering_any_credential(fleet_env, fresh_host):
    mark = fresh_host.log_mark()
    proc = fleet_env.hw(*_register_args(fresh_host))
    assert proc.returncode == 3
    log = fresh_host.log_text(mark)
    assert log.strip(), "sshd logged nothing: the test would prove nothing"
    # At LogLevel VERBOSE sshd logs the fingerprint of every public key a client offers.
    assert fresh_host.lab.client_key_fingerprint not in log
    assert "Accepted" not in log


def test_append_keeps_the_existing_file_and_refuses_a_duplicate(fleet_env, fresh_host, lab):
    other = fresh_host.agent_entry(name="already-here")
    existing = (
        "# my fleet, hand written\n\n"
        "# the first box\n"
        "[[agents]]\n"
        f'name = "already-here"  # keep this comment\n'
        f'hostname = "{other["hostname"]}"\n'
        f'ssh_user = "{other["ssh_user"]}"\n'
        f'ssh_key_path = "{other["ssh_key_path"]}"\n'
        f'ssh_port = {other["ssh_port"]}\n'
        "\n# trailing note\n"
    )
    fleet_env.config.write_text(existing)
    fleet_env.config.chmod(0o600)
    fleet_env.register(fresh_host)
    text = fleet_env.config.read_text()
    assert text.startswith(existing)
    assert [a.name for a in agents_file.read_agents(fleet_env.config)] == ["already-here", fresh_host.name]

    again = fleet_env.hw(*_register_args(fresh_host, "--accept-new-host-key", "--skip-heartbeat"))
    assert again.returncode == 2 and "already registered" in again.stderr
    assert fleet_env.config.read_text() == text


def test_a_key_the_host_does_not_accept_registers_but_the_heartbeat_says_why(fleet_env, fresh_host, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    proc = fleet_env.hw("fleet", "register-ssh", "--host", f"{fresh_host.user}@{fresh_host.address}:{fresh_host.port}",
                        "--key", str(stranger), "--name", fresh_host.name, "--accept-new-host-key")
    assert proc.returncode == 1
    assert "first heartbeat failed (unreachable)" in proc.stderr
    assert "Permission denied" in proc.stderr
    with fleet_env.store() as store:
        assert store.get_agent(fresh_host.name).state == "pending"


def test_register_through_a_bastion_pins_both_keys(fleet_env, bastion_pair):
    bastion, internal = bastion_pair
    args = ["fleet", "register-ssh", "--host", f"{internal.user}@{internal.address}:{internal.port}",
            "--key", str(internal.lab.client_key), "--name", "behind-bastion",
            "--bastion", f"{bastion.user}@{bastion.address}:{bastion.port}"]
    refused = fleet_env.hw(*args)
    assert refused.returncode == 3
    assert bastion.host_key_fingerprint in refused.stderr
    assert not fleet_env.known_hosts.exists()

    proc = fleet_env.hw(*_confirm_line(refused.stderr)[:-2], "--accept-new-host-key")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert internal.host_key_fingerprint in proc.stdout
    assert "first heartbeat: 2 GPU(s)" in proc.stdout
    (agent,) = agents_file.read_agents(fleet_env.config)
    assert agent.bastion is not None and agent.bastion.hostname == bastion.address
    bastion_alias = ssh.bastion_known_hosts_alias(agent.bastion)
    agent_alias = ssh.known_hosts_alias(agent)
    pinned = hostkeys.pinned_keys
    assert [k.fingerprint for k in pinned(fleet_env.known_hosts, bastion_alias)] == [bastion.host_key_fingerprint]
    assert [k.fingerprint for k in pinned(fleet_env.known_hosts, agent_alias)] == [internal.host_key_fingerprint]
