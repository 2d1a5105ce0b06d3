# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""How hwledger talks ssh: the policy, the control socket directory, pinned host keys' aliases, and
the one builder of ssh command lines.

Every ssh that hwledger starts or has Ansible start is built here: the inventory's
``ansible_ssh_common_args`` (``ssh_common_args``), a bastion's ``ProxyCommand``, the fan-out heartbeat's
execs and ``-O`` control operations (``ssh_argv``), and ``register-ssh``'s host-key learning connection
(``learn_argv``). So every path to a host verifies the same pinned key under the same alias and shares
the same master connection (``ControlPath=<control dir>/%C``). This is the only module that names the
ssh executable.

The control directory has one chooser too, ``control_dir_for(data_dir)``: the app passes the store's
directory; the inventory plugin, by default, the directory of the store the app would use with the same
environment (``locations``), so a hand-run ``ansible-playbook`` and ``hwledger fleet serve`` reuse one
master per host when they run as the same user with the same files.
Plain Python, standard library only.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Union

from ansible_collections.hwledger.fleet.plugins.plugin_utils import private_files
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agent_values import show, validate_path
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent, AgentsFileError, Bastion, check_file_permissions

SSH = "ssh"
# Ansible's connection plugin that runs this same OpenSSH client with our options (paramiko would ignore
# ansible_ssh_common_args, and with them the pinned host keys).
ANSIBLE_CONNECTION = SSH
ENV_CONTROL_DIR = "HWLEDGER_CONTROL_DIR"
HOST_KEY_POLICIES = ("yes", "accept-new", "off")

# ssh creates the master socket as "<ControlPath>.<16 random chars>" and renames it afterwards, and
# ControlPath is "<control_dir>/%C" where %C is a 40-hex-digit hash: control_dir + 58 bytes, plus the
# terminating NUL, must fit in sun_path (108 bytes on Linux, 104 on macOS and the BSDs). Measured with
# OpenSSH 9.2: a 49-byte control_dir works on Linux, a 50-byte one fails "too long for Unix domain socket".
SUN_PATH_SIZE = 108 if sys.platform.startswith("linux") else 104
CONTROL_PATH_OVERHEAD = len("/") + 40 + len(".") + 16
MAX_CONTROL_DIR_BYTES = SUN_PATH_SIZE - 1 - CONTROL_PATH_OVERHEAD

DEFAULT_CONNECT_TIMEOUT_S = 10
DEFAULT_CONTROL_PERSIST_S = 300
DEFAULT_SERVER_ALIVE_INTERVAL_S = 15
DEFAULT_SERVER_ALIVE_COUNT_MAX = 3

# The connection that learns a host's key (register-ssh) authenticates with nothing and records the key
# the server proved it holds during key exchange. These come first on its command line, so they win
# over the usual options after them (ssh keeps the first value it reads).
LEARN_OPTIONS = (
    "BatchMode=yes",
    "PubkeyAuthentication=no",
    "PasswordAuthentication=no",
    "KbdInteractiveAuthentication=no",
    "GSSAPIAuthentication=no",
    "HostbasedAuthentication=no",
    "NumberOfPasswordPrompts=0",
    "StrictHostKeyChecking=accept-new",
    "HashKnownHosts=no",
    "UpdateHostKeys=no",
)

Target = Union[Agent, Bastion]


class SshPolicyError(ValueError):
    """A bad host-key policy, known_hosts file or control directory setting."""


