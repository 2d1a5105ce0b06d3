"""SshFanoutHeartbeat against real sshd hosts (tests/lab): direct and bastion-only hosts, a hung tool, an
address that never answers, a rotated host key, and the serve tick recording into a real SQLite store.

Host keys are pinned the way register-ssh pins them: one line per agent under its HostKeyAlias in a
private known_hosts file, checked strictly (StrictHostKeyChecking=yes).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils import probe

from hwledger.fanout import SshFanoutHeartbeat
from hwledger.server import Server
# control_dir is a fixture: importing it makes it available to the tests of this module.
from tests.integration.gpu_query_support import control_dir  # noqa: F401 pylint: disable=unused-import
from lab import Lab, SshHost
from lab.pinning import pinned_fleet, pinned_lines

TIMEOUT_S = 2


class Pinned:
    """A private known_hosts plus control dir, and the agents pinned in it."""

    def __init__(self, root: Path, control_dir: str):
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text("")
        self.known_hosts.chmod(0o600)
        self.policy = ssh.SshPolicy(known_hosts=str(self.known_hosts), control_dir=control_dir)

    def agent(self, host: SshHost, **overrides) -> agents_schema.Agent:
        agent = agents_schema.agent_from_dict(host.agent_entry(**overrides))
        with open(self.known_hosts, "a", encoding="utf-8") as handle:
            handle.write("".join(f"{line}\n" for line in pinned_lines(agent, host)))
        return agent


@pytest.fixture
def pinned(tmp_path: Path, control_dir: str) -> Pinned:
    return Pinned(tmp_path, control_dir)


def _processes_with(text: str) -> list[tuple[int, list[str]]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(text in arg for arg in argv):
            found.append((int(entry), argv))
    return found


def ssh_clients(control_dir: str) -> list[int]:
    """ssh clients (not masters) of this control dir that are still running."""
    return [pid for pid, argv in _processes_with(f"ControlPath={control_dir}/")
            if os.path.basename(argv[0]) == "ssh"]


def masters(control_dir: str) -> list[int]:
    return [pid for pid, argv in _processes_with(f"ssh: {control_dir}/") if argv[0].endswith("[mux]")]


def never() -> bool:
    return False


def master_is_up(agent: agents_schema.Agent, policy: ssh.SshPolicy) -> bool:
    return subprocess.run(ssh.ssh_argv(agent, policy, control_operation="check"), capture_output=True, check=False).returncode == 0


def test_snapshots_from_loopback_and_bastion_hosts_over_reused_masters(
        pinned: Pinned, fresh_host: SshHost, bastion_pair) -> None:
    _bastion, internal = bastion_pair
    direct, behind = pinned.agent(fresh_host), pinned.agent(internal, name="fanout-internal")
    transport = SshFanoutHeartbeat(pinned.policy, query_timeout_s=TIMEOUT_S)
    for _tick in range(2):
        outcomes = transport.tick([direct, behind], cancel=never)
        for name in (direct.name, behind.name):
            assert outcomes[name].ok, outcomes[name]
            snapshot = outcomes[name].snapshot
            assert snapshot["agent"] == name
            assert [gpu["name"] for gpu in snapshot["gpus"]] == [
                "NVIDIA GeForce RTX 4070 Laptop GPU", "NVIDIA GeForce RTX 5070 Ti"]
        # Both masters are up after the first tick: the second one was a channel on each, not a handshake.
        assert master_is_up(direct, pinned.policy) and master_is_up(behind, pinned.policy)
    assert ssh_clients(pinned.policy.control_dir) == []
    transport.close(exit_masters=True)
    assert not master_is_up(direct, pinned.policy) and not master_is_up(behind, pinned.policy)


def test_a_hung_host_times_out_within_the_timeout_while_the_others_answer(lab: Lab, pinned: Pinned,
                                                                          fresh_host: SshHost) -> None:
    hung = lab.add_loopback_host(lab.unique_name("hung"), delay=60)
    try:
        agents = [pinned.agent(fresh_host), pinned.agent(hung)]
        answered: dict[str, float] = {}
        start = time.monotonic()
        transport = SshFanoutHeartbeat(pinned.policy, query_timeout_s=TIMEOUT_S,
                                       on_outcome=lambda name, _o: answered.setdefault(name, time.monotonic() - start))
        outcomes = transport.tick(agents, cancel=never)
        elapsed = time.monotonic() - start
        assert outcomes[fresh_host.name].ok
        assert answered[fresh_host.name] < TIMEOUT_S  # not held up by the hung host
        # The host's watchdog killed the tool at the timeout and answered ("timeout", not the controller's
        # "no_answer"): the host is up, its tool hangs. The bound only proves the tick did not wait for the
        # tool (60 s).
        assert outcomes[hung.name].reason == "timeout"
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 20
        assert ssh_clients(pinned.policy.control_dir) == []
        time.sleep(probe.KILL_GRACE_S + 0.5)
        leftover = [pid for pid in hung.processes() if pid != hung.pid and "sshd" not in
                    Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        assert leftover == []  # the hung tool and its sleeper were killed on the host
    finally:
        hung.stop()


def test_an_address_that_never_answers_is_cut_at_the_deadline(pinned: Pinned, fresh_host: SshHost) -> None:
    # A listener that accepts connections (the kernel does) but never says a word: ssh waits for the
    # banner until its ConnectTimeout (10 s), longer than the deadline, which must cut it first.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        mute = agents_schema.Agent(name="mute", hostname="127.0.0.1", ssh_user=fresh_host.user,
                                   ssh_key_path=str(fresh_host.lab.client_key), ssh_port=port)
        transport = SshFanoutHeartbeat(pinned.policy, query_timeout_s=1)
        start = time.monotonic()
        outcomes = transport.tick([mute, pinned.agent(fresh_host)], cancel=never)
        elapsed = time.monotonic() - start
    assert outcomes["mute"].reason == "no_answer"
    assert outcomes[fresh_host.name].ok
    # Cut at its deadline, not at ssh's ConnectTimeout (10 s) nor later.
    deadline = transport.deadline_for(mute)
    assert deadline <= elapsed < deadline + 3.0
    assert ssh_clients(pinned.policy.control_dir) == []


def test_a_rotated_host_key_is_refused_and_nothing_is_learned(pinned: Pinned, fresh_host: SshHost) -> None:
    agent = pinned.agent(fresh_host)
    transport = SshFanoutHeartbeat(pinned.policy, query_timeout_s=TIMEOUT_S)
    assert transport.tick([agent], cancel=never)[agent.name].ok
    fresh_host.rotate_host_key()  # sshd restarted with a new key: the old connection (and master) is gone
    deadline = time.monotonic() + 10
    while master_is_up(agent, pinned.policy) and time.monotonic() < deadline:
        time.sleep(0.1)
    pinned_before = pinned.known_hosts.read_bytes()
    files_before = sorted(os.listdir(pinned.known_hosts.parent))
    outcome = transport.tick([agent], cancel=never)[agent.name]
    assert outcome.reason == "host_key_changed", outcome
    assert pinned.known_hosts.read_bytes() == pinned_before
    assert sorted(os.listdir(pinned.known_hosts.parent)) == files_before  # no known_hosts.old either
    assert ssh_clients(pinned.policy.control_dir) == []


def test_a_host_with_no_pinned_key_is_host_key_unknown(pinned: Pinned, fresh_host: SshHost) -> None:
    """ssh says "Host key verification failed." for an unknown key as for a changed one; only the banner
    tells them apart, and an unregistered host must be told to register, not to re-key."""
    agent = agents_schema.agent_from_dict(fresh_host.agent_entry())  # nothing pinned for it
    mark = fresh_host.log_mark()
    outcome = SshFanoutHeartbeat(pinned.policy, query_timeout_s=TIMEOUT_S).tick([agent], cancel=never)[agent.name]
    assert outcome.reason == "host_key_unknown", outcome
    assert "register-ssh" in outcome.msg
    assert pinned.known_hosts.read_text() == ""  # nothing was learned
    assert "Accepted publickey" not in fresh_host.log_text(since=mark)
    assert ssh_clients(pinned.policy.control_dir) == []


def test_the_serve_tick_records_snapshots_and_states_in_the_store(lab: Lab, tmp_path: Path,
                                                                  fresh_host: SshHost) -> None:
    broken = lab.add_loopback_host(lab.unique_name("broken"),
                                   capture="nvidia/failure-nvml-driver-library-version-mismatch.txt", rc=18)
    data = Path(tempfile.mkdtemp(prefix="hwlf-", dir="/tmp"))  # the control dir lives below the store
    try:
        fleet = pinned_fleet(tmp_path, data, [fresh_host, broken])
        transport = SshFanoutHeartbeat(fleet.policy(), query_timeout_s=TIMEOUT_S)
        server = Server(fleet, transport=transport)
        try:
            report = server.tick()
            assert set(report.outcomes) == {fresh_host.name, broken.name}
            rows = {row.name: row for row in server.store.list_agents()}
            assert rows[fresh_host.name].state == "online"
            assert rows[broken.name].state == "error"
            snapshot = server.store.latest_snapshot(fresh_host.name)
            assert snapshot is not None and len(snapshot.data["gpus"]) == 2
        finally:
            server.close()
            transport.close(exit_masters=True)
        assert masters(str(fleet.policy().control_dir)) == []
    finally:
        broken.stop()
        shutil.rmtree(data, ignore_errors=True)
