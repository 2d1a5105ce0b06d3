"""SshFanoutHeartbeat with a stand-in `ssh` (no sshd): result mapping, the deadline kill, the concurrency
bounds, cancel, spawn failures and that no child is ever left behind.

The stand-in is a POSIX sh script given as `ssh_binary`. It receives the exact argv the transport builds
(logged, so the options can be checked against agents.ssh_argv), takes the destination after `--`, and
behaves by the destination's first label: `ok*` runs the remote command (the real probe) with the real
/bin/sh and that host's fake GPU tool on PATH; `hang*` sleeps in a child process; `refused*` and
`rekeyed*` print what OpenSSH prints in those cases and exit 255; `flood*` prints more than any probe
could. Every start and end is logged with a timestamp, which gives the concurrency actually reached.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import probe, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger import fanout
from hwledger.heartbeat import HeartbeatRunError
from tests.toolchains import REPO

FIXTURES = REPO / "tests" / "fixtures" / "gpu"
A800 = "nvidia/csv-header-index-name-memtotal-memfree-driver-computecap-8xA800-SXM4-80GB.txt"
A800_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap --format=csv"
MISMATCH = "nvidia/failure-nvml-driver-library-version-mismatch.txt"
MARKER = "HWLEDGER_FANOUT_UNIT_TEST"

FAKE_SSH = r"""#!/bin/sh
# Stand-in for ssh (see the test module's docstring).
log="$FAKE_SSH_DIR/log"
printf '%s\n' "$*" >/dev/null
argv_file="$FAKE_SSH_DIR/argv.$$"
for arg in "$@"; do printf '%s\0' "$arg"; done >"$argv_file"
op=
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    -O) op=$2 ;;
  esac
  shift
done
host=$1
cmd=$2
now() { date +%s.%N; }
printf 'start %s %s %s\n' "$$" "$host" "$(now)" >>"$log"
code=0
if [ -n "$op" ]; then
  printf 'op %s %s\n' "$op" "$host" >>"$log"
else
  case "$host" in
    hang*) sleep 60 ;;
    refused*) echo "ssh: connect to host $host port 22: Connection refused" >&2; code=255 ;;
    rekeyed*)
      echo '@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@' >&2
      echo '@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @' >&2
      echo 'Host key verification failed.' >&2
      code=255 ;;
    flood*) head -c 3000000 /dev/zero ;;
    *) # Each host is a machine of its own: its own tools and its own runtime dir (the probe's lock).
       PATH="$FAKE_SSH_DIR/hosts/$host:$PATH" XDG_RUNTIME_DIR="$FAKE_SSH_DIR/hosts/$host.run" /bin/sh -c "$cmd"
       code=$? ;;
  esac
