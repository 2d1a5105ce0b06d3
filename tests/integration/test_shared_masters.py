"""One ssh master per host, whoever connects: a playbook run by hand through the inventory plugin and
`hwledger fleet serve` (either transport), with the same files, reuse the same OpenSSH master connection.
There is one control-dir chooser (`ssh.control_dir_for`): the app passes its store's directory, the plugin
the directory of the store the app would use with the same environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import processes
from tests.toolchains import REPO

BIN = Path(sys.executable).parent


def masters(control_dir: Path) -> dict[int, str]:
    """The ssh ControlMaster processes serving sockets in `control_dir` (ssh names itself after the socket,
    "ssh: <ControlPath> [mux]", once it has become a master)."""
    return {pid: line for pid, line in processes.mentioning(str(control_dir)).items() if line.endswith("[mux]")}


def test_a_hand_run_playbook_and_serve_share_one_master(fleet_env, fresh_host):
    fleet_env.register(fresh_host)  # pins the host key; no heartbeat yet, so no connection either
    control_dir = fleet_env.fleet().control_dir
    inventory = fleet_env.root / "fleet.hwledger.yml"
    # No agents_file, known_hosts_file or control_dir: the plugin takes them from the same environment
    # (HWLEDGER_CONFIG, HWLEDGER_KNOWN_HOSTS, HWLEDGER_DB) that the app reads.
    inventory.write_text("plugin: hwledger.fleet.ssh_agents\n")
    assert masters(control_dir) == {}
    try:
        playbook = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), "hwledger.fleet.heartbeat"],
                                  cwd=REPO, env=fleet_env.env, capture_output=True, text=True, timeout=180,
                                  stdin=subprocess.DEVNULL, check=False)
        assert playbook.returncode == 0, playbook.stdout + playbook.stderr
        assert f"{fresh_host.name}: 2 GPU(s)" in playbook.stdout, playbook.stdout  # the lab replays two GPUs
        first = masters(control_dir)
        assert len(first) == 1, first  # the playbook opened it, and it outlives the playbook (ControlPersist)

        for transport in ("fanout", "ansible"):
            served = fleet_env.hw("fleet", "serve", "--once", "--transport", transport)
            assert served.returncode == 0, served.stdout + served.stderr
            # The same master process answered: no second connection, no handshake.
            assert masters(control_dir) == first, transport
        with fleet_env.store() as store:
            assert store.get_agent(fresh_host.name).state == "online"
    finally:
        for pid in masters(control_dir):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
