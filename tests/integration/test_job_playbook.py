"""The hwledger.fleet.job playbook and role over real SSH (tests/lab hosts, the ssh_agents inventory plugin).

Every test runs `ansible-playbook hwledger.fleet.job` as a user would, against real sshd hosts on loopback
addresses and behind a bastion in network namespaces, and checks the result file on the controller, the
processes left on the remote (the same machine here), and that no file of the job is left on the remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema, processes
from lab import Lab, SshHost, write_agents_toml
from lab.pinning import pinned_lines
from ansible_collections.hwledger.fleet.plugins.plugin_utils.processes import mentioning as _mentioning

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# ansible-playbook from this virtualenv, or from another one (e.g. ansible-core 2.18) given here:
ANSIBLE_BIN = Path(os.environ.get("HWLEDGER_TEST_ANSIBLE_BIN") or Path(sys.executable).parent)
SYSTEM_TMP = Path(tempfile.gettempdir())  # the remotes are this machine: their temp dir is ours
PYTHON38 = sorted((Path.home() / ".pyenv" / "versions").glob("3.8*/bin/python3.8"))


# --- the fleet: hosts, inventory, runs ---------------------------------------------------------------


class Fleet:
    """The lab hosts of this module and an inventory (*.hwledger.yml + ssh-agents.toml) naming them."""

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.hosts: dict[str, SshHost] = {}
        # Short (the plugin's ControlPath limit) and private; the ssh masters in it are ended at teardown.
        self.control_dir = Path(tempfile.mkdtemp(prefix="hwl-jobcp-"))
        # The jobs' remote temp base (hwledger_job_tmp_base): sticky and world-writable like /tmp, but ours,
        # so what a test leaves there is told apart from other test runs on this machine.
        self.tmp_base = Path(tempfile.mkdtemp(prefix="hwljob-remote-tmp-"))
        self.tmp_base.chmod(0o1777)
        self.inventory = root / "fleet.hwledger.yml"

    def add(self, key: str, host: SshHost) -> SshHost:
        self.hosts[key] = host
        self.write_inventory()
        return host

    def write_inventory(self) -> None:
        agents_file = write_agents_toml(self.root / "ssh-agents.toml", [h.agent_entry() for h in self.hosts.values()])
        loaded, _warnings = agents_schema.load_agents_file(str(agents_file))
        lines = set()
        for agent in loaded:
            lines.update(pinned_lines(agent, self.hosts_by_name()[agent.name]))
        known_hosts = self.root / "known_hosts"
        known_hosts.write_text("".join(sorted(f"{line}\n" for line in lines)))
        known_hosts.chmod(0o600)
        self.inventory.write_text(
            "plugin: hwledger.fleet.ssh_agents\n"
            f"agents_file: {agents_file.name}\n"
            f"known_hosts_file: {known_hosts}\n"
            f"control_dir: {self.control_dir}\n"
            "host_key_checking: 'yes'\n"
        )

    def hosts_by_name(self) -> dict[str, SshHost]:
        return {h.name: h for h in self.hosts.values()}

    def stop_ssh_masters(self) -> None:
        """End the connection-sharing ssh processes of our control dir (by pid)."""
        for pid in list(_mentioning(str(self.control_dir))):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.control_dir, ignore_errors=True)
        shutil.rmtree(self.tmp_base, ignore_errors=True)


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, results_dir: Path, job_id: str | None) -> None:
        self.rc = proc.returncode
        self.output = proc.stdout + proc.stderr
        self.results_dir = results_dir
        self.job_id = job_id

    @property
    def result(self) -> dict:
        path = self.results_dir / f"{self.job_id}.json"
        assert path.is_file(), f"no result at {path}; ansible-playbook said:\n{self.output[-4000:]}"
        return json.loads(path.read_text())

    def result_files(self) -> list[str]:
        return sorted(p.name for p in self.results_dir.iterdir()) if self.results_dir.exists() else []


def run_playbook(fleet: Fleet, host: SshHost, tmp_path: Path, job: dict | None = None, *, job_text: str | None = None,
                 as_dict: bool = False, timeout: float = 240, limit: str | None = None,
                 options: tuple[str, ...] = (), playbook: str = "hwledger.fleet.job", **extra_vars) -> Run:
    """ansible-playbook PLAYBOOK (hwledger.fleet.job) -i fleet.hwledger.yml -l HOST -e @vars.json [options]"""
    results_dir = tmp_path / "results"
    variables = {
        "hwledger_results_dir": str(results_dir),
        "hwledger_job_poll_s": 1,
        "hwledger_job_tmp_base": str(fleet.tmp_base),
        # No ansible_python_interpreter: the role runs no module on the remote, so Ansible never looks for
        # an interpreter there (the staged runner uses the python3 of the remote PATH, checked first).
    }
    if as_dict:
        variables["hwledger_job"] = job
    elif job is not None or job_text is not None:
        job_file = tmp_path / "job.json"
        job_file.write_text(job_text if job_text is not None else json.dumps(job))
        variables["hwledger_job_file"] = str(job_file)
    variables.update(extra_vars)
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(variables))
    env = {
        **os.environ,
        "PATH": f"{ANSIBLE_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
    }
    proc = subprocess.run(
        [str(ANSIBLE_BIN / "ansible-playbook"), playbook, "-i", str(fleet.inventory), "-l", limit or host.name,
         "-e", f"@{vars_file}", *options],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    job_id = job.get("job_id") if isinstance(job, dict) else extra_vars.get("hwledger_job_id")
    return Run(proc, results_dir, job_id if isinstance(job_id, str) else None)


def remote_job_dirs(base: Path) -> set[str]:
    return {p.name for p in base.glob("hwledger-job-*")}


def remote(host: SshHost, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(host.ssh_argv(command), capture_output=True, text=True, timeout=60, check=False)


def unique_sleep() -> str:
    return "300.%d" % secrets.randbelow(10**9)


def install_hwledger_wrapper(host: SshHost) -> Path:
    """Put `hwledger` (this checkout's app) on the host's remote PATH; returns the file logging its calls."""
    calls = host.dir / "hwledger.calls"
    script = host.bin_dir / "hwledger"
    script.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {sys.executable} -m hwledger.cli "$@"\n')
    script.chmod(0o755)
    return calls


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(lab: Lab, tmp_path_factory: pytest.TempPathFactory):
    the_fleet = Fleet(lab, tmp_path_factory.mktemp("job-fleet"))
    the_fleet.add("py", lab.add_loopback_host(lab.unique_name("job-py"), python=True))
    try:
        yield the_fleet
    finally:
        the_fleet.stop_ssh_masters()
        for host in the_fleet.hosts.values():
            host.stop()


def host_of(fleet: Fleet, key: str, factory) -> SshHost:
    if key not in fleet.hosts:
        fleet.add(key, factory())
    return fleet.hosts[key]


@pytest.fixture(scope="module")
def py_host(fleet: Fleet) -> SshHost:
    """python3 on the remote PATH, no hwledger: the staged runner."""
    return fleet.hosts["py"]


@pytest.fixture(scope="module")
def hwledger_host(fleet: Fleet, lab: Lab) -> tuple[SshHost, Path]:
    host = host_of(fleet, "hwledger", lambda: lab.add_loopback_host(lab.unique_name("job-hwl"), python=True))
    return host, install_hwledger_wrapper(host)


@pytest.fixture(scope="module")
def internal_host(fleet: Fleet, lab: Lab) -> SshHost:
    """A host reachable only through its bastion (network namespaces)."""
    def make() -> SshHost:
        try:
            _bastion, internal = lab.add_bastion_pair(lab.unique_name("jobnet"), python=True)
        except Exception as exc:  # LabUnavailable where namespaces cannot be made
            pytest.skip(f"no bastion pair: {exc}")
        return internal
    return host_of(fleet, "internal", make)


@pytest.fixture(scope="module")
def untouched_host(fleet: Fleet, lab: Lab) -> SshHost:
    """Only ever given invalid jobs: nothing may ever log in to it."""
    return host_of(fleet, "untouched", lambda: lab.add_loopback_host(lab.unique_name("job-untouched"), python=True))


@pytest.fixture(params=["loopback", "bastion"])
def target(request, py_host) -> SshHost:
    return py_host if request.param == "loopback" else request.getfixturevalue("internal_host")


@pytest.fixture(autouse=True)
def nothing_of_the_job_left_on_the_remote(fleet: Fleet):
    """After every test: no new hwledger-job-* dir in the remote temp dir, nothing left in the remote HOMEs
    (no module runs there, so no per-task temp dir or async status file is ever made)."""
    before = remote_job_dirs(fleet.tmp_base)
    yield
    assert remote_job_dirs(fleet.tmp_base) - before == set()
    for host in list(fleet.hosts.values()):
        assert not (host.home / ".ansible_async").exists()
        ansible_tmp = host.home / ".ansible" / "tmp"
        assert not ansible_tmp.exists() or list(ansible_tmp.iterdir()) == []


# --- outcomes, on a loopback host and on a host behind a bastion --------------------------------------


def test_success(fleet, target, tmp_path):
    # An env value the job prints comes back masked (the runner masks every value of 6 characters or more).
    job = job_schema.new_job(["sh", "-c", 'echo "GPU jobs run on $(hostname)"; echo "$GREETING, $WHO" >&2; pwd'],
                             env={"GREETING": "hello from env", "WHO": "me"}, workdir="/", timeout_s=60)
    run = run_playbook(fleet, target, tmp_path, job)
    assert run.rc == 0, run.output
    result = run.result
    assert result["state"] == "succeeded" and result["exit_code"] == 0
    assert result["stdout_tail"].startswith("GPU jobs run on ") and result["stdout_tail"].endswith("\n/\n")
    assert result["stderr_tail"] == "***, me\n"
    assert run.result_files() == [f"{job['job_id']}.json"]  # nothing unverified left beside it
    assert stat.S_IMODE((run.results_dir / f"{job['job_id']}.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(run.results_dir.stat().st_mode) == 0o700


def test_nonzero_exit(fleet, target, tmp_path):
    job = job_schema.new_job(["sh", "-c", "echo doing; exit 3"], timeout_s=60)
    run = run_playbook(fleet, target, tmp_path, job)
    assert run.rc == 2, run.output  # the host failed: the job did not succeed
    assert f"job {job['job_id']} on {target.name}: failed (exit code 3" in run.output
    assert (run.result["state"], run.result["exit_code"], run.result["stdout_tail"]) == ("failed", 3, "doing\n")


def test_timeout_kills_the_group_and_leaves_no_process(fleet, target, tmp_path):
    mark = unique_sleep()
    script = f"sleep {mark} & setsid sleep {mark} & (setsid sleep {mark} &); echo started; sleep {mark}"
    job = job_schema.new_job(["sh", "-c", script], timeout_s=2)
    run = run_playbook(fleet, target, tmp_path, job)
    assert run.rc == 2, run.output
    assert run.result["state"] == "timed_out" and run.result["signal"] == signal.SIGTERM
    assert run.result["stdout_tail"] == "started\n"
    assert list(_mentioning(mark)) == []
    check = remote(target, f"pgrep -f 'sleep {mark.replace('.', '[.]')}' || echo none")
    assert check.stdout.strip() == "none", check


def test_command_not_found(fleet, target, tmp_path):
    job = job_schema.new_job(["hwledger-no-such-tool", "--version"], timeout_s=60)
    run = run_playbook(fleet, target, tmp_path, job)
    assert run.rc == 2, run.output
    assert run.result["state"] == "error" and run.result["error"]["reason"] == "command_not_found"
    assert "command_not_found" in run.output


def test_huge_output_stays_bounded(fleet, target, tmp_path):
    job = job_schema.new_job(["sh", "-c", "head -c 50000000 /dev/zero | tr '\\0' x; echo; echo END"], timeout_s=120)
    run = run_playbook(fleet, target, tmp_path, job)
    assert run.rc == 0, run.output
    result = run.result
    assert result["stdout_bytes"] == 50_000_005
    assert len(result["stdout_tail"]) == job_schema.TAIL_BYTES and result["stdout_tail"].endswith("x\nEND\n")
    assert (run.results_dir / f"{job['job_id']}.json").stat().st_size < 200_000


# --- runners ---------------------------------------------------------------------------------------


def test_hwledger_on_the_remote_path_is_used(fleet, hwledger_host, tmp_path):
    host, calls = hwledger_host
    job = job_schema.new_job(["echo", "via hwledger run"], timeout_s=60)
    run = run_playbook(fleet, host, tmp_path, job)
    assert run.rc == 0, run.output
    assert run.result["stdout_tail"] == "via hwledger run\n"
    assert calls.read_text().splitlines()[-1].startswith("run /")


def test_staged_runner_when_asked_even_with_hwledger_present(fleet, hwledger_host, tmp_path):
    host, calls = hwledger_host
    before = calls.read_text() if calls.exists() else ""
    job = job_schema.new_job(["echo", "staged"], timeout_s=60)
    run = run_playbook(fleet, host, tmp_path, job, hwledger_job_runner="staged")
    assert run.rc == 0, run.output
    assert run.result["stdout_tail"] == "staged\n"
    assert (calls.read_text() if calls.exists() else "") == before


def test_remote_without_python3_gets_a_clear_message(fleet, lab, tmp_path):
    host = host_of(fleet, "nopy", lambda: lab.add_loopback_host(lab.unique_name("job-nopy"), python=False))
    run = run_playbook(fleet, host, tmp_path, job_schema.new_job(["true"]))
    assert run.rc == 2
    assert "python3 is not on its PATH" in run.output and "needs python3 (>= 3.8) on the remote" in run.output


def test_remote_with_python_3_8_runs_the_staged_runner(fleet, lab, tmp_path):
    if not PYTHON38:
        pytest.skip("no Python 3.8 under ~/.pyenv/versions (pyenv install 3.8 to run this check)")

    def make() -> SshHost:
        host = lab.add_loopback_host(lab.unique_name("job-py38"), python=True)
        (host.bin_dir / "python3").unlink()
        (host.bin_dir / "python3").symlink_to(PYTHON38[-1])
        return host

    host = host_of(fleet, "py38", make)
    job = job_schema.new_job(["sh", "-c", "python3 -c 'import sys; print(sys.version_info[:2])'"], timeout_s=60)
    run = run_playbook(fleet, host, tmp_path, job)
    assert run.rc == 0, run.output
    assert run.result["stdout_tail"] == "(3, 8)\n"


PYENV_BASHRC = """\
# As `pyenv init -` leaves a rented box: its shims first on the PATH of every shell, ssh host cmd included.
export PYENV_ROOT="$HOME/.pyenv"
export PATH="$PYENV_ROOT/shims:$PATH"
"""


def pyenv_host(lab: Lab) -> SshHost:
    """bash as login shell, and a ~/.bashrc that puts pyenv shims first: `python3` works, `python3.13` is a
    shim for a version that is not selected (what pyenv prints then, exit 127)."""
    host = lab.add_loopback_host(lab.unique_name("job-pyenv"), python=False, bashrc=PYENV_BASHRC)
    shims = host.home / ".pyenv" / "shims"
    shims.mkdir(parents=True)
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    (shims / "python3").write_text(f'#!/bin/sh\nexec {system_python} "$@"\n')
    (shims / "python3.13").write_text(
        "#!/bin/sh\necho 'pyenv: python3.13: command not found' >&2\necho >&2\n"
        "echo \"The \\`python3.13' command exists in these Python versions:\" >&2\necho '  3.13.0' >&2\nexit 127\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    return host


def test_a_pyenv_shim_first_on_the_path_does_not_break_the_job(fleet, lab, tmp_path):
    """The host of issue 10: Ansible's interpreter discovery picks the broken python3.13 shim, so any module
    fails there; the role runs none, and its runner uses the python3 it checked."""
    host = host_of(fleet, "pyenv", lambda: pyenv_host(lab))
    shell = remote(host, "command -v python3.13; command -v python3")
    assert shell.stdout.split() == [str(host.home / ".pyenv/shims/python3.13"), str(host.home / ".pyenv/shims/python3")]
    job = job_schema.new_job(["sh", "-c", "python3 -c 'print(40 + 2)'"], timeout_s=60)
    run = run_playbook(fleet, host, tmp_path, job)
    assert run.rc == 0, run.output
    assert run.result["state"] == "succeeded" and run.result["stdout_tail"] == "42\n"
    assert "python3.13" not in run.output
    assert not (host.home / ".ansible").exists()  # no module ever ran there
    # The control: any module on this host fails as in the issue (discovery picks the shim).
    module = subprocess.run(
        [str(ANSIBLE_BIN / "ansible"), host.name, "-i", str(fleet.inventory), "-m", "ansible.builtin.ping"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PATH": f"{ANSIBLE_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "ANSIBLE_NOCOLOR": "1"})
    shutil.rmtree(host.home / ".ansible", ignore_errors=True)
    assert module.returncode != 0 and "pyenv: python3.13: command not found" in module.stdout + module.stderr, module


# --- inputs ------------------------------------------------------------------------------------------

INVALID_JOBS = {
    "missing command": ({"job_id": str(uuid.uuid4())}, "command: is required"),
    "command as a string": ({"job_id": str(uuid.uuid4()), "command": "nvidia-smi -L"},
                            "command: must be a list of arguments"),
    "non-string env": ({"job_id": str(uuid.uuid4()), "command": ["env"], "env": {"THREADS": 8}}, "env.THREADS"),
    "negative timeout": ({"job_id": str(uuid.uuid4()), "command": ["true"], "timeout_s": -1},
                         "timeout_s: must be positive"),
    "job_id with ..": ({"job_id": "../../.ssh/authorized_keys", "command": ["true"]}, "job_id: must be a UUID"),
    "job_id with /": ({"job_id": "a/b", "command": ["true"]}, "must not contain '/' or '..'"),
    "unknown key": ({"job_id": str(uuid.uuid4()), "command": ["true"], "timout_s": 5}, "did you mean 'timeout_s'?"),
}


@pytest.mark.parametrize("as_dict", [False, True], ids=["job_file", "job_dict"])
@pytest.mark.parametrize("case", sorted(INVALID_JOBS))
def test_invalid_jobs_are_rejected_before_the_remote_is_touched(fleet, untouched_host, tmp_path, case, as_dict):
    job, message = INVALID_JOBS[case]
    mark = untouched_host.log_mark()
    run = run_playbook(fleet, untouched_host, tmp_path, job, as_dict=as_dict)
    assert run.rc == 2
    assert "invalid job" in run.output and message in run.output, run.output
    assert "Accepted publickey" not in untouched_host.log_text(since=mark)  # no login at all
    assert run.result_files() == []


def test_job_file_that_is_not_json_is_rejected(fleet, untouched_host, tmp_path):
    mark = untouched_host.log_mark()
    run = run_playbook(fleet, untouched_host, tmp_path, job_text='{"command": ["true"],')
    assert run.rc == 2 and "is not valid JSON" in run.output
    assert "Accepted publickey" not in untouched_host.log_text(since=mark)


def test_neither_job_nor_job_file(fleet, untouched_host, tmp_path):
    run = run_playbook(fleet, untouched_host, tmp_path)
    assert run.rc == 2 and "give exactly one of hwledger_job" in run.output


def test_one_job_on_two_hosts_is_refused(fleet, py_host, untouched_host, tmp_path):
    mark = untouched_host.log_mark()
    run = run_playbook(fleet, py_host, tmp_path, job_schema.new_job(["true"]), limit=f"{py_host.name},{untouched_host.name}")
    assert run.rc == 2 and "is set for more than one host of this play" in run.output, run.output
    assert "Accepted publickey" not in untouched_host.log_text(since=mark)
    assert run.result_files() == []


def test_template_text_in_a_job_file_stays_literal(fleet, py_host, tmp_path):
    canary = tmp_path / "PWNED"
    payload = "{{ lookup('ansible.builtin.pipe', 'touch %s') }}" % canary
    # In the job's argv, env and metadata. The job prints its argument and checks its env value (printing that
    # would show `***`: the runner masks env values in what a job prints).
    job = job_schema.new_job(["sh", "-c", 'printf %s "$1"; [ "$X" = "$1 (env)" ] && printf " env-literal"', "sh",
                              payload], env={"X": payload + " (env)"}, metadata={"note": payload}, timeout_s=60)
    run = run_playbook(fleet, py_host, tmp_path, job)
    assert run.rc == 0, run.output
    assert run.result["stdout_tail"] == payload + " env-literal"  # came back from the remote untemplated, too
    assert not canary.exists()


def test_job_given_as_a_dict(fleet, py_host, tmp_path):
    # A value shorter than the runner's masking minimum (6), so it comes back as printed.
    job = job_schema.new_job(["sh", "-c", "echo $MODE"], env={"MODE": "dict"}, timeout_s=60)
    run = run_playbook(fleet, py_host, tmp_path, job, as_dict=True)
    assert run.rc == 0, run.output
    assert run.result["stdout_tail"] == "dict\n"


def test_failed_job_without_failing_the_host(fleet, py_host, tmp_path):
    job = job_schema.new_job(["false"], timeout_s=60)
    run = run_playbook(fleet, py_host, tmp_path, job, hwledger_job_fail_on_error=False)
    assert run.rc == 0, run.output
    assert run.result["state"] == "failed" and run.result["exit_code"] == 1


# --- hostile hosts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_host(fleet: Fleet, lab: Lab) -> SshHost:
    """A remote whose `hwledger run` lies: it writes whatever the test put in its behaviour files."""
    host = host_of(fleet, "hostile", lambda: lab.add_loopback_host(lab.unique_name("job-hostile"), python=True))
    behaviour = host.dir / "hostile"
    behaviour.mkdir(exist_ok=True)
    script = host.bin_dir / "hwledger"
    script.write_text(
        "#!/bin/sh\n"
        "# $1=run $2=job.json $3=--output $4=result.json\n"
        f'cd {behaviour} || exit 70\n'
        'if [ -e symlink-to ]; then ln -s "$(cat symlink-to)" "$4"; else cat payload > "$4"; fi\n'
        "cat printed\n"
    )
    script.chmod(0o755)
    # The role reads result.json with `head -c LIMIT+1 -- DIR/result.json` after checking it with stat.
    # This head first swaps the file for a symlink when told to (swap-to), as any process of the job's
    # user could do between that check and the read, then runs the real head and counts what it printed.
    (host.bin_dir / "head").rename(host.bin_dir / "head.real")
    wrapper = host.bin_dir / "head"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"behaviour={behaviour}\n"
        'if [ -e "$behaviour/swap-to" ] && [ "$#" -eq 4 ] && [ "$3" = "--" ]; then\n'
        '  case "$4" in */result.json)\n'
        '    rm -f -- "$4" && ln -s "$(cat "$behaviour/swap-to")" "$4" && echo "$4" >> "$behaviour/swapped";;\n'
        "  esac\n"
        "fi\n"
        f'{host.bin_dir}/head.real "$@" > "$behaviour/read-out"; status=$?\n'
        'wc -c < "$behaviour/read-out" > "$behaviour/read-count"\n'
        'cat "$behaviour/read-out"; rm -f "$behaviour/read-out"\n'
        "exit $status\n"
    )
    wrapper.chmod(0o755)
    return host


def behave(host: SshHost, *, payload: bytes = b"", printed: str = "", symlink_to: str | None = None,
           swap_to: str | None = None) -> None:
    behaviour = host.dir / "hostile"
    (behaviour / "payload").write_bytes(payload)
    (behaviour / "printed").write_text(printed)
    for name in ("swapped", "read-count"):
        (behaviour / name).unlink(missing_ok=True)
    for name, value in (("symlink-to", symlink_to), ("swap-to", swap_to)):
        if value is None:
            (behaviour / name).unlink(missing_ok=True)
        else:
            (behaviour / name).write_text(value)


def valid_result_for(job_id: str) -> bytes:
    return job_schema.encode_result(job_schema.make_result(job_id, "succeeded", started=time.time() - 1,
                                                           finished=time.time(), exit_code=0, stdout=b"all fine\n"))


def hostile_case(name: str, job_id: str, tmp_path: Path) -> dict:
    victim = tmp_path / "victim-secret"
    victim.write_text("controller secret\n")
    data = valid_result_for(job_id)
    return {
        "too big": dict(payload=b" " * (job_schema.RESULT_MAX_BYTES + 1)),
        "not json": dict(payload=b"<html>definitely not json</html>"),
        "another job": dict(payload=valid_result_for(str(uuid.uuid4()))),
        "a symlink": dict(symlink_to=str(victim)),
        "bytes changed after the run": dict(payload=data, printed="%s  result.json\n" % ("0" * 64)),
        "schema violation": dict(payload=data.replace(b'"succeeded"', b'"owned"')),
        # Issue 13: ansible-core 2.19 refused to carry these bytes back, and the reason was lost.
        "not utf-8": dict(payload=data.replace(b"all fine", b"all \xff\xfe fine")),
    }[name]


@pytest.mark.parametrize(
    "case, reason",
    [("too big", "result_too_large"), ("not json", "result_not_json"), ("another job", "result_wrong_job"),
     ("a symlink", "result_not_regular_file"), ("bytes changed after the run", "result_checksum_mismatch"),
     ("schema violation", "result_invalid"), ("not utf-8", "result_not_json")],
)
def test_hostile_results_are_refused(fleet, hostile_host, tmp_path, case, reason):
    job = job_schema.new_job(["true"], timeout_s=60)
    behave(hostile_host, **hostile_case(case, job["job_id"], tmp_path))
    run = run_playbook(fleet, hostile_host, tmp_path, job, hwledger_job_runner="hwledger")
    assert run.rc == 2
    assert reason in run.output, run.output
    assert run.result_files() == []  # nothing fetched or nothing kept: no result to trust


def test_an_honest_result_from_the_hostile_host_is_accepted(fleet, hostile_host, tmp_path):
    """The control for the refusals above: the same fake runner with a valid result passes."""
    job = job_schema.new_job(["true"], timeout_s=60)
    data = valid_result_for(job["job_id"])

    behave(hostile_host, payload=data, printed="%s  result.json\n" % hashlib.sha256(data).hexdigest())
    run = run_playbook(fleet, hostile_host, tmp_path, job, hwledger_job_runner="hwledger")
    assert run.rc == 0, run.output
    assert run.result["stdout_tail"] == "all fine\n"


@pytest.mark.parametrize("target", ["/dev/zero", "a 4 GiB file"])
def test_result_swapped_after_its_check_is_read_bounded_and_refused(fleet, hostile_host, tmp_path, target):
    """result.json passes the stat checks (a small regular file of ours), then becomes a symlink to something
    endless or huge before it is read: the read stops one byte past the limit and the result is refused."""
    job = job_schema.new_job(["true"], timeout_s=60)
    data = valid_result_for(job["job_id"])
    if target == "/dev/zero":
        swap_to = "/dev/zero"
    else:
        huge = tmp_path / "huge"
        with huge.open("wb") as handle:
            handle.truncate(4 << 30)  # sparse: no disk used here
        swap_to = str(huge)
    behave(hostile_host, payload=data, printed="%s  result.json\n" % hashlib.sha256(data).hexdigest(),
           swap_to=swap_to)
    started = time.monotonic()
    run = run_playbook(fleet, hostile_host, tmp_path, job, hwledger_job_runner="hwledger")
    behaviour = hostile_host.dir / "hostile"
    assert (behaviour / "swapped").is_file(), "the swap never happened: " + run.output[-3000:]
    assert run.rc == 2, run.output
    assert "result_too_large" in run.output and f"more than {job_schema.RESULT_MAX_BYTES} bytes" in run.output, run.output
    # What reached the controller is what head printed: one byte past the limit, not the endless rest.
    assert int((behaviour / "read-count").read_text()) == job_schema.RESULT_MAX_BYTES + 1
    assert run.result_files() == []
    assert time.monotonic() - started < 120


def test_results_dir_writable_by_others_is_refused_before_the_remote_is_touched(fleet, untouched_host, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o777)
    mark = untouched_host.log_mark()
    run = run_playbook(fleet, untouched_host, tmp_path, job_schema.new_job(["true"], timeout_s=60))
    assert run.rc == 2
    assert "results_dir is not safe for job results" in run.output and "writable by group and others" in run.output
    assert "Accepted publickey" not in untouched_host.log_text(since=mark)
    assert run.result_files() == []


# --- secrets in env ------------------------------------------------------------------------------------


def canary_job() -> tuple[dict, str]:
    """A job whose env holds a fresh canary value; it succeeds only if it got that exact value, and it
    never prints it (it compares the value's sha256)."""
    canary = "hwl-canary-" + secrets.token_hex(16)
    digest = hashlib.sha256(canary.encode()).hexdigest()
    check = 'test "$(printf %s "$TOKEN" | sha256sum)" = "$1  -"'
    return job_schema.new_job(["sh", "-c", check, "sh", digest], env={"TOKEN": canary}, timeout_s=60), canary


@pytest.mark.parametrize("as_dict", [False, True], ids=["job_file", "job_dict"])
def test_env_values_never_reach_the_ansible_output(fleet, py_host, tmp_path, as_dict):
    job, canary = canary_job()
    run = run_playbook(fleet, py_host, tmp_path, job, as_dict=as_dict, options=("-vvv", "--diff"))
    assert run.rc == 0, run.output[-4000:]
    assert run.result["state"] == "succeeded"  # the job got the exact value
    assert "SSH: EXEC" in run.output and job["job_id"] in run.output  # the output is verbose indeed
    assert canary not in run.output
    assert canary not in (run.results_dir / f"{job['job_id']}.json").read_text()


def test_env_values_never_reach_ansible_runner_events(fleet, py_host, tmp_path):
    """The server runs the role through ansible-runner: its events (what AWX stores too) and artifacts."""
    import ansible_runner

    job, canary = canary_job()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    private_dir = tmp_path / "runner"
    private_dir.mkdir(mode=0o700)
    events: list[dict] = []
    env = {
        "PATH": f"{ANSIBLE_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "collections"),
        "ANSIBLE_NOCOLOR": "1",
    }
    extravars = {
        "hwledger_job_file": str(job_file),
        "hwledger_results_dir": str(tmp_path / "results"),
        "hwledger_job_poll_s": 1,
        "hwledger_job_tmp_base": str(fleet.tmp_base),
    }
    runner = ansible_runner.run(
        private_data_dir=str(private_dir), playbook="hwledger.fleet.job", inventory=str(fleet.inventory),
        limit=py_host.name, extravars=extravars, envvars=env, verbosity=3, quiet=True,
        event_handler=lambda event: events.append(event) or True,
    )
    assert runner.status == "successful", runner.stdout.read()[-4000:]
    assert json.loads((tmp_path / "results" / f"{job['job_id']}.json").read_text())["state"] == "succeeded"
    assert any(e.get("event") == "runner_on_ok" and e["event_data"].get("task_action", "").endswith("job_spec")
               for e in events)
    assert canary not in json.dumps(events)
    for path in private_dir.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path


@pytest.fixture
def other_user():
    """A second, unprivileged local account (the remote is this machine)."""
    if os.geteuid() != 0:
        pytest.skip("creating a second user needs root")
    name = "hwljob" + secrets.token_hex(3)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name], check=True,
                   capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True, check=False)


