"""The ssh policy and the one ssh command-line builder (plugins/plugin_utils/ssh.py): host-key options,
session hardening, connection reuse, a bastion's ProxyCommand, the control socket directory and its
chooser, and what ssh itself reads from the options (`ssh -G`)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as A
from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh as S
from tests.unit.plugins.plugin_utils.agent_samples import (
    GOOD_AGENT,
    GOOD_BASTION,
    SPEC_EXAMPLE,
    agent_block,
    parse,
    policy,
)

ssh_binary = shutil.which("ssh")


def option_values(options: list[str]) -> dict[str, str]:
    assert options[:2] == ["-F", "none"]  # no ssh_config applies (see NO_CONFIG)
    options = options[2:]
    assert options[::2] == ["-o"] * (len(options) // 2)
    return dict(option.split("=", 1) for option in options[1::2])


@pytest.fixture
def short_tmp():
    """A temporary directory with a short path (pytest's tmp_path is too long for a control_dir)."""
    path = Path(tempfile.mkdtemp(prefix="hwl-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def test_bastion_proxy_command_uses_the_bastions_own_identity_and_survives_two_splits(home):
    agents = A.parse_agents_toml(SPEC_EXAMPLE.read_text(), str(SPEC_EXAMPLE))[0]
    vpn = agents[2]
    pol = S.SshPolicy(known_hosts="~/.config/hwledger/known_hosts", control_dir="/run/hwl/cp")
    common = S.ssh_common_args(vpn, pol)
    # Ansible splits ansible_ssh_common_args with shlex: the first split gives our option list back.
    options = shlex.split(common)
    assert options == S.ssh_options(vpn, pol)
    proxy = [value for flag, value in zip(options[::2], options[1::2])
             if flag == "-o" and value.startswith("ProxyCommand=")]
    assert len(proxy) == 1
    # ssh hands the ProxyCommand to /bin/sh: the second split is what the shell runs.
    inner = shlex.split(proxy[0][len("ProxyCommand="):])
    kh = f"{home}/.config/hwledger/known_hosts"
    assert inner == [
        "ssh", "-F", "none",
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "HostKeyAlias=hwledger-bastion-bastion.example.com-22", "-o", "CheckHostIP=no",
        "-o", "UpdateHostKeys=no", "-o", "VerifyHostKeyDNS=no", "-o", "HashKnownHosts=no",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ForwardAgent=no", "-o", "ForwardX11=no",
        "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
        "-o", "ControlMaster=no", "-o", "ControlPath=none",
        "-i", f"{home}/.ssh/bastion_key", "-p", "22", "-l", "root",
        "-W", "[%h]:%p", "--", "bastion.example.com",
    ]
    # The agent's own hop uses the agent's alias, not the bastion's.
    assert "HostKeyAlias=hwledger-agent-vpn-private-gpu" in options


def test_bastion_with_its_own_port_user_and_key():
    agent = A.Agent(**GOOD_AGENT, bastion=A.Bastion(**GOOD_BASTION))
    inner = shlex.split(S.proxy_command(agent.bastion, policy()))
    tail = inner[inner.index("-i"):]
    assert tail == ["-i", "/keys/bastion_key", "-p", "2222", "-l", "jump", "-W", "[%h]:%p", "--",
                    "bastion.example.com"]
    assert "HostKeyAlias=hwledger-bastion-bastion.example.com-2222" in inner
    assert "IdentitiesOnly=yes" in inner


def test_ipv6_agent_and_bastion():
    text = agent_block({**GOOD_AGENT, "hostname": "2001:db8::10", "ssh_port": 2200},
                       {**GOOD_BASTION, "hostname": "2001:db8::1"})
    [agent] = parse(text)[0]
    assert agent.hostname == "2001:db8::10"
    assert agent.bastion.hostname == "2001:db8::1"
    argv = S.ssh_argv(agent, policy(), "nvidia-smi")
    assert argv[-9:] == ["-p", "2200", "-l", "ubuntu", "-i", "/keys/id_ed25519", "--", "2001:db8::10", "nvidia-smi"]
    inner = shlex.split(S.proxy_command(agent.bastion, policy()))
    assert inner[-4:] == ["-W", "[%h]:%p", "--", "2001:db8::1"]


def test_quoting_round_trips_for_every_agent_of_the_spec(home):
    agents = A.parse_agents_toml(SPEC_EXAMPLE.read_text(), str(SPEC_EXAMPLE))[0]
    for agent in agents:
        pol = S.SshPolicy(known_hosts="~/kh", control_dir="/run/hwl/cp", host_key_checking="accept-new")
        assert shlex.split(S.ssh_common_args(agent, pol)) == S.ssh_options(agent, pol)


def test_default_policy_is_strict_against_hwledgers_own_known_hosts():
    agent = A.Agent(**GOOD_AGENT)
    values = option_values(S.ssh_options(agent, policy()))
    assert values == {
        "StrictHostKeyChecking": "yes", "UserKnownHostsFile": "/var/lib/hwl/known_hosts",
        "GlobalKnownHostsFile": "/dev/null", "HostKeyAlias": "hwledger-agent-gpu-1", "CheckHostIP": "no",
        "UpdateHostKeys": "no", "VerifyHostKeyDNS": "no", "HashKnownHosts": "no",
        "BatchMode": "yes", "IdentitiesOnly": "yes", "ForwardAgent": "no", "ForwardX11": "no",
        "ConnectTimeout": "10", "ServerAliveInterval": "15", "ServerAliveCountMax": "3",
        "ControlMaster": "auto", "ControlPersist": "300s", "ControlPath": "/run/hwl/cp/%C",
    }


def test_accept_new_and_off_are_explicit_choices():
    agent = A.Agent(**GOOD_AGENT, bastion=A.Bastion(**GOOD_BASTION))
    accept = option_values(S.ssh_options(agent, policy(host_key_checking="accept-new"))[:-2])
    assert accept["StrictHostKeyChecking"] == "accept-new"
    assert accept["UserKnownHostsFile"] == "/var/lib/hwl/known_hosts"
    off_options = S.ssh_options(agent, policy(host_key_checking="off"))
    off = option_values(off_options[:-2])
    assert off["StrictHostKeyChecking"] == "no" and off["UserKnownHostsFile"] == "/dev/null"
    assert "HostKeyAlias" not in off
    inner = shlex.split(off_options[-1][len("ProxyCommand="):])
    assert "StrictHostKeyChecking=no" in inner and "UserKnownHostsFile=/dev/null" in inner
    with pytest.raises(S.SshPolicyError, match="host_key_checking must be one of yes, accept-new, off"):
        policy(host_key_checking="no")


def test_no_control_dir_means_no_connection_sharing():
    values = option_values(S.ssh_options(A.Agent(**GOOD_AGENT), policy(control_dir=None)))
    assert values["ControlMaster"] == "no" and values["ControlPath"] == "none"
    assert "ControlPersist" not in values


def test_ssh_argv_runs_the_command_after_double_dash():
    agent = A.Agent(**{**GOOD_AGENT, "ssh_port": 2222})
    pol = policy()
    argv = S.ssh_argv(agent, pol, "nvidia-smi -L; echo $HOME")
    options = S.ssh_options(agent, pol)
    assert argv == ["ssh", *options, "-p", "2222", "-l", "ubuntu", "-i", "/keys/id_ed25519", "--",
                    "gpu-1.example.com", "nvidia-smi -L; echo $HOME"]
    assert S.ssh_argv(agent, pol, "x", ssh_binary="/usr/bin/ssh")[0] == "/usr/bin/ssh"


@pytest.mark.skipif(ssh_binary is None, reason="the OpenSSH client (ssh) is not installed")
def test_ssh_reads_the_options_as_intended():
    """`ssh -G` prints the configuration ssh resolved from our argv, without connecting."""
    agent = A.Agent(**{**GOOD_AGENT, "ssh_port": 2222}, bastion=A.Bastion(**GOOD_BASTION))
    argv = S.ssh_argv(agent, policy(), "true")
    resolved = subprocess.run([argv[0], "-G", *argv[1:-1]], check=False, capture_output=True, text=True, timeout=10,
                              env={**os.environ, "HOME": "/nonexistent"}, stdin=subprocess.DEVNULL)
    assert resolved.returncode == 0, resolved.stderr
    config = dict(line.split(" ", 1) for line in resolved.stdout.splitlines())
    assert config["hostname"] == "gpu-1.example.com"
    assert config["port"] == "2222" and config["user"] == "ubuntu"
    assert config["stricthostkeychecking"] == "true"
    assert config["hostkeyalias"] == "hwledger-agent-gpu-1"
    assert config["userknownhostsfile"] == "/var/lib/hwl/known_hosts"
    assert config["forwardagent"] == "no" and config["batchmode"] == "yes"
    assert config["identitiesonly"] == "yes"
    assert config["proxycommand"] == S.proxy_command(agent.bastion, policy())
    assert config["controlpath"].startswith("/run/hwl/cp/")


@pytest.mark.skipif(ssh_binary is None, reason="the OpenSSH client (ssh) is not installed")
def test_control_path_fits_the_socket_limit_for_a_250_character_hostname():
    hostname = ".".join(["a" * 62] * 4)[:249] + "z"
    assert len(hostname) == 250
    agent = A.Agent(**{**GOOD_AGENT, "hostname": hostname})
    longest_dir = "/" + "d" * (S.MAX_CONTROL_DIR_BYTES - 1)
    argv = S.ssh_argv(agent, policy(control_dir=longest_dir), "true")
    resolved = subprocess.run([argv[0], "-G", *argv[1:-1]], check=False, capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    assert resolved.returncode == 0, resolved.stderr
    control_path = dict(line.split(" ", 1) for line in resolved.stdout.splitlines())["controlpath"]
    assert hostname not in control_path
    # ssh binds "<ControlPath>.<16 random characters>" first; that plus NUL must fit sun_path.
    assert len(control_path) + 17 + 1 <= S.SUN_PATH_SIZE
    assert len(control_path) == len(longest_dir) + 41


def test_too_long_control_dir_is_refused_with_the_limit():
    too_long = "/" + "d" * S.MAX_CONTROL_DIR_BYTES
    with pytest.raises(S.SshPolicyError) as caught:
        policy(control_dir=too_long)
    message = str(caught.value)
    assert f"is {S.MAX_CONTROL_DIR_BYTES + 1} bytes long" in message
    assert f"at most {S.MAX_CONTROL_DIR_BYTES} bytes" in message and "Fix: choose a shorter directory" in message


@pytest.mark.parametrize("field", ["known_hosts", "control_dir"])
def test_policy_paths_are_checked_like_key_paths(field):
    with pytest.raises(S.SshPolicyError, match="contains a space"):
        policy(**{field: "/tmp/my dir/x"})


def test_control_dir_chooser_falls_back_when_the_data_dir_is_long(monkeypatch):
    """One chooser for the app and the plugin: <data dir>/cm, else a stable per-store directory under /tmp,
    else HWLEDGER_CONTROL_DIR when set."""
    monkeypatch.delenv("HWLEDGER_CONTROL_DIR", raising=False)
    assert S.control_dir_for("/home/me/.local/share/hwledger") == "/home/me/.local/share/hwledger/cm"
    long = "/home/" + "h" * 60 + "/.local/share/hwledger"
    chosen = S.control_dir_for(long)
    assert chosen.startswith(f"/tmp/hwledger-{os.getuid()}/") and len(chosen.encode()) <= S.MAX_CONTROL_DIR_BYTES
    assert chosen == S.control_dir_for(long) != S.control_dir_for(long + "2")
    monkeypatch.setenv("HWLEDGER_CONTROL_DIR", "/run/user/1000/hwl-cp")
    assert S.control_dir_for(long) == "/run/user/1000/hwl-cp"


def test_prepare_control_dir_creates_a_private_directory(short_tmp):
    pol = policy(control_dir=str(short_tmp / "cp"))
    S.prepare_control_dir(pol)
    assert (short_tmp / "cp").stat().st_mode & 0o777 == 0o700
    (short_tmp / "cp").chmod(0o777)
    with pytest.raises(S.SshPolicyError, match="must belong to you and not be writable by others"):
        S.prepare_control_dir(pol)


def test_known_hosts_checks(tmp_path):
    missing = tmp_path / "sub" / "known_hosts"
    [warning] = S.check_known_hosts(policy(known_hosts=str(missing)))
    assert "does not exist, so every host will fail host key verification" in warning
    assert S.check_known_hosts(policy(known_hosts=str(missing), host_key_checking="accept-new")) == []
    assert missing.parent.is_dir()  # ssh can now create the file when it learns a key
    missing.write_text("")
    missing.chmod(0o666)
    with pytest.raises(S.SshPolicyError, match="group- or world-writable"):
        S.check_known_hosts(policy(known_hosts=str(missing)))
    [off_warning] = S.check_known_hosts(policy(known_hosts=str(missing), host_key_checking="off"))
    assert "host key checking is off" in off_warning