@dataclass(frozen=True)
class SshPolicy:
    """How hwledger talks ssh: host-key policy, its own known_hosts file, connection reuse, timeouts.

    host_key_checking: "yes" (default: only keys already in known_hosts), "accept-new" (learn a missing
    key, refuse a changed one; trust on first use) or "off" (no checking at all: anyone on the network
    path can impersonate a host; for throwaway labs only). control_dir None disables connection reuse.
    """

    known_hosts: str
    host_key_checking: str = "yes"
    control_dir: str | None = None
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S
    control_persist_s: int = DEFAULT_CONTROL_PERSIST_S
    server_alive_interval_s: int = DEFAULT_SERVER_ALIVE_INTERVAL_S
    server_alive_count_max: int = DEFAULT_SERVER_ALIVE_COUNT_MAX

    def __post_init__(self) -> None:
        if self.host_key_checking not in HOST_KEY_POLICIES:
            raise SshPolicyError(f"host_key_checking must be one of {', '.join(HOST_KEY_POLICIES)}, got "
                                 f"{show(self.host_key_checking)}; quote it in YAML (host_key_checking: 'yes')")
        try:
            object.__setattr__(self, "known_hosts", validate_path(self.known_hosts, "the known_hosts file"))
        except ValueError as exc:
            raise SshPolicyError(f"known_hosts file {exc}") from None
        if self.control_dir is not None:
            object.__setattr__(self, "control_dir", validate_control_dir(self.control_dir))
        for field_name in ("connect_timeout", "control_persist_s", "server_alive_interval_s",
                           "server_alive_count_max"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SshPolicyError(f"{field_name} must be a positive whole number of seconds, got {show(value)}")


# --------------------------------------------------------------------------------------------------
# The control socket directory


def validate_control_dir(value: Any) -> str:
    """The directory for ControlMaster sockets: a safe path short enough for ``<dir>/%C`` sockets."""
    try:
        path = validate_path(value, "the control socket directory")
    except ValueError as exc:
        raise SshPolicyError(f"control_dir {exc}") from None
    size = len(path.encode("utf-8"))
    if size > MAX_CONTROL_DIR_BYTES:
        raise SshPolicyError(
            f"control_dir {show(path)} is {size} bytes long, but ssh's control socket <dir>/<40-character hash> "
            f"plus its 17-character temporary suffix must fit the {SUN_PATH_SIZE}-byte unix socket path limit, "
            f"so control_dir may have at most {MAX_CONTROL_DIR_BYTES} bytes. Fix: choose a shorter directory, "
            "e.g. ~/.cache/hwledger/cp or /tmp/hwledger-cp")
    return path


def control_dir_for(data_dir: str | os.PathLike) -> str:
    """The control socket directory of the hwledger whose store lives in ``data_dir``: ``<data_dir>/cm``
    when that is short enough for a unix socket, else ``/tmp/hwledger-<uid>/<12 hex digits>`` named by a
    hash of the data dir's real path (stable: the same store always gets the same sockets, so masters are
    reused across ticks and across processes, and two stores never share one). Only computes the path;
    ``prepare_control_dir`` creates it. ``HWLEDGER_CONTROL_DIR``, when set, is used instead (by the app and,
    as its ``control_dir`` option, by the inventory plugin alike)."""
    if os.environ.get(ENV_CONTROL_DIR):
        return os.path.expanduser(os.environ[ENV_CONTROL_DIR])
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    preferred = os.path.join(data_dir, "cm")
    if len(os.fsencode(preferred)) <= MAX_CONTROL_DIR_BYTES:
        return preferred
    digest = hashlib.sha256(os.fsencode(os.path.realpath(data_dir))).hexdigest()[:12]
    return os.path.join(_shared_base(), digest)


def _shared_base() -> str:
    return f"/tmp/hwledger-{os.getuid()}"


def prepare_control_dir(policy: SshPolicy) -> None:
    """Create the control socket directory (0700) and refuse one that others could write to.

    ssh exits if the directory is missing. A directory other users can write to would let them plant a
    socket at our ControlPath and receive every command we send to a host. The per-user base under /tmp
    is hwledger's own (tightened to 0700, refused when another user made it first).
    """
    if policy.control_dir is None:
        return
    try:
        if os.path.dirname(policy.control_dir) == _shared_base():
            private_files.ensure_private_dir(_shared_base(), "hwledger's socket directory", tighten=True,
                                             harm="intercept ssh sessions")
        private_files.ensure_private_dir(policy.control_dir, "control_dir", harm="intercept ssh sessions")
    except private_files.PrivatePathError as exc:
        raise SshPolicyError(str(exc)) from None


# --------------------------------------------------------------------------------------------------
# Host keys


def check_known_hosts(policy: SshPolicy) -> list[str]:
    """Check hwledger's known_hosts file; return warnings. Creates its directory for accept-new."""
    if policy.host_key_checking == "off":
        return ["host key checking is off: ssh accepts any host key, so anyone on the network path can "
                "impersonate a GPU host and receive its commands and files. Use 'yes' (the default) or "
                "'accept-new'."]
    path = policy.known_hosts
    if not os.path.exists(path):
        if policy.host_key_checking == "accept-new":
            try:
                private_files.make_dirs(os.path.dirname(path))
            except private_files.PrivatePathError as exc:
                raise SshPolicyError(f"known_hosts file {path}: {exc}") from None
            return []
        return [f"known_hosts file {path} does not exist, so every host will fail host key verification; pin "
                f"each host's key with hwledger fleet register-ssh, or use host_key_checking accept-new once"]
    try:
        check_file_permissions(path, "known_hosts file")
    except AgentsFileError as exc:
        raise SshPolicyError(str(exc)) from None
    return []


def known_hosts_alias(agent: Agent) -> str:
    """The HostKeyAlias an agent's host key is pinned under: its name, not its (recyclable) address."""
    return f"hwledger-agent-{agent.name}"


def bastion_known_hosts_alias(bastion: Bastion) -> str:
    """The HostKeyAlias of a bastion: its own entry, shared by every agent behind it."""
    return f"hwledger-bastion-{bastion.hostname}-{bastion.ssh_port}"


def host_key_alias(target: Target) -> str:
    """The alias ``target`` (an agent, or a bastion reached directly) is pinned under."""
    return known_hosts_alias(target) if isinstance(target, Agent) else bastion_known_hosts_alias(target)


# --------------------------------------------------------------------------------------------------
# Options and command lines


def _host_key_options(policy: SshPolicy, alias: str) -> list[str]:
    # CheckHostIP, UpdateHostKeys, VerifyHostKeyDNS off: the known_hosts file changes only when a person
    # registers a host (or, with accept-new, the first time), never because a server or DNS said so.
    if policy.host_key_checking == "off":
        return ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "GlobalKnownHostsFile=/dev/null",
                "CheckHostIP=no", "UpdateHostKeys=no"]
    return [f"StrictHostKeyChecking={policy.host_key_checking}",
            f"UserKnownHostsFile={policy.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            f"HostKeyAlias={alias}",
            "CheckHostIP=no",
            "UpdateHostKeys=no",
            "VerifyHostKeyDNS=no",
            "HashKnownHosts=no"]


