"""Real sshd test hosts: loopback hosts on 127.0.x.y and bastion pairs in network namespaces.

Layout of a lab's private root (0700)::

    client_ed25519[.pub]   the controller key every host accepts
    known_hosts            one pinned line per host ("[address]:port ssh-ed25519 ...")
    hosts/<name>/          sshd_config, ssh_host_ed25519_key[.pub], sshd.pid, sshd.log (LogLevel VERBOSE)
                 bin/      the remote PATH: POSIX tools and the fake GPU tools
                 tools/    the fake tools' behaviour files (see tools.py)
                 home/     HOME of the host's login account, with .ssh/authorized_keys

With ``Lab(root, unprivileged=True)`` each host logs in with an ordinary account instead of a uid-0
alias (see system.create_alias_account for why the tests use the alias). Such an account cannot reach
into the private root, so ``bin/``, ``tools/`` and ``home/`` move to ``/tmp/hwledger-lab-<id>-XXXXXX/<name>/``
(0711, root's; HOME and tools/ are the account's), and sshd's own files stay in the root.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import itertools
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import netns, system, tools
from .sshd import sshd_base_config, sshd_version_options
from .system import LabError, LabUnavailable

SSHD = "/usr/sbin/sshd"
# Where an unprivileged lab keeps what its logins see (see the module's notes).
REMOTE_ROOT_BASE = "/tmp"
REMOTE_ROOT_PREFIX = "hwledger-lab-"
_REMOTE_ROOT_NAME = re.compile(re.escape(REMOTE_ROOT_PREFIX) + r"([0-9a-f]{6})-[A-Za-z0-9_]{1,32}")
_HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
_START_TIMEOUT = 10.0


def lab_unavailable_reason() -> str | None:
    """Why the lab cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return (
            "the real-SSH test lab needs root (it runs sshd under its own config, adds login accounts "
            f"and network namespaces); running as uid {os.geteuid()}"
        )
    if not os.access(SSHD, os.X_OK):
        return f"openssh-server is not installed ({SSHD} is missing): apt-get install openssh-server"
    for tool in ("ssh", "ssh-keygen", "useradd", "userdel", "ip"):
        if shutil.which(tool, path=system.SYSTEM_PATH) is None:
            return f"`{tool}` is not installed; the test lab needs openssh-client, passwd and iproute2"
    return None


