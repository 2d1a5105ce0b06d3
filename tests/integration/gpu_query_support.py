"""Helpers shared by the gpu_query and heartbeat integration tests: an inventory for lab hosts,
ansible-playbook runs from the checkout, and the cleanup of the ssh masters those runs leave.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from lab import SshHost, write_agents_toml
from lab.pinning import pinned_lines

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))


def make_inventory(directory: Path, hosts: list[SshHost], *, control_dir: str, overrides: dict | None = None) -> Path:
    """ssh-agents.toml, a known_hosts pinning each host (and bastion) under its alias, and the YAML source."""
    overrides = overrides or {}
    agents_file = write_agents_toml(directory / "ssh-agents.toml",
                                    [host.agent_entry(**overrides.get(host.name, {})) for host in hosts])
    agents, _warnings = agents_schema.load_agents_file(agents_file)
    by_name = {host.name: host for host in hosts}
    lines = [line for agent in agents for line in pinned_lines(agent, by_name[agent.name])]
    known_hosts = directory / "known_hosts"
    known_hosts.write_text("\n".join(lines) + "\n")
    known_hosts.chmod(0o600)
    source = directory / "fleet.hwledger.yml"
    source.write_text(
        "plugin: hwledger.fleet.ssh_agents\n"
        "agents_file: %s\n"
        "known_hosts_file: %s\n"
        "control_dir: %s\n"
        "host_key_checking: 'yes'\n" % (agents_file, known_hosts, control_dir)
    )
    return source


@pytest.fixture
def control_dir() -> Iterator[str]:
    """A short private directory for ssh control sockets; the masters started there are ended after."""
    # Short on purpose: "<dir>/<40 hex>.<16 chars>" must fit a unix socket path.
    path = tempfile.mkdtemp(prefix="hwl-", dir="/tmp")
    try:
        yield path
    finally:
        stop_ssh_masters(path)
        shutil.rmtree(path, ignore_errors=True)


def stop_ssh_masters(control_path_dir: str) -> None:
    """End the ssh ControlMaster processes whose sockets live in this test's own directory (by pid)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if cmdline.startswith(b"ssh") and control_path_dir.encode() in cmdline:
            try:
                os.kill(int(entry), 15)
            except OSError:
                pass


def run_playbook(playbook: str | Path, inventory: Path, tmp_path: Path, *extra: str, timeout: float = 180,
                 env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """ansible-playbook from the checkout (its ansible.cfg finds this collection), output as text."""
    env = dict(os.environ)
    env.update(ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_HOME=str(tmp_path / "ansible-home"))
    env.pop("ANSIBLE_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.run([ANSIBLE_PLAYBOOK, str(playbook), "-i", str(inventory), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