def _session_options(policy: SshPolicy) -> list[str]:
    # Set explicitly so a user's ~/.ssh/config cannot forward an agent or X11 to a rented host, or
    # make ssh prompt and hang a 5-second poller.
    return ["BatchMode=yes",
            "IdentitiesOnly=yes",
            "ForwardAgent=no",
            "ForwardX11=no",
            f"ConnectTimeout={policy.connect_timeout}",
            f"ServerAliveInterval={policy.server_alive_interval_s}",
            f"ServerAliveCountMax={policy.server_alive_count_max}"]


_NO_CONTROL = ["ControlMaster=no", "ControlPath=none"]

# No ssh_config is read, neither the user's ~/.ssh/config nor /etc/ssh/ssh_config: every connection is
# made from ssh-agents.toml alone, the same under `serve`, cron, AWX or a terminal, and a `Host *` block
# cannot add a ProxyCommand, a RemoteCommand, a LocalCommand or a `Match exec` to a connection to a
# rented host. Put what a host needs in ssh-agents.toml (port, user, key, bastion) instead.
NO_CONFIG = ["-F", "none"]


def _control_options(policy: SshPolicy) -> list[str]:
    if policy.control_dir is None:
        return list(_NO_CONTROL)
    # %C is a 40-hex-digit hash of (local host, host, port, user): the socket path has the same length
    # whatever the hostname, and the Ansible path and ssh_argv() share one master per agent.
    return ["ControlMaster=auto",
            f"ControlPersist={policy.control_persist_s}s",
            f"ControlPath={policy.control_dir}/%C"]


def _as_args(options: list[str]) -> list[str]:
    argv: list[str] = []
    for option in options:
        argv += ["-o", option]
    return argv


def _bastion_options(bastion: Bastion, policy: SshPolicy) -> list[str]:
    # A bastion is reached directly and does not multiplex: the agent's own master connection
    # (ControlPersist) already keeps the hop open.
    return _host_key_options(policy, bastion_known_hosts_alias(bastion)) + _session_options(policy) + _NO_CONTROL


def _destination(target: Target) -> list[str]:
    return ["-p", str(target.ssh_port), "-l", target.ssh_user, "-i", target.ssh_key_path, "--", target.hostname]


