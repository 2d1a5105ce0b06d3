"""The job spec's `resources` (a GPU request) and the memory sizes it takes (plugins/plugin_utils/job_schema.py)."""

from __future__ import annotations

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema

JOB_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"
GIB = 1 << 30


def spec(**overrides) -> dict:
    return {"job_id": JOB_ID, "command": ["python3", "train.py"], **overrides}


def errors_of(obj) -> dict[str, str]:
    with pytest.raises(job_schema.JobSpecError) as info:
        job_schema.validate_job(obj)
    return dict(info.value.errors)


@pytest.mark.parametrize(("text", "size"), [
    ("40GiB", 40 * GIB), ("40G", 40 * GIB), ("40 gib", 40 * GIB), ("40GB", 40 * 10 ** 9), ("512MiB", 512 << 20),
    ("1.5TiB", int(1.5 * (1 << 40))), ("42949672960", 40 * GIB), (42949672960, 40 * GIB), ("8k", 8192),
])
def test_sizes_read_as_people_write_them(text, size):
    assert job_schema.parse_size(text) == size


@pytest.mark.parametrize(("value", "says"), [
    ("40XB", "is not a size"), ("forty", "is not a size"), ("", "is not a size"), ("-1G", "is not a size"),
    (0, "more than 0"), ("2PiB", "is not a size"), (1 << 51, "at most 1 PiB"), (True, "must be a size"),
    (4.5, "must be a size"),
])
def test_bad_sizes_say_what_is_accepted(value, says):
    with pytest.raises(ValueError, match=says):
        job_schema.parse_size(value)


def test_resources_are_normalised_and_absent_when_not_asked():
    job = job_schema.validate_job(spec(resources={"min_free_vram": "40GiB", "gpu_name": "H100*"}))
    assert job["resources"] == {"gpus": 1, "min_free_vram": 40 * GIB, "gpu_name": "H100*"}
    assert "resources" not in job_schema.validate_job(spec())  # an older runner would refuse the key
    assert job_schema.validate_job(job) == job  # normalised once is normalised


@pytest.mark.parametrize(("resources", "field", "says"), [
    ({"gpus": 0}, "resources.gpus", "from 1 to 64"),
    ({"gpus": 65}, "resources.gpus", "from 1 to 64"),
    ({"gpus": "2"}, "resources.gpus", "whole number"),
    ({"gpus": True}, "resources.gpus", "whole number"),
    ({"min_free_vram": "40XB"}, "resources.min_free_vram", "is not a size"),
    ({"gpu_name": ""}, "resources.gpu_name", "glob"),
    ({"gpu_name": "H100\x1b[31m"}, "resources.gpu_name", "printable"),
    ({"gpu": 1}, "resources.gpu", ""),
    ("40GiB", "resources", "must be a mapping"),
])
def test_bad_resources_name_the_field(resources, field, says):
    errors = errors_of(spec(resources=resources))
    assert field in errors and says in errors[field]


def test_a_job_with_resources_may_not_choose_its_gpus_itself():
    errors = errors_of(spec(resources={"gpus": 1}, env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert "is set by hwledger" in errors["env.CUDA_VISIBLE_DEVICES"]
    # Without resources the job's env is its own business, as before.
    assert job_schema.validate_job(spec(env={"CUDA_VISIBLE_DEVICES": "0"}))["env"] == {"CUDA_VISIBLE_DEVICES": "0"}
