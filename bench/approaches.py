"""The three ways of asking every host once, run side by side on the same hosts.

(a) floor        parallel-ssh (libssh2), connections kept open in one worker process
(b) ansible_raw  `ansible-playbook` with one `raw` task, forks = the same parallelism, the product's
                 per-host ssh options (so the same warm ControlMasters)
(c) hwledger     the product's heartbeat tick exactly as `hwledger fleet serve` runs it:
                 `Server.tick()` (re-reads ssh-agents.toml, asks the store which agents to ask, runs
                 the transport, records every outcome and state in the SQLite store) with the
                 `SshFanoutHeartbeat` transport.
(d) hwledger_ansible  the same tick with `--transport ansible` (ansible-runner, hwledger.fleet.heartbeat_facts).
All three run the same remote command (the probe script under /bin/sh), so the hosts do the same work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import hostvars, probe, ssh

from bench.fleet import Agent
from bench.measure import Meter, Sample
from hwledger.fanout import SshFanoutHeartbeat
from hwledger.fleet import Fleet
from hwledger.server import Server, TickReport  # the bench drives the serve loop itself, as the tests do
from lab import write_agents_toml

REPO = Path(__file__).resolve().parents[1]


def bench_command(query_cmd: str, timeout_s: float) -> str:
    """The remote command (a) and (b) run: the product's probe, wrapped as the product sends it."""
    return probe.ssh_command(probe.remote_script(query_cmd, timeout_s=timeout_s, host_metrics=True))


@dataclass
class FleetFiles:
    """The controller's files, where `hwledger fleet serve` would find them."""

    data_dir: Path

    @property
    def fleet(self) -> Fleet:
        return Fleet(self.data_dir / "ssh-agents.toml", self.data_dir / "known_hosts", self.data_dir / "fleet.db")

    def write(self, agents: list[Agent]) -> list[agents_schema.Agent]:
        """Write ssh-agents.toml and the pinned keys (as register-ssh pins them: per-agent HostKeyAlias)."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fleet = self.fleet
        write_agents_toml(fleet.config, [a.entry for a in agents])
        parsed = [agents_schema.agent_from_dict(a.entry) for a in agents]
        lines = "".join(f"{ssh.known_hosts_alias(p)} {a.host_key_pub}\n" for p, a in zip(parsed, agents))
        fd = os.open(fleet.known_hosts, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(lines)
        return parsed


class Product:
    """(c): one resident Server with the fan-out transport, as `hwledger fleet serve` holds it."""

    def __init__(self, files: FleetFiles, *, query_timeout_s: float, max_parallel: int, on_outcome=None):
        fleet = files.fleet
        self.transport = SshFanoutHeartbeat(fleet.policy(), query_timeout_s=query_timeout_s,
                                            max_parallel=max_parallel, on_outcome=on_outcome)
        self.server = Server(fleet, transport=self.transport, query_timeout_s=int(query_timeout_s))
        self.server.recover()
        self.control_dir = str(fleet.policy().control_dir)

    def tick(self, meter: Meter) -> tuple[Sample, TickReport]:
        start = meter.begin()
        report = self.server.tick()
        return meter.end(start), report

    def close(self, *, exit_masters: bool = False) -> None:
        self.server.close()
        self.transport.close(exit_masters=exit_masters)


class AnsibleTransport:
    """(d): the same serve tick with `--transport ansible`: `Server.tick()` with AnsibleHeartbeat, i.e. the
    `hwledger.fleet.heartbeat_facts` playbook through ansible-runner (AnsibleRuns), forks as (b)."""

    def __init__(self, files: FleetFiles, *, query_timeout_s: float, forks: int):
        self.server = Server(files.fleet, query_timeout_s=int(query_timeout_s))
        self.server.runs.forks = forks  # the transport's AnsibleRuns: the same parallelism as (b)
        self.server.recover()

    def tick(self, meter: Meter) -> tuple[Sample, TickReport]:
        start = meter.begin()
        report = self.server.tick()
        return meter.end(start), report

    def close(self) -> None:
        self.server.close()


class Floor:
    """(a): the parallel-ssh worker; its CPU is its own rusage (it starts no processes)."""

    def __init__(self, agents: list[agents_schema.Agent], command: str, pool_size: int):
        first = agents[0]
        spec = {"hosts": [a.hostname for a in agents], "user": first.ssh_user, "port": first.ssh_port,
                "key": first.ssh_key_path, "pool_size": pool_size, "command": command}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.floor_worker"], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._send(json.dumps(spec))
        ready = self._receive()
        if "error" in ready:
            self.close()
            raise RuntimeError(ready["error"])
        self.connect = ready["connect"]

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the parallel-ssh worker exited early")
        return json.loads(line)

    def round(self, meter: Meter) -> tuple[Sample, int]:
        start = meter.begin()
        self._send("round")
        answer = self._receive()
        sample = meter.end(start)
        # The worker's own CPU, not the bench's: the bench only waited on a pipe.
        sample.cpu_s = answer["cpu_s"] + sample.masters_cpu_s
        sample.wall_s = answer["wall_s"]
        return sample, answer["ok"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send("quit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


_PLAYBOOK = """\
# (b) of the benchmark: one raw task per host (the product's probe script), nothing else.
- name: hwledger bench, one raw task
  hosts: hwledger_agents
  gather_facts: false
  tasks:
    - name: Run the probe
      ansible.builtin.raw: "{{ hwledger_bench_command }}"
