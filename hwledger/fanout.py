"""The fast heartbeat transport: one resident object that fans the probe out over OpenSSH masters.

`SshFanoutHeartbeat` implements `hwledger.heartbeat.HeartbeatTransport`. Per tick it runs the probe
(`probe.remote_script`, one POSIX-sh exec) on every agent at once, each as a plain `ssh` child built by
`ssh.ssh_argv` -- the same options as the Ansible path, so the same pinned known_hosts, the same
HostKeyAlias, BatchMode, and the same ControlPath (`<control dir>/%C`): a heartbeat reuses the
agent's ControlPersist master whichever path opened it, and costs a channel, not a handshake. Every
answer goes through `probe.evaluate` (the one parser and classifier) once, and the `ProbeOutcome` it
returns is handed on as it is, so a host ends in the same state whichever transport asked it.

Why not Ansible for this: ansible-playbook costs ~0.7 s to start plus ~36 ms of controller CPU per
host per tick (see docs/performance.md); a multiplexed `ssh` exec costs a few ms. Why not one thread
per host: a single selector loop over the children's non-blocking pipes (and pidfds, so an exit is an
event, not a poll) keeps the controller's own cost flat from 10 to 1000 hosts.

Bounds, whatever the hosts do:
- at most `max_parallel` ssh children at a time (also kept under the open-files limit);
- a per-host deadline, `probe.controller_deadline(query_timeout)` by default (the remote watchdog's
  timeout plus the connection grace): then the child's process group is SIGKILLed and the host gets
  the exec-timeout failure, so a hung tool or a black-holed address never stretches a tick further;
- at most `MAX_STDOUT_BYTES` / `MAX_STDERR_BYTES` read per host (plus the bounded log reads of its running
  jobs, `job_log_read.max_output_bytes`, when the server asks for them: `log_reads`);
- every child is reaped before `tick` returns: nothing is left behind but the ControlPersist masters
  (which ssh daemonises out of our process group and which expire on their own, or on `close`).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import selectors
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log_read, probe, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger.heartbeat import DEFAULT_QUERY_TIMEOUT_S, HeartbeatRunError, OnOutcome
from hwledger.ssh_masters import MasterRetirer, exit_control_masters, kill_group

log = logging.getLogger("hwledger.fanout")

DEFAULT_MAX_PARALLEL = 64
# New connections (a full key exchange each: ~150 ms of client CPU with the default post-quantum KEX, as
# much again in the host's sshd) at once. A server starting with 1000 agents would otherwise run 64
# handshakes side by side on a small controller, each slow enough to hit ConnectTimeout.
DEFAULT_MAX_NEW_CONNECTIONS = 16
# An agent counts as warm (its master is up) this long after its last answer, well inside ControlPersist.
WARM_MARGIN_S = 10.0
# What is read of one exec: the probe sends at most its caps plus frame lines; ssh's own messages are short.
MAX_STDOUT_BYTES = probe.STDOUT_CAP + probe.STDERR_CAP + 64 * 1024
MAX_STDERR_BYTES = 64 * 1024
READ_CHUNK = 64 * 1024
# Longest sleep of the event loop: how often `cancel` is polled while children run.
POLL_S = 0.1
# Open files one child needs here: stdout and stderr pipes and its pidfd, plus one spare.
FDS_PER_CHILD = 4
FDS_RESERVED = 64
_HEADER = probe.HEADER_PREFIX.encode()


def max_parallel_for_fd_limit(requested: int) -> int:
    """`requested`, lowered so that every child's pipes fit under the soft open-files limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, (soft - FDS_RESERVED) // FDS_PER_CHILD))


@dataclass
class _Exec:
    """One ssh child in flight for one agent."""

    agent: Agent
    proc: subprocess.Popen
    started: float            # time.time(), for the snapshot's captured_at / query_ms
    deadline: float           # time.monotonic()
    pidfd: int | None
    cold: bool = False          # no master expected: this exec opens the connection
    # The tick that started it waits for it, within the tick's budget: after that it goes on between ticks.
    waited_for: bool = True
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    stdout_size: int = 0
    stderr_size: int = 0
    exited: bool = False
    timed_out: bool = False     # killed at the deadline
    too_large: bool = False     # killed for printing too much
    ended: float = 0.0
    query: bool = True          # False: a liveness check (the GPU tool was not run)
    reads: tuple = ()           # the job logs this exec reads (job_log_read.LogRead)
    max_stdout: int = MAX_STDOUT_BYTES


