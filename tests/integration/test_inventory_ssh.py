"""hwledger.fleet.ssh_agents against real sshd hosts (tests/lab): a loopback host and a host that only
its bastion can reach. Every run is a real `ansible all -m raw` through the plugin's connection vars."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as A
from ansible_collections.hwledger.fleet.plugins.plugin_utils import probe, ssh
from lab import SshHost, write_agents_toml
from lab.pinning import pinned_lines
from lab.netns import INNER_NET  # the bastion <-> internal links, inside the namespaces only

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.root


class Fleet:
    """An ssh-agents.toml, hwledger's own known_hosts and a *.hwledger.yml config in a short private dir."""

    def __init__(self, hosts: list[SshHost], *, pin: bool = True, host_key_checking: str = "yes") -> None:
        # Short: control sockets live in <dir>/cp and must fit the unix socket path limit.
        self.dir = Path(tempfile.mkdtemp(prefix="hwl-it-", dir="/tmp"))
        self.control_dir = self.dir / "cp"
        self.known_hosts = self.dir / "known_hosts"
        self.agents_file = write_agents_toml(self.dir / "ssh-agents.toml", [host.agent_entry() for host in hosts])
        self.agents = A.load_agents_file(str(self.agents_file))[0]
        self.hosts = {host.name: host for host in hosts}
        lines = []
        if pin:  # what `hwledger fleet register-ssh` does: pin each key under the agent's alias
            for agent in self.agents:
                lines += pinned_lines(agent, self.hosts[agent.name])
        self.known_hosts.write_text("".join(f"{line}\n" for line in lines))
        self.known_hosts.chmod(0o600)
        self.configure(host_key_checking)

    def configure(self, host_key_checking: str) -> None:
        config = self.dir / "fleet.hwledger.yml"
        config.write_text("plugin: hwledger.fleet.ssh_agents\n"
                          "agents_file: ssh-agents.toml\n"
                          f"host_key_checking: '{host_key_checking}'\n"
                          f"known_hosts_file: {self.known_hosts}\n"
                          f"control_dir: {self.control_dir}\n"
                          "connect_timeout: 5\n")
        config.chmod(0o600)
        self.config = config

    def policy(self) -> ssh.SshPolicy:
        return ssh.SshPolicy(known_hosts=str(self.known_hosts), control_dir=str(self.control_dir), connect_timeout=5)

    def raw(self, command: str = "echo ok", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        environment = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
        environment.update({"ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(self.dir / "tmp")})
        environment.update(env or {})
        return subprocess.run([str(BIN / "ansible"), "all", "-i", str(self.config), "-m", "ansible.builtin.raw",
                               "-a", command, "-o", "-T", "10"],
                              cwd=REPO, env=environment, check=False, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    def close(self) -> None:
        """Stop the ControlPersist masters this fleet's connections left running, then remove the dir."""
        if self.control_dir.is_dir():
            for socket in self.control_dir.iterdir():
                subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "hwledger-test"],
                               check=False, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


def host_lines(output: str) -> dict[str, str]:
    """`ansible -o` prints one line per host: "name | STATUS | ..."."""
    lines = {}
    for line in output.splitlines():
        name, sep, rest = line.partition(" | ")
        if sep:
            lines[name] = rest
    return lines


@pytest.fixture(scope="module")
def loopback(lab):
    host = lab.add_loopback_host(lab.unique_name("inv"))
    yield host
    host.stop()


@pytest.fixture
def fleet_factory():
    fleets: list[Fleet] = []

    def make(hosts, **kwargs) -> Fleet:
        fleet = Fleet(hosts, **kwargs)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


def test_raw_reaches_a_loopback_host_and_a_host_behind_its_bastion(loopback, bastion_pair, fleet_factory):
    bastion, internal = bastion_pair
    fleet = fleet_factory([loopback, internal])
    proc = fleet.raw("echo ok; echo from=$SSH_CONNECTION")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = host_lines(proc.stdout)
    assert lines[loopback.name].startswith("CHANGED | rc=0 | (stdout) ok"), lines
    assert lines[internal.name].startswith("CHANGED | rc=0 | (stdout) ok"), lines
    # The internal host saw the connection come from the bastion's inner link, which only the bastion's
    # namespace has: the chain went through the bastion.
    client = lines[internal.name].split("from=", 1)[1].split()[0]
    assert ipaddress.ip_address(client) in INNER_NET, (client, bastion)
    assert fleet.known_hosts.read_text().count("\n") == 3  # nothing was added


def test_app_fast_path_shares_the_ansible_connection(loopback, fleet_factory):
    fleet = fleet_factory([loopback])
    assert fleet.raw().returncode == 0
    sockets = list(fleet.control_dir.iterdir())
    assert len(sockets) == 1 and len(sockets[0].name) == 40  # <control_dir>/%C
    [agent] = fleet.agents
    mark = loopback.log_mark()
    proc = subprocess.run(ssh.ssh_argv(agent, fleet.policy(), "echo fast"), check=False, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout == "fast\n", proc.stderr
    # Multiplexed over the master Ansible opened: sshd saw no new login.
    assert "Accepted publickey" not in loopback.log_text(since=mark)


def test_changed_host_key_is_unreachable_and_nothing_is_learned(fresh_host, fleet_factory):
    fleet = fleet_factory([fresh_host])
    assert fleet.raw().returncode == 0
    fleet.close()  # no master left: the next connection must do a full handshake
    fleet = fleet_factory([fresh_host])
    pinned = fleet.known_hosts.read_bytes()
    fresh_host.rotate_host_key()
    mark = fresh_host.log_mark()
    for policy in ("yes", "accept-new"):  # accept-new learns missing keys, never changed ones
        fleet.configure(policy)
        proc = fleet.raw()
        assert proc.returncode != 0
        assert host_lines(proc.stdout)[fresh_host.name].startswith("UNREACHABLE!"), proc.stdout
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stdout, proc.stdout
        assert "Host key verification failed" in proc.stdout, proc.stdout
        assert probe.classify_ssh_failure(proc.stdout) == "host_key_changed"  # as the server reads it
        assert fleet.known_hosts.read_bytes() == pinned
    assert "Accepted publickey" not in fresh_host.log_text(since=mark)  # never authenticated to it


def test_a_changed_host_key_is_refused_even_when_ansible_turns_host_key_checking_off(fresh_host, fleet_factory):
    """ansible-runner (and so AWX) exports ANSIBLE_HOST_KEY_CHECKING=False by default. Ansible's ssh plugin
    then puts "-o StrictHostKeyChecking=no" before the plugin's common args, and ssh keeps the first value:
    the host variables must keep that option out, or ssh would log in to the impostor with our key."""
    fleet = fleet_factory([fresh_host])
    assert fleet.raw().returncode == 0
    fleet.close()  # no master left: the next connection must do a full handshake
    fleet = fleet_factory([fresh_host])
    pinned = fleet.known_hosts.read_bytes()
    fresh_host.rotate_host_key()
    mark = fresh_host.log_mark()
    proc = fleet.raw(env={"ANSIBLE_HOST_KEY_CHECKING": "False"})
    assert host_lines(proc.stdout)[fresh_host.name].startswith("UNREACHABLE!"), proc.stdout + proc.stderr
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stdout, proc.stdout
    assert "Host key verification failed" in proc.stdout, proc.stdout
    assert fleet.known_hosts.read_bytes() == pinned
    assert "Accepted publickey" not in fresh_host.log_text(since=mark)  # never authenticated to it


def test_a_missing_key_is_learned_only_with_accept_new(fresh_host, fleet_factory):
    fleet = fleet_factory([fresh_host], pin=False)
    proc = fleet.raw()
    assert host_lines(proc.stdout)[fresh_host.name].startswith("UNREACHABLE!")
    assert "Host key verification failed" in proc.stdout
    assert probe.classify_ssh_failure(proc.stdout) == "host_key_unknown"  # as the server reads it
    assert fleet.known_hosts.read_text() == ""
    fleet.configure("accept-new")
    assert fleet.raw().returncode == 0
    [agent] = fleet.agents
    key_type, key = fresh_host.host_key_pub.split()[:2]
    assert fleet.known_hosts.read_text().split() == [ssh.known_hosts_alias(agent), key_type, key]
    fleet.close()
    fleet = fleet_factory([fresh_host], pin=True)  # the strict default now works with the learned key
    assert fleet.raw().returncode == 0
