"""The benchmark's fleet: up to thousands of loopback GPU hosts served by one real sshd.

Layout (chosen over several sshd processes with 16 ListenAddress entries each):

    private network namespace hwl-<lab id>-bench (only `lo`, plus a veth pair for the black hole)
      - the bench process itself enters it (setns), so ssh, ansible-playbook and parallel-ssh run in it;
      - ONE sshd bound to 0.0.0.0:<port>: in a namespace whose only interface is `lo`, every 127.x.y.z
        address is local, so agent i is 127.10.<i // 250>.<i % 250 + 1>, a distinct address (and so a
        distinct ssh connection, ControlMaster and HostKeyAlias) per agent, yet nothing listens outside;
      - the remote PATH holds POSIX tools and a fake nvidia-smi that replays a real capture from
        tests/fixtures/gpu byte for byte (`exec cat`, no python);
      - a host whose tool hangs: a tests.lab loopback host whose nvidia-smi sleeps;
      - a black-holed address: 198.51.100.7 (TEST-NET-2) routed through a static neighbour onto a veth
        pair whose other end takes the frames and drops them, so a SYN is never answered (a "blackhole"
        route would fail at once with EINVAL instead of hanging). Nothing leaves the namespace.

Everything is registered as a tests.lab Lab (its id names the namespace, the login account and the
sshd config path), so a bench killed half-way is cleaned up by the next Lab, like a crashed test run.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lab import Lab, SshHost
from lab import system as lab_system
from lab import tools as lab_tools
from lab.sshd import sshd_base_config, sshd_version_options

CLONE_NEWNET = 0x40000000
SSHD = "/usr/sbin/sshd"
BLACKHOLE_ADDRESS = "198.51.100.7"
_BLACKHOLE_NEXT_HOP = "192.0.2.254"
_BLACKHOLE_SOURCE = "192.0.2.1/24"
_BLACKHOLE_MAC = "02:00:00:00:00:01"
HOSTS_PER_OCTET = 250
# Agent addresses set up as separate machines (see _per_address_environment); the largest default sweep.
DEFAULT_CAPACITY = 1000

DEFAULT_CAPTURE = "nvidia/csv-header-index-name-memtotal-memfree-driver-computecap-8xA800-SXM4-80GB.txt"
DEFAULT_QUERY_CMD = ("nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap "
                     "--format=csv")


class BenchUnavailable(RuntimeError):
    """The bench cannot run here (not root, no sshd, no network namespaces); the message says why."""


def bulk_address(index: int) -> str:
    if not 0 <= index < 250 * HOSTS_PER_OCTET:
        raise ValueError(f"host index {index} out of range")
    return f"127.10.{index // HOSTS_PER_OCTET}.{index % HOSTS_PER_OCTET + 1}"


def enter_netns(name: str) -> None:
    """Move this process (its main thread, before any other thread exists) into a named netns."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise BenchUnavailable(f"setns into {name} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Agent:
    """One [[agents]] entry of the bench and the host key it is pinned to."""

    entry: dict
    host_key_pub: str