fi
printf 'end %s %s %s\n' "$$" "$host" "$(now)" >>"$log"
exit $code
"""


class FakeFleet:
    """The stand-in ssh, per-host fake tools, and the log both write."""

    def __init__(self, root: Path):
        self.root = root
        self.ssh = root / "ssh"
        self.ssh.write_text(FAKE_SSH)
        self.ssh.chmod(0o755)
        (root / "hosts").mkdir()
        self.log = root / "log"
        self.log.write_text("")

    def host(self, name: str, *, capture: str = A800, rc: int = 0, sleep: float = 0.0) -> None:
        bin_dir = self.root / "hosts" / name
        bin_dir.mkdir()
        (self.root / "hosts" / f"{name}.run").mkdir(mode=0o700)
        tool = bin_dir / "nvidia-smi"
        pause = f"sleep {sleep}\n" if sleep else ""
        tool.write_text(f"#!/bin/sh\n{pause}cat {FIXTURES / capture}\nexit {rc}\n")
        tool.chmod(0o755)

    def events(self) -> list[tuple[str, str, str, float]]:
        rows = []
        for line in self.log.read_text().splitlines():
            kind, pid, host, *rest = line.split()
            rows.append((kind, pid, host, float(rest[0]) if rest and kind in ("start", "end") else 0.0))
        return rows

    def max_overlap(self, hosts: set[str] | None = None) -> int:
        """The most stand-in ssh processes that ran at the same time."""
        points = sorted((t, 1 if kind == "start" else -1) for kind, _pid, host, t in self.events()
                        if kind in ("start", "end") and (hosts is None or host in hosts))
        live = peak = 0
        for _t, step in points:
            live += step
            peak = max(peak, live)
        return peak

    def argvs(self) -> list[list[str]]:
        return [path.read_bytes().rstrip(b"\0").decode().split("\0") for path in sorted(self.root.glob("argv.*"))]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeFleet:
    monkeypatch.setenv("FAKE_SSH_DIR", str(tmp_path))
    # Every process the transport starts inherits this, so a leftover one can be found by it.
    monkeypatch.setenv(MARKER, str(tmp_path))
    return FakeFleet(tmp_path)


@pytest.fixture
def policy(tmp_path: Path) -> ssh.SshPolicy:
    return ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"))


def agent(name: str, host: str | None = None, cmd: str = A800_CMD) -> agents_schema.Agent:
    return agents_schema.Agent(name=name, hostname=host or f"{name}.test", ssh_user="gpu",
                               ssh_key_path="/nonexistent/id_ed25519", gpu_query_cmd=cmd)


def transport(fake: FakeFleet, policy, **kwargs) -> fanout.SshFanoutHeartbeat:
    kwargs.setdefault("query_timeout_s", 5)
    return fanout.SshFanoutHeartbeat(policy, ssh_binary=str(fake.ssh), **kwargs)


def _marked_processes(tag: str, ssh: str) -> tuple[list[int], list[int]]:
    """(stand-in ssh processes, all live processes) that carry this test's marker."""
    needle = f"{MARKER}={tag}".encode()
    clients, everything = [], []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ.split(b"\0") and state not in ("Z", "X"):
            everything.append(int(entry))
            if ssh.encode() in cmdline[:2]:
                clients.append(int(entry))
    return clients, everything


def leftover_processes(tag: str) -> list[int]:
    """Processes left by a tick. The stand-in ssh processes (what the transport starts) must be gone
    when tick() returns; the probe's own helpers (on a real host they run remotely) may take a moment
    after its exit to go, e.g. its watchdog's sleep, which it TERMs on the way out."""
    clients, _everything = _marked_processes(tag, f"{tag}/ssh")
    if clients:
        return clients
    deadline = time.monotonic() + 3.0
    while True:
        _clients, everything = _marked_processes(tag, f"{tag}/ssh")
        if not everything or time.monotonic() > deadline:
            return everything
        time.sleep(0.05)


def zombie_children() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append(int(entry))
    return found


def never() -> bool:
    return False


# -- result mapping ------------------------------------------------------------------------------


def test_a_healthy_host_gives_its_snapshot(fake: FakeFleet, policy) -> None:
    fake.host("ok-1.test")
    outcomes = transport(fake, policy).tick([agent("ok-1")], cancel=never)
    assert set(outcomes) == {"ok-1"}
    outcome = outcomes["ok-1"]
    assert outcome.ok and outcome.reason is None
    snapshot = outcome.snapshot
    assert snapshot["agent"] == "ok-1" and snapshot["backend"] == "nvidia"
    assert len(snapshot["gpus"]) == 8
    assert {gpu["name"] for gpu in snapshot["gpus"]} == {"NVIDIA A800-SXM4-80GB"}
    assert snapshot["gpus"][0]["memory_total_bytes"] == 81920 * 1048576
    assert snapshot["host"]["cpu_count"] == os.cpu_count()  # host metrics came back in the same exec