def _key_fingerprint(pub_line: str) -> str:
    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _keygen(path: Path, comment: str) -> str:
    """A new ed25519 key at ``path`` (replacing any); returns its public line without the comment."""
    path.unlink(missing_ok=True)
    Path(f"{path}.pub").unlink(missing_ok=True)
    system.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def _known_hosts_pattern(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def known_hosts_line(alias: str, host: SshHost) -> str:
    """A known_hosts line pinning ``host``'s current key under ``alias`` (a HostKeyAlias or pattern)."""
    return f"{alias} {host.host_key_pub}"


def _sshd_version() -> tuple[int, int]:
    proc = system.run([SSHD, "-V"], check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", proc.stderr + proc.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class SshHost:
    """One real sshd: its own config, host key, login account, log, remote PATH and fake tools.

    ``user`` is an account created for this host (name ``hwl-<lab id>-<n>``, login shell /bin/sh, HOME
    ``home``): a uid-0 alias, root as far as files and processes go, or in an unprivileged lab an
    ordinary account. sshd starts /bin/sh for it, which reads no rc file, so the remote PATH is exactly
    ``bin_dir`` (see system.create_alias_account for why root itself would not do).
    """

    def __init__(
        self,
        lab: Lab,
        name: str,
        *,
        user: str,
        address: str,
        port: int,
        netns_name: str | None = None,
        probe_netns: str | None = None,
        bastion: SshHost | None = None,
        forwarding: bool = False,
    ) -> None:
        self.lab = lab
        self.name = name
        self.user = user
        self.address = address
        self.port = port
        self.netns = netns_name  # the namespace sshd runs in; None: the root namespace
        self.bastion = bastion
        self.forwarding = forwarding
        self.gpu_query_cmd = tools.DEFAULT_GPU_QUERY_CMD
        # Sessions sshd allows on one connection (MaxSessions); a shared-cluster host may allow only one.
        self.max_sessions = 200
        self.dir = lab.root / "hosts" / name
        # What the login account sees: inside the private root for a uid-0 alias, else the lab's remote root.
        self.remote_dir = self.dir if lab.remote_root is None else lab.remote_root / name
        self.bin_dir = self.remote_dir / "bin"
        self.tools_dir = self.remote_dir / "tools"
        self.home = self.remote_dir / "home"
        # The login's XDG_RUNTIME_DIR (private, its own): per-machine runtime state such as the probe's
        # single-flight lock is the host's own, as on separate machines.
        self.runtime_dir = self.remote_dir / "run"
        self.config_path = self.dir / "sshd_config"
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        self.log_path = self.dir / "sshd.log"
        self.pid_path = self.dir / "sshd.pid"
        self.host_key_pub = ""
        self.host_key_fingerprint = ""
        self._probe_netns = probe_netns  # where a readiness probe can reach us from (None: here)
        self._process: subprocess.Popen[bytes] | None = None
        self._start_mark = 0

    def __repr__(self) -> str:
        return f"SshHost({self.name!r}, {self.user}@{self.address}:{self.port}, running={self.running})"

    # --- identity ---------------------------------------------------------------------------------

    @property
    def marker(self) -> str:
        """The HWLEDGER_LAB_HOST value every process of this host carries in its environment."""
        return f"{self.lab.id}:{self.name}"

    @property
    def known_hosts_pattern(self) -> str:
        return _known_hosts_pattern(self.address, self.port)

    def known_hosts_line(self, alias: str | None = None) -> str:
        return known_hosts_line(alias or self.known_hosts_pattern, self)

    def _prepare(self, *, python: bool, owner: tuple[int, int] | None) -> None:
        """Create the host's files; ``owner`` (uid, gid) of an ordinary login account gets HOME and tools/."""
        self.dir.mkdir(mode=0o700, parents=True)
        if self.remote_dir != self.dir:
            self.remote_dir.mkdir()
            self.remote_dir.chmod(0o755)  # whatever the umask: the login passes through it
        # StrictModes: sshd checks the key file and every directory up to HOME (then stops), so
        # HOME and .ssh must be owned by root or the login and not group/world writable; /tmp above is fine.
        (self.home / ".ssh").mkdir(mode=0o700, parents=True)
        self.home.chmod(0o700)
        keys = self.home / ".ssh" / "authorized_keys"
        keys.write_text(Path(f"{self.lab.client_key}.pub").read_text())
        keys.chmod(0o600)
        tools.populate_bin_dir(self.bin_dir, python=python)
        self.tools_dir.mkdir()
        self.tools_dir.chmod(0o755)
        self.runtime_dir.mkdir(mode=0o700)
        if owner is not None:
            # The login writes in HOME (Ansible's ~/.ansible), tools/ (the fake tools' call logs) and its
            # runtime dir.
            for path in (self.home, self.home / ".ssh", keys, self.tools_dir, self.runtime_dir):
                os.chown(path, *owner)
        self._new_host_key()

    def _new_host_key(self) -> None:
        self.host_key_pub = _keygen(self.host_key_path, f"hwledger-lab-host-{self.name}")
        self.host_key_fingerprint = _key_fingerprint(self.host_key_pub)

    def _write_config(self) -> None:
        lines = [
            f"# hwledger test lab host {self.name} (generated by the lab package; rewritten at every start)",
            *sshd_base_config(
                listen=f"{self.address}:{self.port}",
                host_key=self.host_key_path,
                pid_file=self.pid_path,
                authorized_keys=f"{self.home}/.ssh/authorized_keys",
                user=self.user,
                max_startups="1000:30:1000",
                max_sessions=self.max_sessions,
                tcp_forwarding=self.forwarding,
            ),
            "PermitUserEnvironment no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            # Applied after sshd's own defaults, so it is the remote PATH (the login shell is /bin/sh,
            # which reads no rc file that could change it).  The marker finds the sessions at stop().
            # XDG_RUNTIME_DIR: per-machine, per-user runtime state (the probe's single-flight lock) is
            # the host's own, as on separate machines, though every lab host runs on this one.
            f"SetEnv PATH={self.bin_dir} XDG_RUNTIME_DIR={self.runtime_dir} {system.MARKER_VAR}={self.marker}",
            *sshd_version_options(self.lab.sshd_version),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    # --- process ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The sshd listener's pid while it runs."""
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start sshd (same address, port and host key as before) and wait until it accepts connections."""
        if self.running:
            return
        if self.lab.stopped:
            raise LabError(f"lab host {self.name}: its lab has been stopped; create a new Lab")
        self._write_config()
        self._start_mark = self.log_mark()
        argv = [SSHD, "-D", "-f", str(self.config_path), "-E", str(self.log_path)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]  # execs sshd: the pid stays the same
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={"PATH": system.SYSTEM_PATH, "LC_ALL": "C", system.MARKER_VAR: self.marker},
                # The kernel's parent-death signal follows the creating *thread*: only tie sshd to
                # the main thread, which lives as long as the process.
                preexec_fn=system.die_with_parent if threading.current_thread() is threading.main_thread() else None,
                close_fds=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        listening = f"Server listening on {self.address} port {self.port}."
        while listening not in self.log_text(since=self._start_mark):
            if self._process is None or self._process.poll() is not None:
                raise LabError(f"sshd for lab host {self.name} exited at start; its log:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise LabError(f"sshd for lab host {self.name} did not start listening; its log:\n{self._log_tail()}")
            time.sleep(0.005)
        self._probe_banner()

    def _probe_banner(self) -> None:
        """Connect and read the SSH banner: proof that sshd accepts and serves connections.

        (The log therefore starts with one unauthenticated connection; use log_mark()/log_text(since=).)"""
        if self._probe_netns is None:
            banner = _read_banner(self.address, self.port)
        else:
            code = (
                "import socket,sys\n"
                "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
                "sys.stdout.write(s.makefile('rb').readline().decode('latin-1'))\n"
            )
            argv = ["ip", "netns", "exec", self._probe_netns, sys.executable, "-c", code, self.address, str(self.port)]
            banner = system.run(argv).stdout
        if not banner.startswith("SSH-2.0-"):
            raise LabError(f"lab host {self.name} answered {banner!r} instead of an SSH banner")

    def processes(self) -> set[int]:
        """Pids of everything this host runs now: the sshd listener, its per-connection sshd
        processes and every session command (a fake tool's sleep included)."""
        listener = [self._process.pid] if self._process is not None else []
        return system.lab_processes(
            lambda marker: marker == self.marker,
            roots=listener,
            title_matches=lambda title: system.sshd_title_user(title) == self.user
            or f" -f {self.config_path} " in title,
        )

    def stop(self) -> None:
        """Take the host down: the listener and every session process it started (by pid)."""
        pids = self.processes()

        def reap() -> None:
            if self._process is not None:
                self._process.poll()

        system.terminate(pids, reap=reap)
        if self._process is not None:
            self._process.wait(timeout=5)
        self._process = None

    def rotate_host_key(self) -> None:
        """New host key; sshd restarted on the same address and port.

        The lab's known_hosts keeps the old key, so strict host key checking now fails for this host
        (use Lab.trust(host) to pin the new one)."""
        was_running = self.running
        self.stop()
        self._new_host_key()
        if was_running:
            self.start()

    # --- fake tools -------------------------------------------------------------------------------

    def set_tool(
        self,
        tool: str = "nvidia-smi",
        *,
        capture: str | None = None,
        stdout: str | bytes | None = None,
        stderr: str | bytes = "",
        rc: int = 0,
        delay: float = 0.0,
    ) -> None:
        """Install (or change) a fake GPU tool on the remote PATH; takes effect for the next call.

        capture: a file relative to tests/fixtures/gpu replayed byte for byte as stdout; stdout: literal
        output instead; neither: the default query's output for nvidia-smi, nothing for others."""
        tools.check_tool_name(tool)
        output = tools.stdout_for(tool, capture, stdout)
        tools.write_behaviour(self.tools_dir, tool, stdout=output, stderr=stderr, rc=rc, delay=delay)
        tools.install_tool(self.bin_dir, self.tools_dir, tool)

    def remove_tool(self, tool: str = "nvidia-smi") -> None:
        """Take a fake tool off the remote PATH (the remote shell then answers 'not found', rc 127)."""
        tools.remove_tool(self.bin_dir, tool)

    def tool_calls(self, tool: str = "nvidia-smi") -> list[str]:
        """The arguments the fake tool was called with, one space-joined string per call."""
        return tools.read_calls(self.tools_dir, tool)

    # --- logs -------------------------------------------------------------------------------------

    def log_mark(self) -> int:
        """A position in the sshd log; pass it to log_text(since=...) to see only what came after."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- client side ------------------------------------------------------------------------------

    def agent_entry(self, **overrides: Any) -> dict[str, Any]:
        """An [[agents]] dict for ssh-agents.toml; an override of None drops that key."""
        entry: dict[str, Any] = {
            "name": self.name,
            "hostname": self.address,
            "ssh_user": self.user,
            "ssh_key_path": str(self.lab.client_key),
            "ssh_port": self.port,
            "gpu_query_cmd": self.gpu_query_cmd,
        }
        if self.bastion is not None:
            entry["bastion"] = {
                "hostname": self.bastion.address,
                "ssh_user": self.bastion.user,
                "ssh_key_path": str(self.lab.client_key),
                "ssh_port": self.bastion.port,
            }
        for key, value in overrides.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        return entry

    def ssh_options(self, known_hosts: str | os.PathLike[str] | None = None, *, via_bastion: bool = True) -> list[str]:
        """ssh options (before the destination) that log in to this host with strict host key checking
        against ``known_hosts`` (default: the lab's), through the bastion for an internal host
        (via_bastion=False: a direct attempt, which must fail for an internal host)."""
        known = str(known_hosts if known_hosts is not None else self.lab.known_hosts)
        options = [
            "-F", "/dev/null",  # no user or system ssh_config
            "-i", str(self.lab.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=5",
            "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            "-p", str(self.port),
            "-l", self.user,
        ]  # fmt: skip
        if self.bastion is not None and via_bastion:
            jump = [self.lab.ssh, *self.bastion.ssh_options(known_hosts), "-W", "%h:%p", self.bastion.address]
            options += ["-o", f"ProxyCommand={shlex.join(jump)}"]
        return options

    def ssh_argv(
        self,
        cmd: str | None = None,
        known_hosts: str | os.PathLike[str] | None = None,
        *,
        via_bastion: bool = True,
    ) -> list[str]:
        """A full ssh command line that runs ``cmd`` on this host (an interactive login when None)."""
        argv = [self.lab.ssh, *self.ssh_options(known_hosts, via_bastion=via_bastion), self.address]
        return argv if cmd is None else [*argv, cmd]


def _read_banner(address: str, port: int) -> str:
    with socket.create_connection((address, port), timeout=5) as sock:
        return sock.makefile("rb").readline().decode("latin-1")


class Lab:
    """A set of real sshd hosts for one test session; everything it starts, it stops (by pid).

    Lab(root) needs root and openssh-server (else LabUnavailable).  It removes what a crashed earlier
    lab left behind (namespaces, veths, accounts, processes) before it starts anything."""

    def __init__(self, root: Path, *, unprivileged: bool = False) -> None:
        reason = lab_unavailable_reason()
        if reason:
            raise LabUnavailable(reason)
        self.root = Path(root).resolve()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.ssh = shutil.which("ssh", path=system.SYSTEM_PATH) or "ssh"
        self.sshd_version = _sshd_version()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        reap_stale_labs()
        self.id = _new_lab_id()
        system.register_lab(self.id, self.root)
        self.unprivileged = unprivileged
        self.remote_root: Path | None = None
        if unprivileged:  # after registering: whatever a lab creates belongs to a registered lab
            self.remote_root = Path(tempfile.mkdtemp(prefix=f"{REMOTE_ROOT_PREFIX}{self.id}-", dir=REMOTE_ROOT_BASE))
            self.remote_root.chmod(0o711)  # the logins pass through it to their own directories
        self.hosts: dict[str, SshHost] = {}
        self._accounts: list[str] = []
        self._networks: list[netns.PairNetwork] = []
        self._addresses = _loopback_addresses()
        self._counter = itertools.count(1)
        self._stopped = False
        atexit.register(self.stop)
        self.port = _free_port()
        self.client_key = self.root / "client_ed25519"
        pub = _keygen(self.client_key, "hwledger-lab-client")
        self.client_key_fingerprint = _key_fingerprint(pub)
        self.known_hosts = self.root / "known_hosts"
        self._pinned: dict[str, str] = {}
        self._write_known_hosts()

    def __repr__(self) -> str:
        return f"Lab({self.id}, root={self.root}, hosts={sorted(self.hosts)})"

    def unique_name(self, prefix: str) -> str:
        """A host name not used in this lab yet: ``<prefix>-<n>``."""
        while True:
            name = f"{prefix}-{next(self._counter)}"
            if name not in self.hosts:
                return name

    # --- hosts ------------------------------------------------------------------------------------

    def add_loopback_host(
        self,
        name: str,
        *,
        address: str | None = None,
        tool: str = "nvidia-smi",
        capture: str | None = None,
        stdout: str | bytes | None = None,
        stderr: str | bytes = "",
        rc: int = 0,
        delay: float = 0.0,
        python: bool = False,
        bashrc: str | None = None,
        max_sessions: int = 200,
    ) -> SshHost:
        """A running host on its own 127.0.x.y (auto-picked unless given) and the lab's port.

        bashrc: the login shell is bash instead of sh, and this is its ~/.bashrc, which bash reads for
        every ``ssh host cmd`` (e.g. pyenv's PATH changes, as on many rented GPU boxes)."""
        # The address is settled at start (auto-picked ones may be taken by another test run).
        host = self._new_host(name, address=address or "", python=python,
                              login_shell="/bin/sh" if bashrc is None else "/bin/bash")
        host.max_sessions = max_sessions
        if bashrc is not None:
            (host.home / ".bashrc").write_text(bashrc)
        host.set_tool(tool, capture=capture, stdout=stdout, stderr=stderr, rc=rc, delay=delay)
        if address is not None:
            self._pin(host)
            host.start()
        else:
            self._start_on_free_address(host)
        return host

    def add_bastion_pair(self, name: str, **tool_kwargs: Any) -> tuple[SshHost, SshHost]:
        """(bastion, internal): the bastion (``<name>-bastion``) is reachable from here; the internal
        host (``<name>``, fake tools per tool_kwargs as in add_loopback_host) only from the bastion's
        namespace.  Raises LabUnavailable where network namespaces cannot be created."""
        python = bool(tool_kwargs.pop("python", False))
        tool = tool_kwargs.pop("tool", "nvidia-smi")
        self._check_name(name)
        self._check_name(f"{name}-bastion")
        net = netns.create_pair(self.id, len(self._networks))
        self._networks.append(net)
        bastion = self._new_host(
            f"{name}-bastion", address=net.bastion_address, python=False, netns_name=net.bastion_ns,
            forwarding=True,
        )  # fmt: skip
        self._pin(bastion)
        bastion.start()
        internal = self._new_host(
            name, address=net.internal_address, python=python, netns_name=net.internal_ns,
            probe_netns=net.bastion_ns, bastion=bastion,
        )  # fmt: skip
        internal.set_tool(tool, **tool_kwargs)
        self._pin(internal)
        internal.start()
        return bastion, internal

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _check_name(self, name: str) -> None:
        if self._stopped:
            raise LabError("this lab has been stopped; create a new Lab")
        if not _HOST_NAME.match(name):
            raise ValueError(f"lab host name {name!r}: use lowercase letters, digits, '-' and '_' (max 48)")
        if name in self.hosts:
            raise ValueError(f"lab host name {name!r} is already used in this lab")

    def _new_host(self, name: str, *, address: str, python: bool, login_shell: str = "/bin/sh",
                  **kwargs: Any) -> SshHost:
        self._check_name(name)
        user = f"{system.NAME_PREFIX}{self.id}-{len(self.hosts) + 1}"
        host = SshHost(self, name, user=user, address=address, port=self.port, **kwargs)
        self.hosts[name] = host
        owner = None
        if self.unprivileged:
            owner = system.create_login_account(user, host.home, self.id)
        else:
            system.create_alias_account(user, host.home, self.id, shell=login_shell)
        self._accounts.append(user)
        host._prepare(python=python, owner=owner)
        return host

    def _start_on_free_address(self, host: SshHost) -> None:
        # Other labs (other test runs on this machine) pick 127.0.x.y too; their ports almost always
        # differ, but when an address:port is taken we simply move on to the next address.
        last_error: Exception | None = None
        for _attempt in range(20):
            host.address = next(self._addresses)
            if not _can_bind(host.address, self.port):
                continue
            self._pin(host)
            try:
                host.start()
                return
            except LabError as exc:
                if "Address already in use" not in host.log_text():
                    raise
                last_error = exc
        raise LabError(f"no free 127.0.x.y address for lab host {host.name} on port {self.port}: {last_error}")

    # --- known hosts ------------------------------------------------------------------------------

    def _pin(self, host: SshHost) -> None:
        self._pinned[host.name] = host.known_hosts_line()
        self._write_known_hosts()

    def trust(self, host: SshHost) -> None:
        """Pin the host's current key (after rotate_host_key) in the lab's known_hosts."""
        self._pin(host)

    def _write_known_hosts(self) -> None:
        tmp = self.known_hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in self._pinned.values()))
        tmp.chmod(0o600)
        os.replace(tmp, self.known_hosts)

    # --- teardown ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every host, delete the namespaces, veths and accounts; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[str] = []
        for host in self.hosts.values():
            try:
                host.stop()
            except Exception as exc:  # keep going: the rest must still be cleaned up
                errors.append(f"{host.name}: {exc}")
        try:
            # Anything of this lab that no host claimed (a host whose start failed half-way).
            system.terminate(_processes_of_lab(self.id, self.root))
        except LabError as exc:
            errors.append(str(exc))
        for net in self._networks:
            netns.delete_pair(net)
        for account in self._accounts:
            try:
                system.delete_account(account)
            except LabError as exc:
                errors.append(str(exc))
        if self.remote_root is not None:
            shutil.rmtree(self.remote_root, onerror=lambda _f, path, exc: errors.append(f"{path}: {exc[1]}"))
        system.unregister_lab(self.id)
        atexit.unregister(self.stop)
        if errors:
            raise LabError("lab teardown was incomplete: " + "; ".join(errors))


def _processes_of_lab(lab_id: str, root: str | Path | None) -> set[int]:
    def title_matches(title: str) -> bool:
        # A connection's title names its account; a listener's names its config file.
        return netns.lab_id_of(system.sshd_title_user(title)) == lab_id or bool(root and f" {root}/hosts/" in title)

    return system.lab_processes(lambda marker: marker.startswith(f"{lab_id}:"), title_matches=title_matches)


def _new_lab_id() -> str:
    taken = set(system.registered_labs())
    while True:
        lab_id = secrets.token_hex(3)
        if lab_id not in taken:
            return lab_id


def _loopback_addresses():
    """127.0.x.y addresses from a random start (x in 1..254), so concurrent labs rarely overlap."""
    start = secrets.randbelow(254 * 254)
    for n in itertools.count(start):
        n %= 254 * 254
        yield f"127.0.{n // 254 + 1}.{n % 254 + 1}"


def _can_bind(address: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A port below the ephemeral range that nothing on this machine is bound to (on any address)."""
    for _attempt in range(200):
        port = 20000 + secrets.randbelow(12000)
        if _can_bind("0.0.0.0", port):
            return port
    raise LabError("no free TCP port found in 20000-31999")


def reap_stale_labs() -> list[str]:
    """Remove what labs of dead processes left behind: their sshd and session processes, network
    namespaces, veths and accounts; returns their lab ids.  Labs whose owner still runs (other test
    runs on this machine) are left alone.

    Resources are listed before the registry is read: a lab registers before it creates anything, so
    whatever is listed belongs to a lab that the registry read then sees."""
    namespaces = netns.list_namespaces()
    links = netns.list_links()
    accounts = system.lab_accounts()
    remote_roots = _remote_roots()
    marked = {m.split(":", 1)[0] for p in system.scan_processes() for m in p.markers}
    registry = system.registered_labs()
    live = {lab_id for lab_id, record in registry.items() if record.alive}
    seen = {netns.lab_id_of(name) for name in (*namespaces, *links, *accounts)} | marked | set(registry)
    seen |= set(remote_roots.values())
    stale = sorted(lab_id for lab_id in seen if lab_id is not None and lab_id not in live)
    for lab_id in stale:
        record = registry.get(lab_id)
        system.terminate(_processes_of_lab(lab_id, record.root if record else None))
        for name in namespaces:
            if netns.lab_id_of(name) == lab_id:
                netns.delete_namespace(name)
        remaining = set(netns.list_links())  # a veth goes away with its peer's namespace
        for name in links:
            if netns.lab_id_of(name) == lab_id and name in remaining:
                netns.delete_link(name)
        for name in accounts:
            if netns.lab_id_of(name) == lab_id:
                system.delete_account(name)
        for path, owner in remote_roots.items():
            if owner == lab_id:
                shutil.rmtree(path, ignore_errors=True)
        system.unregister_lab(lab_id)
    return stale


def _remote_roots() -> dict[Path, str]:
    """The remote roots of unprivileged labs (real directories of root's in /tmp), with their lab ids."""
    found = {}
    for path in Path(REMOTE_ROOT_BASE).glob(f"{REMOTE_ROOT_PREFIX}*-*"):
        match = _REMOTE_ROOT_NAME.fullmatch(path.name)
        try:
            info = path.lstat()
        except OSError:
            continue
        if match and stat.S_ISDIR(info.st_mode) and info.st_uid == 0:
            found[path] = match.group(1)
    return found
