"""`make demo`: a local GPU fleet over real SSH, from registration to a finished job, left up to play with.

It starts real sshd hosts (the lab package lab/: loopback hosts, and a GPU host reachable only through a
bastion when network namespaces are available) whose fake nvidia-smi / rocm-smi replay real captures, owned
by a supervisor process of their own (demo/fleet.py), then drives them with nothing but the public
commands a user would type:

  1. `hwledger fleet register-ssh` for each host (host keys confirmed by fingerprint);
  2. `ansible-inventory --graph` and `ansible all -m raw` through the hwledger.fleet.ssh_agents plugin;
  3. `ansible-playbook hwledger.fleet.heartbeat` (GPU telemetry as facts);
  4. `ansible-playbook hwledger.fleet.job` (one agentless job, result fetched to the controller);
  5. `hwledger job submit` + `hwledger fleet serve` for a few ticks + `hwledger fleet status`;
  6. `hwledger fleet serve --http`: /metrics, /api/fleet and a screenshot of the status page (.demo/fleet.png);
  7. `hwledger job submit --agent auto --min-free-vram 40GiB`: a job placed on a GPU with that much free memory,
     followed with `hwledger job logs -f` while `serve` runs it, then `hwledger job show` says where and why.

Everything lives under .demo/ (or --dir). With --keep (`make demo`) the fleet stays up afterwards and the
demo prints the lines to paste to go on with it; `python -m demo --down` (`make demo-down`) stops it.
Without --keep the fleet is stopped when the tour ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo import fleet  # noqa: E402
from lab import lab_unavailable_reason  # noqa: E402

DEFAULT_DIR = REPO / ".demo"
BIN = Path(sys.executable).parent
ENV_FILE = "env"
INVENTORY = "demo.hwledger.yml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="A local GPU fleet over real SSH (root: sshd hosts, network namespaces, login accounts): "
                    "register, inventory, heartbeats, jobs, fleet status. `make demo` runs it with --keep.",
        epilog="make demo = python -m demo --keep; make demo-down = python -m demo --down",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true",
                      help="leave the demo fleet running after the tour and print the lines to go on with it")
    mode.add_argument("--down", action="store_true",
                      help="stop a demo fleet left running by --keep (its hosts, namespaces and accounts)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, metavar="DIR",
                        help="where the demo keeps its files (default: .demo in the checkout); started afresh")
    return parser.parse_args(argv)


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(argv: list, *, env: dict[str, str], check: bool = True) -> int:
    print("$ " + shlex.join(str(a) for a in argv), flush=True)
    rc = subprocess.run([str(a) for a in argv], env=env, cwd=REPO, check=False).returncode
    if check and rc != 0:
        raise SystemExit(f"demo: the command above failed with exit code {rc}")
    return rc


def demo_files(directory: Path) -> dict[str, str]:
    """The environment that points hwledger and Ansible at the demo's files (the env file says the same)."""
    return {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HWLEDGER_CONFIG": str(directory / "ssh-agents.toml"),
        "HWLEDGER_KNOWN_HOSTS": str(directory / "known_hosts"),
        "HWLEDGER_DB": str(directory / "fleet.db"),
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
    }


def write_env_file(directory: Path) -> Path:
    files = demo_files(directory)
    path = directory / ENV_FILE
    path.write_text(
        "# The hwledger demo fleet: source this file (`. PATH/TO/env`) to use it from a shell.\n"
        "# PATH: hwledger and ansible-* from the checkout's virtualenv. HWLEDGER_*: the demo's own files\n"
        "# (without them hwledger uses ~/.config/hwledger and ~/.local/share/hwledger). ANSIBLE_CONFIG: the\n"
        "# checkout's ansible.cfg, whichever directory you are in.\n"
        f"export PATH={shlex.quote(str(BIN))}:\"$PATH\"\n"
        + "".join(f"export {name}={shlex.quote(files[name])}\n"
                  for name in ("HWLEDGER_CONFIG", "HWLEDGER_KNOWN_HOSTS", "HWLEDGER_DB", "ANSIBLE_CONFIG")))
    return path


