"""An agent's Ansible host vars and groups (plugins/plugin_utils/hostvars.py), for the inventory plugin and
the server alike."""

from __future__ import annotations

import shlex

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as A
from ansible_collections.hwledger.fleet.plugins.plugin_utils import hostvars as H
from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh as S
from tests.unit.plugins.plugin_utils.agent_samples import (
    GOOD_AGENT,
    GOOD_BASTION,
    SPEC_EXAMPLE,
    SPEC_QUERY,
    policy,
)


def test_spec_example_groups(home):
    agents = A.parse_agents_toml(SPEC_EXAMPLE.read_text(), str(SPEC_EXAMPLE))[0]
    # The GPU group follows the tool each agent's gpu_query_cmd runs: nvidia-smi, rocm-smi, nvidia-smi.
    assert [H.agent_groups(agent) for agent in agents] == [
        ["hwledger_agents", "hwledger_nvidia"],
        ["hwledger_agents", "hwledger_rocm"],
        ["hwledger_agents", "hwledger_nvidia", "hwledger_via_bastion"],
    ]


def test_host_vars_match_the_options():
    agent = A.Agent(**GOOD_AGENT, bastion=A.Bastion(**GOOD_BASTION))
    pol = policy()
    assert H.host_vars(agent, pol) == {
        "ansible_connection": "ssh",
        "ansible_ssh_host_key_checking": True,
        "ansible_host": "gpu-1.example.com",
        "ansible_port": 22,
        "ansible_user": "ubuntu",
        "ansible_ssh_private_key_file": "/keys/id_ed25519",
        "ansible_ssh_common_args": shlex.join(S.ssh_options(agent, pol)),
        "hwledger_gpu_query_cmd": SPEC_QUERY,
        "hwledger_agent": {"name": "gpu-1", "hostname": "gpu-1.example.com", "ssh_user": "ubuntu",
                           "ssh_key_path": "/keys/id_ed25519", "ssh_port": 22, "gpu_query_cmd": SPEC_QUERY,
                           "host_key_fingerprint": None, "query_timeout_s": None, "min_query_interval_s": 0,
                           "bastion": {"hostname": "bastion.example.com", "ssh_user": "jump",
                                       "ssh_key_path": "/keys/bastion_key", "ssh_port": 2222}},
    }


@pytest.mark.parametrize("checking", ["yes", "accept-new"])
def test_host_vars_enforce_host_key_checking_whatever_ansible_is_told(checking):
    """ansible-runner/AWX export ANSIBLE_HOST_KEY_CHECKING=False; the host variable (which beats the
    environment for the ssh plugin's host_key_checking) keeps "-o StrictHostKeyChecking=no" out."""
    variables = H.host_vars(A.Agent(**GOOD_AGENT), policy(host_key_checking=checking))
    assert variables["ansible_ssh_host_key_checking"] is True
    assert variables["ansible_connection"] == "ssh"  # paramiko would ignore ansible_ssh_common_args


def test_host_vars_leave_host_key_checking_alone_when_the_policy_is_off():
    variables = H.host_vars(A.Agent(**GOOD_AGENT), policy(host_key_checking="off"))
    assert "ansible_ssh_host_key_checking" not in variables
    assert variables["ansible_connection"] == "ssh"


@pytest.mark.parametrize("cmd, bastion, groups", [
    ("nvidia-smi --query-gpu=index,memory.free --format=csv", False, ["hwledger_agents", "hwledger_nvidia"]),
    ("rocm-smi --showuse --json", False, ["hwledger_agents", "hwledger_rocm"]),
    ("sudo /opt/rocm/bin/amd-smi metric --json", True, ["hwledger_agents", "hwledger_rocm", "hwledger_via_bastion"]),
    ("cat /run/gpus.csv", False, ["hwledger_agents"]),
    ("cat /run/gpus.csv", True, ["hwledger_agents", "hwledger_via_bastion"]),
])
def test_groups(cmd, bastion, groups):
    agent = A.Agent(**GOOD_AGENT, gpu_query_cmd=cmd, bastion=A.Bastion(**GOOD_BASTION) if bastion else None)
    assert H.agent_groups(agent) == groups


def test_the_servers_inventory_has_the_plugins_groups(home):
    """The server writes this inventory for its runs: every agent in hwledger_agents with its host vars,
    and in the same GPU and bastion groups the inventory plugin puts it in."""
    agents = A.parse_agents_toml(SPEC_EXAMPLE.read_text(), str(SPEC_EXAMPLE))[0]
    pol = policy()
    inventory = H.inventory(agents, pol)
    children = inventory["all"]["children"]
    assert set(children) == set(H.GROUPS)
    assert children["hwledger_agents"]["hosts"] == {agent.name: H.host_vars(agent, pol) for agent in agents}
    for group in H.GROUPS[1:]:
        members = {agent.name for agent in agents if group in H.agent_groups(agent)}
        assert set(children[group]["hosts"]) == members
    assert set(children["hwledger_nvidia"]["hosts"]) == {"vast-rental-1", "vpn-private-gpu"}
    assert set(children["hwledger_rocm"]["hosts"]) == {"lambda-labs-2"}
    assert set(children["hwledger_via_bastion"]["hosts"]) == {"vpn-private-gpu"}