def as_user(user: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", "sh", "-c", command],
                          capture_output=True, text=True, timeout=30, check=False)


def test_files_planted_in_tmp_by_another_user_cannot_redirect_or_read_the_job(fleet, py_host, tmp_path, other_user):
    """The job dir is made in the shared /tmp here (the role's default), next to what another user planted."""
    loot = Path(tempfile.mkdtemp(prefix="hwljob-loot-"))
    os.chown(loot, *_ids(other_user))
    planted = [SYSTEM_TMP / f"hwledger-job-{secrets.token_hex(4)}" for _index in range(3)]
    script = "; ".join(
        [f"ln -s {loot} {planted[0]}", f"mkdir -m 777 {planted[1]}", f"touch {planted[2]}",
         f"ln -s {loot}/result.json {SYSTEM_TMP}/result.json 2>/dev/null || true"]
    )
    assert as_user(other_user, script).returncode == 0
    before = {p.name for p in job_dirs_owned_by(SYSTEM_TMP, 0)}
    seen: list[Path] = []
    reads: list[subprocess.CompletedProcess] = []

    def spy() -> None:
        # While the job runs, the other user tries to list the job's dir and read its job.json.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not reads:
            new = [p for p in job_dirs_owned_by(SYSTEM_TMP, 0) if p.name not in before]
            if new:
                seen.append(new[0])
                reads.append(as_user(other_user, f"ls {new[0]}; cat {new[0]}/job.json"))
            time.sleep(0.05)

    try:
        job = job_schema.new_job(["sh", "-c", "echo secret-output; sleep 3"], env={"TOKEN": "job-secret"}, timeout_s=60)
        watcher = threading.Thread(target=spy)
        watcher.start()
        run = run_playbook(fleet, py_host, tmp_path, job, hwledger_job_tmp_base="")
        watcher.join()
        assert run.rc == 0, run.output
        assert run.result["stdout_tail"] == "secret-output\n"
        assert reads, "the job directory was never seen"
        assert reads[0].returncode != 0 and "Permission denied" in reads[0].stderr
        assert "job-secret" not in reads[0].stdout
        assert list(loot.iterdir()) == []  # nothing was written through the planted links
        assert planted[0].is_symlink() and planted[1].is_dir() and planted[2].is_file()
        assert stat.S_IMODE(planted[1].stat().st_mode) == 0o777 and list(planted[1].iterdir()) == []
        assert not seen[0].exists()  # and the job's own dir is gone
    finally:
        for path in planted:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                path.rmdir()
        shutil.rmtree(loot, ignore_errors=True)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def job_dirs_owned_by(base: Path, uid: int) -> list[Path]:
    found = []
    for path in base.glob("hwledger-job-*"):
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
            found.append(path)
    return found


