"""The demo fleet: real sshd GPU hosts that outlive the command that started them, until `make demo-down`.

Why a supervisor process: the lab's sshd processes die with the process that started them (the kernel's
parent-death signal, lab/system.py die_with_parent), and the next lab or test run removes what a lab of a
dead process left behind (lab/lab.py reap_stale_labs). So a fleet that must stay up after `make demo`
exits is owned by a process of its own: `python -m demo.supervisor DIR`, started detached (a new session,
no terminal, its output in DIR/fleet.log) by `start`. It creates the Lab (so the lab registry names it
as the owner, and reaping leaves the lab alone while it runs), starts the hosts, writes DIR/fleet.json
(what the tour and the user need: addresses, logins, host key fingerprints) and waits. SIGTERM makes it
take the whole lab down (processes, network namespaces, accounts) and exit; `stop` sends it and waits.
If the supervisor died some other way, its sshd died with it and `stop` has the lab's leftovers reaped.

The hosts log in with ordinary accounts (Lab(..., unprivileged=True)): nothing of hwledger needs root
on a GPU host, and a fleet left running for a newcomer to play with should not add uid-0 logins.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab import Lab, LabUnavailable, netns, reap_stale_labs, system  # noqa: E402
from lab.lab import REMOTE_ROOT_BASE, REMOTE_ROOT_PREFIX  # noqa: E402
from lab.system import NAME_PREFIX, is_alive, start_time  # noqa: E402

STATE_FILE = "fleet.json"
LOG_FILE = "fleet.log"
START_TIMEOUT_S = 120.0  # four sshd hosts and two namespaces; minutes only on a machine that is very busy
STOP_TIMEOUT_S = 60.0

# Real captures the demo hosts replay, with the command each was captured with (tests/fixtures/gpu/SOURCES.md).
A800_CAPTURE = "nvidia/csv-header-index-name-memtotal-memfree-driver-computecap-8xA800-SXM4-80GB.txt"
A800_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap --format=csv"
MI100_CAPTURE = "rocm/json-pretty-telegraf-allinfo-4xMI100-rocm6.0.2.json"
MI100_CMD = "rocm-smi -a --json"


class DemoError(RuntimeError):
    """The demo fleet could not be started or stopped; the message says why and what to look at."""


@dataclass(frozen=True)
class Login:
    user: str
    address: str
    port: int
    host_key_fingerprint: str


@dataclass(frozen=True)
class DemoHost:
    name: str
    login: Login
    gpu_query_cmd: str
    python3: str | None  # the host's python3, for hosts that have one (jobs need it)
    bastion: Login | None


@dataclass(frozen=True)
class FleetState:
    """What DIR/fleet.json says about a running demo fleet."""

    pid: int
    start_time: int | None
    lab_id: str
    client_key: str
    hosts: tuple[DemoHost, ...]

    @classmethod
    def read(cls, directory: Path) -> "FleetState | None":
        try:
            data = json.loads((directory / STATE_FILE).read_text())
            hosts = tuple(
                DemoHost(h["name"], Login(**h["login"]), h["gpu_query_cmd"], h["python3"],
                         Login(**h["bastion"]) if h["bastion"] else None)
                for h in data["hosts"])
            return cls(int(data["pid"]), data["start_time"], str(data["lab_id"]), str(data["client_key"]), hosts)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, directory: Path) -> None:
        tmp = directory / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, directory / STATE_FILE)

    @property
    def alive(self) -> bool:
        """Whether its supervisor still runs (the same process: pid and start time; a zombie has ended)."""
        return start_time(self.pid) == self.start_time and is_alive(self.pid)

    def host(self, name: str) -> DemoHost:
        return next(host for host in self.hosts if host.name == name)


# --- inside the supervisor ------------------------------------------------------------------------


def start_hosts(lab: Lab) -> list:
    """The demo's GPU hosts: an A800 box and an MI100 box on loopback, and a GPU host reachable only
    through a bastion when network namespaces are available."""
    hosts = [
        lab.add_loopback_host("a800-box", capture=A800_CAPTURE, python=True),
        lab.add_loopback_host("mi100-box", tool="rocm-smi", capture=MI100_CAPTURE, python=True),
    ]
    hosts[0].gpu_query_cmd = A800_CMD
    hosts[1].gpu_query_cmd = MI100_CMD
    try:
        _bastion, internal = lab.add_bastion_pair("private-gpu")  # the default query and its output
        hosts.append(internal)
    except LabUnavailable as exc:
        print(f"(no bastion host in this demo: {exc})", flush=True)
    return hosts


def _login(host) -> Login:
    return Login(host.user, host.address, host.port, host.host_key_fingerprint)


def state_of(lab: Lab, hosts: list) -> FleetState:
    return FleetState(
        pid=os.getpid(), start_time=start_time(os.getpid()), lab_id=lab.id, client_key=str(lab.client_key),
        hosts=tuple(DemoHost(h.name, _login(h), h.gpu_query_cmd,
                             str(h.bin_dir / "python3") if (h.bin_dir / "python3").exists() else None,
                             _login(h.bastion) if h.bastion is not None else None) for h in hosts))


# --- from the outside -----------------------------------------------------------------------------


def running(directory: Path) -> FleetState | None:
    """The demo fleet of `directory` while its supervisor runs, else None."""
    state = FleetState.read(directory)
    return state if state is not None and state.alive else None


def start(directory: Path) -> FleetState:
    """Start a supervisor for `directory` (which must exist) and wait until its hosts are up. If that fails
    or is interrupted (Ctrl-C), the supervisor is stopped and what it made is removed: no fleet is left
    up that nobody was told about."""
    (directory / STATE_FILE).unlink(missing_ok=True)
    with open(directory / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with  # it outlives this process on purpose
            [sys.executable, "-m", "demo.supervisor", str(directory)], cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, close_fds=True, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            state = FleetState.read(directory)
            if state is not None and state.pid == proc.pid:
                return state
            if proc.poll() is not None:
                raise DemoError(f"the demo fleet did not start (exit status {proc.returncode}); "
                                f"{directory / LOG_FILE} ends with:\n{_tail(directory / LOG_FILE)}")
            if time.monotonic() > deadline:
                raise DemoError(f"the demo fleet did not come up in {START_TIMEOUT_S:.0f} s; "
                                f"{directory / LOG_FILE} ends with:\n{_tail(directory / LOG_FILE)}")
            time.sleep(0.1)
    except BaseException:
        if proc.poll() is None:
            proc.terminate()  # the supervisor takes down what it started
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reap_stale_labs()  # what a supervisor that died half-way left (its lab's owner is dead now)
        (directory / STATE_FILE).unlink(missing_ok=True)
        raise


def stop(directory: Path) -> str:
    """Take the demo fleet of `directory` down: its ssh masters, then its supervisor (which stops every
    host, namespace and account); returns what was done, for the user."""
    state = FleetState.read(directory)
    if state is None:
        return f"no demo fleet in {directory}; nothing to stop"
    _exit_ssh_masters(directory)
    if state.alive:
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while state.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        if state.alive:
            os.kill(state.pid, signal.SIGKILL)  # its sshd die with it; the reaping below does the rest
            while state.alive:
                time.sleep(0.05)
    # A supervisor that did not finish (killed, crashed, the machine rebooted) leaves a stale lab.
    reap_stale_labs()
    left = leftovers(state.lab_id)
    if left:
        raise DemoError(f"the demo fleet (lab {state.lab_id}) did not go away completely: {'; '.join(left)}; "
                        f"see {directory / LOG_FILE}")
    (directory / STATE_FILE).unlink(missing_ok=True)
    return (f"the demo fleet in {directory} is stopped: no sshd host, namespace or account of it is left "
            "(its files stay there until make clean)")


def leftovers(lab_id: str) -> list[str]:
    """What of the lab `lab_id` still exists: processes, network namespaces, accounts, its remote root."""
    prefix = f"{NAME_PREFIX}{lab_id}-"
    found = []
    pids = sorted(p.pid for p in system.scan_processes()
                  if any(m.startswith(f"{lab_id}:") for m in p.markers) or system.sshd_title_user(p.sshd_title)
                  .startswith(prefix))
    if pids:
        found.append(f"processes {pids}")
    namespaces = [name for name in netns.list_namespaces() if name.startswith(prefix)]
    if namespaces:
        found.append(f"network namespaces {namespaces}")
    accounts = [name for name in system.lab_accounts() if name.startswith(prefix)]
    if accounts:
        found.append(f"accounts {accounts}")
    roots = sorted(str(path) for path in Path(REMOTE_ROOT_BASE).glob(f"{REMOTE_ROOT_PREFIX}{lab_id}-*"))
    if roots:
        found.append(f"directories {roots}")
    return found


def _exit_ssh_masters(directory: Path) -> None:
    """`ssh -O exit` for the demo's agents: their masters (ControlPersist) would end with the hosts
    anyway; asking first ends them at once and cleanly."""
    # Imported here: the app is only needed when there is a fleet whose masters to end.
    from hwledger.errors import UserError  # pylint: disable=import-outside-toplevel
    from hwledger.ssh_masters import exit_control_masters  # pylint: disable=import-outside-toplevel
    from hwledger.fleet import Fleet  # pylint: disable=import-outside-toplevel

    fleet = Fleet(directory / "ssh-agents.toml", directory / "known_hosts", directory / "fleet.db")
    try:
        agents = fleet.load_agents()
        if agents and fleet.data_dir.is_dir():
            exit_control_masters(agents, fleet.policy())
    except UserError:
        pass  # an agents file the user broke: the masters still end with the hosts


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