def test_each_failure_gets_the_reason_the_probe_gives_it(fake: FakeFleet, policy) -> None:
    fake.host("ok-1.test")
    fake.host("nvml-1.test", capture=MISMATCH, rc=18)
    agents = [agent("ok-1"), agent("nvml-1"), agent("refused-1"), agent("rekeyed-1")]
    outcomes = transport(fake, policy).tick(agents, cancel=never)
    assert outcomes["ok-1"].ok
    # One parser: the tool failure is classified exactly as the probe classifies that output.
    expected = probe.evaluate_tool_output(agent="nvml-1", cmd=A800_CMD, backend="auto",
                                          stdout=(FIXTURES / MISMATCH).read_text(), stderr="", rc=18,
                                          started=0.0, ended=0.0)
    assert not expected.ok and outcomes["nvml-1"].reason == expected.reason
    assert not outcomes["nvml-1"].ok
    refused = outcomes["refused-1"]
    assert (refused.ok, refused.reason, refused.answered, refused.snapshot) == (False, "unreachable", False, None)
    assert "Connection refused" in outcomes["refused-1"].msg
    assert outcomes["rekeyed-1"].reason == "host_key_changed"


def test_output_beyond_any_probe_is_cut_and_reported(fake: FakeFleet, policy) -> None:
    outcomes = transport(fake, policy).tick([agent("flood-1")], cancel=never)
    assert outcomes["flood-1"].reason == "output_too_large"
    assert leftover_processes(str(fake.root)) == []


def test_the_argv_is_the_one_options_builder_s(fake: FakeFleet, tmp_path: Path) -> None:
    control_dir = tempfile.mkdtemp(prefix="hwlf-", dir="/tmp")  # short: a unix socket path lives in it
    try:
        policy = ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"), control_dir=control_dir)
        fake.host("ok-1.test")
        one = agent("ok-1")
        transport(fake, policy).tick([one], cancel=never)
        (argv,) = fake.argvs()
        expected = ssh.ssh_argv(one, policy, "placeholder")
        assert argv[:-1] == expected[1:-1]  # everything but the program name and the remote command
        assert argv[-1].startswith("exec /bin/sh -c ")
        assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
        assert f"ControlPath={control_dir}/%C" in argv
    finally:
        shutil.rmtree(control_dir)


# -- bounds --------------------------------------------------------------------------------------


def test_a_hung_host_is_killed_at_the_deadline_and_the_others_are_answered(fake: FakeFleet, policy) -> None:
    for i in range(3):
        fake.host(f"ok-{i}.test")
    seen: dict[str, float] = {}
    start = time.monotonic()
    hb = transport(fake, policy, query_timeout_s=2, deadline_s=3.0,
                   on_outcome=lambda name, _o: seen.setdefault(name, time.monotonic() - start))
    outcomes = hb.tick([agent("hang-1"), agent("ok-0"), agent("ok-1"), agent("ok-2")], cancel=never)
    elapsed = time.monotonic() - start
    assert 3.0 <= elapsed < 15  # cut at the deadline; the hung stand-in would sleep far longer
    # The exec never came back: for the server that is a host that did not answer (a miss).
    assert outcomes["hang-1"].reason == "no_answer"
    assert all(outcomes[f"ok-{i}"].ok for i in range(3))
    # The others were not held up by it: they answer in milliseconds, the hung one at 3 s.
    assert max(seen[f"ok-{i}"] for i in range(3)) < 1.5
    assert leftover_processes(str(fake.root)) == []  # the stand-in and its sleeping child are gone


def test_concurrency_never_exceeds_the_bound(fake: FakeFleet, policy) -> None:
    names = [f"ok-{i}" for i in range(9)]
    for name in names:
        fake.host(f"{name}.test", sleep=0.3)
    hb = transport(fake, policy, max_parallel=3)
    outcomes = hb.tick([agent(name) for name in names], cancel=never)
    assert all(outcomes[name].ok for name in names)
    assert fake.max_overlap() == 3


def test_new_connections_are_paced_and_warm_ones_are_not(fake: FakeFleet, tmp_path: Path) -> None:
    control_dir = tempfile.mkdtemp(prefix="hwlf-", dir="/tmp")
    try:
        policy = ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"), control_dir=control_dir)
        names = [f"ok-{i}" for i in range(6)]
        for name in names:
            fake.host(f"{name}.test", sleep=0.4)
        hb = transport(fake, policy, max_parallel=6, max_new_connections=2)
        agents = [agent(name) for name in names]
        assert all(o.ok for o in hb.tick(agents, cancel=never).values())
        assert fake.max_overlap() == 2  # first tick: every agent is a new connection
        fake.log.write_text("")
        assert all(o.ok for o in hb.tick(agents, cancel=never).values())
        assert fake.max_overlap() > 2  # second tick: they answered, so their masters are up
    finally:
        shutil.rmtree(control_dir)


