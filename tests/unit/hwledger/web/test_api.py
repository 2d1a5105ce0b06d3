"""The JSON API (hwledger/web/api.py): the CLI's JSON, minus key paths and job environment values."""

from __future__ import annotations

import io
import json

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_runner, job_schema

from hwledger import job_settle
from hwledger.fleet import Fleet
from hwledger.placement import launch_spec
from hwledger.reports import job_list, status_items
from hwledger.web import api


def _fleet(store, tmp_path) -> Fleet:
    return Fleet(tmp_path / "none.toml", tmp_path / "kh", store.path)


def test_fleet_is_the_status_json_without_key_paths(fleet_store, tmp_path):
    secrets = api.key_paths(_fleet(fleet_store, tmp_path), fleet_store)
    served = api.fleet_items(fleet_store, secrets, stale_after=30)
    plain = status_items(fleet_store, 30)
    assert [i["name"] for i in served] == [i["name"] for i in plain]
    assert "/secret/keys/gone" in json.dumps(plain) and "/secret/keys" not in json.dumps(served)
    gone = next(i for i in served if i["name"] == "gone")
    assert "Identity file <hidden> not accessible" in gone["msg"]


def test_jobs_hide_env_values_everywhere_and_keep_the_rest(fleet_store, tmp_path):
    token = "hf_SuperSecretValue42"
    gpu = "GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
    script = 'echo "token=$HF_TOKEN mode=$MODE gpus=$CUDA_VISIBLE_DEVICES"; echo "HF_TOKEN=$HF_TOKEN" >&2'
    spec = job_schema.new_job(["sh", "-c", script], env={"HF_TOKEN": token, "MODE": "1"})
    job = fleet_store.submit_job("h200", spec, job_id=spec["job_id"], max_attempts=2)
    fleet_store.transition_job(job.id, ["queued"], "dispatched")
    # A run that failed before its launch, quoting the job's environment: the job may run again, so the store
    # still holds its env values, and every string served has them masked.
    fleet_store.transition_job(job.id, ["dispatched"], "queued", error=f"task_failed: HF_TOKEN={token} MODE=1")
    secrets = api.key_paths(_fleet(fleet_store, tmp_path), fleet_store)
    served = api.job_items(fleet_store, secrets, "")
    assert token not in json.dumps(served)
    assert served[0]["spec"]["env"] == {"HF_TOKEN": "<hidden>", "MODE": "<hidden>"}
    assert served[0]["error"] == "task_failed: HF_TOKEN=<hidden> MODE=1"  # a short value only in env
    plain = job_list(fleet_store)
    assert set(served[0]) == set(plain[0]) and served[0]["job_id"] == plain[0]["job_id"]
    assert plain[0]["spec"]["env"] == {"HF_TOKEN": "***", "MODE": "***"}  # job_list itself shows no env value

    # Its run: the real runner gets the spec the server launches (the placement's GPUs added) and the job
    # prints the token; the result is settled as the server settles it (job_settle, which also ends the log).
    fleet_store.transition_job(job.id, ["queued"], "dispatched")
    fleet_store.transition_job(job.id, ["dispatched"], "running")
    launched = launch_spec(fleet_store.get_job(job.id).spec, {"env": {"CUDA_VISIBLE_DEVICES": gpu}})
    results = tmp_path / "results"
    results.mkdir(mode=0o700)
    rc = job_runner.run_job(launched, str(job_schema.result_path(results, job.id)), stdout=io.StringIO(),
                            stderr=io.StringIO())
    assert rc == 0
    fleet_store.record_launch(job.id)
    assert job_settle.settle_job(fleet_store, fleet_store.get_job(job.id), results, None) == "succeeded"
    # The job ended: its values are gone from the store, so the API has nothing left to mask them by: what it serves holds
    # no token because the runner masked it at the source. The rest of the output is intact.
    assert fleet_store.get_job(job.id).spec["env"] == {"HF_TOKEN": None, "MODE": None}
    assert api.Secrets(v for v in (fleet_store.get_job(job.id).spec["env"]).values()).values == []
    served = api.job_items(fleet_store, secrets, "")
    assert token not in json.dumps(served) and token not in json.dumps(job_list(fleet_store))
    assert served[0]["spec"]["env"] == {"HF_TOKEN": "<hidden>", "MODE": "<hidden>"}
    assert served[0]["result"]["stdout_tail"] == f"token=*** mode=1 gpus={gpu}\n"
    assert served[0]["result"]["stderr_tail"] == "HF_TOKEN=***\n"
    logged = b"".join(entry.data for entry in fleet_store.read_job_log(job.id).entries)
    assert token.encode() not in logged and b"token=*** mode=1" in logged


@pytest.mark.parametrize(("query", "message"), [
    ("limit=0", "limit must be"), ("limit=abc", "limit must be"), ("limit=5000", "limit must be"),
    ("state=bogus", "unknown state"), ("agent=a&agent=b", "at most one agent"), ("drop=table", "unknown parameter"),
])
def test_bad_queries_are_refused_in_words(fleet_store, query, message):
    with pytest.raises(api.BadRequest, match=message):
        api.job_items(fleet_store, api.Secrets(), query)


def test_job_queries_filter_like_the_cli(fleet_store):
    fleet_store.submit_job("h200", {"command": ["a"]})
    fleet_store.submit_job("sparse", {"command": ["b"]})
    assert [j["agent"] for j in api.job_items(fleet_store, api.Secrets(), "agent=sparse")] == ["sparse"]
    assert len(api.job_items(fleet_store, api.Secrets(), "state=queued&limit=1")) == 1
