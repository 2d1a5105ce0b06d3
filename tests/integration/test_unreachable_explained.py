"""When a host cannot be reached and the cause is on this side, the agent's state says so (reliability
audit, cases 4 and 5).

- A bastion whose host key changed: with ControlPersist, OpenSSH sends the ProxyCommand's messages to
  /dev/null, so the agent behind it only said "Connection closed by UNKNOWN port 65535" and went
  `stale`, then `offline`. Now the server checks the bastion's own key when an agent behind it stops
  answering, and blocks the agent (`host_key_changed`) naming the bastion.
- A private key made 0644, or deleted: ssh only says "Permission denied (publickey)". Now the state names
  the key file, what is wrong with it and the fix (`key_unusable`), and the host is not counted as down.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hwledger.fanout import SshFanoutHeartbeat
from hwledger.server import Server
from lab import write_agents_toml
from lab.pinning import pinned_fleet


@pytest.fixture
def short_data_dir():
    """A store directory short enough for the control sockets to live below it."""
    path = Path(tempfile.mkdtemp(prefix="hwlx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _server(fleet, transport_name: str) -> Server:
    transport = SshFanoutHeartbeat(fleet.policy(), query_timeout_s=5) if transport_name == "fanout" else None
    return Server(fleet, transport=transport, query_timeout_s=5)


def test_a_rekeyed_bastion_blocks_its_agents_and_is_named(lab, tmp_path, short_data_dir):
    bastion, internal = lab.add_bastion_pair(lab.unique_name("behind"))
    try:
        fleet = pinned_fleet(tmp_path, short_data_dir, [internal])
        server = _server(fleet, "fanout")
        try:
            server.tick()
            assert server.store.get_agent(internal.name).state == "online"
            bastion.rotate_host_key()  # the bastion restarts with a new key; the agent's master goes with it
            server.tick()
            row = server.store.get_agent(internal.name)
        finally:
            server.close()
        assert (row.state, row.state_reason) == ("host_key_changed", "host_key_changed"), row
        assert f"the bastion {bastion.user}@{bastion.address}:{bastion.port}" in row.state_msg
        assert "not the one pinned for it" in row.state_msg and row.consecutive_misses == 0
    finally:
        internal.stop()
        bastion.stop()


def test_a_bastion_that_is_fine_leaves_the_agent_unreachable(lab, tmp_path, short_data_dir):
    bastion, internal = lab.add_bastion_pair(lab.unique_name("behind"))
    try:
        fleet = pinned_fleet(tmp_path, short_data_dir, [internal])
        server = _server(fleet, "fanout")
        try:
            server.tick()
            internal.stop()  # the GPU host itself is down; its bastion answers with the pinned key
            server.tick()
            row = server.store.get_agent(internal.name)
        finally:
            server.close()
        assert (row.state, row.state_reason, row.consecutive_misses) == ("stale", "unreachable", 1), row
    finally:
        bastion.stop()


@pytest.mark.parametrize("transport", ["fanout", "ansible"])
@pytest.mark.parametrize("damage", ["mode 0644", "deleted", "passphrase"])
def test_an_unusable_private_key_is_named_with_the_fix(lab, fresh_host, tmp_path, short_data_dir, transport, damage,
                                                       monkeypatch):
    key = tmp_path / "agent_key"
    shutil.copy(lab.client_key, key)
    key.chmod(0o600)
    fleet = pinned_fleet(tmp_path, short_data_dir, [fresh_host])
    write_agents_toml(fleet.config, [fresh_host.agent_entry(ssh_key_path=str(key))])
    if damage == "deleted":
        key.unlink()
    elif damage == "passphrase":
        # The right key, given a passphrase afterwards (written into the file by hand, say): ssh runs in
        # BatchMode and cannot ask for it, and no ssh-agent holds it.
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "a passphrase", "-f", str(key)], check=True,
                       capture_output=True)
    else:
        key.chmod(0o644)
    server = _server(fleet, transport)
    try:
        server.tick()  # no master yet: this connection needs the key
        row = server.store.get_agent(fresh_host.name)
    finally:
        server.close()
    assert (row.state, row.state_reason) == ("error", "key_unusable"), row
    assert str(key) in row.state_msg
    expected = {"mode 0644": "chmod 600", "deleted": "does not exist", "passphrase": "protected by a passphrase"}
    assert expected[damage] in row.state_msg, row.state_msg
    assert row.consecutive_misses == 0 and row.last_seen is None  # the host is not blamed
