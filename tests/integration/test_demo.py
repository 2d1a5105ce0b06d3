"""`make demo` leaves a demo fleet up whose printed follow-up lines work, and `make demo-down` takes it
away completely: the newcomer's path (issue 14), run as a newcomer would run it.

The demo runs with --keep in a directory of its own (so it never touches a developer's .demo), exits,
and its fleet must still be up, survive another lab reaping stale labs, and answer every line the demo
printed, pasted into a shell whose PATH knows nothing of the virtualenv. The last printed line is the
`make demo-down` to run; after it no process, namespace, account or directory of the fleet is left.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.fleet import FleetState, leftovers
from hwledger.fleet import Fleet
from lab import Lab, lab_unavailable_reason
from lab.system import scan_processes
from tests.toolchains import REPO
from tests.unit.test_readme_commands import readme_commands, readme_section

pytestmark = [pytest.mark.root, pytest.mark.slow]

PASTE_MARKER = "Paste these lines"
# A shell as a newcomer has it: the system's PATH, nothing of the checkout's virtualenv.
BARE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def printed_lines(stdout: str) -> list[str]:
    """The block of indented lines after the demo's "Paste these lines" heading."""
    after = stdout.split(PASTE_MARKER, 1)[1].split("\n")[1:]
    lines = []
    for line in after:
        if line.startswith("    "):
            lines.append(line.strip())
        elif lines:
            break
    return lines


def paste(env_line: str, line: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": BARE_PATH, "HOME": os.environ["HOME"], "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", f"{env_line} && {line}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def processes_naming(text: str) -> list[int]:
    found = []
    for proc in scan_processes():
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline and proc.pid != os.getpid():
            found.append(proc.pid)
    return found


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def demo_dir(tmp_path: Path):
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    directory = tmp_path / "demo"
    yield directory
    # Whatever happened above, the fleet does not outlive the test.
    subprocess.run([sys.executable, "-m", "demo", "--down", "--dir", str(directory)], cwd=REPO,
                   capture_output=True, timeout=120, check=False)


def test_demo_keeps_a_fleet_up_its_lines_work_and_demo_down_removes_it(demo_dir: Path, tmp_path: Path):
    started = subprocess.run([sys.executable, "-m", "demo", "--keep", "--dir", str(demo_dir)], cwd=REPO,
                             capture_output=True, text=True, timeout=900, check=False)
    assert started.returncode == 0, started.stdout[-6000:] + started.stderr[-3000:]

    # Step 8: a job placed on free GPU memory, followed line by line as it ran, on the GPU placement chose.
    logs_f = started.stdout.split(" job logs -f ", 1)[1].split(" job show ", 1)[0]  # job show repeats its tail
    followed = [line for line in logs_f.splitlines() if re.fullmatch(r"step \d of 5 on GPU \S+", line)]
    assert [line.split()[1] for line in followed] == ["1", "2", "3", "4", "5"], started.stdout[-4000:]
    assert len({line.rsplit(" ", 1)[1] for line in followed}) == 1
    assert re.search(r"^placed +\S", started.stdout, re.M), started.stdout[-4000:]

    # The process that started it is gone; the fleet is not.
    state = FleetState.read(demo_dir)
    assert state is not None and state.alive
    names = [host.name for host in state.hosts]
    assert {"a800-box", "mi100-box"} <= set(names)
    accounts = {entry.pw_name: entry.pw_uid for entry in pwd.getpwall() if entry.pw_name.startswith(f"hwl-{state.lab_id}-")}
    assert len(accounts) >= len(state.hosts) and 0 not in accounts.values(), "the demo logs in without root"

    # Another lab (a test run, the bench) reaps stale labs: this one is not stale while its supervisor runs.
    Lab(tmp_path / "another-lab").stop()
    assert state.alive and leftovers(state.lab_id), "the demo fleet was reaped by another lab"

    lines = printed_lines(started.stdout)
    env_line, *commands, down_line = lines
    assert env_line == f". {demo_dir / 'env'}"
    assert down_line == f"make demo-down DEMO_DIR={demo_dir}"
    assert any(line.startswith("ansible-playbook -i ") for line in commands)
    # The README's "After make demo" block is what the demo prints (with the default .demo directory).
    readme = readme_commands(readme_section("### After `make demo`"), inline=False)
    assert readme == [". .demo/env", *[line.replace(str(demo_dir), ".demo") for line in commands], "make demo-down"]
    out = {}
    for line in commands:
        result = paste(env_line, line)
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        out[line] = result.stdout
    status = out["hwledger fleet status"]
    assert all(name in status for name in names), status
    listed = out["hwledger job list"].splitlines()
    hello = [row for row in listed if "echo hello from" in row]
    assert len(hello) == 1 and " succeeded " in hello[0], listed
    graph = next(text for line, text in out.items() if line.startswith("ansible-inventory"))
    assert all(name in graph for name in names)
    # The pasted lines used the demo's files, not ~/.config/hwledger or ~/.local/share/hwledger.
    jobs = json.loads(paste(env_line, "hwledger job list --json").stdout)
    assert any(job["spec"]["command"][:2] == ["sh", "-c"] and "hello from" in job["spec"]["command"][2]
               for job in jobs)

    control_dir = str(Fleet(demo_dir / "ssh-agents.toml", demo_dir / "known_hosts", demo_dir / "fleet.db").control_dir)
    # The pasted commands leave ssh masters (ControlPersist): demo-down must end them too.
    assert processes_naming(control_dir), "no ssh master to check demo-down against"

    down = subprocess.run(["bash", "-c", down_line], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "is stopped" in down.stdout

    assert not state.alive
    assert leftovers(state.lab_id) == []
    assert not set(accounts) & {entry.pw_name for entry in pwd.getpwall()}
    assert not Path(f"/run/hwledger-lab/{state.lab_id}.json").exists()
    assert wait_for(lambda: not processes_naming(control_dir)), processes_naming(control_dir)
    assert processes_naming(str(demo_dir)) == []
    assert FleetState.read(demo_dir) is None
    again = subprocess.run(["bash", "-c", down_line], cwd=REPO, capture_output=True, text=True, timeout=60,
                           check=False)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


def test_demo_down_cleans_up_after_a_killed_supervisor(demo_dir: Path):
    """A supervisor killed outright (kill -9, the OOM killer) takes its sshd with it; `make demo-down`
    removes the rest (namespaces, accounts, its directories)."""
    from demo import fleet  # pylint: disable=import-outside-toplevel

    demo_dir.mkdir(mode=0o700)
    state = fleet.start(demo_dir)
    assert leftovers(state.lab_id)
    os.kill(state.pid, 9)
    assert wait_for(lambda: not state.alive)
    down = subprocess.run(["make", "demo-down", f"DEMO_DIR={demo_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert down.returncode == 0, down.stdout + down.stderr
    assert leftovers(state.lab_id) == []
