"""hwledger.fleet.job_start with its connection mocked by the local /bin/sh (stdin included)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from ansible.playbook.task import Task

from ansible_collections.hwledger.fleet.plugins.action import job_start
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_bundle, job_schema


class LocalShell:
    def __init__(self, path: str):
        self.path = path
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append((cmd, kwargs))
        proc = subprocess.run(["/bin/sh", "-c", cmd], input=kwargs.get("in_data") or b"", capture_output=True,
                              env={"PATH": self.path}, timeout=60, check=False)
        return {"rc": proc.returncode, "stdout": proc.stdout.decode(), "stderr": proc.stderr.decode()}


def make_action(args: dict, shell) -> job_start.ActionModule:
    task = MagicMock(Task)
    task.args = args
    task.async_val = 0
    task.check_mode = False
    task.action = "hwledger.fleet.job_start"
    action = job_start.ActionModule(task=task, connection=MagicMock(), play_context=MagicMock(), loader=MagicMock(),
                                    templar=MagicMock(), shared_loader_obj=None)
    action._low_level_execute_command = shell
    return action


@pytest.fixture
def bundle(tmp_path: Path) -> str:
    path = tmp_path / "runner.pyz"
    path.write_bytes(job_bundle.bundle())
    return str(path)


def test_one_exec_with_the_job_on_stdin_and_the_dir_returned(tmp_path, bundle):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").symlink_to(sys.executable)
    shell = LocalShell("%s:/usr/bin:/bin" % (tmp_path / "bin"))
    spec = job_schema.new_job(["true"], env={"TOKEN": "never-on-argv"}, timeout_s=10)
    job = {"job_id": spec["job_id"], "job_json": job_schema.encode_job(spec).decode(), "runner_source": bundle}
    result = make_action({"job": job, "tmp_base": str(tmp_path)}, shell).run(task_vars={"inventory_hostname": "h"})
    try:
        assert result.get("failed") is not True, result
        assert result["changed"] is True and result["runner"] == "staged" and result["pid"] > 0
        assert json.loads(Path(result["path"], "job.json").read_text())["env"] == {"TOKEN": "never-on-argv"}
        assert len(shell.calls) == 1 and shell.calls[0][1]["sudoable"] is False
        assert "never-on-argv" not in shell.calls[0][0] and "never-on-argv" not in json.dumps(result)
    finally:
        shutil.rmtree(result.get("path", tmp_path / "none"), ignore_errors=True)


def test_no_runner_says_what_the_remote_needs(tmp_path, bundle):
    shell = LocalShell(str(tmp_path))  # an empty PATH: no python3, no hwledger (sh builtins only)
    spec = job_schema.new_job(["true"])
    job = {"job_id": spec["job_id"], "job_json": job_schema.encode_job(spec).decode(), "runner_source": bundle}
    result = make_action({"job": job, "tmp_base": str(tmp_path)}, shell).run(task_vars={"inventory_hostname": "h"})
    assert result["failed"] is True and result["reason"] == "no_runner"
    assert result["msg"].startswith("h cannot run hwledger jobs: python3 is not on its PATH")
    assert "needs python3 (>= 3.8) on the remote" in result["msg"]


@pytest.mark.parametrize("job, args, message", [
    ({"job_id": "not-a-uuid"}, {}, "job_id"),
    ({}, {"stale_age": "soon"}, "stale age"),
    ({"runner_source": None}, {}, "job holds no runner_source, which runner=auto needs"),
    ({"job_json": {"command": ["true"]}}, {}, "job holds no job_json"),
])
def test_bad_arguments_fail_before_any_exec(tmp_path, bundle, job, args, message):
    shell = LocalShell(str(tmp_path))
    spec = job_schema.new_job(["true"])
    given = {"job_id": spec["job_id"], "job_json": job_schema.encode_job(spec).decode(), "runner_source": bundle}
    given.update(job)
    result = make_action({"job": given, **args}, shell).run(task_vars={})
    assert result["failed"] is True and message in result["msg"]
    assert shell.calls == []
