"""`hwledger job submit/show/list` with a GPU request (--agent auto, --min-free-vram, --gpus, --gpu-name)."""

from __future__ import annotations

import json

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome
from hwledger.cli import main
from hwledger.job_dispatch import DispatchRound
from hwledger.store import AgentRecord, AgentUpdate, Store
from tests.unit.hwledger.placement_captures import A800, GIB, snapshot


@pytest.fixture
def db(tmp_path, monkeypatch):
    path = tmp_path / "data" / "fleet.db"
    monkeypatch.setenv("HWLEDGER_DB", str(path))
    with Store.open(path) as store:
        store.upsert_agent(AgentRecord(name="a800", hostname="192.0.2.1", port=22, ssh_user="root", key_path="/k"))
        store.record_heartbeats({"a800": ProbeOutcome(True, snapshot=snapshot(A800))},
                                lambda _row, _outcome: AgentUpdate("online", 0, seen=True))
    return path


def _submit(capsys, *argv) -> dict:
    assert main(["job", "submit", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _round(db) -> None:
    with Store.open(db) as store:
        running = [job.id for job in store.list_jobs(states=["dispatched", "running"])]
        DispatchRound(store, configured=["a800"], answered=["a800"], in_workers=running, capacity=4,
                      workers_max=4, max_age_s=10).run()


def test_auto_with_a_request_is_queued_for_placement(db, capsys):
    job = _submit(capsys, "--agent", "auto", "--min-free-vram", "40GiB", "--gpu-name", "A800*", "--", "python3")
    assert job["agent"] == "auto"
    assert job["spec"]["resources"] == {"gpus": 1, "min_free_vram": 40 * GIB, "gpu_name": "A800*"}
    # A request without --agent means auto.
    assert _submit(capsys, "--gpus", "2", "--", "python3")["agent"] == "auto"
    main(["job", "submit", "--gpus", "1", "--", "true"])
    assert "queued, to be placed on a free GPU of an online agent" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (["--agent", "auto", "--min-free-vram", "40XB"], "'40XB' is not a size"),
    (["--agent", "auto", "--gpus", "0"], "resources.gpus: must be a whole number of GPUs from 1 to 64"),
    (["--agent", "auto", "--gpus", "9"], "no agent has 9 GPUs (the most: a800 with 8)"),
    (["--agent", "a800", "--min-free-vram", "90GiB"], "no agent has a GPU with 90 GiB of memory"),
    (["--agent", "auto", "--gpu-name", "H100*"], "no agent has a GPU named like 'H100*'"),
    (["--agent", "auto"], "--agent auto places a job on GPUs"),
    ([], "give the agent"),
])
def test_bad_requests_are_refused_with_a_clear_error(db, capsys, argv, says):
    assert main(["job", "submit", *argv, "--", "true"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_show_and_list_say_why_a_job_waits_and_where_a_placed_one_runs(db, capsys):
    waits = _submit(capsys, "--min-free-vram", "70GiB", "--gpus", "5", "--", "python3")["job_id"]
    placed = _submit(capsys, "--min-free-vram", "40GiB", "--", "python3", "train.py")["job_id"]
    _round(db)
    assert main(["job", "show", waits]) == 0
    assert "best: a800 GPUs 5, 6, 4, 7, 1 with 79.2 GiB, 79.1 GiB," in capsys.readouterr().out
    _round(db)  # the next round sees GPU 5 held by the placed job: the reason changes
    assert main(["job", "show", waits]) == 0
    out = capsys.readouterr().out
    assert "asks     70 GiB free on each of 5 GPUs" in out
    assert ("waits    no online agent has 70 GiB free on each of 5 GPUs (1 held by running jobs); "
            "best: a800 GPUs 6, 4, 7, 1, 3 with 79.1 GiB, 66.0 GiB, 63.8 GiB, 12.3 GiB, 12.3 GiB, 0 s ago") in out
    assert main(["job", "show", placed]) == 0
    out = capsys.readouterr().out
    assert "agent    a800" in out and "env      CUDA_VISIBLE_DEVICES=5" in out
    assert "gpu      5: NVIDIA A800-SXM4-80GB (79.2 GiB free at placement)" in out
    assert "placed   asked 40 GiB free on one GPU; a800 GPU 5 with 79.2 GiB free (snapshot 0 s old)" in out
    assert main(["job", "list"]) == 0
    out = capsys.readouterr().out
    assert "GPUS / WAITS FOR" in out and "GPU 5" in out and "no online agent has 70 GiB" in out
    assert main(["job", "show", placed, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["placement"]["gpus"][0]["index"] == 5 and shown["waits_because"] is None
