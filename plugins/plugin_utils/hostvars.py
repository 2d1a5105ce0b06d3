# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""What an agent is to Ansible: its host variables and its groups.

One home for both users: the ``hwledger.fleet.ssh_agents`` inventory plugin sets them on its hosts, and
the app's server writes them into the inventory of every run it starts, so a playbook sees the same
hosts, variables and groups whichever way it was started (the plugin adds its Constructable
``compose`` / ``groups`` / ``keyed_groups`` on top, which need Ansible's templating).
Plain data; the inventory plugin and the app's runner mark every string unsafe.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent, agent_to_dict
from ansible_collections.hwledger.fleet.plugins.plugin_utils.telemetry import tool_in_command

# Inventory groups (public names, see DESIGN.md).
GROUP_ALL = "hwledger_agents"
GROUP_NVIDIA = "hwledger_nvidia"
GROUP_ROCM = "hwledger_rocm"
GROUP_VIA_BASTION = "hwledger_via_bastion"
GROUPS = (GROUP_ALL, GROUP_NVIDIA, GROUP_ROCM, GROUP_VIA_BASTION)
# Set by the app's server on the hosts of a run that only checks that they answer (see inventory()).
LIVENESS_VAR = "hwledger_liveness_check"
_TOOL_GROUPS = {"nvidia-smi": GROUP_NVIDIA, "rocm-smi": GROUP_ROCM, "amd-smi": GROUP_ROCM}


def agent_groups(agent: Agent) -> list[str]:
    """The inventory groups of an agent, ``hwledger_agents`` first.

    The GPU group comes from the tool its gpu_query_cmd runs, as the telemetry parsers see it
    (telemetry.tool_in_command): one place decides which tool a command runs.
    """
    groups = [GROUP_ALL]
    tool = tool_in_command(agent.gpu_query_cmd)
    if tool in _TOOL_GROUPS:
        groups.append(_TOOL_GROUPS[tool])
    if agent.bastion is not None:
        groups.append(GROUP_VIA_BASTION)
    return groups


def host_vars(agent: Agent, policy: ssh.SshPolicy) -> dict:
    """The inventory variables of an agent.

    The host key policy lives in ``ansible_ssh_common_args``, which the ssh connection plugin puts after
    its own options; ssh keeps the first value of an option, so Ansible's ``host_key_checking`` set to
    false (ansible-runner and AWX set ANSIBLE_HOST_KEY_CHECKING=False by default) would put
    ``StrictHostKeyChecking=no`` first and win. A host variable beats the environment and ansible.cfg
    for that plugin option, so it is pinned here, and the connection is pinned to ``ssh`` because
    paramiko would ignore the common args altogether.
    """
    variables: dict[str, Any] = {
        "ansible_connection": ssh.ANSIBLE_CONNECTION,
        "ansible_host": agent.hostname,
        "ansible_port": agent.ssh_port,
        "ansible_user": agent.ssh_user,
        "ansible_ssh_private_key_file": agent.ssh_key_path,
        "ansible_ssh_common_args": ssh.ssh_common_args(agent, policy),
        "hwledger_gpu_query_cmd": agent.gpu_query_cmd,
        "hwledger_agent": agent_to_dict(agent),
    }
    if policy.host_key_checking != "off":
        variables["ansible_ssh_host_key_checking"] = True
    return variables


def inventory(agents: Iterable[Agent], policy: ssh.SshPolicy, *, liveness: Collection[str] = ()) -> dict:
    """A whole inventory (the YAML/JSON inventory structure) of ``agents``: every host in
    ``hwledger_agents`` with its variables, and in its GPU and bastion groups, as the plugin makes them.

    The agents named in ``liveness`` get ``hwledger_liveness_check: true``: this run's ``gpu_query`` only
    checks that they answer, without running their GPU tool (their ``min_query_interval_s`` has not passed).
    """
    hosts: dict[str, dict] = {}
    members: dict[str, dict[str, dict]] = {group: {} for group in GROUPS}
    for agent in agents:
        hosts[agent.name] = host_vars(agent, policy)
        if agent.name in liveness:
            hosts[agent.name][LIVENESS_VAR] = True
        for group in agent_groups(agent)[1:]:
            members[group][agent.name] = {}
    children: dict[str, dict] = {GROUP_ALL: {"hosts": hosts}}
    for group in GROUPS[1:]:
        children[group] = {"hosts": members[group]}
    return {"all": {"children": children}}
