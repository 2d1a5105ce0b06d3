"""hwledger.fleet.job_wait with its connection mocked by the local /bin/sh: polling, the checks on
result.json before it is read, the bounded read, and dropped connections."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from ansible.errors import AnsibleConnectionFailure
from ansible.playbook.task import Task

from ansible_collections.hwledger.fleet.plugins.action import job_wait


class LocalShell:
    def __init__(self, drop_first: int = 0):
        self.calls: list[str] = []
        self.drop_first = drop_first

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        if len(self.calls) <= self.drop_first:
            raise AnsibleConnectionFailure("Connection closed by remote host")
        proc = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, timeout=60, check=False,
                              env={"PATH": "/usr/bin:/bin"})
        # As ActionBase._low_level_execute_command decodes the connection's bytes.
        errors = kwargs.get("encoding_errors", "surrogate_then_replace")
        errors = "replace" if errors == "surrogate_then_replace" else errors
        return {"rc": proc.returncode, "stdout": proc.stdout.decode(errors=errors),
                "stderr": proc.stderr.decode(errors=errors)}


def make_action(args: dict, shell) -> job_wait.ActionModule:
    task = MagicMock(Task)
    task.args = args
    task.async_val = 0
    task.check_mode = False
    task.action = "hwledger.fleet.job_wait"
    action = job_wait.ActionModule(task=task, connection=MagicMock(), play_context=MagicMock(), loader=MagicMock(),
                                   templar=MagicMock(), shared_loader_obj=None)
    action._low_level_execute_command = shell
    return action


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    path = tmp_path / "hwledger-job-0f8fad5b-d9cb-469f-a165-70867728950e-abcdefgh"
    path.mkdir(mode=0o700)
    return path


def finished(job_dir: Path, result: bytes | None = b'{"ok": 1}', rc: int = 0, out: str = "abc  x\n") -> None:
    if result is not None:
        (job_dir / "result.json").write_bytes(result)
    (job_dir / "runner.out").write_text(out)
    (job_dir / "runner.err").write_text("the runner's stderr\n")
    (job_dir / "runner.rc").write_text("%d\n" % rc)


def wait(job_dir: Path, shell=None, **kw):
    args = {"path": str(job_dir), "pid": os.getpid(), "timeout": 30, "poll_s": 0.2, "result_max_bytes": 100}
    args.update(kw)
    return make_action(args, shell or LocalShell()).run(task_vars={"inventory_hostname": "h"})


def test_a_finished_job_is_read_and_the_result_hidden_from_callbacks(job_dir):
    finished(job_dir)
    result = wait(job_dir)
    assert result.get("failed") is not True, result
    assert result["runner_rc"] == 0 and result["runner_stdout"] == "abc  x"
    assert result["read"] == {"rc": 0, "stdout": b'{"ok": 1}'.hex(), "encoding": "hex", "stderr": "", "failed": False}
    assert result["_ansible_no_log"] is True


def test_any_bytes_come_back_exactly_and_job_result_says_result_not_json(job_dir):
    """Invalid UTF-8 and NUL bytes: read exactly (as hex), so job_result refuses them with a reason."""
    from ansible_collections.hwledger.fleet.plugins.action import job_result

    raw = b'{"job_id": "\xff\xfe\x00"}\n'
    finished(job_dir, result=raw)
    result = wait(job_dir)
    assert result.get("failed") is not True, result
    assert bytes.fromhex(result["read"]["stdout"]) == raw
    with pytest.raises(job_result.RefusedResult) as refused:
        job_result.result_bytes(result["read"], "hex")
    assert refused.value.reason == "result_not_json"


def test_polls_until_the_runner_ends(job_dir):
    shell = LocalShell()
    # The "runner" is this test's process (alive); it ends when runner.rc appears after a few polls.
    original = shell.__call__

    def ending(cmd, **kw):
        if len(shell.calls) == 3:
            finished(job_dir)
        return original(cmd, **kw)

    result = wait(job_dir, ending)
    assert result.get("failed") is not True, result
    polls = [c for c in shell.calls if "kill -0" in c]
    assert len(polls) >= 3


def test_a_dropped_connection_is_retried(job_dir):
    finished(job_dir)
    result = wait(job_dir, LocalShell(drop_first=2))
    assert result.get("failed") is not True, result


def test_a_host_that_stays_unreachable_is_reported_as_such(job_dir):
    with pytest.raises(AnsibleConnectionFailure):
        wait(job_dir, LocalShell(drop_first=100))


@pytest.mark.parametrize("setup, reason, text", [
    (lambda d: finished(d, result=None, rc=4), "result_missing", "wrote no result (exit code 4): the runner's stderr"),
    (lambda d: (finished(d, result=None), (d / "result.json").symlink_to("/dev/zero")), "result_not_regular_file",
     "is not a regular file (a link)"),
    (lambda d: (finished(d, result=None), (d / "result.json").mkdir()), "result_not_regular_file", "(a directory)"),
    (lambda d: finished(d, result=b" " * 101), "result_too_large", "is 101 bytes, over the limit of 100"),
])
def test_results_that_must_not_be_read_are_refused_before_the_read(job_dir, setup, reason, text):
    setup(job_dir)
    shell = LocalShell()
    result = wait(job_dir, shell)
    assert result["failed"] is True and result["reason"] == reason and text in result["msg"], result
    assert not any(call.startswith("head -c") for call in shell.calls)
    assert "_ansible_no_log" not in result  # a refusal is shown: it holds no bytes of the result


def test_a_vanished_runner_ends_the_wait(job_dir):
    result = wait(job_dir, pid=2**22 + 7)  # no such process, no runner.rc
    assert result["failed"] is True and result["reason"] == "result_missing"
    assert "vanished without an exit status" in result["msg"]


def test_a_job_that_never_ends_is_given_up_at_the_timeout(job_dir):
    result = wait(job_dir, timeout=1, poll_s=0.2)
    assert result["failed"] is True and "did not end within 1 s" in result["msg"]


def test_anything_but_a_job_dir_is_refused(tmp_path):
    shell = LocalShell()
    result = wait(tmp_path, shell)
    assert result["failed"] is True and "is not an hwledger job directory" in result["msg"]
    assert shell.calls == []
