"""The job role's remote sh steps (plugin_utils/job_remote.py), run with the local /bin/sh as the remote.

Each script runs as the role runs it (``sh -c SCRIPT`` with the job on stdin), with a remote PATH made for
the test: the real POSIX tools, and python3 / hwledger only where a test puts them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_bundle, job_remote, job_schema

TOOLS = ("sh", "cat", "ls", "mktemp", "find", "rm", "mv", "id", "head", "tail", "setsid", "sleep", "printf",
         "env", "true", "echo", "tr", "grep")


@pytest.fixture
def remote(tmp_path: Path):
    """A remote PATH with POSIX tools only, a temp base, and a way to run a script there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool, path="/usr/bin:/bin")
        if found:
            (bin_dir / tool).symlink_to(found)
    base = tmp_path / "base"
    base.mkdir()

    class Remote:
        def __init__(self):
            self.bin_dir, self.base = bin_dir, base

        def add_python3(self, target: str = sys.executable) -> None:
            (bin_dir / "python3").symlink_to(target)

        def run(self, script: str, data: bytes = b"") -> subprocess.CompletedProcess:
            return subprocess.run(["/bin/sh", "-c", script], input=data, capture_output=True, timeout=60, check=False,
                                  env={"PATH": str(bin_dir), "HOME": str(tmp_path)})

    return Remote()


def job(**kw) -> dict:
    # The job gets its env value (it says whether it matches, and prints it: the runner masks it).
    command = ["sh", "-c", "echo ran; [ \"$TOKEN\" = s3cret-value ] && echo \"match $TOKEN\" >&2"]
    return job_schema.new_job(kw.pop("command", command),
                              env=kw.pop("env", {"TOKEN": "s3cret-value"}), timeout_s=30, **kw)