"""

_ANSIBLE_CFG = """\
[defaults]
host_key_checking = True
gathering = explicit
retry_files_enabled = False
interpreter_python = auto_silent
forks = {forks}
local_tmp = {tmp}
"""


class AnsibleRaw:
    """(b): `ansible-playbook` with one raw task, forks matched, the product's per-host ssh options."""

    def __init__(self, workdir: Path, agents: list[agents_schema.Agent], policy: ssh.SshPolicy,
                 command: str, forks: int):
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (workdir / "tmp").mkdir(mode=0o700, exist_ok=True)
        (workdir / "ansible.cfg").write_text(_ANSIBLE_CFG.format(forks=forks, tmp=workdir / "tmp"))
        (workdir / "raw.yml").write_text(_PLAYBOOK)
        (workdir / "inventory.json").write_text(json.dumps(hostvars.inventory(agents, policy)))
        # !unsafe: the script is data for the task, never a template. JSON strings are YAML strings.
        (workdir / "vars.yml").write_text(f"hwledger_bench_command: !unsafe {json.dumps(command)}\n")
        self.workdir = workdir
        self.forks = forks
        venv_bin = Path(sys.executable).parent
        self.env = {"PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": os.environ.get("HOME", "/root"),
                    "LC_ALL": "C.UTF-8", "ANSIBLE_CONFIG": str(workdir / "ansible.cfg"),
                    "ANSIBLE_HOST_KEY_CHECKING": "True"}
        self.argv = [str(venv_bin / "ansible-playbook"), "-i", str(workdir / "inventory.json"),
                     "-e", f"@{workdir / 'vars.yml'}", "-f", str(forks), str(workdir / "raw.yml")]

    def run(self, meter: Meter) -> tuple[Sample, int]:
        start = meter.begin()
        proc = subprocess.run(self.argv, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        sample = meter.end(start)
        ok = _recap_ok(proc.stdout)
        if proc.returncode != 0 and ok == 0:
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            raise RuntimeError(f"ansible-playbook failed (rc {proc.returncode}):\n{tail}")
        return sample, ok


def _recap_ok(output: str) -> int:
    """Hosts with ok=1 and no failure in the PLAY RECAP."""
    ok = 0
    for line in output.splitlines():
        if " : ok=" in line:
            fields = dict(part.split("=", 1) for part in line.split(" : ", 1)[1].split() if "=" in part)
            ok += int(fields.get("ok", "0") != "0" and fields.get("failed", "0") == "0"
                      and fields.get("unreachable", "0") == "0")
    return ok
