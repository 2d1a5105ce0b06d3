"""hwledger.placement: which agent and GPUs a request gets, on snapshots parsed from real captures."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from hwledger.placement import (
    AgentView,
    Choice,
    Claim,
    Gpu,
    NoFit,
    Request,
    choose,
    claims_of,
    launch_spec,
    never_fits,
    note_text,
    size_text,
    visible_devices_env,
)
from tests.unit.hwledger.placement_captures import (
    A800,
    A800_FREE_MIB,
    GIB,
    LAPTOP,
    MI100_4,
    MI100_4_FREE,
    MI100_6,
    MIB,
    snapshot,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
MAX_AGE_S = 10.0


def view(name: str, capture: str, *, age_s: float = 2.0, state: str = "online", active_jobs: int = 0,
         closed: str | None = None) -> AgentView:
    return AgentView.of_snapshot(name, state, snapshot(capture), NOW - timedelta(seconds=age_s),
                                 active_jobs=active_jobs, closed=closed)


def place(request: Request, agents, claims=(), **kw) -> Choice | NoFit:
    return choose(request, agents, claims, now=NOW, max_age_s=MAX_AGE_S, **kw)


def test_one_gpu_goes_to_the_a800_gpu_with_the_most_free_memory():
    got = place(Request(1, 40 * GIB), [view("a800", A800)])
    assert isinstance(got, Choice)
    assert (got.agent, [g.index for g in got.gpus]) == ("a800", [5])  # 81148 MiB free
    assert got.env == {"CUDA_VISIBLE_DEVICES": "5"}  # this capture has no UUIDs: by index
    assert "a800 GPU 5 with 79.2 GiB free" in got.why and "snapshot 2 s old" in got.why


def test_several_gpus_are_the_most_free_ones_that_each_cover_the_request():
    got = place(Request(4, 60 * GIB), [view("a800", A800)])
    assert [g.index for g in got.gpus] == [5, 6, 4, 7]  # 81148, 81032, 67547, 65326 MiB
    assert got.env == {"CUDA_VISIBLE_DEVICES": "5,6,4,7"}
    assert [g.free_bytes for g in got.gpus] == [A800_FREE_MIB[i] * MIB for i in (5, 6, 4, 7)]


def test_a_request_no_gpu_covers_waits_naming_the_best_candidate():
    got = place(Request(1, 100 * GIB), [view("a800", A800, age_s=8)])
    assert isinstance(got, NoFit)
    assert got.text == "no online agent has 100 GiB free on one GPU; best: a800 GPU 5 with 79.2 GiB"
    assert got.agent == "a800"
    assert note_text(got.note(), 12.4) == got.text + ", 12 s ago"
    # Five GPUs with 60 GiB: only four of the A800s have it.
    five = place(Request(5, 60 * GIB), [view("a800", A800)])
    assert isinstance(five, NoFit) and five.text.startswith("no online agent has 60 GiB free on each of 5 GPUs")


def test_the_gpu_name_glob_matches_with_or_without_the_vendor_word():
    laptop = [view("laptop", LAPTOP)]
    assert [g.index for g in place(Request(1, None, "RTX 5070*"), laptop).gpus] == [1]
    assert [g.index for g in place(Request(1, None, "nvidia geforce rtx 4070*"), laptop).gpus] == [0]
    assert [g.index for g in place(Request(1, None, "MI100*"), [view("mi6", MI100_6)]).gpus] == [0]
    assert isinstance(place(Request(1, None, "TX 5070*"), laptop), NoFit)  # from a word's start, not inside one
    assert [g.index for g in place(Request(1, 10 * GIB), laptop).gpus] == [1]  # 15799 MiB; GPU 0 has 7948
    small = place(Request(1, 10 * GIB, "*4070*"), laptop)
    assert isinstance(small, NoFit)
    assert small.text == ("no online agent has 10 GiB free on one GPU named like '*4070*' (1 named otherwise); "
                          "best: laptop GPU 0 with 7.8 GiB")


def test_amd_gpus_are_shown_by_rocr_uuid_when_known_else_by_index():
    four = place(Request(2, 30 * GIB), [view("mi4", MI100_4)])
    # All four have the same free memory: the lowest indices, named by their unique ids as ROCr takes them.
    assert [g.index for g in four.gpus] == [0, 1]
    assert four.env == {"ROCR_VISIBLE_DEVICES": "GPU-79ccd55167a2124a,GPU-04edfb117a17a07d"}
    six = place(Request(1, 30 * GIB), [view("mi6", MI100_6)])
    assert six.env == {"ROCR_VISIBLE_DEVICES": "0"}


def test_across_a_fleet_the_most_free_memory_wins_then_the_fewest_active_jobs():
    fleet = [view("a800", A800), view("laptop", LAPTOP), view("mi4", MI100_4), view("mi6", MI100_6)]
    assert place(Request(1, 40 * GIB), fleet).agent == "a800"  # only the A800 has 40 GiB on one GPU
    got = place(Request(1, 20 * GIB, "*MI100*"), fleet)
    assert got.agent == "mi4"  # 6750208 bytes used per GPU against mi6's 6782976
    twins = [view("mi-a", MI100_4, active_jobs=2), view("mi-b", MI100_4, active_jobs=1)]
    tie = place(Request(1, 20 * GIB), twins)
    assert tie.agent == "mi-b" and "fewest active jobs (1)" in tie.why
    assert place(Request(1, 20 * GIB), twins[::-1]).agent == "mi-b"


def test_offline_stale_and_closed_agents_are_skipped_with_the_reason():
    stale = view("a800", A800, age_s=MAX_AGE_S + 5)
    offline = view("a800-b", A800, state="offline")
    busy = view("a800-c", A800, closed="runs a job that holds the whole agent")
    got = place(Request(1, 40 * GIB), [stale, offline, busy, view("laptop", LAPTOP)])
    assert isinstance(got, NoFit)
    assert got.text == ("no online agent has 40 GiB free on one GPU; 3 other agent(s) offline, stale or busy; "
                        "best: laptop GPU 1 with 15.4 GiB")
    only = place(Request(1, 40 * GIB), [stale, view("laptop", LAPTOP)], agent="a800")
    assert only.text == "a800's latest snapshot is 15 s old (placement wants one younger than 10 s)"
    nothing = place(Request(1, 40 * GIB), [stale, offline])
    assert nothing.text.startswith("no online agent has a fresh snapshot: a800's latest snapshot is 15 s old")
    assert "a800-b is offline" in nothing.text
    assert place(Request(1), [stale], agent="gone").text == "gone is not in the agents file"


def test_gpus_claimed_by_active_jobs_are_never_given_again_whatever_the_snapshot_says():
    a800 = view("a800", A800)
    first = place(Request(1, 40 * GIB), [a800])
    claims = claims_of(first.placement(Request(1, 40 * GIB)), "job-1")
    assert claims == [Claim("a800", 5, None, "job-1")]
    second = place(Request(1, 40 * GIB), [a800], claims)
    assert [g.index for g in second.gpus] == [6]  # the snapshot still shows GPU 5 free: the claim holds it
    claims += claims_of(second.placement(Request(1, 40 * GIB)), "job-2")
    third = place(Request(3, 40 * GIB), [a800], claims)
    assert isinstance(third, NoFit)
    assert third.text == ("no online agent has 40 GiB free on each of 3 GPUs (2 held by running jobs); "
                          "best: a800 GPUs 4, 7, 1 with 66.0 GiB, 63.8 GiB, 12.3 GiB")
    # A claim on another agent holds nothing here.
    assert [g.index for g in place(Request(1), [a800], [Claim("other", 5)]).gpus] == [5]


def test_a_claim_by_uuid_follows_the_gpu_when_indices_change():
    mi4 = view("mi4", MI100_4)
    renumbered = Claim("mi4", 3, "0x79ccd55167a2124a")  # placed on it when it was index 3
    got = place(Request(1, 30 * GIB), [mi4], [renumbered])
    assert [g.index for g in got.gpus] == [1]  # index 0 is that GPU now; index 3 is another one, but not free


def test_untrusted_uuids_never_become_the_environment():
    gpus = [Gpu(0, "GPU-1234abcd-0000-0000-0000-000000000000"), Gpu(1, "GPU-$(touch /tmp/x)")]
    assert visible_devices_env("nvidia", gpus[1:], gpus) == {"CUDA_VISIBLE_DEVICES": "1"}  # not a UUID: the index
    assert visible_devices_env("nvidia", gpus[:1], gpus) == {
        "CUDA_VISIBLE_DEVICES": "GPU-1234abcd-0000-0000-0000-000000000000"}
    same = [Gpu(0, "GPU-aa"), Gpu(1, "GPU-aa")]
    assert visible_devices_env("nvidia", same[:1], same) == {"CUDA_VISIBLE_DEVICES": "0"}  # not distinct
    ok = [Gpu(0, "GPU-aa"), Gpu(1, "MIG-bb")]
    assert visible_devices_env("nvidia", ok[1:], ok) == {"CUDA_VISIBLE_DEVICES": "MIG-bb"}
    amd = [Gpu(0, "0x0"), Gpu(1, "0x1")]  # rocm-smi's 0: no unique id
    assert visible_devices_env("rocm", amd[:1], amd) == {"ROCR_VISIBLE_DEVICES": "0"}
    assert visible_devices_env("rocm", amd[1:], amd) == {"ROCR_VISIBLE_DEVICES": "GPU-0000000000000001"}


def test_unhealthy_and_unreported_gpus_are_not_given():
    agent = AgentView("box", "online", NOW, "nvidia",
                      (Gpu(0, None, "H100", 70 * GIB, healthy=False), Gpu(1, None, "H100", None),
                       Gpu(2, None, "H100", 20 * GIB)))
    got = place(Request(1, 40 * GIB), [agent])
    assert got.text == ("no online agent has 40 GiB free on one GPU (1 not healthy, 1 without a free-memory "
                        "reading); best: box GPU 2 with 20 GiB")
    assert [g.index for g in place(Request(1), [agent]).gpus] == [2]  # no memory asked: a reading is not needed


def test_the_runner_gets_the_spec_without_resources_and_with_the_placement_env():
    spec = {"command": ["python3"], "env": {"A": "1"}, "resources": {"gpus": 1}}
    placement = {"env": {"CUDA_VISIBLE_DEVICES": "5"}}
    assert launch_spec(spec, placement) == {"command": ["python3"], "env": {"A": "1", "CUDA_VISIBLE_DEVICES": "5"}}
    assert launch_spec({"command": ["true"]}, None) == {"command": ["true"]}
    assert spec["env"] == {"A": "1"}  # the stored spec is not changed


@pytest.mark.parametrize(("request_", "reason"), [
    (Request(9), "no agent has 9 GPUs (the most: a800 with 8)"),
    (Request(1, 100 * GIB), "no agent has a GPU with 100 GiB of memory (the largest has 80 GiB in all)"),
    (Request(3, 20 * GIB, "*5070*"), "no agent has 3 GPUs named like '*5070*' (the most: laptop with 1)"),
    (Request(1, None, "H100*"), "no agent has a GPU named like 'H100*'"),
    (Request(8, 70 * GIB), None),  # all 8 A800s have 80 GiB: it fits once they are free
    (Request(6, 16 * GIB, "*mi100*"), None),
])
def test_a_request_that_could_never_fit_is_told_apart(request_, reason):
    fleet = [view("a800", A800, state="offline"), view("laptop", LAPTOP, age_s=3600), view("mi6", MI100_6)]
    assert never_fits(request_, fleet) == reason
    assert never_fits(request_, [AgentView("new", "pending")]) is None  # nothing known yet


def test_requests_and_sizes_read_as_people_write_them():
    assert Request(1, 40 * GIB).describe() == "40 GiB free on one GPU"
    assert Request(2, None, "H100*").describe() == "2 free GPUs named like 'H100*'"
    assert Request.of_spec({"command": ["x"]}) is None
    assert Request.of_spec({"resources": {"gpus": 2, "min_free_vram": 5, "gpu_name": None}}) == Request(2, 5)
    assert (size_text(22 * GIB), size_text(MI100_4_FREE), size_text(512 * MIB), size_text(None)) == (
        "22 GiB", "32.0 GiB", "512 MiB", "unknown")
