"""hwledger.fleet.job_reconcile_find with its connection mocked by the local /bin/sh: what a cut-off run left
(a dir, its runner, the traces of its launch, a result), the bounded read, and what is removed."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from ansible.playbook.task import Task

from ansible_collections.hwledger.fleet.plugins.action import job_reconcile_find, job_result


def local_shell(cmd, **kwargs):
    proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin"})
    errors = kwargs.get("encoding_errors", "surrogate_then_replace")
    errors = "replace" if errors == "surrogate_then_replace" else errors
    return {"rc": proc.returncode, "stdout": proc.stdout.decode(errors=errors), "stderr": proc.stderr.decode(errors=errors)}


def reconcile(base: Path, job_id: str, **kw) -> dict:
    task = MagicMock(Task)
    task.args = {"job_id": job_id, "tmp_base": str(base), "poll_s": 0.1, "result_max_bytes": 100, **kw}
    task.async_val = 0
    task.check_mode = False
    task.action = "hwledger.fleet.job_reconcile_find"
    action = job_reconcile_find.ActionModule(task=task, connection=MagicMock(), play_context=MagicMock(),
                                             loader=MagicMock(), templar=MagicMock(), shared_loader_obj=None)
    action._low_level_execute_command = local_shell
    return action.run(task_vars={"inventory_hostname": "h"})


@pytest.fixture
def job_id() -> str:
    return str(uuid.uuid4())


def wait_for_exec(pid: int, argument: str) -> None:
    """Until the child runs its program (between fork and exec its command line is still pytest's, and a
    reconcile looking then would find no runner)."""
    deadline = time.monotonic() + 60
    while argument.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
        assert time.monotonic() < deadline, "the runner never started"
        time.sleep(0.01)


def plant(base: Path, job_id: str, suffix: str = "abcd1234", **files: bytes) -> Path:
    path = base / f"hwledger-job-{job_id}-{suffix}"
    path.mkdir(mode=0o700)
    (path / "job.json").write_text("{}")
    for name, data in files.items():
        (path / name.replace("_", ".")).write_bytes(data)
    return path


def test_a_result_left_is_read_as_hex_and_its_dir_removed(tmp_path, job_id):
    left = plant(tmp_path, job_id, runner_rc=b"0\n", result_json=b'{"ok": 1}')
    result = reconcile(tmp_path, job_id)
    assert result.get("failed") is not True, result
    assert result["reconciled"] == {"found": True, "dir": str(left), "running": False, "launched": True, "result": True}
    assert bytes.fromhex(result["read"]["stdout"]) == b'{"ok": 1}' and result["read"]["encoding"] == "hex"
    assert result["_ansible_no_log"] is True and result["removed"] and not left.exists()


def test_invalid_utf8_comes_back_exactly_and_is_result_not_json(tmp_path, job_id):
    plant(tmp_path, job_id, result_json=b'{"job_id": "\xff\xfe\x00"}\n')
    result = reconcile(tmp_path, job_id)
    with pytest.raises(job_result.RefusedResult) as refused:
        job_result.result_bytes(result["read"], "hex")
    assert refused.value.reason == "result_not_json"


def test_a_dir_from_before_the_launch_is_not_launched_and_is_removed(tmp_path, job_id):
    left = plant(tmp_path, job_id)
    result = reconcile(tmp_path, job_id)
    assert result["reconciled"]["found"] and not result["reconciled"]["launched"] and "read" not in result
    assert result["removed"] and not left.exists()


def test_nothing_there_says_so(tmp_path, job_id):
    result = reconcile(tmp_path, job_id)
    assert result["reconciled"] == {"found": False, "dir": None, "running": False, "launched": False, "result": False}


def test_a_runner_still_running_leaves_its_dir(tmp_path, job_id):
    left = plant(tmp_path, job_id, runner_out=b"")
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(left / "job.json")])
    try:
        result = reconcile(tmp_path, job_id, wait_s=0)
        assert result["reconciled"]["running"] and result["reconciled"]["launched"] and left.is_dir()
    finally:
        runner.kill()
        runner.wait()


def test_a_runner_is_followed_to_its_end(tmp_path, job_id):
    left = plant(tmp_path, job_id, runner_out=b"")
    runner = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(1); open(sys.argv[2], 'w').write"
                               "('{\"ok\": 2}')", str(left / "job.json"), str(left / "result.json")])
    try:
        wait_for_exec(runner.pid, str(left / "job.json"))
        result = reconcile(tmp_path, job_id, wait_s=30)
        assert not result["reconciled"]["running"] and result["reconciled"]["result"], result
        assert bytes.fromhex(result["read"]["stdout"]) == b'{"ok": 2}' and not left.exists()
    finally:
        runner.kill()
        runner.wait()


def test_several_dirs_of_one_job_are_refused_and_left(tmp_path, job_id):
    first, second = plant(tmp_path, job_id, "aaaa1111"), plant(tmp_path, job_id, "bbbb2222")
    result = reconcile(tmp_path, job_id)
    assert result["failed"] and result["reason"] == "job_dirs_ambiguous"
    assert first.is_dir() and second.is_dir()


def test_a_result_that_fails_a_check_is_not_read_and_its_dir_removed(tmp_path, job_id):
    left = plant(tmp_path, job_id, result_json=b"x" * 200)
    result = reconcile(tmp_path, job_id)
    assert result["failed"] and result["reason"] == "result_too_large" and not left.exists()


@pytest.mark.parametrize("directory", ["/etc", "/tmp/hwledger-job-other-abcd1234", "relative/hwledger-job-x-1"])
def test_a_dir_that_is_not_this_jobs_is_refused(tmp_path, job_id, directory):
    result = reconcile(tmp_path, job_id, dir=directory)
    assert result["failed"] and result["reason"] == "invalid_job"
