"""The JSON API (hwledger/web/api.py): the CLI's JSON, minus key paths and job environment values."""

from __future__ import annotations

import json

import pytest

from hwledger.fleet import Fleet
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
    job = fleet_store.submit_job("h200", {"command": ["sh", "-c", "env"], "env": {"HF_TOKEN": token, "MODE": "1"}},
                                 max_attempts=2)
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
    # Once the job has ended its values leave the store (hwledger.store.job_env): nothing can serve them from
    # the spec, and output that echoed them can no longer be masked by value (docs/fleet-server.md).
    fleet_store.transition_job(job.id, ["queued"], "dispatched")
    fleet_store.transition_job(job.id, ["dispatched"], "running")
    fleet_store.transition_job(job.id, ["running"], "succeeded", result={"stdout_tail": "MODE=1\n"})
    assert fleet_store.get_job(job.id).spec["env"] == {"HF_TOKEN": None, "MODE": None}
    served = api.job_items(fleet_store, secrets, "")
    assert served[0]["spec"]["env"] == {"HF_TOKEN": "<hidden>", "MODE": "<hidden>"}


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
