"""The job-latency phase: trivial jobs through the serve loop, beside the floors of one SSH exec.

On one real sshd lab host with python3 (the staged runner), over a connection the heartbeat keeps warm:
(a) `ssh host true` over the same ControlMaster (the floor of any remote step);
(b) `ansible HOST -m ansible.builtin.raw -a true` (the floor of any Ansible run: its start-up and one task);
(c) the product: a job submitted to the store, dispatched by `Server.tick()` (the fan-out heartbeat finds the
    host answering, a JobWorkers thread runs the `hwledger.fleet.job` playbook through ansible-runner) and
    settled in the store. Latency = the job's `finished_at` - its `dispatched_at` (both written by the store);
    start = the `started_at` of the job's result (the runner's clock: the host is this machine) - `dispatched_at`.
The job is the issue's trivial one: `sh -c 'nvidia-smi -L; exit 3'` (state failed, exit code 3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import hostvars, job_schema, ssh

from bench.approaches import FleetFiles
from bench.fleet import Agent, BenchFleet
from bench.measure import percentile
from hwledger.fanout import SshFanoutHeartbeat
from hwledger.server import Server  # the bench drives the serve loop itself, as the tests do

TRIVIAL_JOB = ["sh", "-c", "nvidia-smi -L; exit 3"]
_CFG = "[defaults]\nhost_key_checking = True\ngathering = explicit\nretry_files_enabled = False\nlocal_tmp = {tmp}\n"


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _timed(argv: list[str], env: dict | None = None) -> float:
    started = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[:3])} ...` failed (rc {proc.returncode}): {proc.stdout[-500:]}{proc.stderr[-500:]}")
    return elapsed


def _summary(values: list[float]) -> dict:
    return {"p50_s": round(percentile(values, 50), 4), "p95_s": round(percentile(values, 95), 4),
            "min_s": round(min(values), 4), "n": len(values)}


def job_latency(fleet: BenchFleet, root: Path, *, jobs: int, floor_runs: int) -> dict:
    host = fleet.lab.add_loopback_host("jobs", python=True)
    files = FleetFiles(root / "jobs-data")
    parsed = files.write([Agent(host.agent_entry(), host.host_key_pub)])[0]
    fleet_files = files.fleet
    policy = fleet_files.policy()
    transport = SshFanoutHeartbeat(policy, query_timeout_s=10)
    server = Server(fleet_files, transport=transport, query_timeout_s=10)
    try:
        server.recover()
        server.tick()  # opens the master; the agent is online from here on
        ssh_true = [_timed(ssh.ssh_argv(parsed, policy, "true")) for _run in range(max(floor_runs, 20))]
        adhoc = _adhoc_raw_runs(root / "jobs-adhoc", parsed, policy, floor_runs)
        latencies, starts, states = [], [], []
        for _job in range(jobs):
            spec = job_schema.new_job(TRIVIAL_JOB, timeout_s=60)
            server.store.submit_job(parsed.name, spec, job_id=spec["job_id"], timeout_s=60)
            deadline = time.monotonic() + 120
            while True:
                job = server.store.get_job(spec["job_id"])
                if job is not None and job.state == "queued":
                    # Dispatched at a tick at which the agent answered; on a loaded machine one tick's exec
                    # may outlive the tick's budget (it is heard at the next one), so tick until it goes.
                    server.tick()
                    continue
                if job is not None and job.terminal:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bench job {spec['job_id']} did not end within 120 s (state {job and job.state})")
                time.sleep(0.01)
            server.wait_for_workers(timeout=60)
            if job.result is None or job.dispatched_at is None or job.finished_at is None:
                raise RuntimeError(f"bench job {job.id} ended {job.state} without a result: {job.error}")
            latencies.append(_stamp(job.finished_at) - _stamp(job.dispatched_at))
            starts.append(_stamp(job.result["started_at"]) - _stamp(job.dispatched_at))
            states.append(f"{job.state}/{job.exit_code}")
    finally:
        server.close()
        transport.close(exit_masters=True)
        host.stop()
    result = {
        "job": TRIVIAL_JOB, "jobs": jobs,
        "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p95_s": round(percentile(latencies, 95), 3),
        "start_p50_s": round(percentile(starts, 50), 3), "start_p95_s": round(percentile(starts, 95), 3),
        "states": sorted(set(states)),
        "ssh_true": _summary(ssh_true), "ansible_raw_adhoc": _summary(adhoc),
    }
    result["latency_vs_adhoc_raw"] = round(result["latency_p50_s"] / result["ansible_raw_adhoc"]["p50_s"], 2)
    return result


def _adhoc_raw_runs(workdir: Path, agent, policy: ssh.SshPolicy, runs: int) -> list[float]:
    """`ansible HOST -m ansible.builtin.raw -a true`, the same ssh options (so the same warm master)."""
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(mode=0o700, exist_ok=True)
    (workdir / "ansible.cfg").write_text(_CFG.format(tmp=workdir / "tmp"))
    (workdir / "inventory.json").write_text(json.dumps(hostvars.inventory([agent], policy)))
    venv_bin = Path(sys.executable).parent
    env = {"PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": os.environ.get("HOME", "/root"),
           "LC_ALL": "C.UTF-8", "ANSIBLE_CONFIG": str(workdir / "ansible.cfg"), "ANSIBLE_HOST_KEY_CHECKING": "True"}
    argv = [str(venv_bin / "ansible"), agent.name, "-i", str(workdir / "inventory.json"), "-m", "ansible.builtin.raw",
            "-a", "true"]
    return [_timed(argv, env) for _run in range(runs)]


def print_jobs(r: dict) -> None:
    print(f"\njobs: {r['jobs']} trivial jobs ({' '.join(r['job'])}) through the serve loop, warm connection", flush=True)
    print(f"  dispatch -> recorded result: p50 {r['latency_p50_s']:.3f} s, p95 {r['latency_p95_s']:.3f} s", flush=True)
    print(f"  dispatch -> command started: p50 {r['start_p50_s']:.3f} s, p95 {r['start_p95_s']:.3f} s "
          f"(states {', '.join(r['states'])})", flush=True)
    s, a = r["ssh_true"], r["ansible_raw_adhoc"]
    print(f"  beside: ssh host true over the master p50 {s['p50_s']:.3f} s (n={s['n']}); "
          f"ansible -m raw -a true p50 {a['p50_s']:.3f} s (n={a['n']}); job p50 / ansible raw p50 = "
          f"{r['latency_vs_adhoc_raw']}", flush=True)
