"""`ansible-playbook hwledger.fleet.heartbeat -i <x>.hwledger.yml` against real sshd hosts.

One summary line per host, whatever the host does; exit 0 by default, non-zero only when asked; the
snapshot lands in the fact cache (as with AWX's use_fact_cache); a GPU name that is a Jinja expression
is printed and cached as the literal text and runs nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.gpu_query_support import make_inventory, run_playbook
# control_dir is a fixture: importing it makes it available to the tests of this module.
from tests.integration.gpu_query_support import control_dir  # noqa: F401 pylint: disable=unused-import
from lab import Lab, SshHost

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def hosts(lab: Lab) -> Iterator[dict[str, SshHost]]:
    made: dict[str, SshHost] = {}
    try:
        made["ok"] = lab.add_loopback_host(lab.unique_name("hb-ok"))
        made["evil"] = lab.add_loopback_host(lab.unique_name("hb-evil"), stdout="")
        made["broken"] = lab.add_loopback_host(lab.unique_name("hb-broken"))
        made["broken"].remove_tool()
        made["down"] = lab.add_loopback_host(lab.unique_name("hb-down"))
        yield made
    finally:
        for host in made.values():
            host.stop()


def summary_lines(stdout: str) -> dict[str, str]:
    """host -> its summary line (strategy free interleaves the task banners, so match the lines)."""
    lines = {}
    for match in re.finditer(r'ok: \[([^\]]+)\] => \{\s*"msg": "((?:[^"\\]|\\.)*)"', stdout):
        host, msg = match.group(1), json.loads('"%s"' % match.group(2))
        if msg.startswith(host + ": "):
            assert host not in lines, "two summary lines for %s" % host
            lines[host] = msg
    return lines


def cached_facts(cache: Path, host: str) -> dict:
    """A host's facts in the jsonfile cache (file name: the host, possibly after a format prefix)."""
    files = [path for path in cache.iterdir() if path.name == host or path.name.endswith("_" + host)]
    assert len(files) <= 1, files
    if not files:
        return {}
    data = json.loads(files[0].read_text())
    # ansible-core 2.19 wraps the facts: {"__payload__": "<the facts as JSON>"}; 2.18 stores them as they are.
    return json.loads(data["__payload__"]) if "__payload__" in data else data