class SshFanoutHeartbeat:
    """A `HeartbeatTransport` that runs the probe on all agents concurrently over multiplexed ssh.

    Resident: create it once per server and keep it; the ssh masters it (or the Ansible path) opened
    stay warm between ticks for `policy.control_persist_s`. Not thread-safe: one tick at a time.
    """

    # The new bytes of running jobs' logs are read in each host's heartbeat exec (`log_reads`).
    reads_job_logs = True

    def __init__(
        self,
        policy: ssh.SshPolicy,
        *,
        query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
        host_metrics: bool = True,
        backend: str = "auto",
        max_parallel: int = DEFAULT_MAX_PARALLEL,
        max_new_connections: int = DEFAULT_MAX_NEW_CONNECTIONS,
        deadline_s: float | None = None,
        ssh_binary: str = ssh.SSH,
        on_outcome: OnOutcome | None = None,
    ) -> None:
        for name, value in (("max_parallel", max_parallel), ("max_new_connections", max_new_connections)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        self.policy = policy
        self.query_timeout_s = probe.check_timeout(query_timeout_s)
        self.host_metrics = host_metrics
        self.backend = backend
        self.max_parallel = max_parallel_for_fd_limit(max_parallel)
        self.max_new_connections = min(max_new_connections, self.max_parallel)
        # A fixed controller deadline for every exec (tests); None: each agent's query timeout plus the grace.
        self.deadline_override = None if deadline_s is None else float(deadline_s)
        if self.deadline_override is not None and self.deadline_override <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s!r}")
        self.ssh_binary = ssh_binary
        # An observer of every outcome as it arrives (tests, the benchmark), besides the tick's own hooks.
        self.on_outcome = on_outcome
        self._seen: dict[str, Agent] = {}
        self._answered: dict[str, tuple[Agent, float]] = {}  # name -> (agent, monotonic time)
        self._durations: dict[str, float] = {}  # name -> seconds its last exec took
        # The execs still in flight between ticks (new connections or hung tools that outlived a tick's budget).
        self._loop: _FanoutLoop | None = None
        self._liveness: set[str] = set()  # this tick's agents that get the liveness check
        self._log_reads: dict[str, tuple] = {}  # this tick's job logs to read, by agent
        self._retirer = MasterRetirer(policy, ssh_binary=ssh_binary)
        ssh.prepare_control_dir(policy)

    # -- the protocol ------------------------------------------------------------------------

    def tick(self, agents: Sequence[Agent], *, cancel: Callable[[], bool], on_outcome: OnOutcome | None = None,
             on_progress: Callable[[], None] | None = None, budget_s: float | None = None,
             liveness: Collection[str] = (), log_reads: Mapping[str, Sequence] | None = None) -> dict[str, ProbeOutcome]:
        """One heartbeat over `agents`. Hosts missing from the answer were not asked (cancelled, or
        the controller could not start their ssh) and keep their state. `on_outcome` sees each outcome as
        it arrives; `on_progress` is called about every POLL_S while hosts are still out. The agents named
        in `liveness` get the liveness check instead of the GPU query (their minimum interval has not passed).
        `log_reads` ({agent name: [job_log_read.LogRead]}): running jobs' logs read in the same exec; what
        came back is in each outcome's `job_logs`.

        `budget_s`: how long the tick waits for answers. A host without a master (it has not answered
        lately: a dead host, a silent listener, a black-holed address) costs up to ConnectTimeout to dial,
        and a host whose GPU tool hangs holds its exec until the tool's watchdog (query_timeout_s); past
        the budget such an exec goes on in the background, is not started again while it runs, and its
        outcome is reported by the tick during which it ends. So neither holds the healthy hosts' cadence.
        New connections start only within the budget. None waits for every exec (register-ssh's first
        heartbeat)."""
        # Only the current agents are remembered: removed ones are forgotten (bounded memory).
        self._seen = {agent.name: agent for agent in agents}
        self._answered = {name: seen for name, seen in self._answered.items() if name in self._seen}
        self._durations = {name: took for name, took in self._durations.items() if name in self._seen}
        if not agents and self._loop is None:
            return {}
        self._liveness = set(liveness)
        self._log_reads = {name: _valid_reads(reads) for name, reads in (log_reads or {}).items()}
        return self.run_probes(agents, cancel=cancel, on_outcome=on_outcome, on_progress=on_progress,
                               budget_s=budget_s)

    # -- the fan-out ---------------------------------------------------------------------------

    def run_probes(self, agents: Sequence[Agent], *, cancel: Callable[[], bool] = lambda: False,
                   on_outcome: OnOutcome | None = None, on_progress: Callable[[], None] | None = None,
                   budget_s: float | None = None) -> dict[str, ProbeOutcome]:
        """Run the probe on every agent; {agent name: its outcome} for those that answered during this call
        (see `tick` for the budget)."""
        loop = self._loop or _FanoutLoop(self)
        self._loop = loop
        try:
            finished = loop.run(list(agents), cancel, on_outcome, on_progress, budget_s)
        except BaseException:
            self.stop_in_flight()  # kills and reaps everything still running
            raise
        if not finished:  # cancelled
            self.stop_in_flight()
        elif not loop.running:
            self.stop_in_flight()  # nothing in flight: hold no selector between ticks
        if loop.spawn_errors and not loop.results:
            raise HeartbeatRunError(
                f"could not start ssh for any agent: {loop.spawn_errors[0]}")
        return loop.results

    def in_flight(self) -> list[str]:
        """The agents whose exec is still running between ticks (a connection being made)."""
        return sorted(ex.agent.name for ex in self._loop.running.values()) if self._loop else []

    def stop_in_flight(self) -> None:
        """Kill (and reap) the execs still in flight: the server is stopping."""
        if self._loop is not None:
            self._loop.abort()
            self._loop = None

    def is_warm(self, agent: Agent, now: float) -> bool:
        """Whether the agent's ssh master is (almost certainly) up: it answered within ControlPersist, with
        the same connection settings. A guess only used for pacing new connections; ssh decides."""
        seen = self._answered.get(agent.name)
        if seen is None or seen[0] != agent or self.policy.control_dir is None:
            return False
        return now - seen[1] < self.policy.control_persist_s - WARM_MARGIN_S

    def note_connection(self, agent: Agent, connected: bool, duration_s: float) -> None:
        """Remember whether the agent's connection worked this tick (its shell ran the probe), and how
        long the exec took."""
        if connected:
            self._answered[agent.name] = (agent, time.monotonic())
        else:
            self._answered.pop(agent.name, None)
        self._durations[agent.name] = duration_s

    def last_duration(self, agent: Agent) -> float:
        """Seconds the agent's last exec took (0 when unknown)."""
        return self._durations.get(agent.name, 0.0)

    def argv(self, agent: Agent, script: str) -> list[str]:
        return ssh.ssh_argv(agent, self.policy, probe.ssh_command(script), ssh_binary=self.ssh_binary)

    def timeout_for(self, agent: Agent) -> float:
        """The agent's GPU-tool timeout: its own query_timeout_s, else the server's."""
        return agent.query_timeout_s if agent.query_timeout_s is not None else self.query_timeout_s

    def deadline_for(self, agent: Agent) -> float:
        """How long the controller waits for the agent's exec."""
        if self.deadline_override is not None:
            return self.deadline_override
        return probe.controller_deadline(self.timeout_for(agent))

    def wants_query(self, agent: Agent) -> bool:
        return agent.name not in self._liveness

    def reads_for(self, agent: Agent) -> tuple:
        return self._log_reads.get(agent.name, ())

    def script(self, agent: Agent) -> str:
        return probe.remote_script(agent.gpu_query_cmd, timeout_s=self.timeout_for(agent),
                                   host_metrics=self.host_metrics, query=self.wants_query(agent),
                                   log_reads=self.reads_for(agent))

    def evaluate(self, ex: _Exec, stdout: bytes) -> ProbeOutcome:
        """The outcome of one finished exec (the one parser: probe.evaluate)."""
        if ex.timed_out:
            return probe.exec_timeout_failure(agent=ex.agent.name, timeout_s=self.timeout_for(ex.agent))
        if ex.too_large:
            return ProbeOutcome.failure(
                "output_too_large",
                f"the exec sent more than {ex.max_stdout} bytes, more than the probe ever prints; the remote "
                "shell or its start-up files print too much",
                agent=ex.agent.name)
        rc = ex.proc.returncode
        return probe.evaluate(
            agent=ex.agent.name,
            cmd=ex.agent.gpu_query_cmd,
            backend=self.backend,
            exec_stdout=stdout.decode("utf-8", "surrogateescape"),
            exec_stderr=b"".join(ex.stderr).decode("utf-8", "replace"),
            exec_rc=rc if rc is not None and rc >= 0 else 255,
            started=ex.started,
            ended=ex.ended,
            host_metrics=self.host_metrics,
            query=ex.query,
            log_reads=ex.reads,
        )

    # -- shutdown ------------------------------------------------------------------------------

    def retire_master(self, agent: Agent) -> None:
        """Ask the agent's ssh master to exit: an exec over a connection believed warm got no answer by its
        deadline (`ssh_masters.MasterRetirer`)."""
        self._answered.pop(agent.name, None)
        self._retirer.retire(agent)

    def close(self, *, exit_masters: bool = False) -> None:
        """Forget the agents; with `exit_masters`, ask each agent's ssh master to exit now.

        Without it the masters expire on their own after ControlPersist, which is what lets a
        restarted server (or the Ansible path) reuse them."""
        agents = list(self._seen.values())
        self._seen.clear()
        self.stop_in_flight()
        self._retirer.close()
        if exit_masters:
            exit_control_masters(agents, self.policy, ssh_binary=self.ssh_binary, max_parallel=self.max_parallel)


