"""hwledger.store.placement: the v4 columns, the placed dispatch's compare-and-set, and the waiting note."""

from __future__ import annotations

import sqlite3

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema
from hwledger.store import AgentRecord, Store
from hwledger.store.schema import MIGRATIONS, split_sql

PLACEMENT = {"agent": "gpu1", "gpus": [{"index": 3, "uuid": None}], "env": {"CUDA_VISIBLE_DEVICES": "3"},
             "why": "asked a free GPU"}


def _store_with_agent(path) -> Store:
    store = Store.open(path)
    store.upsert_agent(AgentRecord(name="gpu1", hostname="192.0.2.1", port=22, ssh_user="root", key_path="/k"))
    return store


def test_a_v3_store_is_migrated_to_the_placement_columns(tmp_path):
    path = tmp_path / "fleet.db"
    raw = sqlite3.connect(path)
    for migration in MIGRATIONS[:3]:
        for statement in split_sql(migration):
            raw.execute(statement)
    raw.execute("PRAGMA user_version = 3")
    at = "2025-01-01T00:00:00.000+00:00"
    raw.execute("INSERT INTO agents (name, hostname, port, ssh_user, key_path, state, state_since, registered_at) "
                "VALUES ('gpu1', 'h', 22, 'u', '/k', 'online', ?, ?)", (at, at))
    raw.commit()
    raw.close()
    with Store.open(path) as store:
        job = store.submit_job("gpu1", job_schema.new_job(["true"]))
        assert (job.placement, job.placement_note) == (None, None)


def test_a_placed_dispatch_is_compare_and_set_and_records_its_gpus(tmp_path):
    with _store_with_agent(tmp_path / "fleet.db") as store:
        job = store.submit_job("auto", job_schema.new_job(["true"], resources={"gpus": 1}))
        assert store.note_placement(job, {"text": "no online agent has a free GPU", "agent": None})
        assert store.dispatch_placed(job.id, "gpu1", PLACEMENT)
        placed = store.get_job(job.id)
        assert (placed.state, placed.agent, placed.placement, placed.placement_note) == (
            "dispatched", "gpu1", PLACEMENT, None)
        assert placed.dispatched_at is not None
        assert not store.dispatch_placed(job.id, "gpu1", PLACEMENT)  # no longer queued: nothing changes
        event = [e for e in store.list_events(job_id=job.id) if e.detail.get("new") == "dispatched"][0]
        assert (event.agent, event.detail["gpus"]) == ("gpu1", [3])


def test_a_cancelled_job_is_neither_placed_nor_given_a_note(tmp_path):
    with _store_with_agent(tmp_path / "fleet.db") as store:
        job = store.submit_job("auto", job_schema.new_job(["true"], resources={"gpus": 1}))
        assert store.request_cancel(job.id) == "cancelled"
        assert not store.dispatch_placed(job.id, "gpu1", PLACEMENT)
        assert not store.note_placement(job, {"text": "waits", "agent": None})
        assert store.get_job(job.id).placement_note is None and store.get_job(job.id).placement is None


def test_auto_is_accepted_as_a_job_agent_but_not_an_unknown_name(tmp_path):
    with _store_with_agent(tmp_path / "fleet.db") as store:
        assert store.submit_job("auto", job_schema.new_job(["true"], resources={"gpus": 1})).agent == "auto"