def test_heartbeat_prints_one_line_per_host_and_caches_the_facts(hosts, lab, tmp_path, control_dir):
    marker = tmp_path / "PWNED"
    evil_name = "{{ lookup('pipe', 'touch %s') }}" % marker
    hosts["evil"].set_tool(stdout="0, %s, 2048 MiB, 1024 MiB\n" % evil_name)
    inventory = make_inventory(tmp_path, list(hosts.values()), control_dir=control_dir)
    hosts["down"].stop()
    cache = tmp_path / "facts"

    run = run_playbook("hwledger.fleet.heartbeat", inventory, tmp_path,
                       env_extra={"ANSIBLE_CACHE_PLUGIN": "jsonfile", "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(cache)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    lines = summary_lines(run.stdout)
    assert sorted(lines) == sorted(host.name for host in hosts.values())

    ok = lines[hosts["ok"].name]
    assert ok.startswith("%s: 2 GPU(s) (nvidia, " % hosts["ok"].name)
    assert "[0] NVIDIA GeForce RTX 4070 Laptop GPU: 7948 of 8188 MiB free" in ok
    assert "[1] NVIDIA GeForce RTX 5070 Ti: 15799 of 16303 MiB free" in ok
    assert re.search(r"; load \d+(\.\d+)? on \d+ CPUs, \d+(\.\d+)? of \d+(\.\d+)? GiB memory available$", ok)

    evil = lines[hosts["evil"].name]
    assert evil.startswith("%s: 1 GPU(s) (nvidia, " % hosts["evil"].name)
    assert "; [0] %s: 1024 of 2048 MiB free;" % evil_name in evil
    assert lines[hosts["broken"].name].startswith("%s: FAILED (tool_not_found): " % hosts["broken"].name)
    assert lines[hosts["down"].name].startswith("%s: UNREACHABLE: " % hosts["down"].name)

    # The fact cache holds each answering host's snapshot, the hostile name as literal text.
    assert cached_facts(cache, hosts["evil"].name)["hwledger_snapshot"]["gpus"][0]["name"] == evil_name
    assert cached_facts(cache, hosts["ok"].name)["hwledger_snapshot"]["agent"] == hosts["ok"].name
    assert "hwledger_snapshot" not in cached_facts(cache, hosts["broken"].name)
    assert not marker.exists()


def test_heartbeat_fails_only_when_asked(hosts, lab, tmp_path, control_dir):
    inventory = make_inventory(tmp_path, list(hosts.values()), control_dir=control_dir)
    hosts["down"].stop()
    unreachable = run_playbook("hwledger.fleet.heartbeat", inventory, tmp_path,
                               "-e", "hwledger_fail_on_unreachable=true")
    assert unreachable.returncode == 4, unreachable.stdout[-3000:]
    failing = run_playbook("hwledger.fleet.heartbeat", inventory, tmp_path, "-e", "hwledger_fail_on_query_error=true")
    assert failing.returncode == 2, failing.stdout[-3000:]
    # Even then, the other hosts got their heartbeat.
    assert "%s: 2 GPU(s)" % hosts["ok"].name in failing.stdout


# --- hwledger.fleet.heartbeat_facts: the machine entry (serve --transport ansible, AWX) -------------------


def test_facts_playbook_caches_the_facts_prints_nothing_and_exits_0(hosts, lab, tmp_path, control_dir):
    marker = tmp_path / "PWNED"
    evil_name = "{{ lookup('pipe', 'touch %s') }}" % marker
    hosts["evil"].set_tool(stdout="0, %s, 2048 MiB, 1024 MiB\n" % evil_name)
    inventory = make_inventory(tmp_path, list(hosts.values()), control_dir=control_dir)
    hosts["down"].stop()
    cache = tmp_path / "facts"
    run = run_playbook("hwledger.fleet.heartbeat_facts", inventory, tmp_path,
                       env_extra={"ANSIBLE_CACHE_PLUGIN": "jsonfile", "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(cache)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert summary_lines(run.stdout) == {}  # no summary: one task per host, nothing templated
    assert cached_facts(cache, hosts["ok"].name)["hwledger_snapshot"]["gpus"][1]["name"] == "NVIDIA GeForce RTX 5070 Ti"
    assert cached_facts(cache, hosts["evil"].name)["hwledger_snapshot"]["gpus"][0]["name"] == evil_name
    assert "hwledger_snapshot" not in cached_facts(cache, hosts["broken"].name)
    assert not marker.exists()


def test_facts_playbook_fails_once_for_the_run_only_when_asked(hosts, lab, tmp_path, control_dir):
    inventory = make_inventory(tmp_path, list(hosts.values()), control_dir=control_dir)
    hosts["down"].stop()
    unreachable = run_playbook("hwledger.fleet.heartbeat_facts", inventory, tmp_path,
                               "-e", "hwledger_fail_on_unreachable=true")
    assert unreachable.returncode == 2, unreachable.stdout[-3000:]
    assert f"Unreachable: {hosts['down'].name}. GPU query failed: none." in unreachable.stdout
    failing = run_playbook("hwledger.fleet.heartbeat_facts", inventory, tmp_path, "-e", "hwledger_fail_on_query_error=true")
    assert failing.returncode == 2, failing.stdout[-3000:]
    line = re.search(r"Unreachable: none\. GPU query failed: ([^.\n]+)\.", failing.stdout)
    assert line, failing.stdout[-3000:]
    # The host without a tool and the one printing no GPU rows; the others answered.
    assert sorted(line.group(1).split(", ")) == sorted([hosts["broken"].name, hosts["evil"].name])
    quiet = run_playbook("hwledger.fleet.heartbeat_facts", inventory, tmp_path, "-e", "hwledger_fail_on_query_error=false")
    assert quiet.returncode == 0, quiet.stdout[-3000:]