class _FanoutLoop:
    """The event loop: spawn within the bound, read pipes, reap on pidfd, kill at the deadline. It lives
    from one tick to the next while execs of new connections are still in flight.

    An exec is complete when its ssh has exited and its stdout is at end of file. Not stderr: for the
    first connection through a bastion, the ProxyCommand that ssh starts inherits ssh's stderr and
    lives on with the master, so stderr is drained once ssh has exited and then closed. (stdout reaches
    end of file only when every writer closed it: the ssh process and, through a master, the master,
    which writes the output into the pipe itself.)
    """

    def __init__(self, transport: SshFanoutHeartbeat):
        self.t = transport
        self.on_outcome: OnOutcome | None = None
        self.current: set[str] = set()
        self.sel = selectors.DefaultSelector()
        self.running: dict[int, _Exec] = {}   # pid -> exec
        self.results: dict[str, ProbeOutcome] = {}
        self.spawn_errors: list[str] = []

    def run(self, agents: list[Agent], cancel: Callable[[], bool], on_outcome: OnOutcome | None,
            on_progress: Callable[[], None] | None, budget_s: float | None) -> bool:
        """One tick; False when it was cancelled."""
        self.results, self.spawn_errors, self.on_outcome = {}, [], on_outcome
        self.current = {agent.name for agent in agents}  # an exec of an agent removed meanwhile is not reported
        now = time.monotonic()
        cold_until = now + budget_s if budget_s is not None else float("inf")
        in_flight = {ex.agent.name for ex in self.running.values()}
        for ex in self.running.values():
            ex.waited_for = False  # started by an earlier tick: reported when it ends, not waited for
        agents = [a for a in agents if a.name not in in_flight]
        # New connections start first (at most max_new_connections at a time): in steady state they are
        # the few hosts that failed last time, and a black-holed one must not start late and then hold
        # the tick for its whole deadline. Warm agents fill the other slots, the slowest last time first,
        # so that a host whose tool takes seconds overlaps with the rest instead of ending the tick.
        cold = [a for a in agents if not self.t.is_warm(a, now)]
        warm = sorted((a for a in agents if self.t.is_warm(a, now)), key=self.t.last_duration)
        cold.reverse()  # pop() from the end: the caller's order
        while True:
            if cancel():
                log.info("heartbeat cancelled with %d host(s) in flight", len(self.running))
                return False
            in_budget = time.monotonic() < cold_until
            while (in_budget and cold and len(self.running) < self.t.max_parallel
                   and self.cold_running < self.t.max_new_connections):
                self._spawn(cold.pop(), cold=True)
            while warm and len(self.running) < self.t.max_parallel:
                self._spawn(warm.pop(), cold=False)
            # Past the budget nothing is waited for: a new connection still being made, or a host whose GPU
            # tool hangs (until its watchdog, query_timeout_s), goes on between ticks and is reported by the
            # tick in which it ends, so neither holds the others' cadence.
            waiting = in_budget and any(ex.waited_for for ex in self.running.values())
            if not (warm or (cold and in_budget) or waiting):
                if self.running:
                    # Execs carried over from earlier ticks that ended meanwhile are reported now (a poll that
                    # does not wait), and those past their deadline are ended: a fleet whose only hosts are in
                    # flight must still hear from them, and an agent whose first dial outlived a tick's budget
                    # must not stay "in flight", never reported, as long as nothing else is asked.
                    self._wait_events(time.monotonic())
                    self._enforce_deadlines()
                return True  # cold agents not started within the budget are asked by a later tick
            if self.running:
                self._wait_events(cold_until)
                self._enforce_deadlines()
            if on_progress is not None:
                on_progress()

    @property
    def cold_running(self) -> int:
        return sum(1 for ex in self.running.values() if ex.cold)

    # -- children ------------------------------------------------------------------------

    def _spawn(self, agent: Agent, *, cold: bool) -> None:
        try:
            argv = self.t.argv(agent, self.t.script(agent))
        except ValueError as exc:  # the agent's query command cannot make a probe
            self._finish(agent.name, ProbeOutcome.failure("invalid_query", str(exc), agent=agent.name))
            return
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
        except OSError as exc:
            # A controller problem (no ssh binary, out of processes or files), not the host's: the
            # host is left out of the answer and keeps its state.
            self.spawn_errors.append(f"{type(exc).__name__}: {exc}")
            log.error("agent %s: cannot start ssh: %s", agent.name, exc)
            return
        reads = self.t.reads_for(agent)
        ex = _Exec(agent, proc, time.time(), time.monotonic() + self.t.deadline_for(agent), _pidfd(proc.pid),
                   cold=cold, query=self.t.wants_query(agent), reads=reads,
                   max_stdout=MAX_STDOUT_BYTES + job_log_read.max_output_bytes(len(reads)))
        self.running[proc.pid] = ex
        for pipe, kind in ((proc.stdout, "o"), (proc.stderr, "e")):
            os.set_blocking(pipe.fileno(), False)
            self.sel.register(pipe.fileno(), selectors.EVENT_READ, (ex, kind))
        if ex.pidfd is not None:
            self.sel.register(ex.pidfd, selectors.EVENT_READ, (ex, "x"))

    def _wait_events(self, cold_until: float) -> None:
        soonest = min(min(ex.deadline for ex in self.running.values()), cold_until)
        timeout = max(0.0, min(POLL_S, soonest - time.monotonic()))
        polled = [ex for ex in self.running.values() if ex.pidfd is None and not ex.exited]
        if polled:
            timeout = min(timeout, 0.005)  # no pidfd on this system: poll for exits
        for key, _mask in self.sel.select(timeout):
            ex, kind = key.data
            if ex.proc.pid not in self.running:
                continue  # finished by an earlier event of this batch
            if kind == "x":
                self._on_exit(ex)
            else:
                self._on_readable(ex, kind, key.fd)
        for ex in polled:
            if ex.proc.pid in self.running and ex.proc.poll() is not None:
                self._on_exit(ex)

    def _on_readable(self, ex: _Exec, kind: str, fd: int) -> None:
        data = _read(fd)
        if data is None:
            return
        if not data:
            self._close_pipe(ex, kind)
            self._maybe_done(ex)
            return
        if kind == "o":
            ex.stdout_size += len(data)
            if ex.stdout_size > ex.max_stdout:
                ex.too_large = True
                self._kill(ex)
                return
            ex.stdout.append(data)
        else:
            ex.stderr_size += len(data)
            if ex.stderr_size <= MAX_STDERR_BYTES:
                ex.stderr.append(data)

    def _close_pipe(self, ex: _Exec, kind: str) -> None:
        pipe = ex.proc.stdout if kind == "o" else ex.proc.stderr
        if pipe is not None and not pipe.closed:
            self.sel.unregister(pipe.fileno())
            pipe.close()

    def _on_exit(self, ex: _Exec) -> None:
        if ex.pidfd is not None:
            self.sel.unregister(ex.pidfd)
            os.close(ex.pidfd)
            ex.pidfd = None
        ex.proc.wait()  # it has exited: this reaps at once
        ex.exited = True
        self._maybe_done(ex)

    def _maybe_done(self, ex: _Exec) -> None:
        if not ex.exited or not ex.proc.stdout.closed:
            return
        # What ssh itself said is in the pipe by now; a ProxyCommand may keep stderr open for good.
        fd = ex.proc.stderr.fileno() if not ex.proc.stderr.closed else None
        while fd is not None:
            data = _read(fd)
            if not data:
                break
            if ex.stderr_size < MAX_STDERR_BYTES:
                ex.stderr.append(data)
            ex.stderr_size += len(data)
        self._complete(ex)

    def _complete(self, ex: _Exec) -> None:
        self._release(ex)
        ex.ended = time.time()
        stdout = b"".join(ex.stdout)
        # The remote shell ran the probe (it printed the header): the connection, and so its master, works.
        self.t.note_connection(ex.agent, not ex.timed_out and _HEADER in stdout[:4096], ex.ended - ex.started)
        self._finish(ex.agent.name, self.t.evaluate(ex, stdout))

    def _finish(self, name: str, outcome: ProbeOutcome) -> None:
        if name not in self.current:
            return  # removed while its exec was in flight
        self.results[name] = outcome
        for listener in (self.on_outcome, self.t.on_outcome):
            if listener is not None:
                listener(name, outcome)

    def _release(self, ex: _Exec) -> None:
        self.running.pop(ex.proc.pid, None)
        self._close_pipe(ex, "o")
        self._close_pipe(ex, "e")
        if ex.pidfd is not None:
            self.sel.unregister(ex.pidfd)
            os.close(ex.pidfd)
            ex.pidfd = None

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for ex in [ex for ex in self.running.values() if now >= ex.deadline]:
            log.debug("agent %s: no answer within %.1f s; killing its ssh (pid %d)",
                      ex.agent.name, self.t.deadline_for(ex.agent), ex.proc.pid)
            ex.timed_out = True
            self._kill(ex)
            if not ex.cold:
                self.t.retire_master(ex.agent)

    def _kill(self, ex: _Exec) -> None:
        kill_group(ex.proc)
        ex.proc.wait()  # SIGKILL cannot be caught: this reaps at once, so nothing is left behind
        ex.exited = True
        self._complete(ex)

    def abort(self) -> None:
        """Kill and reap every child still running (cancel, or an exception in the loop); their hosts
        are left out of the answer."""
        for ex in list(self.running.values()):
            kill_group(ex.proc)
            ex.proc.wait()
            self._release(ex)
        self.sel.close()


def _valid_reads(reads: Sequence) -> tuple:
    """The reads that can go into a script (at most job_log_read.MAX_READS): a bad one must not cost the
    host its heartbeat, so it is left out (and said) rather than failing the script."""
    valid = []
    for read in reads:
        try:
            valid.append(job_log_read.check_read(read))
        except ValueError as exc:
            log.warning("job log read left out: %s", exc)
    return tuple(valid[:job_log_read.MAX_READS])


def _read(fd: int) -> bytes | None:
    """One non-blocking read: data, b"" at end of file, None when nothing is there yet."""
    try:
        return os.read(fd, READ_CHUNK)
    except BlockingIOError:
        return None
    except OSError as exc:  # pragma: no cover - a pipe read fails no other way
        if exc.errno == errno.EIO:
            return b""
        raise


def _pidfd(pid: int) -> int | None:
    """A pidfd for the child (Linux 5.3+), so its exit wakes the selector; None elsewhere."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except OSError:
        return None
