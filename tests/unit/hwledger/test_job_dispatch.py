"""hwledger.job_dispatch: one dispatch round over a real store, agents replaying real captures' snapshots."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome
from hwledger.job_dispatch import Dispatch, DispatchRound
from hwledger.store import AgentRecord, AgentUpdate, Store, parse_time
from tests.unit.hwledger.placement_captures import A800, GIB, LAPTOP, MI100_4, snapshot

INTERVAL_S = 5.0


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "fleet.db") as opened:
        yield opened


def heartbeat(store: Store, name: str, capture: str, *, state: str = "online") -> None:
    """The agent answers with its capture's GPUs (registered first when new)."""
    if store.get_agent(name) is None:
        store.upsert_agent(AgentRecord(name=name, hostname="192.0.2.1", port=22, ssh_user="root", key_path="/k"))
    store.record_heartbeats({name: ProbeOutcome(True, snapshot=snapshot(capture))},
                            lambda _row, _outcome: AgentUpdate(state, 0, seen=True))


def submit(store: Store, agent: str = "auto", **resources) -> str:
    spec = job_schema.new_job(["python3", "train.py"], **({"resources": resources} if resources else {}))
    return store.submit_job(agent, spec, job_id=spec["job_id"]).id


def dispatch_round(store: Store, *, answered=None, capacity: int = 8, later_s: float = 0.0,
                   in_workers=None) -> list[Dispatch]:
    """A round of the server that dispatched every active job so far (its workers run them), unless
    `in_workers` says otherwise (a restarted server: none)."""
    agents = [row.name for row in store.list_agents()]
    if in_workers is None:
        in_workers = [job.id for job in store.list_jobs(states=["dispatched", "running"])]
    now = datetime.now(timezone.utc) + timedelta(seconds=later_s)
    return DispatchRound(store, configured=agents, answered=agents if answered is None else answered,
                         in_workers=in_workers, capacity=capacity, workers_max=8, max_age_s=2 * INTERVAL_S,
                         now=now).run()


def gpus_of(store: Store, job_id: str) -> list[int]:
    return [gpu["index"] for gpu in store.get_job(job_id).placement["gpus"]]


def test_two_one_gpu_jobs_go_at_once_to_disjoint_gpus_of_one_8_gpu_host(store):
    heartbeat(store, "a800", A800)
    first, second = submit(store, min_free_vram=40 * GIB), submit(store, min_free_vram=40 * GIB)
    assert dispatch_round(store) == [Dispatch(first, "a800"), Dispatch(second, "a800")]
    assert (gpus_of(store, first), gpus_of(store, second)) == ([5], [6])  # 81148 and 81032 MiB free
    job = store.get_job(first)
    assert (job.state, job.agent) == ("dispatched", "a800")
    assert job.placement["env"] == {"CUDA_VISIBLE_DEVICES": "5"}
    assert "a800 GPU 5 with 79.2 GiB free" in job.placement["why"]
    dispatched = [e for e in store.list_events(job_id=first) if e.detail.get("new") == "dispatched"]
    assert dispatched[0].detail["gpus"] == [5] and dispatched[0].agent == "a800"


def test_gpus_claimed_between_heartbeats_are_not_given_again_until_the_job_ends(store):
    heartbeat(store, "a800", A800)
    first = submit(store, min_free_vram=60 * GIB, gpus=2)
    assert dispatch_round(store) == [Dispatch(first, "a800")]
    assert gpus_of(store, first) == [5, 6]
    # No new snapshot since: it still shows GPUs 5 and 6 free. The next round (a new one, as after a
    # server restart: the claims come from the store) places around them.
    second = submit(store, min_free_vram=60 * GIB, gpus=2)
    assert dispatch_round(store) == [Dispatch(second, "a800")]
    assert gpus_of(store, second) == [4, 7]
    third = submit(store, min_free_vram=60 * GIB)
    assert dispatch_round(store) == []
    note = store.get_job(third).placement_note
    assert note["text"] == ("no online agent has 60 GiB free on one GPU (4 held by running jobs); "
                            "best: a800 GPU 1 with 12.3 GiB")
    # The first job ends: its GPUs are free for the waiting one, which then loses its note.
    assert store.transition_job(first, ["dispatched"], "succeeded")
    assert dispatch_round(store) == [Dispatch(third, "a800")]
    assert gpus_of(store, third) == [5]
    assert store.get_job(third).placement_note is None


