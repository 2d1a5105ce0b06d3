"""`make demo`: a local GPU fleet over real SSH, from registration to a finished job.

It starts real sshd hosts (the test lab in tests/lab: loopback hosts, and a GPU host reachable only
through a bastion when network namespaces are available) whose fake nvidia-smi / rocm-smi replay real
captures, then drives them with nothing but the public commands a user would type:

  1. `hwledger fleet register-ssh` for each host (host keys confirmed by fingerprint);
  2. `ansible-inventory --graph` and `ansible all -m raw` through the hwledger.fleet.ssh_agents plugin;
  3. `ansible-playbook hwledger.fleet.heartbeat` (GPU telemetry as facts);
  4. `ansible-playbook hwledger.fleet.job` (one agentless job, result fetched to the controller);
  5. `hwledger job submit` + `hwledger fleet serve` for a few ticks + `hwledger fleet status`;
  6. `hwledger fleet serve --http`: /metrics, /api/fleet and a screenshot of the status page (.demo/fleet.png).

Everything lives under .demo/ and every process it starts is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab import Lab, LabUnavailable, lab_unavailable_reason  # noqa: E402

DEMO_DIR = REPO / ".demo"
BIN = Path(sys.executable).parent

# Real captures the demo hosts replay, with the command each was captured with (tests/fixtures/gpu/SOURCES.md).
A800_CAPTURE = "nvidia/csv-header-index-name-memtotal-memfree-driver-computecap-8xA800-SXM4-80GB.txt"
A800_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap --format=csv"
MI100_CAPTURE = "rocm/json-pretty-telegraf-allinfo-4xMI100-rocm6.0.2.json"
MI100_CMD = "rocm-smi -a --json"


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(argv: list[str], *, env: dict[str, str], check: bool = True) -> int:
    print("$ " + shlex.join(str(a) for a in argv), flush=True)
    rc = subprocess.run([str(a) for a in argv], env=env, cwd=REPO, check=False).returncode
    if check and rc != 0:
        raise SystemExit(f"demo: the command above failed with exit code {rc}")
    return rc


def demo_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        HWLEDGER_CONFIG=str(DEMO_DIR / "ssh-agents.toml"),
        HWLEDGER_KNOWN_HOSTS=str(DEMO_DIR / "known_hosts"),
        HWLEDGER_DB=str(DEMO_DIR / "fleet.db"),
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
    )
    return env


def start_hosts(lab: Lab) -> list:
    hosts = [
        lab.add_loopback_host("a800-box", capture=A800_CAPTURE),
        lab.add_loopback_host("mi100-box", tool="rocm-smi", capture=MI100_CAPTURE, python=True),
    ]
    hosts[0].gpu_query_cmd = A800_CMD
    hosts[1].gpu_query_cmd = MI100_CMD
    try:
        bastion, internal = lab.add_bastion_pair("private-gpu")
        hosts.append(internal)
        print(f"bastion {bastion.address}:{bastion.port} -> private-gpu {internal.address} "
              "(reachable only through the bastion)")
    except LabUnavailable as exc:
        print(f"(no bastion host in this demo: {exc})")
    return hosts


def register(host, env: dict[str, str]) -> None:
    argv = [BIN / "hwledger", "fleet", "register-ssh", "--host", f"{host.user}@{host.address}:{host.port}",
            "--key", host.lab.client_key, "--name", host.name, "--gpu-query-cmd", host.gpu_query_cmd,
            "--host-key-fingerprint", host.host_key_fingerprint]
    if host.bastion is not None:
        b = host.bastion
        argv += ["--bastion", f"{b.user}@{b.address}:{b.port}", "--bastion-key", host.lab.client_key,
                 "--bastion-host-key-fingerprint", b.host_key_fingerprint]
    run(argv, env=env)


def main() -> int:
    reason = lab_unavailable_reason()
    if reason:
        print(f"demo: cannot start real sshd hosts here: {reason}", file=sys.stderr)
        return 1
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(mode=0o700)
    env = demo_env()
    inventory = DEMO_DIR / "demo.hwledger.yml"
    inventory.write_text("plugin: hwledger.fleet.ssh_agents\nagents_file: ssh-agents.toml\n"
                         f"known_hosts_file: {DEMO_DIR / 'known_hosts'}\n")
    lab = Lab(DEMO_DIR / "lab")
    try:
        step("1. Start demo GPU hosts (real sshd, fake tools replaying real captures)")
        hosts = start_hosts(lab)
        for host in hosts:
            print(f"  {host.name}: {host.user}@{host.address}:{host.port}  query: {host.gpu_query_cmd}")

        step("2. Register each host (host key pinned only when its fingerprint matches)")
        for host in hosts:
            register(host, env)

        step("3. The fleet as Ansible sees it (hwledger.fleet.ssh_agents)")
        run([BIN / "ansible-inventory", "-i", inventory, "--graph"], env=env)
        run([BIN / "ansible", "all", "-i", inventory, "-m", "ansible.builtin.raw", "-a", "echo ok from $(hostname)"],
            env=env)

        step("4. Heartbeat: GPU telemetry as facts (hwledger.fleet.heartbeat)")
        run([BIN / "ansible-playbook", "-i", inventory, "hwledger.fleet.heartbeat"], env=env)

        step("5. One agentless job through the job playbook (hwledger.fleet.job)")
        job_file = DEMO_DIR / "job.json"
        argv = [BIN / "hwledger", "job", "new", "--timeout", "60", "--",
                "sh", "-c", "echo job ran on $(uname -n) as uid $(id -u); rocm-smi --showproductname | head -c 120"]
        print("$ " + shlex.join(str(a) for a in argv) + " > .demo/job.json", flush=True)
        job_file.write_bytes(subprocess.run([str(a) for a in argv], check=True, capture_output=True).stdout)
        job_id = json.loads(job_file.read_text())["job_id"]
        results = DEMO_DIR / "results"
        mi100 = hosts[1]
        # In the lab, python3 is only on the host's own PATH (its bin dir), so name it for Ansible.
        run([BIN / "ansible-playbook", "-i", inventory, "hwledger.fleet.job", "--limit", mi100.name,
             "-e", f"hwledger_job_file={job_file}", "-e", f"hwledger_results_dir={results}",
             "-e", f"ansible_python_interpreter={mi100.bin_dir / 'python3'}"], env=env)
        print(f"--- .demo/results/{job_id}.json")
        print((results / f"{job_id}.json").read_text())

        step("6. The fleet server: queue a job, serve a few heartbeats, show the fleet")
        run([BIN / "hwledger", "job", "submit", "--agent", "mi100-box", "--", "sh", "-c", "echo queued job ran"],
            env=env)
        run([BIN / "hwledger", "fleet", "serve", "--interval", "2", "--max-ticks", "3"], env=env)
        run([BIN / "hwledger", "job", "list"], env=env)
        run([BIN / "hwledger", "fleet", "status"], env=env)

        step("7. Watch the fleet: serve --http (Prometheus /metrics, the status page, the JSON API)")
        watch(env)
        print("\ndemo: done. Files are in .demo/ (config, known_hosts, fleet.db, results, fleet.png).")
        return 0
    finally:
        lab.stop()


def watch(env: dict[str, str]) -> None:
    """`serve --http` for a few ticks with a job running: fetch /metrics and /api/fleet, screenshot the page."""
    import re  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    import urllib.request  # pylint: disable=import-outside-toplevel

    run([BIN / "hwledger", "job", "submit", "--agent", "mi100-box", "--", "sh", "-c", "echo training; sleep 8"],
        env=env)
    argv = [BIN / "hwledger", "fleet", "serve", "--interval", "2", "--max-ticks", "8", "--http", "127.0.0.1:0"]
    print("$ " + shlex.join(str(a) for a in argv) + " &", flush=True)
    log_path = DEMO_DIR / "serve-http.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([str(a) for a in argv], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = None
        for _attempt in range(100):  # the port it picked, from its log (at most 20 s)
            found = re.search(r"serving (http://127\.0\.0\.1:\d+)/", log_path.read_text(errors="replace"))
            if found or server.poll() is not None:
                base = found.group(1) if found else None
                break
            time.sleep(0.2)
        if base is None:
            raise SystemExit(f"demo: serve --http did not start:\n{log_path.read_text(errors='replace')}")
        for _attempt in range(50):  # the job is on its way (at most 10 s): the page shows it
            with urllib.request.urlopen(base + "/api/jobs?state=running", timeout=10) as answer:
                if json.loads(answer.read()):
                    break
            time.sleep(0.2)
        with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        print(f"$ curl {base}/metrics | grep hwledger_gpu_memory_free_bytes")
        print("\n".join(line for line in metrics.splitlines() if line.startswith("hwledger_gpu_memory_free_bytes")))
        with urllib.request.urlopen(base + "/api/fleet", timeout=10) as answer:
            fleet = json.loads(answer.read())
        print(f"$ curl {base}/api/fleet   # the JSON of hwledger fleet status --json")
        for item in fleet:
            print(f"  {item['name']}: {item['state']}, {len(item['gpus'])} GPU(s)")
        chromium = shutil.which("chromium")
        if chromium is None:
            print("(no screenshot: chromium is not installed; apt-get install chromium)")
        else:
            shot = DEMO_DIR / "fleet.png"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--hide-scrollbars", f"--user-data-dir={DEMO_DIR / 'chromium'}", "--window-size=1280,960",
                            f"--screenshot={shot}", base + "/"], check=True, capture_output=True, timeout=180)
            print(f"the status page {base}/ as a browser shows it: .demo/{shot.name}")
        server.wait(120)  # its last ticks, and the job it runs
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
