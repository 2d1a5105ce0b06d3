"""hwledger.fleet.gpu_query against real sshd hosts, through the hwledger.fleet.ssh_agents inventory.

One ansible-playbook run queries, in the same play: a loopback host replaying nvidia-smi, one replaying
rocm-smi, the namespace host reachable only through its bastion, a host whose nvidia-smi hangs, and a
host whose GPU name is a Jinja expression. None of them has python3. The run checks the facts, that the
hung host fails with reason timeout within its timeout while the others succeed, and that the hostile
name stays literal through the facts, later templating and hostvars (its marker file never appears).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.gpu_query_support import make_inventory, run_playbook
# control_dir is a fixture: importing it makes it available to the tests of this module.
from tests.integration.gpu_query_support import control_dir  # noqa: F401 pylint: disable=unused-import
from lab import DEFAULT_NVIDIA_STDOUT, Lab, SshHost

pytestmark = [pytest.mark.root, pytest.mark.slow]

MIB = 1048576
HANG_TIMEOUT_S = 3
ROCM_CMD = "rocm-smi -i -P -t -f -u --showmemuse --showmeminfo vram --showproductname --csv"
A800_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap --format=csv"

QUERY_PLAYBOOK = """
- name: Query every agent once
  hosts: hwledger_agents
  gather_facts: false
  strategy: free
  tasks:
    - name: Note the start
      ansible.builtin.set_fact:
        t0: "{{ now().timestamp() }}"
    - name: Query
      hwledger.fleet.gpu_query:
        timeout: "{{ query_timeout }}"
      register: query
      ignore_errors: true
    - name: Note the end
      ansible.builtin.set_fact:
        t1: "{{ now().timestamp() }}"
    - name: Template the facts again later, through hostvars and set_fact
      ansible.builtin.set_fact:
        names_later: "{{ hostvars[inventory_hostname].ansible_facts.hwledger_snapshot.gpus | map(attribute='name') | list }}"
        names_joined: "GPUs: {{ ansible_facts.hwledger_snapshot.gpus | map(attribute='name') | join(' / ') }}"
        first_name: "{{ hwledger_snapshot.gpus[0].name }}"
      when: query is succeeded
    - name: Print a name in a message
      ansible.builtin.debug:
        msg: "first GPU: {{ first_name }}"
      when: query is succeeded
    - name: Write what came back
      ansible.builtin.copy:
        content: "{{ {'query': query, 't0': t0, 't1': t1, 'names_later': names_later | default(none),
                      'names_joined': names_joined | default(none), 'first_name': first_name | default(none)} | to_json }}"
        dest: "{{ out_dir }}/{{ inventory_hostname }}.json"
        mode: "0600"
      delegate_to: localhost
