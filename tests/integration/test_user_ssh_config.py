"""hwledger's connections never read an ssh_config (checklist E31): not the user's ~/.ssh/config, not
/etc/ssh/ssh_config. Every connection comes from ssh-agents.toml alone, so it is the same under `serve`,
cron, AWX or a terminal, and a `Host *` block can neither redirect it nor run a command on this machine.

The user's config here is hostile: a `Match exec` that runs a command, a ProxyCommand that goes nowhere,
a wrong user and port, a LocalCommand and a RemoteCommand. It is put in place for the hwledger commands
only: the user's home (ssh looks it up in the password database, not in $HOME) gets the fake ~/.ssh laid
over it in a private mount namespace (`unshare --mount`, an overlay), so nothing outside sees it.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.gpu_query_support import ANSIBLE_PLAYBOOK

UNSHARE = shutil.which("unshare")
pytestmark = pytest.mark.skipif(UNSHARE is None, reason="unshare (util-linux) is needed for a private mount")

HOSTILE_CONFIG = """\
Match exec "touch {marker}-match-exec"
    User nobody
    Port 1
    ProxyCommand sh -c 'touch {marker}-proxy; exit 1'
    PermitLocalCommand yes
    LocalCommand touch {marker}-local
    RemoteCommand touch /tmp/hwl-never-remote; exit 7
    ForwardAgent yes
    BatchMode no
"""


@pytest.fixture
def hostile_home(tmp_path):
    home = tmp_path / "fake-home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    marker = tmp_path / "ssh-config-was-read"
    (home / ".ssh" / "config").write_text(HOSTILE_CONFIG.format(marker=marker))
    (home / ".ssh" / "config").chmod(0o600)
    return home, marker


def _in_fake_home(home: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run argv with `home` laid over the user's home directory (an overlay: the rest of the home, where
    the interpreter may live, stays visible)."""
    real_home = shlex.quote(pwd.getpwuid(os.getuid()).pw_dir)
    work = shlex.quote(str(home.with_name(home.name + "-work")))
    script = (f"set -e; mkdir -p {work}; mount -t overlay hwl-fake-home "
              f"-o lowerdir={real_home},upperdir={shlex.quote(str(home))},workdir={work} {real_home}; "
              f"exec {shlex.join(argv)}")
    return subprocess.run([UNSHARE, "--mount", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, check=False)


def test_the_fake_home_really_reaches_a_plain_ssh(hostile_home, fleet_env, fresh_host):
    """The guard: a plain `ssh` in the same namespace does read the hostile config (the marker appears),
    so the test below would see it if hwledger's connections read it too."""
    home, marker = hostile_home
    proc = _in_fake_home(home, ["ssh", "-G", f"{fresh_host.address}"], fleet_env.env)
    assert proc.returncode == 0, proc.stderr
    assert "user nobody" in proc.stdout and "port 1" in proc.stdout
    assert Path(f"{marker}-match-exec").exists()


def test_hwledger_connections_ignore_the_users_ssh_config(hostile_home, fleet_env, lab, fresh_host, tmp_path):
    home, marker = hostile_home
    bastion, internal = lab.add_bastion_pair(lab.unique_name("behind"))
    try:
        fleet_env.register(fresh_host)
        fleet_env.register(internal)
        hw = [sys.executable, "-m", "hwledger"]
        for transport in ("fanout", "ansible"):
            proc = _in_fake_home(home, [*hw, "fleet", "serve", "--once", "--transport", transport], fleet_env.env)
            assert proc.returncode == 0, (transport, proc.stdout, proc.stderr)
            with fleet_env.store() as store:
                states = {name: store.get_agent(name).state for name in (fresh_host.name, internal.name)}
            assert states == {fresh_host.name: "online", internal.name: "online"}, (transport, states, proc.stderr)
        # A hand-run playbook through the inventory plugin takes the same options.
        inventory = tmp_path / "fleet.hwledger.yml"
        inventory.write_text(f"plugin: hwledger.fleet.ssh_agents\nagents_file: {fleet_env.config}\n"
                             f"known_hosts_file: {fleet_env.known_hosts}\n")
        env = dict(fleet_env.env, ANSIBLE_NOCOLOR="1", ANSIBLE_HOME=str(tmp_path / "ansible-home"),
                   ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"))
        play = _in_fake_home(home, [ANSIBLE_PLAYBOOK, "hwledger.fleet.heartbeat", "-i", str(inventory)], env)
        assert play.returncode == 0, play.stdout + play.stderr
        assert "unreachable=0" in play.stdout and "failed=0" in play.stdout, play.stdout
    finally:
        internal.stop()
        bastion.stop()
    assert sorted(p.name for p in tmp_path.glob(f"{marker.name}-*")) == []
    assert not Path("/tmp/hwl-never-remote").exists()
