"""What the benchmark measures, and how: wall time, controller CPU, processes, memory and disk.

Controller CPU of an approach = user+sys of everything it ran on the controller:
- the measuring process itself and the children it waited for (getrusage RUSAGE_SELF + RUSAGE_CHILDREN
  deltas; a waited-for child brings the CPU of its own waited-for children, e.g. ansible-playbook's
  forks and their ssh clients);
- plus the ssh ControlMaster processes of the bench's control dir. ssh daemonises a master out of the
  process tree, so rusage never sees it, yet it does the encryption of every multiplexed exec (and
  ansible-playbook's ssh clients use the same masters). Their CPU is read from /proc/PID/schedstat
  (nanoseconds of run time) before and after.
The simulated hosts (the bench's sshd and the probes it runs) share the same cores; their CPU is
reported apart as the fleet's, never as the controller's.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def rusage_cpu_s() -> float:
    """User+sys seconds of this process and of every child it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").rstrip("\0").split("\0") if raw else []


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from "state" on (the name may hold spaces)


def is_master(argv: list[str], control_dir: str) -> bool:
    """A backgrounded ssh ControlMaster of our control dir: its title is "ssh: <socket path> [mux]"."""
    return len(argv) == 1 and argv[0].startswith(f"ssh: {control_dir}/") and argv[0].endswith("[mux]")


def is_ssh_client(argv: list[str], control_dir: str) -> bool:
    """An ssh client (mux client or one still connecting) that uses our control dir."""
    return bool(argv) and os.path.basename(argv[0]) == "ssh" and any(
        arg == f"ControlPath={control_dir}/%C" or arg.startswith(f"ControlPath={control_dir}/") for arg in argv)


def is_ansible(argv: list[str]) -> bool:
    return any(os.path.basename(arg).startswith(("ansible-playbook", "ansible-runner")) for arg in argv[:3])


def master_pids(control_dir: str) -> list[int]:
    return [pid for pid in _pids() if is_master(_cmdline(pid), control_dir)]


def sched_cpu_s(pid: int) -> float | None:
    """Run time of one process in seconds (nanosecond counter), None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class MasterCpu:
    """CPU of the ssh masters of one control dir, summed; masters may appear (new connections) or go."""

    def __init__(self, control_dir: str):
        self.control_dir = control_dir

    def snapshot(self) -> dict[int, float]:
        found = {}
        for pid in master_pids(self.control_dir):
            cpu = sched_cpu_s(pid)
            if cpu is not None:
                found[pid] = cpu
        return found

    @staticmethod
    def delta(before: dict[int, float], after: dict[int, float]) -> float:
        # A master that exited in between took its CPU with it (rare: only when a host went away).
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def tree_cpu_s(root_pid: int) -> float:
    """utime+stime+cutime+cstime of a process and all its descendants (clock ticks; the fleet's sshd)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields is None:
            continue
        stats[pid] = fields
        children.setdefault(int(fields[1]), []).append(pid)
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        fields = stats.get(pid)
        if fields is not None:
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
        stack.extend(children.get(pid, []))
    return total * CLOCK_TICK_S


@dataclass
class Sample:
    wall_s: float
    cpu_s: float           # controller: process + waited children + ssh masters
    masters_cpu_s: float   # the masters' part of cpu_s
    fleet_cpu_s: float     # the simulated hosts (not controller CPU)


class Meter:
    """Measures one stretch of work: `with meter.measure() as sample: ...`."""

    def __init__(self, control_dir: str, fleet_pids: Iterable[int] = ()):
        self.masters = MasterCpu(control_dir)
        self.fleet_pids = list(fleet_pids)

    def _fleet(self) -> float:
        return sum(tree_cpu_s(pid) for pid in self.fleet_pids)

    def begin(self) -> tuple:
        # The /proc scans run outside the timed and rusage'd stretch.
        masters = self.masters.snapshot()
        fleet = self._fleet()
        return masters, fleet, rusage_cpu_s(), time.perf_counter()

    def end(self, start: tuple, *, extra_cpu_s: float = 0.0) -> Sample:
        wall = time.perf_counter()
        cpu = rusage_cpu_s()
        masters0, fleet0, cpu0, wall0 = start
        masters = MasterCpu.delta(masters0, self.masters.snapshot())
        fleet = self._fleet() - fleet0
        return Sample(wall - wall0, cpu - cpu0 + masters + extra_cpu_s, masters, fleet)


@dataclass
class Census:
    masters: int
    ssh_clients: int
    ansible: int

    def as_dict(self) -> dict:
        return {"ssh_masters": self.masters, "ssh_clients": self.ssh_clients, "ansible": self.ansible}


def census(control_dir: str, *, descendants_of: int | None = None) -> Census:
    """Live processes: our control dir's ssh masters and clients, and ansible processes (descendants of
    `descendants_of` when given, else any)."""
    pids = _pids()
    mine: set[int] | None = None
    if descendants_of is not None:
        children: dict[int, list[int]] = {}
        for pid in pids:
            fields = _stat_fields(pid)
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(pid)
        mine, stack = set(), [descendants_of]
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in mine:
                    mine.add(child)
                    stack.append(child)
    masters = clients = ansible = 0
    for pid in pids:
        argv = _cmdline(pid)
        if not argv:
            continue
        if is_master(argv, control_dir):
            masters += 1
        elif is_ssh_client(argv, control_dir):
            clients += 1
        elif is_ansible(argv) and (mine is None or pid in mine):
            ansible += 1
    return Census(masters, clients, ansible)


def rss_mb(pid: int | None = None) -> float:
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def disk_usage(paths: Iterable[Path]) -> tuple[int, int]:
    """(bytes, files) under the given paths (files and sockets; directories not counted)."""
    total = files = 0
    for top in paths:
        if not top.exists():
            continue
        for dirpath, _dirnames, filenames in os.walk(top):
            for name in filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
                files += 1
    return total, files


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]
