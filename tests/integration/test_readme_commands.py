"""The README's commands of sections 1-3 (inventory, telemetry, jobs), run as they are written.

A newcomer copies them: so they run here from the README's own text, in a fresh directory with the
README's `fleet.hwledger.yml`, an `ssh-agents.toml` whose agent has the README's name (`vast-rental-1`,
a lab sshd host), the default XDG locations under a fresh HOME, and a PATH that has the virtualenv's
programs first (what `. .venv/bin/activate` gives). A README edit that breaks one of them fails here.
docs/readme-commands.md says which test or demo step runs each of the README's other commands.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh

from lab import write_agents_toml
from lab.lab import known_hosts_line
from tests.integration.checkout_support import copy_checkout
from tests.unit.test_readme_commands import readme_commands, readme_section

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
AGENT = "vast-rental-1"
# The README's capture lines run the controller's nvidia-smi; this one prints a real capture (copied into
# tests/fixtures with its provenance) with the header, or without it for `noheader`, as nvidia-smi does.
CAPTURE = (REPO / "tests/fixtures/gpu/nvidia"
           / "csv-header-index-name-memtotal-memfree-2xRTX4070Laptop-RTX5070Ti-windows.txt")
FAKE_NVIDIA_SMI = f"""#!/bin/sh
case "$*" in
  *noheader*) tail -n +2 '{CAPTURE}' ;;
  *) cat '{CAPTURE}' ;;
esac
"""


@pytest.fixture
def newcomer(lab, tmp_path):
    """A fresh directory and HOME (short: ssh control sockets live under it), and the environment."""
    del tmp_path
    root = Path(tempfile.mkdtemp(prefix="hwlr-", dir="/tmp"))
    home = root / "home"
    home.mkdir(mode=0o700)
    work = root / "work"
    work.mkdir()
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HWLEDGER_", "XDG_", "ANSIBLE_"))}
    path = [str(Path(sys.executable).parent), str(bin_dir), "/usr/local/bin:/usr/bin:/bin"]
    env.update(HOME=str(home), PATH=os.pathsep.join(path))
    try:
        yield work, home, env
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(line: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def fleet_yml() -> str:
    """The README's fleet.hwledger.yml block."""
    text = readme_section("## 1.")
    block = re.search(r"```yaml\n# fleet.hwledger.yml\n(.*?)```", text, re.S)
    assert block, "the README's fleet.hwledger.yml block"
    return block.group(1)


def test_sections_1_to_3_run_as_written(lab, newcomer):
    work, home, env = newcomer
    host = lab.add_loopback_host(lab.unique_name("readme"), python=True)  # the job runner needs python3
    try:
        # ssh-agents.toml and the pinned key where `register-ssh` would have put them.
        write_agents_toml(work / "ssh-agents.toml", [host.agent_entry(name=AGENT)])
        agent = agents_schema.load_agents_file(work / "ssh-agents.toml")[0][0]
        known_hosts = home / ".config" / "hwledger" / "known_hosts"
        known_hosts.parent.mkdir(parents=True, mode=0o700)
        known_hosts.write_text(known_hosts_line(ssh.known_hosts_alias(agent), host) + "\n")
        (work / "fleet.hwledger.yml").write_text(fleet_yml())

        commands = {section: readme_commands(readme_section(section), inline=False)
                    for section in ("## 1.", "## 2.", "## 3.")}
        graph, raw = commands["## 1."]
        assert graph == "ansible-inventory -i fleet.hwledger.yml --graph"
        out = run(graph, work, env).stdout
        assert re.search(rf"@hwledger_nvidia:\n[ |]+--{AGENT}\n", out), out
        assert re.search(rf"^{AGENT} \| CHANGED \| rc=0 >>\nok$", run(raw, work, env).stdout, re.M)

        heartbeat, capture, parse, capture_noheader, parse_noheader = commands["## 2."]
        out = run(heartbeat, work, env).stdout
        assert f"{AGENT}: 2 GPU(s) (nvidia, " in out
        assert "[1] NVIDIA GeForce RTX 5070 Ti: 15799 of 16303 MiB free" in out
        for tool_line, parse_line in ((capture, parse), (capture_noheader, parse_noheader)):
            run(tool_line, work, env)
            parsed = run(parse_line, work, env).stdout
            assert '"name": "NVIDIA GeForce RTX 4070 Laptop GPU"' in parsed, parsed

        new, playbook = commands["## 3."]
        assert new.startswith("hwledger job new ") and playbook.startswith("ansible-playbook hwledger.fleet.job ")
        run(new, work, env)
        run(playbook, work, env)
        results = list((work / "results").glob("*.json"))
        assert len(results) == 1, results
        assert '"state": "succeeded"' in results[0].read_text()
    finally:
        host.stop()