def _start_order(fake: FakeFleet) -> list[str]:
    return [host for kind, _pid, host, _t in fake.events() if kind == "start"]


def test_a_new_connection_starts_before_the_warm_ones(fake: FakeFleet, tmp_path: Path) -> None:
    control_dir = tempfile.mkdtemp(prefix="hwlf-", dir="/tmp")
    try:
        policy = ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"), control_dir=control_dir)
        for i in range(5):
            fake.host(f"ok-{i}.test")
        hb = transport(fake, policy, max_parallel=1)
        hb.tick([agent(f"ok-{i}") for i in range(4)], cancel=never)
        fake.log.write_text("")
        # ok-4 is new (no master yet): it starts first, however late it comes in the list.
        hb.tick([agent(f"ok-{i}") for i in range(5)], cancel=never)
        assert _start_order(fake)[0] == "ok-4.test"
    finally:
        shutil.rmtree(control_dir)


def test_the_slowest_warm_host_starts_first(fake: FakeFleet, tmp_path: Path) -> None:
    control_dir = tempfile.mkdtemp(prefix="hwlf-", dir="/tmp")
    try:
        policy = ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"), control_dir=control_dir)
        fake.host("ok-0.test")
        fake.host("ok-1.test", sleep=0.5)
        fake.host("ok-2.test")
        agents = [agent("ok-0"), agent("ok-1"), agent("ok-2")]
        hb = transport(fake, policy, max_parallel=1)
        hb.tick(agents, cancel=never)
        assert hb.last_duration(agents[1]) >= 0.5
        fake.log.write_text("")
        hb.tick(agents, cancel=never)
        assert _start_order(fake)[0] == "ok-1.test"
    finally:
        shutil.rmtree(control_dir)


def test_a_host_that_stopped_answering_counts_as_a_new_connection_again(fake: FakeFleet, tmp_path: Path) -> None:
    control_dir = tempfile.mkdtemp(prefix="hwlf-", dir="/tmp")
    try:
        policy = ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"), control_dir=control_dir)
        fake.host("ok-1.test")
        hb = transport(fake, policy)
        now = time.monotonic()
        hb.tick([agent("ok-1"), agent("refused-1")], cancel=never)
        assert hb.is_warm(agent("ok-1"), now) and not hb.is_warm(agent("refused-1"), now)
        # A changed configuration is another connection (another ControlPath hash): cold again.
        assert not hb.is_warm(agent("ok-1", host="ok-2.test"), now)
    finally:
        shutil.rmtree(control_dir)


def test_cancel_stops_the_tick_and_leaves_the_unfinished_hosts_out(fake: FakeFleet, policy) -> None:
    fake.host("ok-1.test")
    start = time.monotonic()
    hb = transport(fake, policy, query_timeout_s=30)
    outcomes = hb.tick([agent("ok-1"), agent("hang-1"), agent("hang-2")],
                       cancel=lambda: time.monotonic() - start > 0.8)
    assert time.monotonic() - start < 10  # stopped by the cancel (~0.8 s), not by the 30 s timeout
    assert "hang-1" not in outcomes and "hang-2" not in outcomes  # not asked: they keep their state
    assert outcomes["ok-1"].ok
    assert leftover_processes(str(fake.root)) == []


def test_no_ssh_at_all_is_a_controller_failure(policy) -> None:
    hb = fanout.SshFanoutHeartbeat(policy, ssh_binary="/nonexistent/bin/ssh")
    with pytest.raises(HeartbeatRunError, match="could not start ssh"):
        hb.tick([agent("ok-1")], cancel=never)


