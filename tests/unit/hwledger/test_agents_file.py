"""Editing ssh-agents.toml for register-ssh and remove: comments kept, atomic, validated, 0600."""

from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from hwledger import agents_file
from hwledger.errors import UserError

EXISTING = """\
# Our GPU fleet. Keep this comment.
# (second line of the header)

# the old box in rack 3
[[agents]]
name = "rack3"   # trailing comment kept
hostname = "10.0.0.3"
ssh_user = "root"
ssh_key_path = "/keys/id_ed25519"

# comment before the bastion host
[[agents]]
name = "hidden"
hostname = "internal-gpu.local"
ssh_user = "ubuntu"
ssh_key_path = "/keys/id_ed25519"

[agents.bastion]
hostname = "bastion.example.com"
ssh_user = "root"
ssh_key_path = "/keys/bastion"

# a closing remark at the end
"""


def _agent(name: str = "new-box", **kw) -> agents_schema.Agent:
    values = dict(name=name, hostname="192.0.2.10", ssh_user="root", ssh_key_path="/keys/id_ed25519",
                  ssh_port=2222, host_key_fingerprint="SHA256:" + "A" * 43)
    values.update(kw)
    return agents_schema.Agent(**values)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cfg" / "ssh-agents.toml"
    path.parent.mkdir(mode=0o700)
    path.write_text(EXISTING)
    path.chmod(0o600)
    return path


def test_append_keeps_every_existing_byte_and_adds_a_valid_block(config):
    agents_file.append_agent(config, _agent())
    text = config.read_text()
    assert text.startswith(EXISTING)
    names = [a.name for a in agents_file.read_agents(config)]
    assert names == ["rack3", "hidden", "new-box"]
    added = agents_file.read_agents(config)[-1]
    assert added == _agent()
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600


def test_append_creates_a_new_private_file(tmp_path):
    path = tmp_path / "new" / "ssh-agents.toml"
    path.parent.mkdir(mode=0o700)
    agents_file.append_agent(path, _agent())
    assert [a.name for a in agents_file.read_agents(path)] == ["new-box"]
    assert path.read_text().startswith("#")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_duplicate_name_is_refused_and_the_file_is_untouched(config):
    with pytest.raises(UserError, match="already registered"):
        agents_file.append_agent(config, _agent("rack3"))
    assert config.read_text() == EXISTING


def test_replace_swaps_the_block_and_keeps_the_others(config):
    agents_file.append_agent(config, _agent("rack3", hostname="10.9.9.9"), replace=True)
    found = {a.name: a for a in agents_file.read_agents(config)}
    assert found["rack3"].hostname == "10.9.9.9"
    assert list(found) == ["hidden", "rack3"]
    text = config.read_text()
    assert "# Our GPU fleet. Keep this comment." in text
    assert "# the old box in rack 3" not in text  # the replaced block's own comment goes with it
    assert "# comment before the bastion host" in text and "# a closing remark at the end" in text


def test_remove_takes_the_block_with_its_sub_table_and_keeps_the_rest(config):
    assert agents_file.remove_agent(config, "hidden") is True
    text = config.read_text()
    assert "internal-gpu.local" not in text and "bastion.example.com" not in text
    assert "# comment before the bastion host" not in text
    for kept in ("# Our GPU fleet. Keep this comment.", "# the old box in rack 3", "# trailing comment kept",
                 "# a closing remark at the end"):
        assert kept in text
    assert [a.name for a in agents_file.read_agents(config)] == ["rack3"]
    assert agents_file.remove_agent(config, "hidden") is False


def test_remove_the_first_block_keeps_the_header_comment(config):
    agents_file.remove_agent(config, "rack3")
    text = config.read_text()
    assert text.startswith("# Our GPU fleet. Keep this comment.\n# (second line of the header)\n")
    assert "rack3" not in text and "# the old box in rack 3" not in text
    assert [a.name for a in agents_file.read_agents(config)] == ["hidden"]


def test_an_invalid_file_is_reported_and_never_rewritten(config):
    broken = EXISTING + '\n[[agents]]\nname = "bad"\nhostname = "a;b"\nssh_user = "root"\nssh_key_path = "/k"\n'
    config.write_text(broken)
    with pytest.raises(UserError, match="hostname"):
        agents_file.append_agent(config, _agent())
    assert config.read_text() == broken


def test_agent_blocks_spans():
    lines = EXISTING.splitlines()
    blocks = agents_file.agent_blocks(lines)
    assert [lines[b.header] for b in blocks] == ["[[agents]]", "[[agents]]"]
    first, second = blocks
    assert lines[first.start] == "# the old box in rack 3"
    assert lines[first.end - 1] == 'ssh_key_path = "/keys/id_ed25519"'
    assert lines[second.end - 1] == 'ssh_key_path = "/keys/bastion"'  # includes [agents.bastion]