def shown(path: Path) -> str:
    """A path as the user should type it: relative when it is under this directory, else absolute."""
    try:
        return shlex.quote(str(path.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


def next_steps(directory: Path) -> list[str]:
    """The lines to paste after `make demo` (each one true while the demo fleet is up)."""
    inventory = shown(directory / INVENTORY)
    down = "make demo-down" if directory == DEFAULT_DIR else f"make demo-down DEMO_DIR={shlex.quote(str(directory))}"
    return [
        f". {shown(directory / ENV_FILE)}",
        "hwledger fleet status",
        "hwledger job submit --agent mi100-box -- sh -c 'echo hello from $(uname -n), uid $(id -u)'",
        "hwledger fleet serve --once",
        "hwledger job list",
        f"ansible-inventory -i {inventory} --graph",
        f"ansible-playbook -i {inventory} hwledger.fleet.heartbeat",
        down,
    ]


def register(host: fleet.DemoHost, state: fleet.FleetState, env: dict[str, str]) -> None:
    login = host.login
    argv = [BIN / "hwledger", "fleet", "register-ssh", "--host", f"{login.user}@{login.address}:{login.port}",
            "--key", state.client_key, "--name", host.name, "--gpu-query-cmd", host.gpu_query_cmd,
            "--host-key-fingerprint", login.host_key_fingerprint]
    if host.bastion is not None:
        b = host.bastion
        argv += ["--bastion", f"{b.user}@{b.address}:{b.port}", "--bastion-key", state.client_key,
                 "--bastion-host-key-fingerprint", b.host_key_fingerprint]
    run(argv, env=env)


def tour(state: fleet.FleetState, directory: Path, env: dict[str, str]) -> None:
    inventory = directory / INVENTORY
    for host in state.hosts:
        via = f" via the bastion {host.bastion.address}:{host.bastion.port}" if host.bastion else ""
        print(f"  {host.name}: {host.login.user}@{host.login.address}:{host.login.port}{via}  "
              f"query: {host.gpu_query_cmd}")

    step("2. Register each host (host key pinned only when its fingerprint matches)")
    for host in state.hosts:
        register(host, state, env)

    step("3. The fleet as Ansible sees it (hwledger.fleet.ssh_agents)")
    run([BIN / "ansible-inventory", "-i", inventory, "--graph"], env=env)
    run([BIN / "ansible", "all", "-i", inventory, "-m", "ansible.builtin.raw", "-a", "echo ok from $(hostname)"],
        env=env)

    step("4. Heartbeat: GPU telemetry as facts (hwledger.fleet.heartbeat)")
    run([BIN / "ansible-playbook", "-i", inventory, "hwledger.fleet.heartbeat"], env=env)

    step("5. One agentless job through the job playbook (hwledger.fleet.job)")
    job_file = directory / "job.json"
    argv = [BIN / "hwledger", "job", "new", "--timeout", "60", "--",
            "sh", "-c", "echo job ran on $(uname -n) as uid $(id -u); rocm-smi --showproductname | head -c 120"]
    print("$ " + shlex.join(str(a) for a in argv) + f" > {shown(job_file)}", flush=True)
    job_file.write_bytes(subprocess.run([str(a) for a in argv], check=True, capture_output=True).stdout)
    job_id = json.loads(job_file.read_text())["job_id"]
    results = directory / "results"
    mi100 = state.host("mi100-box")
    # In the lab, python3 is only on the host's own PATH (its bin dir), so name it for Ansible.
    run([BIN / "ansible-playbook", "-i", inventory, "hwledger.fleet.job", "--limit", mi100.name,
         "-e", f"hwledger_job_file={job_file}", "-e", f"hwledger_results_dir={results}",
         "-e", f"ansible_python_interpreter={mi100.python3}"], env=env)
    print(f"--- {shown(results / (job_id + '.json'))}")
    print((results / f"{job_id}.json").read_text())

    step("6. The fleet server: queue a job, serve a few heartbeats, show the fleet")
    run([BIN / "hwledger", "job", "submit", "--agent", "mi100-box", "--", "sh", "-c", "echo queued job ran"],
        env=env)
    run([BIN / "hwledger", "fleet", "serve", "--interval", "2", "--max-ticks", "3"], env=env)
    run([BIN / "hwledger", "job", "list"], env=env)
    run([BIN / "hwledger", "fleet", "status"], env=env)

    step("7. Watch the fleet: serve --http (Prometheus /metrics, the status page, the JSON API)")
    watch(env, directory)

    step("8. Place a job where 40 GiB of GPU memory is free, and follow its output as it runs")
    place_and_follow(env, directory)


def check_directory(directory: Path) -> None:
    """Only a demo directory is emptied, as --dir could name any directory: the checkout's .demo, one the
    demo made (it has an env file), a new or an empty one."""
    if directory == DEFAULT_DIR or not os.path.lexists(directory):
        return
    if not directory.is_dir():
        raise fleet.DemoError(f"--dir {directory} is not a directory; give a new or empty directory")
    if any(directory.iterdir()) and not (directory / ENV_FILE).is_file():
        raise fleet.DemoError(f"{directory} is not empty and not a demo directory (it has no {ENV_FILE} file); "
                              "give --dir a new or empty directory")


def prepare(directory: Path) -> None:
    """A fresh demo directory (0700): stop a fleet an earlier run left up, remove its files."""
    if fleet.running(directory) is not None:
        print(f"demo: stopping the demo fleet left up in {directory} by an earlier run", flush=True)
        fleet.stop(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    (directory / INVENTORY).write_text("plugin: hwledger.fleet.ssh_agents\nagents_file: ssh-agents.toml\n"
                                       f"known_hosts_file: {directory / 'known_hosts'}\n")
    write_env_file(directory)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return demo(args, args.dir.resolve())
    except fleet.DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted; its fleet was stopped", file=sys.stderr)
        return 130


def demo(args: argparse.Namespace, directory: Path) -> int:
    if args.down:
        print(f"demo: {fleet.stop(directory)}")
        return 0
    check_directory(directory)
    reason = lab_unavailable_reason()
    if reason:
        print(f"demo: cannot start real sshd hosts here: {reason}", file=sys.stderr)
        return 1
    prepare(directory)
    env = dict(os.environ, **demo_files(directory), ANSIBLE_NOCOLOR="1")
    step("1. Start demo GPU hosts (real sshd, fake tools replaying real captures, ordinary login accounts)")
    state = fleet.start(directory)  # on failure or Ctrl-C it leaves nothing up
    kept = False
    try:
        tour(state, directory, env)
        kept = args.keep
    finally:
        if not kept:  # the tour failed or was interrupted, or no --keep: nothing stays up
            print(f"\ndemo: {fleet.stop(directory)}", flush=True)
    if not kept:
        print("demo: done. To keep a demo fleet running to play with, run `make demo` (python -m demo --keep).")
        return 0
    step("The demo fleet stays up. Paste these lines, in this directory, to go on with it:")
    print("\n" + "".join(f"    {line}\n" for line in next_steps(directory)))
    print(f"`. {shown(directory / ENV_FILE)}` puts {shown(BIN)} first on PATH (hwledger, ansible-*; "
          f"`. {shown(BIN / 'activate')}` does that alone) and points HWLEDGER_CONFIG, HWLEDGER_KNOWN_HOSTS and "
          f"HWLEDGER_DB at {shown(directory)}/ (without them hwledger uses ~/.config/hwledger and "
          "~/.local/share/hwledger). `hwledger fleet serve` without --once keeps serving until Ctrl-C. "
          "make demo-down stops the hosts, their network namespaces and login accounts.")
    return 0


# Prints a line a second with the GPU it was given (placement sets CUDA_VISIBLE_DEVICES to it).
FOLLOWED_JOB = ["sh", "-c", 'for i in 1 2 3 4 5; do echo "step $i of 5 on GPU $CUDA_VISIBLE_DEVICES"; sleep 1; done']


def place_and_follow(env: dict[str, str], directory: Path) -> None:
    """`job submit --agent auto --min-free-vram 40GiB`, `serve` in the background, `job logs -f` until the
    job ends (its exit code is the command's), then `job show` (where and why it was placed)."""
    argv = [BIN / "hwledger", "job", "submit", "--agent", "auto", "--min-free-vram", "40GiB", "--", *FOLLOWED_JOB]
    print("$ " + shlex.join(str(a) for a in argv), flush=True)
    submitted = subprocess.run([str(a) for a in argv], env=env, cwd=REPO, capture_output=True, text=True,
                               check=False)
    sys.stdout.write(submitted.stdout + submitted.stderr)
    if submitted.returncode != 0:
        raise SystemExit(f"demo: the command above failed with exit code {submitted.returncode}")
    job_id = submitted.stdout.split()[0]
    argv = [BIN / "hwledger", "fleet", "serve", "--interval", "1"]
    print("$ " + shlex.join(str(a) for a in argv) + " &", flush=True)
    with open(directory / "serve-follow.log", "wb") as log:
        server = subprocess.Popen([str(a) for a in argv], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        run([BIN / "hwledger", "job", "logs", "-f", job_id], env=env)
        run([BIN / "hwledger", "job", "show", job_id], env=env)
    finally:
        server.terminate()
        server.wait(60)


def watch(env: dict[str, str], directory: Path) -> None:
    """`serve --http` for a few ticks with a job running: fetch /metrics and /api/fleet, screenshot the page."""
    import re  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    import urllib.request  # pylint: disable=import-outside-toplevel

    run([BIN / "hwledger", "job", "submit", "--agent", "mi100-box", "--", "sh", "-c", "echo training; sleep 8"],
        env=env)
    argv = [BIN / "hwledger", "fleet", "serve", "--interval", "2", "--max-ticks", "8", "--http", "127.0.0.1:0"]
    print("$ " + shlex.join(str(a) for a in argv) + " &", flush=True)
    log_path = directory / "serve-http.log"
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
            agents = json.loads(answer.read())
        print(f"$ curl {base}/api/fleet   # the JSON of hwledger fleet status --json")
        for item in agents:
            print(f"  {item['name']}: {item['state']}, {len(item['gpus'])} GPU(s)")
        chromium = shutil.which("chromium")
        if chromium is None:
            print("(no screenshot: chromium is not installed; apt-get install chromium)")
        else:
            shot = directory / "fleet.png"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--hide-scrollbars", f"--user-data-dir={directory / 'chromium'}", "--window-size=1280,960",
                            f"--screenshot={shot}", base + "/"], check=True, capture_output=True, timeout=180)
            print(f"the status page {base}/ as a browser shows it: {shown(shot)}")
        server.wait(120)  # its last ticks, and the job it runs
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