def proxy_command(bastion: Bastion, policy: SshPolicy) -> str:
    """The ProxyCommand that reaches an agent through its bastion, with the bastion's own key, user, port.

    ssh runs it with /bin/sh after expanding %h/%p (the agent's validated host and port), so every word
    is shell-quoted. ``[%h]:%p`` keeps an IPv6 target intact for -W.
    """
    argv = [SSH, *NO_CONFIG, *_as_args(_bastion_options(bastion, policy)), "-i", bastion.ssh_key_path,
            "-p", str(bastion.ssh_port), "-l", bastion.ssh_user, "-W", "[%h]:%p", "--", bastion.hostname]
    return shlex.join(argv)


def ssh_options(agent: Agent, policy: SshPolicy) -> list[str]:
    """``["-F", "none", "-o", "Key=Value", ...]``: no ssh_config, host-key policy, session hardening,
    connection reuse, bastion."""
    options = _host_key_options(policy, known_hosts_alias(agent)) + _session_options(policy)
    options += _control_options(policy)
    if agent.bastion is not None:
        options.append(f"ProxyCommand={proxy_command(agent.bastion, policy)}")
    return [*NO_CONFIG, *_as_args(options)]


def ssh_common_args(agent: Agent, policy: SshPolicy) -> str:
    """ssh_options() as one string for ``ansible_ssh_common_args`` (Ansible splits it with shlex)."""
    return shlex.join(ssh_options(agent, policy))


def ssh_argv(target: Target, policy: SshPolicy, remote_command: str | None = None, *,
             ssh_binary: str = SSH, first: tuple[str, ...] | list[str] = (),
             control_operation: str | None = None) -> list[str]:
    """The full argv of one ssh run (no shell involved) to an agent, or to a bastion reached directly.

    ``remote_command``: what the remote login shell runs (None: nothing, e.g. with a control operation).
    ``first``: ``Key=Value`` options put ahead of the usual ones, which they override (ssh keeps the first
    value it reads). ``control_operation``: ``"check"`` or ``"exit"`` for the agent's master (``-O``): the
    same ControlPath, so the same socket.
    """
    if isinstance(target, Agent):
        options = ssh_options(target, policy)
    else:
        options = [*NO_CONFIG, *_as_args(_bastion_options(target, policy))]
    argv = [ssh_binary]
    if control_operation is not None:
        if control_operation not in ("check", "exit", "stop"):
            raise ValueError(f"unknown ssh control operation {control_operation!r}")
        argv += ["-O", control_operation]
    argv += [*_as_args(list(first)), *options, *_destination(target)]
    if remote_command is not None:
        argv.append(remote_command)
    return argv


def learn_argv(target: Target, known_hosts: str, *, ssh_binary: str = SSH) -> list[str]:
    """The argv of a connection that logs in with nothing and records the host key ``target`` presents
    in ``known_hosts`` (a private temporary file) under the target's alias.

    For an agent behind a bastion the connection goes through the usual ProxyCommand, whose bastion hop
    is verified strictly against ``known_hosts`` too: seed that file with the bastion's pinned key.
    Authentication is off, so no credential is offered to a host that is not trusted yet.
    """
    policy = SshPolicy(known_hosts=known_hosts, host_key_checking="yes", control_dir=None)
    first = [*LEARN_OPTIONS, f"UserKnownHostsFile={policy.known_hosts}", "GlobalKnownHostsFile=/dev/null",
             f"HostKeyAlias={host_key_alias(target)}", *_NO_CONTROL]
    return ssh_argv(target, policy, "true", ssh_binary=ssh_binary, first=first)


def host_key_check_argv(target: Target, policy: SshPolicy, *, ssh_binary: str = SSH) -> list[str]:
    """The argv of a connection that checks the host key ``target`` presents against the pinned one and
    goes no further: every authentication method is off, so it ends at "Permission denied" when the key
    matches and at OpenSSH's host-identification warning when it does not. The server uses it on a
    bastion when the agents behind it stop answering: a changed bastion key is otherwise invisible (the
    ProxyCommand's messages are lost once ssh runs the master in the background)."""
    first = [*(option for option in LEARN_OPTIONS if not option.startswith(("StrictHostKeyChecking", "HashKnown"))),
             "StrictHostKeyChecking=yes", f"UserKnownHostsFile={policy.known_hosts}",
             "GlobalKnownHostsFile=/dev/null", f"HostKeyAlias={host_key_alias(target)}", *_NO_CONTROL]
    return ssh_argv(target, policy, "true", ssh_binary=ssh_binary, first=first)