def test_make_clean_removes_what_it_says(tmp_path):
    """`make clean` (README, "After make demo"): the virtualenvs, caches, bench results and demo files go;
    with no virtualenv there is no demo fleet to stop, and it says so."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    planted = [".venv/bin", ".venv-2.18", ".pytest_cache", "tests/output", "bench/results", ".demo"]
    for path in planted:
        (tmp_path / path).mkdir(parents=True)
    (tmp_path / "keep.txt").write_text("not ours to remove")
    proc = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no demo fleet was started" in proc.stdout
    assert [path for path in planted if (tmp_path / path).exists()] == []
    assert (tmp_path / "keep.txt").exists()


def test_pip_install_then_uninstall_outside_the_checkout(tmp_path):
    """`pip install .` gives the hwledger command and the collection outside the checkout (the runtime
    requirements, `pip install -r requirements/runtime.txt`, are the virtualenv's own here: no network),
    and `pip uninstall hwledger-fleet` removes both."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # The project virtualenv's packages (ansible-core, pip, setuptools...) without its .pth that puts the
    # checkout on sys.path: a plain directory entry, not the checkout.
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p, "ansible").is_dir())
    (site / "deps.pth").write_text(f"{ours}\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHONPATH", "ANSIBLE_"))}
    env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def sh(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=outside, env=env, capture_output=True, text=True,
                              timeout=600, check=False)

    # From a copy of the checkout: setuptools writes build/ and *.egg-info into the tree it builds.
    source = tmp_path / "source"
    copy_checkout(source)
    install = sh(f"python -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check {source}")
    assert install.returncode == 0, install.stdout + install.stderr
    assert (site / "ansible_collections" / "hwledger" / "fleet" / "galaxy.yml").exists() or \
        (site / "ansible_collections" / "hwledger" / "fleet" / "plugins").is_dir()
    helped = sh("hwledger --help")
    assert helped.returncode == 0 and "fleet" in helped.stdout, helped.stdout + helped.stderr
    doc = sh("python -m ansible.cli.doc hwledger.fleet.gpu_query")
    assert doc.returncode == 0 and str(site / "ansible_collections") in doc.stdout, doc.stdout[-2000:] + doc.stderr

    removed = sh("python -m pip uninstall -y -q hwledger-fleet")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not (venv / "bin" / "hwledger").exists()
    # pip removes every file it installed (it may leave the empty namespace directory behind).
    assert not (site / "ansible_collections" / "hwledger" / "fleet").exists()
    assert [p for p in (site / "ansible_collections").rglob("*") if not p.is_dir()] == []


def test_activate_puts_hwledger_and_ansible_on_the_path():
    """`. .venv/bin/activate` (README, "After make demo"): from a shell that knows nothing of the checkout,
    hwledger and the ansible-* programs are the virtualenv's."""
    venv = Path(sys.prefix)
    activate = venv / "bin" / "activate"
    assert activate.is_file(), f"{activate}: the tests run from the project's virtualenv"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    line = f". {activate} && command -v hwledger ansible-playbook ansible-doc && hwledger --help"
    proc = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = proc.stdout.splitlines()[:3]
    assert found == [str(venv / "bin" / name) for name in ("hwledger", "ansible-playbook", "ansible-doc")], found
    assert "usage: hwledger" in proc.stdout
