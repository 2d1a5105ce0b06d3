"""hwledger.fleet.job_spec on the controller: the spec returned to the play hides env values, and the
results directory is created private or refused when it is not."""

from __future__ import annotations

import json
import os

import pytest

from ansible_collections.hwledger.fleet.plugins.action import job_spec
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema

JOB_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def minimal(**overrides):
    spec = {"job_id": JOB_ID, "command": ["nvidia-smi", "-L"]}
    spec.update(overrides)
    return spec


def test_spec_returned_to_the_play_masks_env_values_but_job_json_is_exact():
    job = job_schema.validate_job(minimal(env={"HF_TOKEN": "hf_secret_value", "MODE": "fast"}))
    masked = job_spec.masked_spec(job)
    assert masked["env"] == {"HF_TOKEN": job_spec.ENV_VALUE_MASK, "MODE": job_spec.ENV_VALUE_MASK}
    assert "hf_secret_value" not in json.dumps(masked) and "fast" not in json.dumps(masked["env"])
    assert {k: v for k, v in masked.items() if k != "env"} == {k: v for k, v in job.items() if k != "env"}
    assert job["env"]["HF_TOKEN"] == "hf_secret_value"  # the validated job itself is untouched
    assert json.loads(job_schema.encode_job(job))["env"]["HF_TOKEN"] == "hf_secret_value"


def test_missing_results_dir_is_created_0700(tmp_path):
    path = tmp_path / "a" / "results"
    assert job_spec.prepare_results_dir(str(path), create=True) == str(path)
    assert path.is_dir() and oct(path.stat().st_mode & 0o777) == "0o700"


def test_missing_results_dir_is_not_created_in_check_mode(tmp_path):
    assert job_spec.prepare_results_dir(str(tmp_path / "results"), create=False) == str(tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_private_existing_results_dir_is_accepted(tmp_path):
    path = tmp_path / "results"
    path.mkdir(mode=0o755)  # readable by others is fine: the results are 0600; writable is not
    path.chmod(0o755)
    assert job_spec.prepare_results_dir(str(path), create=True) == str(path)


@pytest.mark.parametrize(
    "make, needle",
    [(lambda p: (p.mkdir(), p.chmod(0o775)), "writable by its group (mode 0775)"),
     (lambda p: (p.mkdir(), p.chmod(0o1777)), "writable by group and others (mode 1777)"),
     (lambda p: (p.mkdir(), p.chmod(0o702)), "writable by others"),
     (lambda p: p.write_text("not a dir"), "exists and is not a directory"),
     (lambda p: ((p.parent / "real").mkdir(mode=0o700), p.symlink_to(p.parent / "real")), "is a symlink")],
    ids=["group-writable", "world-writable sticky", "other-writable", "a file", "a symlink"],
)
def test_unsafe_existing_results_dirs_are_refused(tmp_path, make, needle):
    path = tmp_path / "results"
    make(path)
    with pytest.raises(job_spec.UnsafeResultsDir) as info:
        job_spec.prepare_results_dir(str(path), create=True)
    assert needle in str(info.value) and str(path) in str(info.value)
    assert "results_dir is not safe for job results" in str(info.value)


def test_results_dir_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    path = tmp_path / "results"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(job_spec.UnsafeResultsDir) as info:
        job_spec.prepare_results_dir(str(path), create=True)
    assert "is owned by uid 65534, not by you" in str(info.value)