def test_every_child_is_reaped_after_a_mixed_tick(fake: FakeFleet, policy) -> None:
    fake.host("ok-1.test")
    hb = transport(fake, policy, query_timeout_s=1, deadline_s=1.0)
    hb.tick([agent("ok-1"), agent("hang-1"), agent("refused-1"), agent("flood-1")], cancel=never)
    assert leftover_processes(str(fake.root)) == []
    assert zombie_children() == []  # every child was reaped


def test_an_empty_fleet_starts_nothing(fake: FakeFleet, policy) -> None:
    assert transport(fake, policy).tick([], cancel=never) == {}
    assert fake.events() == []


# -- settings and shutdown -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"max_parallel": 0}, {"max_parallel": True}, {"max_new_connections": 0},
                                    {"query_timeout_s": 0}, {"deadline_s": 0}])
def test_bad_settings_are_refused(policy, kwargs) -> None:
    with pytest.raises(ValueError):
        fanout.SshFanoutHeartbeat(policy, **kwargs)


def test_the_bound_stays_under_the_open_files_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout.resource, "getrlimit", lambda _which: (1024, 4096))
    assert fanout.max_parallel_for_fd_limit(1000) == (1024 - fanout.FDS_RESERVED) // fanout.FDS_PER_CHILD
    assert fanout.max_parallel_for_fd_limit(8) == 8


def test_close_asks_each_master_to_exit(fake: FakeFleet, tmp_path: Path) -> None:
    control_dir = tempfile.mkdtemp(prefix="hwlf-", dir="/tmp")
    try:
        policy = ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"), control_dir=control_dir)
        fake.host("ok-1.test")
        fake.host("ok-2.test")
        hb = transport(fake, policy)
        hb.tick([agent("ok-1"), agent("ok-2")], cancel=never)
        fake.log.write_text("")
        for path in fake.root.glob("argv.*"):
            path.unlink()
        hb.close(exit_masters=True)
        ops = sorted((op, host) for kind, op, host, _t in fake.events() if kind == "op")
        assert ops == [("exit", "ok-1.test"), ("exit", "ok-2.test")]
        for argv in fake.argvs():
            assert argv[:2] == ["-O", "exit"] and f"ControlPath={control_dir}/%C" in argv
            assert argv[-2:] == ["--", argv[-1]] and argv[-1].endswith(".test")  # no remote command
    finally:
        shutil.rmtree(control_dir)


def test_outcomes_are_classified_like_the_ansible_path_s() -> None:
    """The transport hands on the probe's outcome, which AnsibleHeartbeat rebuilds from the action's module
    result: the round trip keeps the classification. An exec that never came back is a miss, a tool
    killed by the remote watchdog is the host's error."""
    gone = ProbeOutcome.from_module_result(probe.exec_timeout_failure(agent="a", timeout_s=5).module_result())
    assert gone.reason == "no_answer" and gone.missed
    watchdog = ProbeOutcome.failure("timeout", "a: killed", agent="a", rc=143)
    assert ProbeOutcome.from_module_result(watchdog.module_result()).reason == "timeout"
    assert not ProbeOutcome.from_module_result(watchdog.module_result()).missed
    assert json.loads(json.dumps(probe.ssh_command("echo 'x'"))).startswith("exec /bin/sh -c ")


def test_a_first_dial_that_outlives_the_tick_budget_is_reported_later(fake: FakeFleet, tmp_path: Path) -> None:
    """The one agent's first dial takes longer than the tick's budget: it goes on between ticks, and a later
    tick reports it (it used to stay in flight for good when no other agent was asked)."""
    control_dir = tempfile.mkdtemp(prefix="hwlf-", dir="/tmp")
    try:
        policy = ssh.SshPolicy(known_hosts=str(tmp_path / "known_hosts"), control_dir=control_dir)
        fake.host("slow.test", sleep=0.6)
        hb = transport(fake, policy)
        assert hb.tick([agent("slow")], cancel=never, budget_s=0.1) == {}  # still dialling
        deadline = time.monotonic() + 10
        answered: dict = {}
        while not answered and time.monotonic() < deadline:
            time.sleep(0.2)
            answered = hb.tick([agent("slow")], cancel=never, budget_s=0.1)
        assert answered and answered["slow"].ok
    finally:
        hb.close()
        shutil.rmtree(control_dir)