class BenchFleet:
    """The namespace, the bulk sshd, the odd hosts and the client key; `stop()` removes all of it."""

    def __init__(self, root: Path, *, capture: str = DEFAULT_CAPTURE, query_cmd: str = DEFAULT_QUERY_CMD,
                 capacity: int = DEFAULT_CAPACITY):
        reason = _unavailable_reason()
        if reason:
            raise BenchUnavailable(reason)
        self.root = root
        self.capture = capture
        self.query_cmd = query_cmd
        self.capacity = capacity  # addresses that each get a remote machine's own runtime dir
        self.lab = Lab(root / "lab")
        self.netns = f"{lab_system.NAME_PREFIX}{self.lab.id}-bench"
        self.account = f"{lab_system.NAME_PREFIX}{self.lab.id}-bulk"
        self.bulk_dir = self.lab.root / "hosts" / "bulk"
        # Port 22 of the namespace's addresses: nothing else listens there (the lab's own hosts use
        # the lab's port), and a black-holed agent looks like any other host.
        self.port = 22
        self.sshd: subprocess.Popen | None = None
        self.hang_host: SshHost | None = None
        self.host_key_pub = ""
        self._account_made = False
        self._netns_made = False

    # -- set-up ------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._make_netns()
            enter_netns(self.netns)
            self._prepare_bulk()
            self._start_bulk_sshd()
            self._make_blackhole()
            self.hang_host = self.lab.add_loopback_host("hang", delay=3600.0)
        except BaseException:
            self.stop()
            raise

    def _make_netns(self) -> None:
        lab_system.run(["ip", "netns", "add", self.netns])
        self._netns_made = True
        lab_system.run(["ip", "-n", self.netns, "link", "set", "lo", "up"])

    def _make_blackhole(self) -> None:
        a, b = f"{lab_system.NAME_PREFIX}{self.lab.id}x", f"{lab_system.NAME_PREFIX}{self.lab.id}y"
        for argv in (
            ["ip", "link", "add", a, "type", "veth", "peer", "name", b],
            ["ip", "addr", "add", _BLACKHOLE_SOURCE, "dev", a],
            ["ip", "link", "set", a, "up"],
            ["ip", "link", "set", b, "up"],
            # A permanent neighbour entry: no ARP is ever sent (its failure would answer "no route" after
            # ~3 s); the frames go to the peer end, which is not that MAC, and are dropped there.
            ["ip", "neigh", "add", _BLACKHOLE_NEXT_HOP, "lladdr", _BLACKHOLE_MAC, "dev", a, "nud", "permanent"],
            ["ip", "route", "add", f"{BLACKHOLE_ADDRESS}/32", "via", _BLACKHOLE_NEXT_HOP],
        ):
            lab_system.run(argv)  # we are inside the namespace already

    def _prepare_bulk(self) -> None:
        home = self.bulk_dir / "home"
        (home / ".ssh").mkdir(mode=0o700, parents=True)
        self.bulk_dir.chmod(0o700)
        home.chmod(0o700)
        keys = home / ".ssh" / "authorized_keys"
        keys.write_text(Path(f"{self.lab.client_key}.pub").read_text())
        keys.chmod(0o600)
        bin_dir = self.bulk_dir / "bin"
        lab_tools.populate_bin_dir(bin_dir, python=False)
        output = self.bulk_dir / "nvidia-smi.stdout"
        output.write_bytes(lab_tools.capture_bytes(self.capture))
        tool = bin_dir / "nvidia-smi"
        # Replays the capture byte for byte; arguments are ignored (the query command is fixed).
        tool.write_text(f"#!/bin/sh\nexec cat {output}\n")
        tool.chmod(0o755)
        key = self.bulk_dir / "ssh_host_ed25519_key"
        lab_system.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hwledger-bench-bulk", "-f", str(key)])
        self.host_key_pub = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        lab_system.create_alias_account(self.account, home, self.lab.id)
        self._account_made = True
        config = [
            "# hwledger bench: every agent address of the namespace (generated by bench/fleet.py)",
            *sshd_base_config(
                listen=f"0.0.0.0:{self.port}",
                host_key=key,
                pid_file=self.bulk_dir / "sshd.pid",
                authorized_keys=keys,
                user=self.account,
                max_startups="2000:30:2000",
                max_sessions=64,
            ),
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel ERROR",  # no per-connection log lines: the bench measures the controller's disk
            *sshd_version_options(self.lab.sshd_version),
            *self._per_address_environment(bin_dir),
        ]
        (self.bulk_dir / "sshd_config").write_text("\n".join(config) + "\n")

    def _per_address_environment(self, bin_dir: Path) -> list[str]:
        """Match blocks that give each agent address its own XDG_RUNTIME_DIR: every address stands for a
        machine of its own, and per-machine state on the remote (the probe's single-flight lock) must not
        be shared among them. sshd keeps the first SetEnv it obtains, so the catch-all comes last."""
        runtime = self.bulk_dir / "run"
        runtime.mkdir(mode=0o700)
        env = f"PATH={bin_dir} {lab_system.MARKER_VAR}={self.lab.id}:bulk"
        lines = []
        for index in range(self.capacity):
            directory = runtime / str(index)
            directory.mkdir(mode=0o700)
            lines += [f"Match LocalAddress {bulk_address(index)}", f"    SetEnv {env} XDG_RUNTIME_DIR={directory}"]
        return [*lines, "Match all", f"    SetEnv {env} XDG_RUNTIME_DIR={runtime}"]

    def _start_bulk_sshd(self) -> None:
        log = open(self.bulk_dir / "sshd.log", "ab")
        with log:
            self.sshd = subprocess.Popen(
                [SSHD, "-D", "-f", str(self.bulk_dir / "sshd_config"), "-E", str(self.bulk_dir / "sshd.log")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={"PATH": lab_system.SYSTEM_PATH, "LC_ALL": "C", lab_system.MARKER_VAR: f"{self.lab.id}:bulk"},
                preexec_fn=lab_system.die_with_parent, close_fds=True)
        deadline = time.monotonic() + 10
        import socket
        while True:
            try:
                with socket.create_connection((bulk_address(0), self.port), timeout=2) as sock:
                    if sock.makefile("rb").readline().startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            if self.sshd.poll() is not None or time.monotonic() > deadline:
                raise BenchUnavailable(f"the bench sshd did not start; see {self.bulk_dir / 'sshd.log'}")
            time.sleep(0.05)

    # -- agents ------------------------------------------------------------------------------

    def bulk_agents(self, n: int) -> list[Agent]:
        return [Agent({"name": f"gpu-{i:04d}", "hostname": bulk_address(i), "ssh_user": self.account,
                       "ssh_key_path": str(self.lab.client_key), "ssh_port": self.port,
                       "gpu_query_cmd": self.query_cmd}, self.host_key_pub) for i in range(n)]

    def hang_agent(self) -> Agent:
        assert self.hang_host is not None
        return Agent(self.hang_host.agent_entry(name="hang-tool"), self.hang_host.host_key_pub)

    def blackhole_agent(self) -> Agent:
        # Never reached, so never pinned: a key is listed all the same so that nothing could be learned.
        return Agent({"name": "blackholed", "hostname": BLACKHOLE_ADDRESS, "ssh_user": self.account,
                      "ssh_key_path": str(self.lab.client_key), "ssh_port": 22,
                      "gpu_query_cmd": self.query_cmd}, self.host_key_pub)

    @property
    def fleet_pids(self) -> list[int]:
        pids = [self.sshd.pid] if self.sshd is not None and self.sshd.poll() is None else []
        if self.hang_host is not None and self.hang_host.pid:
            pids.append(self.hang_host.pid)
        return pids

    # -- teardown ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop sshd and every session, the lab, the account and the namespace (by pid, by name)."""
        errors = []
        if self.sshd is not None:
            try:
                lab_system.terminate(self._bulk_processes(), reap=self.sshd.poll)
            except lab_system.LabError as exc:
                errors.append(str(exc))
            self.sshd.wait(timeout=5)
            self.sshd = None
        try:
            self.lab.stop()
        except lab_system.LabError as exc:
            errors.append(str(exc))
        if self._account_made:
            lab_system.delete_account(self.account)
            self._account_made = False
        if self._netns_made:
            # The namespace lives on while this process is in it; deleting the name is what matters
            # (the veths go with the namespace when the process exits).
            lab_system.run(["ip", "netns", "delete", self.netns], check=False)
            self._netns_made = False
        if errors:
            raise RuntimeError("bench teardown was incomplete: " + "; ".join(errors))

    def _bulk_processes(self) -> set[int]:
        """The bulk sshd, its connection processes and every session process (found by the marker
        that sshd's SetEnv gives them, even when re-parented), each with its descendants."""
        marker = f"{self.lab.id}:bulk"
        roots = {self.sshd.pid} if self.sshd is not None else set()
        # lab_processes leaves out a root that has already exited; the sshd pid is kept all the same, as
        # stop() signals it and then reaps it with Popen.poll.
        return lab_system.lab_processes(lambda value: value == marker, roots=roots) | roots


def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return ("the benchmark starts sshd, a login account and a network namespace, so it needs root "
                f"(running as uid {os.geteuid()}); run `sudo make bench`")
    if not os.access(SSHD, os.X_OK):
        return f"openssh-server is not installed ({SSHD} is missing): apt-get install openssh-server"
    for tool in ("ssh", "ssh-keygen", "ip", "useradd"):
        if lab_system.run(["sh", "-c", f"command -v {tool}"], check=False).returncode != 0:
            return f"`{tool}` is missing; the benchmark needs openssh-client, iproute2 and passwd"
    return None
