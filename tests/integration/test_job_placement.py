"""Placement over real sshd hosts replaying real multi-GPU captures (tests/fixtures/gpu; provenance in its
SOURCES.md), real heartbeats and the real job playbook: `hwledger job submit --agent auto` jobs land on the
GPUs that fit, see only those (CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES), skip stale and offline agents,
never get a GPU another job was given since the last snapshot, and two 1-GPU jobs run at once on one host."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hwledger.fanout import SshFanoutHeartbeat
from hwledger.server import Server
from lab.pinning import pinned_fleet
from tests.integration.fleet_support import wait_for
from tests.toolchains import REPO
from tests.unit.hwledger.placement_captures import A800, LAPTOP, MI100_4, MI100_6
from tests.unit.plugins.plugin_utils.capture_expectations import TELEGRAF_CMD

pytestmark = pytest.mark.slow  # each job runs the real job playbook

A800_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap --format=csv"
LAPTOP_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv"
# Each job prints the variables placement sets; nothing else of the environment.
SHOW_GPUS = 'echo "cuda=${CUDA_VISIBLE_DEVICES-unset} rocr=${ROCR_VISIBLE_DEVICES-unset}"'


@pytest.fixture
def short_data_dir():
    path = Path(tempfile.mkdtemp(prefix="hwlpl-", dir="/tmp"))  # ssh control sockets need a short path
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hosts(lab):
    made = []

    def add(prefix: str, capture: str, *, tool: str = "nvidia-smi"):
        made.append(lab.add_loopback_host(lab.unique_name(prefix), tool=tool, capture=capture, python=True))
        return made[-1]

    yield add
    for host in made:
        host.stop()


class Placed:
    """A fleet of lab hosts, its server (ticked by hand) and the CLI on its files."""

    def __init__(self, tmp_path: Path, data_dir: Path, hosts: list, overrides: dict):
        self.fleet = pinned_fleet(tmp_path, data_dir, hosts, overrides)
        self.env = {"HWLEDGER_CONFIG": str(self.fleet.config), "HWLEDGER_KNOWN_HOSTS": str(self.fleet.known_hosts),
                    "HWLEDGER_DB": str(self.fleet.db), "PATH": "/usr/bin:/bin",
                    "PYTHONPATH": f"{REPO}:{REPO / 'collections'}"}
        self.server = self.new_server()

    def new_server(self) -> Server:
        # The resident fan-out, as `hwledger fleet serve` heartbeats by default.
        return Server(self.fleet, transport=SshFanoutHeartbeat(self.fleet.policy(), query_timeout_s=20),
                      query_timeout_s=20, interval_s=1)

    def hw(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hwledger", *args], env=self.env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)

    def submit(self, *args: str) -> str:
        proc = self.hw("job", "submit", "--timeout", "120", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def job(self, job_id: str):
        return self.server.store.get_job(job_id)

    def finished(self, job_id: str):
        return wait_for(lambda: (job := self.job(job_id)).terminal and job, timeout=120, what=f"job {job_id} to end")


def test_two_one_gpu_jobs_run_at_once_on_one_8_gpu_host_on_gpus_reserved_between_heartbeats(
        hosts, tmp_path, short_data_dir):
    a800 = hosts("a800", A800)
    placed = Placed(tmp_path, short_data_dir, [a800], {a800.name: {"gpu_query_cmd": A800_CMD}})
    marks = tmp_path / "marks"  # the "remote" is this machine: the jobs meet here
    marks.mkdir()
    try:
        # Each job says it started, then waits (up to 60 s) for the other: both succeed only if they ran at once.
        def meet(me: str, other: str) -> str:
            return (f"{SHOW_GPUS}; touch {marks}/{me}; i=0; while [ ! -e {marks}/{other} ] && [ $i -lt 600 ]; "
                    f"do sleep 0.1; i=$((i+1)); done; [ -e {marks}/{other} ]")

        first = placed.submit("--agent", "auto", "--min-free-vram", "40GiB", "--", "sh", "-c", meet("first", "second"))
        assert placed.server.tick().dispatched == [first]
        # The next heartbeat replays the same capture: GPU 5 still shows 79 GiB free. The claim holds it.
        second = placed.submit("--agent", "auto", "--min-free-vram", "40GiB", "--", "sh", "-c", meet("second", "first"))
        whole = placed.submit("--agent", a800.name, "--", "sh", "-c", SHOW_GPUS)  # no GPU request: the whole host
        assert placed.server.tick().dispatched == [second]
        assert [g["index"] for g in placed.job(first).placement["gpus"]] == [5]   # 81148 MiB free
        assert [g["index"] for g in placed.job(second).placement["gpus"]] == [6]  # 81032 MiB free
        done = [placed.finished(first), placed.finished(second)]
        assert [(job.state, job.exit_code) for job in done] == [("succeeded", 0), ("succeeded", 0)]
        assert [job.result["stdout_tail"].strip() for job in done] == ["cuda=5 rocr=unset", "cuda=6 rocr=unset"]
        # The whole-host job waited for both, saying why, and then ran alone, seeing every GPU.
        assert placed.job(whole).state == "queued"
        shown = placed.hw("job", "show", whole)
        assert f"waits    waits for {a800.name} to be free" in shown.stdout, shown.stdout
        placed.server.wait_for_workers(timeout=60)
        assert placed.server.tick().dispatched == [whole]
        ran = placed.finished(whole)
        assert ran.state == "succeeded" and ran.result["stdout_tail"].strip() == "cuda=unset rocr=unset"
        shown = placed.hw("job", "show", first).stdout
        assert f"placed   asked 40 GiB free on one GPU; {a800.name} GPU 5 with 79.2 GiB free" in shown
        assert "env      CUDA_VISIBLE_DEVICES=5" in shown
    finally:
        placed.server.close()


def test_placement_picks_the_right_agent_and_gpus_and_skips_stale_and_offline_agents(
        hosts, tmp_path, short_data_dir):
    a800, laptop = hosts("a800", A800), hosts("laptop", LAPTOP)
    mi4, mi6 = hosts("mi4", MI100_4, tool="rocm-smi"), hosts("mi6", MI100_6, tool="rocm-smi")
    placed = Placed(tmp_path, short_data_dir, [a800, laptop, mi4, mi6], {
        # The A800's tool runs once an hour: between runs it is online, but its snapshot ages.
        a800.name: {"gpu_query_cmd": A800_CMD, "min_query_interval_s": 3600},
        laptop.name: {"gpu_query_cmd": LAPTOP_CMD},
        mi4.name: {"gpu_query_cmd": TELEGRAF_CMD}, mi6.name: {"gpu_query_cmd": TELEGRAF_CMD}})
    try:
        report = placed.server.tick()
        assert all(outcome.ok for outcome in report.outcomes.values()), report.outcomes
        # The best MI100 host (a little more free memory) goes away: its jobs must go to the other one.
        mi4.stop()
        time.sleep(2.5)  # two intervals: the A800's snapshot is stale from now on
        big = placed.submit("--agent", "auto", "--min-free-vram", "40GiB", "--", "sh", "-c", SHOW_GPUS)
        laptop_job = placed.submit("--agent", "auto", "--min-free-vram", "10GiB", "--gpu-name", "RTX*", "--", "sh", "-c", SHOW_GPUS)
        amd = placed.submit("--agent", "auto", "--gpus", "2", "--min-free-vram", "30GiB", "--gpu-name", "MI100*",
                            "--", "sh", "-c", SHOW_GPUS)
        report = placed.server.tick()
        assert not report.outcomes[mi4.name].ok and placed.server.store.get_agent(mi4.name).state == "stale"
        assert report.outcomes[a800.name].ok and placed.server.store.get_agent(a800.name).state == "online"
        assert report.dispatched == [laptop_job, amd]
        assert placed.job(laptop_job).agent == laptop.name and placed.job(amd).agent == mi6.name
        assert placed.job(big).state == "queued"
        note = placed.job(big).placement_note["text"]
        assert note.startswith("no online agent has 40 GiB free on one GPU; 2 other agent(s) offline, stale or busy; "
                               f"best: {mi6.name} GPU 0 with 32.0 GiB"), note
        shown = placed.hw("job", "list").stdout
        assert "no online agent has 40 GiB free on one GPU" in shown
        outputs = {job_id: placed.finished(job_id).result["stdout_tail"].strip() for job_id in (laptop_job, amd)}
        assert outputs == {laptop_job: "cuda=1 rocr=unset",   # the RTX 5070 Ti, 15799 MiB free
                           amd: "cuda=unset rocr=0,1"}       # this capture has no unique ids: by index
        # The A800 heard again (its tool runs for a restarted server's first tick): the big job goes there.
        placed.server.close()
        mi4.start()
        placed.server = placed.new_server()
        report = placed.server.tick()
        assert big in report.dispatched
        assert placed.job(big).agent == a800.name
        assert placed.finished(big).result["stdout_tail"].strip() == "cuda=5 rocr=unset"
        # And the MI100 host that came back is named by its GPUs' unique ids.
        by_uuid = placed.submit("--agent", mi4.name, "--gpus", "1", "--", "sh", "-c", SHOW_GPUS)
        assert placed.server.tick().dispatched == [by_uuid]
        assert placed.finished(by_uuid).result["stdout_tail"].strip() == "cuda=unset rocr=GPU-79ccd55167a2124a"
    finally:
        placed.server.close()