def start(remote, spec: dict, **kw) -> dict:
    script = job_remote.start_script(spec["job_id"], tmp_base=str(remote.base), **kw)
    data = job_remote.start_input(job_schema.encode_job(spec), job_bundle.bundle())
    proc = remote.run(script, data)
    return job_remote.parse_start(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def wait_done(remote, started: dict) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state, rc = job_remote.parse_poll(remote.run(job_remote.poll_script(started["path"], started["pid"])).stdout.decode())
        if state != "running":
            assert state == "done"
            return rc
        time.sleep(0.05)
    raise AssertionError("the job never ended")


def test_start_writes_a_private_dir_and_the_staged_runner_runs_the_job(remote):
    remote.add_python3()
    spec = job()
    started = start(remote, spec)
    path = Path(started["path"])
    assert started["runner"] == "staged" and path.parent == remote.base
    assert path.name.startswith("hwledger-job-%s-" % spec["job_id"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((path / "job.json").stat().st_mode) == 0o600
    assert json.loads((path / "job.json").read_text()) == json.loads(job_schema.encode_job(spec))
    assert (path / "runner.pyz").read_bytes() == job_bundle.bundle()
    assert wait_done(remote, started) == 0
    token = job_remote.new_token()
    found = job_remote.parse_inspect(remote.run(job_remote.inspect_script(str(path), token)).stdout.decode(), token)
    assert found["stat"]["kind"] == "file" and found["uid"] == os.geteuid() == found["stat"]["uid"]
    read = remote.run(job_remote.read_command(str(path), job_schema.RESULT_MAX_BYTES)).stdout
    assert found["stat"]["size"] == len(read)
    result = job_schema.validate_result(read, expected_job_id=spec["job_id"])
    assert result["stdout_tail"] == "ran\n" and result["stderr_tail"] == "match ***\n"
    assert job_schema.parse_sha256_line(found["out"]) is not None
    assert remote.run(job_remote.remove_command(str(path))).returncode == 0 and not path.exists()


def test_no_python3_on_the_path_is_a_clear_error_and_leaves_nothing(remote):
    with pytest.raises(job_remote.RemoteStepError) as caught:
        start(remote, job())
    assert caught.value.reason == "no_runner" and str(caught.value) == "python3 is not on its PATH"
    assert list(remote.base.iterdir()) == []


def test_a_python3_that_does_not_run_is_named_with_what_it_said(remote):
    shim = remote.bin_dir / "python3"
    shim.write_text("#!/bin/sh\necho 'pyenv: python3: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    with pytest.raises(job_remote.RemoteStepError) as caught:
        start(remote, job())
    assert caught.value.reason == "no_runner"
    assert "does not run, or is older than 3.8" in str(caught.value) and "pyenv: python3: command not found" in str(caught.value)


def test_hwledger_on_the_path_is_used_unless_staged_is_asked(remote):
    remote.add_python3()
    fake = remote.bin_dir / "hwledger"
    fake.write_text('#!/bin/sh\necho "$@" > "${2%/*}/argv"\n')
    fake.chmod(0o755)
    spec = job()
    started = start(remote, spec)
    assert started["runner"] == "hwledger"
    wait_done(remote, started)
    path = started["path"]
    assert Path(path, "argv").read_text() == "run %s/job.json --output %s/result.json\n" % (path, path)
    assert not Path(path, "runner.pyz").exists()  # sent, but not written
    assert start(remote, job(), runner="staged")["runner"] == "staged"


def test_runner_hwledger_without_hwledger_is_an_error(remote):
    remote.add_python3()
    with pytest.raises(job_remote.RemoteStepError, match=r"hwledger is not on its PATH \(hwledger_job_runner=hwledger\)"):
        start(remote, job(), runner="hwledger")


def test_env_values_are_on_no_command_line(remote):
    """The job JSON travels on stdin: the start script's text holds nothing of it."""
    remote.add_python3()
    spec = job()
    script = job_remote.start_script(spec["job_id"], tmp_base=str(remote.base))
    assert "s3cret-value" not in script and spec["job_id"] in script


def test_stale_dirs_of_this_user_are_swept_and_recent_ones_kept(remote):
    remote.add_python3()
    stale, recent = remote.base / "hwledger-job-old", remote.base / "hwledger-job-new"
    for path in (stale, recent):
        path.mkdir()
    long_ago = time.time() - 9 * 86400
    os.utime(stale, (long_ago, long_ago))
    start(remote, job(), stale_age_minutes=job_remote.stale_minutes("8d"))
    assert not stale.exists() and recent.is_dir()


@pytest.mark.parametrize("age, minutes", [("8d", 11520), ("36h", 2160), ("90m", 90), ("30", 1), ("1w", 10080)])
def test_stale_age_in_find_format(age, minutes):
    assert job_remote.stale_minutes(age) == minutes


@pytest.mark.parametrize("age", ["-1d", "soon", "8 days", ""])
def test_bad_stale_age_is_refused(age):
    with pytest.raises(ValueError, match="stale age"):
        job_remote.stale_minutes(age)


def test_inspect_sees_a_symlink_without_following_it(remote, tmp_path):
    path = remote.base / "hwledger-job-x-1"
    path.mkdir()
    (path / "result.json").symlink_to("/dev/zero")
    token = job_remote.new_token()
    found = job_remote.parse_inspect(remote.run(job_remote.inspect_script(str(path), token)).stdout.decode(), token)
    assert found["stat"]["kind"] == "link"


def test_runner_output_cannot_fake_a_section(remote):
    path = remote.base / "hwledger-job-x-2"
    path.mkdir()
    (path / "result.json").write_text("{}")
    token = job_remote.new_token()
    (path / "runner.out").write_text("==guess stat\n-rw------- 1 0 0 1 Jan 1 00:00 x\n")
    found = job_remote.parse_inspect(remote.run(job_remote.inspect_script(str(path), token)).stdout.decode(), token)
    assert found["stat"]["size"] == 2 and "==guess stat" in found["out"]


@pytest.mark.parametrize("text", ["", "done", "done x", "running twice", "gone 1"])
def test_unexpected_poll_answers_are_errors(text):
    with pytest.raises(job_remote.RemoteStepError):
        job_remote.parse_poll(text)


@pytest.mark.parametrize("line", [
    "HWLEDGER-JOB-START /tmp/x 12 staged",                          # not a job dir
    "HWLEDGER-JOB-START /tmp/hwledger-job-a/../../etc 12 staged",   # '..'
    "HWLEDGER-JOB-START /tmp/hwledger-job-a-1 12 bash",             # unknown runner
    "HWLEDGER-JOB-START /tmp/hwledger-job-a-1 x staged",            # no pid
])
def test_start_answers_that_are_not_ours_are_refused(line):
    with pytest.raises(job_remote.RemoteStepError) as caught:
        job_remote.parse_start(0, line + "\n", "")
    assert caught.value.reason == "start_failed"


def test_remove_command_refuses_anything_but_a_job_dir():
    with pytest.raises(ValueError):
        job_remote.remove_command("/home/user")
    assert job_remote.remove_command("/tmp/hwledger-job-a-1") == "rm -rf -- /tmp/hwledger-job-a-1"


def test_the_first_poll_watches_the_job_end_on_the_remote(remote):
    path = remote.base / "hwledger-job-x-3"
    path.mkdir()
    runner = subprocess.Popen(["/bin/sh", "-c", 'sleep 0.3; echo 5 > "$1/runner.rc"', "sh", str(path)])
    try:
        answer = remote.run(job_remote.poll_script(str(path), runner.pid, wait_s=5.0)).stdout.decode()
        assert job_remote.parse_poll(answer) == ("done", 5)
        assert job_remote.parse_poll(remote.run(job_remote.poll_script(str(path), 2**22 + 9)).stdout.decode()) == ("done", 5)
    finally:
        runner.wait()


def test_a_poll_without_a_wait_answers_running_at_once(remote):
    path = remote.base / "hwledger-job-x-4"
    path.mkdir()
    assert job_remote.parse_poll(remote.run(job_remote.poll_script(str(path), os.getpid())).stdout.decode()) == ("running", None)
    assert job_remote.parse_poll(remote.run(job_remote.poll_script(str(path), 2**22 + 9, wait_s=5)).stdout.decode()) == ("gone", None)


def test_the_read_can_remove_the_directory_in_the_same_exec(remote):
    path = remote.base / "hwledger-job-x-5"
    path.mkdir()
    (path / "result.json").write_bytes(b"x" * 50)
    proc = remote.run(job_remote.read_command(str(path), 10, then_remove=True))
    assert proc.stdout == b"x" * 11 and proc.returncode == 0 and not path.exists()


# --- a job is started at most once; a cut-off run is found again -------------------------------------------


def test_an_earlier_dir_of_the_job_refuses_the_start_and_is_left_alone(remote):
    remote.add_python3()
    spec = job()
    left = remote.base / ("hwledger-job-%s-earlier1" % spec["job_id"])
    left.mkdir(mode=0o700)
    (left / "keep").write_text("x")
    with pytest.raises(job_remote.RemoteStepError) as refused:
        start(remote, spec)
    assert refused.value.reason == "job_already_started"
    assert "1 other private dir(s) of it, 0 runner(s) of it still running" in str(refused.value)
    assert sorted(p.name for p in remote.base.iterdir()) == [left.name]  # the new dir went, the old one stays
    assert (left / "keep").read_text() == "x"


def test_a_link_or_another_jobs_dir_does_not_refuse_the_start(remote, tmp_path):
    remote.add_python3()
    spec = job()
    (remote.base / ("hwledger-job-%s-alink123" % spec["job_id"])).symlink_to(tmp_path)
    (remote.base / ("hwledger-job-%s-other123" % job()["job_id"])).mkdir()
    started = start(remote, spec)
    assert wait_done(remote, started) == 0


def test_a_running_runner_of_the_job_refuses_the_start(remote, tmp_path):
    remote.add_python3()
    spec = job()
    elsewhere = tmp_path / "gone" / ("hwledger-job-%s-runs1234" % spec["job_id"])  # its dir is not in base
    elsewhere.mkdir(parents=True)
    # How a runner's argv names it (python3 runner.pyz run DIR/job.json ...).
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(elsewhere / "job.json")])
    try:
        with pytest.raises(job_remote.RemoteStepError) as refused:
            start(remote, spec)
        assert refused.value.reason == "job_already_started"
        assert "0 other private dir(s) of it, 1 runner(s) of it still running" in str(refused.value)
        assert list(remote.base.iterdir()) == []
        assert runner.poll() is None  # untouched
    finally:
        runner.kill()
        runner.wait()


def test_the_start_script_cannot_match_its_own_command_line(remote):
    """The start script's text is on the command line of the shells running it: it must not count as a runner."""
    remote.add_python3()
    spec = job()
    script = job_remote.start_script(spec["job_id"], tmp_base=str(remote.base))
    assert "hwledger-job-%s" % spec["job_id"] not in script
    assert wait_done(remote, start(remote, spec)) == 0


def find(remote, job_id: str) -> dict:
    return job_remote.parse_find(remote.run(job_remote.find_script(job_id, tmp_base=str(remote.base))).stdout.decode(),
                                 job_id)


def test_find_sees_the_dir_of_a_started_job_its_runner_and_the_traces_of_its_launch(remote):
    remote.add_python3()
    spec = job(command=["sleep", "2"])
    started = start(remote, spec)
    running = find(remote, spec["job_id"])
    assert running["dirs"] == [started["path"]] and running["runs"] == [started["path"] + "/job.json"]
    assert wait_done(remote, started) == 0
    ended = find(remote, spec["job_id"])
    assert ended["runs"] == []
    assert set(ended["traces"][started["path"]]) == set(job_remote.LAUNCH_TRACES)


def test_find_of_a_dir_without_a_launch_and_of_nothing(remote, tmp_path):
    spec = job()
    before_launch = remote.base / ("hwledger-job-%s-unlaunch" % spec["job_id"])
    before_launch.mkdir()
    (before_launch / "job.json").write_text("{}")
    (remote.base / ("hwledger-job-%s-linked12" % spec["job_id"])).symlink_to(tmp_path)
    assert find(remote, spec["job_id"]) == {"dirs": [str(before_launch)], "traces": {str(before_launch): []},
                                            "runs": []}
    assert find(remote, job()["job_id"]) == {"dirs": [], "traces": {}, "runs": []}


@pytest.mark.parametrize("stdout", ["", "dir /etc\nend\n", "dir /tmp/hwledger-job-x-1\n"])
def test_find_answers_that_are_not_ours_are_refused_or_ignored(stdout):
    job_id = job()["job_id"]
    if "end" not in stdout:
        with pytest.raises(job_remote.RemoteStepError):
            job_remote.parse_find(stdout, job_id)
    else:
        assert job_remote.parse_find(stdout, job_id)["dirs"] == []
