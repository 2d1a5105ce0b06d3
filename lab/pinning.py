"""Pinning lab hosts as `hwledger fleet register-ssh` does: each key under its agent's HostKeyAlias."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh

from hwledger.fleet import Fleet

from .agents_toml import write_agents_toml
from .lab import SshHost, known_hosts_line


def pinned_lines(agent: agents_schema.Agent, host: SshHost) -> list[str]:
    """known_hosts lines for `host` as `agent`: its key under the agent's alias, and for an agent with a
    bastion, the bastion's key under the bastion's alias (the lab host's bastion is that bastion)."""
    lines = [known_hosts_line(ssh.known_hosts_alias(agent), host)]
    if agent.bastion is not None and host.bastion is not None:
        lines.append(known_hosts_line(ssh.bastion_known_hosts_alias(agent.bastion), host.bastion))
    return lines


def pinned_fleet(config_dir: Path, data_dir: Path, hosts: list[SshHost],
                 overrides: dict[str, dict[str, Any]] | None = None) -> Fleet:
    """A fleet whose agents file lists `hosts`, all pinned in its known_hosts, with its store (and so its
    ssh control dir) under `data_dir`, which must be short enough for unix socket paths. `overrides`:
    {host name: agent fields to set} (SshHost.agent_entry)."""
    fleet = Fleet(config_dir / "ssh-agents.toml", config_dir / "known_hosts", data_dir / "fleet.db")
    overrides = overrides or {}
    write_agents_toml(fleet.config, [host.agent_entry(**overrides.get(host.name, {})) for host in hosts])
    agents, _warnings = agents_schema.load_agents_file(fleet.config)
    by_name = {host.name: host for host in hosts}
    fleet.known_hosts.write_text("".join(f"{line}\n" for agent in agents
                                         for line in pinned_lines(agent, by_name[agent.name])))
    fleet.known_hosts.chmod(0o600)
    return fleet
