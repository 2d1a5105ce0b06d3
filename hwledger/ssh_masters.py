"""Ending OpenSSH master connections (`ssh -O exit`), and killing an ssh child with what it started.

The fan-out (`hwledger.fanout`) keeps one ControlPersist master per host and leaves it for the next tick
and for Ansible's runs. Two things end a master before its ControlPersist time: a master that stopped
answering (`MasterRetirer`: its connection died, yet it would still accept sessions that then hang), and
an explicit close (`exit_control_masters`: the demo going down, a test cleaning up). Both build the
command line with `ssh.ssh_argv`, the one builder, and never wait for an unbounded time.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable

from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent

log = logging.getLogger("hwledger.fanout")

# How long an `ssh -O exit` may take before it is killed.
CLOSE_EXIT_TIMEOUT_S = 5.0
DEFAULT_MAX_PARALLEL = 64


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it leads one: start_new_session), i.e. the ssh client and,
    for a first connection through a bastion, its ProxyCommand. A master that ssh already daemonised
    has its own session and is not touched."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # pragma: no cover - the group is ours; kill the leader at least
        proc.kill()


def _exit_command(agent: Agent, policy: ssh.SshPolicy, ssh_binary: str) -> subprocess.Popen:
    argv = ssh.ssh_argv(agent, policy, ssh_binary=ssh_binary, control_operation="exit")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True)


class MasterRetirer:
    """Asks the masters of agents whose warm exec got no answer to exit, without waiting for them: each
    `ssh -O exit` is reaped on a later call, or killed once past CLOSE_EXIT_TIMEOUT_S. Without this, the
    next dial would feed the dead connection until the host counted as offline, instead of making a
    fresh one."""

    def __init__(self, policy: ssh.SshPolicy, *, ssh_binary: str = ssh.SSH):
        self.policy = policy
        self.ssh_binary = ssh_binary
        self._running: list[tuple[subprocess.Popen, float]] = []  # `ssh -O exit` runs, and when to give up

    def retire(self, agent: Agent) -> None:
        self.reap()
        if self.policy.control_dir is None:
            return
        try:
            proc = _exit_command(agent, self.policy, self.ssh_binary)
        except OSError as exc:
            log.warning("agent %s: ssh -O exit could not start: %s", agent.name, exc)
            return
        self._running.append((proc, time.monotonic() + CLOSE_EXIT_TIMEOUT_S))

    def reap(self, *, all_now: bool = False) -> None:
        """Reap the `ssh -O exit` runs that ended; kill those past their time (or all, with all_now)."""
        left = []
        for proc, give_up in self._running:
            if proc.poll() is not None:
                continue
            if all_now or time.monotonic() > give_up:
                kill_group(proc)
                proc.wait()
            else:
                left.append((proc, give_up))
        self._running = left

    def close(self) -> None:
        self.reap(all_now=True)


def exit_control_masters(agents: Iterable[Agent], policy: ssh.SshPolicy, *,
                         ssh_binary: str = ssh.SSH, max_parallel: int = DEFAULT_MAX_PARALLEL) -> int:
    """`ssh -O exit` for every agent (no master: ssh says so and exits); returns how many exited."""
    if policy.control_dir is None:
        return 0
    pending = list(agents)
    running: list[subprocess.Popen] = []
    exited = 0
    deadline = time.monotonic() + CLOSE_EXIT_TIMEOUT_S
    while pending or running:
        while pending and len(running) < max_parallel:
            try:
                running.append(_exit_command(pending.pop(), policy, ssh_binary))
            except OSError as exc:
                log.warning("ssh -O exit could not start: %s", exc)
                pending.clear()
        if not running:
            break
        proc = running.pop(0)
        try:
            exited += proc.wait(timeout=max(0.05, deadline - time.monotonic())) == 0
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.wait()
    return exited