def test_a_lone_host_whose_dial_outlives_the_budget_is_heard_at_a_later_tick(fake: FakeFleet, policy) -> None:
    """A first connection slower than the tick's budget goes on between ticks and is reported by a later
    tick, even when it is the only host (no other exec keeps that tick's event loop running), and it is
    not dialled again while it runs."""
    fake.host("slow-1.test", sleep=1.0)
    hb = transport(fake, policy)
    try:
        assert hb.tick([agent("slow-1")], cancel=never, budget_s=0.05) == {}
        assert hb.in_flight() == ["slow-1"]
        outcomes: dict = {}
        give_up = time.monotonic() + 30  # the exec takes about a second; 30 s means it was never read
        while "slow-1" not in outcomes and time.monotonic() < give_up:
            time.sleep(0.2)
            outcomes = hb.tick([agent("slow-1")], cancel=never, budget_s=0.05)
        assert outcomes["slow-1"].ok, outcomes
        assert hb.in_flight() == []
        assert [kind for kind, _pid, host, _t in fake.events() if kind == "start" and host == "slow-1.test"] == ["start"]
    finally:
        hb.close()


def test_no_answer_over_a_warm_connection_retires_its_master(fake: FakeFleet, policy) -> None:
    """An exec over a connection believed warm that gets no answer by its deadline: the master may be
    wedged (its network died; it still takes sessions, which hang), so it is asked to exit and the next
    dial is a fresh connection. A cold dial that times out has no master to retire."""
    fake.host("ok-1.test")
    control_dir = Path(tempfile.mkdtemp(prefix="hwl-", dir="/tmp"))  # masters are shared only with one
    sharing = ssh.SshPolicy(known_hosts=policy.known_hosts, control_dir=str(control_dir))
    hb = transport(fake, sharing, query_timeout_s=1, deadline_s=0.5)
    try:
        wedged, cold = agent("hang-1"), agent("hang-2")
        hb.note_connection(wedged, True, 0.1)  # it answered a moment ago: its master is up
        assert hb.is_warm(wedged, time.monotonic()) and not hb.is_warm(cold, time.monotonic())
        outcomes = hb.tick([wedged, cold, agent("ok-1")], cancel=never)
        assert outcomes["hang-1"].reason == outcomes["hang-2"].reason == "no_answer"
        assert outcomes["ok-1"].ok
        give_up = time.monotonic() + 10
        while not [e for e in fake.events() if e[0] == "op"] and time.monotonic() < give_up:
            time.sleep(0.05)
        assert [(kind, op, host) for kind, op, host, _t in fake.events() if kind == "op"] == [("op", "exit", "hang-1.test")]
        assert not hb.is_warm(wedged, time.monotonic())  # the next dial is a new connection
    finally:
        hb.close()
        shutil.rmtree(control_dir, ignore_errors=True)
    assert leftover_processes(str(fake.root)) == []


# -- running jobs' logs, read in the heartbeat's exec ------------------------------------------------------


def test_job_logs_are_read_in_the_same_exec_and_a_bad_read_costs_nothing(fake: FakeFleet, policy, tmp_path) -> None:
    import uuid

    from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log
    from ansible_collections.hwledger.fleet.plugins.plugin_utils.job_log_read import LogRead

    job_id = str(uuid.uuid4())
    job_dir = tmp_path / f"hwledger-job-{job_id}-Ab12Cd"
    job_dir.mkdir(mode=0o700)
    record = job_log.encode_record("o", 0, b"progress 1\n")
    (job_dir / job_log.file_name(0)).write_bytes(record)
    fake.host("ok-1.test")
    reads = [LogRead(job_id, str(job_dir)), LogRead(job_id, "/etc; reboot")]
    outcomes = transport(fake, policy).tick([agent("ok-1")], cancel=never, log_reads={"ok-1": reads})
    outcome = outcomes["ok-1"]
    assert outcome.ok and outcome.snapshot["gpus"]
    assert [(c.job_id, c.kind, c.data) for c in outcome.job_logs] == [(job_id, "data", record)]