"""


@pytest.fixture
def fleet(lab: Lab) -> Iterator[dict[str, SshHost]]:
    """The hosts of the one playbook run, none with python3."""
    hosts: dict[str, SshHost] = {}
    try:
        hosts["nv"] = lab.add_loopback_host(lab.unique_name("gq-nv"))
        hosts["rocm"] = lab.add_loopback_host(
            lab.unique_name("gq-rocm"), tool="rocm-smi",
            capture="rocm/csv-i-P-t-f-u-showmemuse-showmeminfo-vram-showproductname-RX7900XTX-rocm7.2.3-TRUNCATED-3of4.txt")
        hosts["hang"] = lab.add_loopback_host(lab.unique_name("gq-hang"), delay=600)
        hosts["evil"] = lab.add_loopback_host(lab.unique_name("gq-evil"), stdout="")  # output set per test
        bastion, internal = lab.add_bastion_pair(
            lab.unique_name("gq-int"),
            capture="nvidia/csv-header-index-name-memtotal-memfree-driver-computecap-8xA800-SXM4-80GB.txt")
        hosts["bastion"], hosts["internal"] = bastion, internal
        yield hosts
    finally:
        for host in hosts.values():
            host.stop()


def test_gpu_query_over_ssh(fleet, lab, tmp_path, control_dir):
    marker = tmp_path / "PWNED"
    evil_name = "{{ lookup('pipe', 'touch %s') }} {%% if true %%}x{%% endif %%}" % marker
    fleet["evil"].set_tool(stdout="0, %s, 1024 MiB, 1000 MiB\n" % evil_name)
    queried = [fleet[key] for key in ("nv", "rocm", "hang", "evil", "internal")]
    inventory = make_inventory(tmp_path, queried, control_dir=control_dir,
                               overrides={fleet["rocm"].name: {"gpu_query_cmd": ROCM_CMD},
                                          fleet["internal"].name: {"gpu_query_cmd": A800_CMD}})
    playbook = tmp_path / "query.yml"
    playbook.write_text(QUERY_PLAYBOOK)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    run = run_playbook(playbook, inventory, tmp_path, "-e", "out_dir=%s" % out_dir,
                       "-e", "query_timeout=%d" % HANG_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = {path.stem: json.loads(path.read_text()) for path in out_dir.glob("*.json")}
    assert sorted(results) == sorted(host.name for host in queried)

    def snapshot(key: str) -> dict:
        query = results[fleet[key].name]["query"]
        assert not query.get("failed"), query
        return query["ansible_facts"]["hwledger_snapshot"]

    # nvidia-smi, default noheader query (tests/lab DEFAULT_NVIDIA_STDOUT, hand-checked).
    nv = snapshot("nv")
    assert nv["agent"] == fleet["nv"].name and nv["backend"] == "nvidia"
    assert [(g["index"], g["name"], g["memory_total_bytes"], g["memory_free_bytes"], g["memory_used_bytes"])
            for g in nv["gpus"]] == [
        (0, "NVIDIA GeForce RTX 4070 Laptop GPU", 8188 * MIB, 7948 * MIB, 240 * MIB),
        (1, "NVIDIA GeForce RTX 5070 Ti", 16303 * MIB, 15799 * MIB, 504 * MIB),
    ]
    assert DEFAULT_NVIDIA_STDOUT.count("\n") == len(nv["gpus"])
    assert nv["host"]["cpu_count"] >= 1 and nv["host"]["mem_total_bytes"] > 0
    assert fleet["nv"].tool_calls() == ["--query-gpu=index,name,memory.total,memory.free --format=csv,noheader"]

    # rocm-smi --csv, ROCm 7.2.3: 3 cards, VRAM total 25753026560 B, used 27947008 B, edge 31/27/28 C.
    rocm = snapshot("rocm")
    assert rocm["backend"] == "rocm"
    assert [g["index"] for g in rocm["gpus"]] == [0, 1, 2]
    assert {g["name"] for g in rocm["gpus"]} == {"Radeon RX 7900 XTX"}
    assert all(g["memory_total_bytes"] == 25753026560 and g["memory_used_bytes"] == 27947008
               and g["memory_free_bytes"] == 25753026560 - 27947008 for g in rocm["gpus"])
    assert [g["temperature_c"] for g in rocm["gpus"]] == [31.0, 27.0, 28.0]

    # The namespace host, reachable only through its bastion: 8 x A800, GPU 0 8404 MiB free.
    internal = snapshot("internal")
    assert len(internal["gpus"]) == 8
    assert internal["gpus"][0]["memory_total_bytes"] == 81920 * MIB
    assert internal["gpus"][0]["memory_free_bytes"] == 8404 * MIB
    assert internal["gpus"][0]["fields"]["driver_version"] == "580.95.05"

    # The hung tool: reason timeout, within its timeout, while the others succeeded in the same run.
    hang = results[fleet["hang"].name]
    assert hang["query"]["failed"] is True
    assert hang["query"]["reason"] == "timeout"
    assert float(hang["t1"]) - float(hang["t0"]) < HANG_TIMEOUT_S + 2.5
    assert hang["query"]["host"]["cpu_count"] >= 1  # the host metrics still came back

    # The hostile GPU name is data everywhere and ran nothing.
    evil = results[fleet["evil"].name]
    assert snapshot("evil")["gpus"][0]["name"] == evil_name
    assert evil["names_later"] == [evil_name]
    assert evil["names_joined"] == "GPUs: " + evil_name
    assert evil["first_name"] == evil_name
    assert "first GPU: " + evil_name in run.stdout
    assert not marker.exists()


def test_the_hosts_have_no_python(fleet, lab):
    for key in ("nv", "internal"):
        check = subprocess.run(fleet[key].ssh_argv("command -v python3 || echo no-python3"),
                               capture_output=True, text=True, timeout=60, check=False)
        assert check.stdout.strip() == "no-python3", check


def test_missing_tool_and_changed_host_key(lab, tmp_path, control_dir):
    """A host without the tool fails with tool_not_found; one whose key changed is UNREACHABLE (ssh refuses)."""
    missing = lab.add_loopback_host(lab.unique_name("gq-missing"))
    rekeyed = lab.add_loopback_host(lab.unique_name("gq-rekeyed"))
    try:
        missing.remove_tool()
        inventory = make_inventory(tmp_path, [missing, rekeyed], control_dir=control_dir)
        rekeyed.rotate_host_key()  # after pinning: the pinned key is now the old one
        playbook = tmp_path / "query.yml"
        playbook.write_text(QUERY_PLAYBOOK)
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        started = time.monotonic()
        run = run_playbook(playbook, inventory, tmp_path, "-e", "out_dir=%s" % out_dir, "-e", "query_timeout=5")
        assert time.monotonic() - started < 60
        # The rekeyed host is UNREACHABLE (exit status 4); the other host's failure was ignored.
        assert run.returncode == 4, run.stdout[-3000:]
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in run.stdout + run.stderr or \
            "Host key verification failed" in run.stdout + run.stderr
        query = json.loads((out_dir / ("%s.json" % missing.name)).read_text())["query"]
        assert query["failed"] is True and query["reason"] == "tool_not_found" and query["rc"] == 127
        assert not (out_dir / ("%s.json" % rekeyed.name)).exists()
    finally:
        missing.stop()
        rekeyed.stop()