def test_stale_job_dirs_of_this_user_are_swept(fleet, py_host, tmp_path, other_user):
    nine_days_ago = time.time() - 9 * 86400
    stale = Path(tempfile.mkdtemp(prefix="hwledger-job-", dir=fleet.tmp_base))
    (stale / "job.json").write_text("{}")
    recent = Path(tempfile.mkdtemp(prefix="hwledger-job-", dir=fleet.tmp_base))
    foreign = fleet.tmp_base / f"hwledger-job-{secrets.token_hex(4)}"
    assert as_user(other_user, f"mkdir {foreign}").returncode == 0
    for path in (stale, foreign):
        os.utime(path, (nine_days_ago, nine_days_ago))
    try:
        run = run_playbook(fleet, py_host, tmp_path, job_schema.new_job(["true"], timeout_s=60))
        assert run.rc == 0, run.output
        assert not stale.exists()  # ours and old: removed
        assert recent.is_dir()  # ours but recent (maybe a job still running): kept
        assert foreign.is_dir()  # another user's: never touched
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(recent, ignore_errors=True)
        if foreign.exists():
            foreign.rmdir()


# --- a dropped connection ---------------------------------------------------------------------------------


def test_job_survives_a_dropped_ssh_connection(fleet, py_host, tmp_path):
    mark = unique_sleep()
    job = job_schema.new_job(["sh", "-c", f"sleep {mark} & sleep 6; echo survived"], timeout_s=120)
    dropped: list[int] = []

    def drop_connections() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(_mentioning(mark)):
            time.sleep(0.1)
        time.sleep(1)
        # The server side of every SSH connection to the host (not the detached job): the link is cut.
        for pid in py_host.processes():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"sshd: {py_host.user}") and pid != py_host.pid:
                os.kill(pid, signal.SIGKILL)
                dropped.append(pid)

    cutter = threading.Thread(target=drop_connections)
    cutter.start()
    run = run_playbook(fleet, py_host, tmp_path, job)
    cutter.join()
    assert dropped, "no SSH connection was found to drop"
    assert run.rc == 0, run.output
    assert run.result["state"] == "succeeded" and run.result["stdout_tail"] == "survived\n"
    assert run.result["duration_s"] >= 6
    assert list(_mentioning(mark)) == []