def test_stale_and_offline_agents_are_skipped_and_the_job_says_why(store):
    heartbeat(store, "a800", A800)
    heartbeat(store, "laptop", LAPTOP, state="offline")
    job = submit(store, min_free_vram=40 * GIB)
    assert dispatch_round(store, later_s=3 * INTERVAL_S) == []  # the A800's snapshot is 15 s old
    text = store.get_job(job).placement_note["text"]
    assert text.startswith("no online agent has a fresh snapshot: a800's latest snapshot is 15 s old")
    assert "laptop is offline" in text
    # A job that needs less than the laptop's 15 GiB still does not go there: it is offline.
    small = submit(store, min_free_vram=8 * GIB)
    assert [d.job_id for d in dispatch_round(store)] == [job, small]
    assert store.get_job(small).agent == "a800"


def test_a_job_without_a_gpu_request_holds_its_whole_agent(store):
    heartbeat(store, "mi4", MI100_4)
    whole = submit(store, agent="mi4")
    gpu_job = submit(store, agent="auto", gpus=1)
    assert dispatch_round(store) == [Dispatch(whole, "mi4")]
    assert store.get_job(whole).placement is None
    assert "holds the whole agent" in store.get_job(gpu_job).placement_note["text"]
    assert store.transition_job(whole, ["dispatched"], "succeeded")
    # Now a GPU job runs; a whole-agent job waits for the agent, and keeps it free of newer GPU jobs.
    assert dispatch_round(store) == [Dispatch(gpu_job, "mi4")]
    waiting = submit(store, agent="mi4")
    newer = submit(store, agent="auto", gpus=1)
    assert dispatch_round(store) == []
    assert store.get_job(waiting).placement_note["text"].startswith("waits for mi4 to be free: 1 job(s) active")
    assert "kept free for an older job" in store.get_job(newer).placement_note["text"]
    assert store.transition_job(gpu_job, ["dispatched"], "failed")
    assert dispatch_round(store) == [Dispatch(waiting, "mi4")]


def test_a_named_agent_with_resources_is_placed_on_that_agent_only(store):
    heartbeat(store, "a800", A800)
    heartbeat(store, "laptop", LAPTOP)
    job = submit(store, agent="laptop", min_free_vram=10 * GIB)
    too_big = submit(store, agent="laptop", min_free_vram=40 * GIB)
    assert dispatch_round(store) == [Dispatch(job, "laptop")]
    assert gpus_of(store, job) == [1]
    assert store.get_job(too_big).placement_note["text"] == (
        "laptop does not have 40 GiB free on one GPU (1 held by running jobs); best: GPU 0 with 7.8 GiB")


def test_a_job_that_fits_waits_while_every_worker_is_busy(store):
    heartbeat(store, "a800", A800)
    job = submit(store, gpus=1)
    assert dispatch_round(store, capacity=0) == []
    assert store.get_job(job).placement_note["text"] == (
        "fits on a800 (GPU 5), but all 8 job workers are busy (serve --max-parallel-jobs)")
    assert store.get_job(job).state == "queued"


def test_the_note_is_written_only_when_it_changes(store):
    heartbeat(store, "a800", A800)
    job = submit(store, min_free_vram=100 * GIB)
    dispatch_round(store)
    first = store.get_job(job)
    dispatch_round(store)
    assert store.get_job(job).updated_at == first.updated_at and store.get_job(job).placement_note == first.placement_note
    assert parse_time(first.updated_at) is not None


def test_a_job_left_dispatched_by_a_previous_server_runs_on_its_agent_when_it_answers(store):
    heartbeat(store, "a800", A800)
    job = submit(store, gpus=1)
    assert dispatch_round(store) == [Dispatch(job, "a800")]
    # The server died before a worker took it: the next server's round hands it on, with its placement.
    assert dispatch_round(store, answered=[], in_workers=[]) == []
    assert dispatch_round(store, in_workers=[]) == [Dispatch(job, "a800")]
    assert gpus_of(store, job) == [5]
