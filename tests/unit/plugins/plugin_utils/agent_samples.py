"""Sample agents and helpers shared by the tests of the agents schema, the ssh options and the host vars."""

from __future__ import annotations

import json

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as A
from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh as S
from tests.toolchains import REPO

SPEC_EXAMPLE = REPO / "examples" / "ssh-agents.toml"
SPEC_QUERY = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
SOURCE = "/etc/fleet/ssh-agents.toml"  # a file name for messages; parse_agents_toml never opens it

GOOD_AGENT = {"name": "gpu-1", "hostname": "gpu-1.example.com", "ssh_user": "ubuntu",
              "ssh_key_path": "/keys/id_ed25519"}
GOOD_BASTION = {"hostname": "bastion.example.com", "ssh_user": "jump", "ssh_key_path": "/keys/bastion_key",
                "ssh_port": 2222}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string with ASCII escapes is a valid TOML basic string


def agent_block(fields: dict, bastion: dict | None = None) -> str:
    lines = ["[[agents]]"] + [f"{json.dumps(key)} = {toml_value(value)}" for key, value in fields.items()]
    if bastion is not None:
        lines += ["", "[agents.bastion]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in bastion.items()]
    return "\n".join(lines) + "\n"


def parse(text: str):
    return A.parse_agents_toml(text, SOURCE)


def error_of(text: str) -> str:
    with pytest.raises(A.AgentsFileError) as caught:
        parse(text)
    return str(caught.value)


def policy(**overrides) -> S.SshPolicy:
    values = {"known_hosts": "/var/lib/hwl/known_hosts", "control_dir": "/run/hwl/cp"}
    values.update(overrides)
    return S.SshPolicy(**values)