# --- a job is started at most once; a cut-off run is reconciled ---------------------------------------------


def job_runners(job_id: str) -> set[int]:
    """The pids of the runners of a job: an argument is the spec file inside one of the job's dirs (what the
    role's own check looks for; the job's other processes, Ansible's modules in its dir, do not count)."""
    pattern = re.compile(rb"^/.*/hwledger-job-" + job_id.encode() + rb"-[^/]+/job[.]json$")
    found = set()
    for pid in processes.table() or {}:
        if any(pattern.match(arg) for arg in processes.cmdline(pid).split(b"\0")):
            found.add(pid)
    return found


def test_a_job_is_started_at_most_once(fleet, py_host, tmp_path):
    """I65: while a run of a job goes on, a second start of the same job_id is refused with a reason, and
    nothing of the first run is touched; a private dir of the job left on the host refuses it too."""
    starts = tmp_path / "starts"
    job = job_schema.new_job(["sh", "-c", f"echo started >> {starts}; sleep 20; echo done"], timeout_s=60)
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    (tmp_path / "third").mkdir()
    runs: dict[str, Run] = {}
    first = threading.Thread(target=lambda: runs.update(first=run_playbook(fleet, py_host, tmp_path / "first", job)))
    first.start()
    try:
        deadline = time.monotonic() + 60
        while not job_runners(job["job_id"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        runners = job_runners(job["job_id"])
        assert runners, "the first run never started"
        second = run_playbook(fleet, py_host, tmp_path / "second", job)
        assert second.rc == 2, second.output[-3000:]
        assert "job_already_started" in second.output, second.output[-3000:]
        assert "1 runner(s) of it still running" in second.output, second.output[-3000:]
        assert second.result_files() == []
        assert job_runners(job["job_id"]) <= runners  # no second runner, ever
    finally:
        first.join(120)
    assert runs["first"].rc == 0, runs["first"].output
    assert runs["first"].result["stdout_tail"] == "done\n"
    assert starts.read_text().splitlines() == ["started"]

    # A dir of this job left behind (a run cut off before its clean-up) refuses a start too.
    left = Path(tempfile.mkdtemp(prefix=f"hwledger-job-{job['job_id']}-", dir=fleet.tmp_base))
    try:
        third = run_playbook(fleet, py_host, tmp_path / "third", job)
        assert third.rc == 2 and "job_already_started" in third.output, third.output[-3000:]
        assert "1 other private dir(s)" in third.output, third.output[-3000:]
        assert left.is_dir()  # not the role's to remove: a reconcile or the clean-up decides
        assert starts.read_text().splitlines() == ["started"]
    finally:
        shutil.rmtree(left, ignore_errors=True)


def _plant_job_dir(fleet: Fleet, job_id: str, result: bytes | None, *, launched: bool = True) -> Path:
    """A private dir of the job as a run cut off after its runner ended leaves it."""
    directory = Path(tempfile.mkdtemp(prefix=f"hwledger-job-{job_id}-", dir=fleet.tmp_base))
    (directory / "job.json").write_text("{}")
    if launched:
        # What the runner's wrapper leaves as it starts and ends (job_remote.LAUNCH_TRACES).
        for name, text in (("runner.out", ""), ("runner.err", ""), ("runner.rc", "1\n")):
            (directory / name).write_text(text)
    if result is not None:
        (directory / "result.json").write_bytes(result)
        (directory / "result.json").chmod(0o600)
    return directory


def reconcile(fleet: Fleet, host: SshHost, tmp_path: Path, job_id: str, **extra) -> tuple[Run, dict | None]:
    results = tmp_path / "results"
    results.mkdir(mode=0o700, exist_ok=True)
    run = run_playbook(fleet, host, tmp_path, playbook="hwledger.fleet.job_reconcile", hwledger_job_id=job_id,
                       hwledger_job_tmp_base=str(fleet.tmp_base), options=("-v",), **extra)
    report = None
    for line in run.output.splitlines():
        if '"hwledger_job_reconciled"' in line:
            report = json.loads(line.split("=> ", 1)[1])["ansible_facts"]["hwledger_job_reconciled"]
    return run, report


def test_reconcile_reads_the_result_a_cut_off_run_left_and_removes_its_dir(fleet, py_host, tmp_path):
    job_id = str(uuid.uuid4())
    data = job_schema.encode_result(job_schema.make_result(job_id, "failed", started=time.time() - 5,
                                                           finished=time.time(), exit_code=7, stdout=b"partial\n"))
    left = _plant_job_dir(fleet, job_id, data)
    run, report = reconcile(fleet, py_host, tmp_path, job_id)
    assert run.rc == 0, run.output
    assert report is not None and report["found"] in (True, "True") and report["result"] in (True, "True")
    assert (run.result["state"], run.result["exit_code"], run.result["stdout_tail"]) == ("failed", 7, "partial\n")
    assert not left.exists()


def test_reconcile_follows_a_runner_still_running_to_its_end(fleet, py_host, tmp_path):
    job = job_schema.new_job(["sh", "-c", "sleep 4; echo followed"], timeout_s=60)
    directory = Path(tempfile.mkdtemp(prefix=f"hwledger-job-{job['job_id']}-", dir=fleet.tmp_base))
    (directory / "job.json").write_text(json.dumps(job))
    (directory / "job.json").chmod(0o600)
    # The runner as the role starts it (its argument names the job's spec file), left by a dead controller.
    runner = subprocess.Popen([sys.executable, "-m", "hwledger.cli", "run", str(directory / "job.json"),
                               "--output", str(directory / "result.json")], cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'collections'}"})
    try:
        run, report = reconcile(fleet, py_host, tmp_path, job["job_id"], hwledger_job_wait_s=60)
        assert runner.poll() == 0  # it ended by itself, followed, not killed
        assert run.rc == 0, run.output
        assert report["running"] in (False, "False") and report["launched"] in (True, "True")
        assert run.result["stdout_tail"] == "followed\n"
        assert not directory.exists()
    finally:
        if runner.poll() is None:
            runner.kill()
        shutil.rmtree(directory, ignore_errors=True)


def test_reconcile_of_a_job_that_left_nothing_says_so(fleet, py_host, tmp_path):
    run, report = reconcile(fleet, py_host, tmp_path, str(uuid.uuid4()))
    assert run.rc == 0, run.output
    assert report["found"] in (False, "False") and report["launched"] in (False, "False")
    assert run.result_files() == []


def test_reconcile_refuses_a_result_that_is_not_the_runners(fleet, py_host, tmp_path):
    job_id = str(uuid.uuid4())
    left = _plant_job_dir(fleet, job_id, b'{"job_id": "\xff\xfe"}\n')
    run, _report = reconcile(fleet, py_host, tmp_path, job_id)
    assert run.rc == 2 and "result_not_json" in run.output, run.output
    assert run.result_files() == [] and not left.exists()
