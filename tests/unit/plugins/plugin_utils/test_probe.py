"""The probe script (run here with real shells and fake GPU tools) and its evaluation.

The script is what runs on a GPU host; running it locally with /bin/sh (and bash when present) checks
the parts that matter there: the tool's stdout, stderr and exit status come back exactly and
separately, a hung tool is killed within its timeout (TERM, then KILL, whole process group), nothing is
left behind, and the host metrics come back whatever the tool did.
"""

from __future__ import annotations

import json
import os
import stat
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import probe, telemetry
from tests.toolchains import REPO

FIXTURES = REPO / "tests" / "fixtures" / "gpu"
MIB = 1048576

SHELLS = [shell for shell in ("/bin/sh", shutil.which("bash"), shutil.which("busybox")) if shell]


@dataclass
class Run:
    stdout: str
    stderr: str
    rc: int
    started: float
    ended: float

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    def frames(self) -> probe.Frames:
        frames = probe.split_frames(self.stdout)
        assert frames is not None, "no probe header in: %r" % self.stdout[:300]
        return frames


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    return path


@pytest.fixture
def remote_tmp(tmp_path: Path) -> Path:
    path = tmp_path / "remote-tmp"
    path.mkdir()
    return path


def fake_tool(bin_dir: Path, name: str, body: str) -> Path:
    tool = bin_dir / name
    tool.write_text("#!/bin/sh\n" + body + "\n")
    tool.chmod(0o755)
    return tool


def run_probe(cmd: str, *, bin_dir: Path, remote_tmp: Path, timeout_s: float = 5, host_metrics: bool = True,
              shell: str = "/bin/sh", suffix: str = " && sleep 0") -> Run:
    """Run the script as Ansible would (`sh -c '<script> && sleep 0'`), with a fake tool on PATH."""
    script = probe.remote_script(cmd, timeout_s=timeout_s, host_metrics=host_metrics)
    env = {"PATH": "%s:/usr/bin:/bin" % bin_dir, "TMPDIR": str(remote_tmp), "HOME": str(remote_tmp)}
    argv = [shell, "sh", "-c", script + suffix] if shell.endswith("busybox") else [shell, "-c", script + suffix]
    started = time.time()
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=timeout_s + 30, check=False)
    ended = time.time()
    return Run(proc.stdout.decode("utf-8", "surrogateescape"), proc.stderr.decode("utf-8", "replace"),
               proc.returncode, started, ended)


def leftovers(remote_tmp: Path) -> list[str]:
    """What a probe left in the remote temp dir, but the single-flight lock's directory when it is empty."""
    lock_dir = "hwledger-probe-%d" % os.getuid()
    return [p.name for p in remote_tmp.iterdir() if not (p.name == lock_dir and not any(p.iterdir()))]


def processes_with(marker: str) -> list[int]:
    """PIDs whose command line holds ``marker`` (to prove the tool's processes are gone)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline.replace(b"\0", b" "):
            found.append(int(entry))
    return found


def wait_gone(marker: str, seconds: float = 2.0) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = processes_with(marker)
        if not left:
            return []
        time.sleep(0.05)
    return processes_with(marker)


def unique_sleep() -> str:
    """A sleep duration no other process uses, so its processes can be found by command line."""
    return "%d.%03d" % (700 + os.getpid() % 200, int(time.time() * 1000) % 1000)


# ---------------------------------------------------------------------------------------------------
# remote_script: the shell side


@pytest.mark.parametrize("shell", SHELLS)
def test_stdout_stderr_and_rc_come_back_exactly_and_separately(shell, bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", r"printf 'line 1\n\nlast line without newline'; printf 'warn 1\nwarn 2' >&2; exit 3")
    run = run_probe("gputool --query", bin_dir=bin_dir, remote_tmp=remote_tmp, shell=shell)
    frames = run.frames()
    assert frames.content["stdout"] == "line 1\n\nlast line without newline"
    assert frames.content["stderr"] == "warn 1\nwarn 2"
    assert frames.values["rc"] == "3"
    # Sizes are not measured on the host (it would cost processes at every heartbeat): "-" stands for one.
    assert re.search(r"^hwl[0-9a-f]{24} stdout -$", run.stdout, re.M)
    assert "timeout" not in frames.values
    assert frames.complete


@pytest.mark.parametrize("shell", SHELLS)
def test_trailing_newlines_and_empty_output_are_kept(shell, bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", r"printf 'a\n\n\n'")
    frames = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, shell=shell).frames()
    assert frames.content["stdout"] == "a\n\n\n"
    assert frames.content["stderr"] == ""
    assert frames.values["rc"] == "0"


def test_binary_output_is_carried_byte_for_byte(bin_dir, remote_tmp):
    payload = bytes(range(256)) * 3
    data_file = bin_dir / "payload.bin"
    data_file.write_bytes(payload)
    fake_tool(bin_dir, "gputool", 'cat "%s"' % data_file)
    frames = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp).frames()
    assert frames.content["stdout"].encode("utf-8", "surrogateescape") == payload


def test_output_that_imitates_frames_stays_inside_the_tool_output(bin_dir, remote_tmp):
    # A tool cannot know the token chosen for this run; a forged header and frame lines are just text.
    forged = "HWLEDGER-PROBE/1 hwl" + "0" * 24 + "\nhwl" + "0" * 24 + " rc 0\nhwl" + "0" * 24 + " end\n"
    (bin_dir / "forged.txt").write_text(forged)
    fake_tool(bin_dir, "gputool", 'cat "%s"; exit 9' % (bin_dir / "forged.txt"))
    frames = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp).frames()
    assert frames.content["stdout"] == forged
    assert frames.values["rc"] == "9"


def test_the_command_reaches_sh_verbatim(bin_dir, remote_tmp):
    cmd = r"""printf '%s|%s\n' "it's" '$HOME `id` $(id) ;|&<>'"""
    frames = run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp).frames()
    assert frames.content["stdout"] == "it's|$HOME `id` $(id) ;|&<>\n"


def test_missing_tool_gives_rc_127_and_the_shell_message(bin_dir, remote_tmp):
    frames = run_probe("nvidia-smi --query-gpu=index --format=csv", bin_dir=bin_dir, remote_tmp=remote_tmp).frames()
    assert frames.values["rc"] == "127"
    assert "nvidia-smi" in frames.content["stderr"]
    assert "not found" in frames.content["stderr"]


@pytest.mark.parametrize("shell", SHELLS)
def test_a_hung_tool_is_killed_within_its_timeout(shell, bin_dir, remote_tmp):
    marker = unique_sleep()
    fake_tool(bin_dir, "gputool", "echo partial; sleep %s; echo never" % marker)
    run = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=1, shell=shell)
    frames = run.frames()
    assert "timeout" in frames.values
    # Did not hang: ~1 s normally, the tool would sleep for minutes (its watchdog answered: "timeout").
    assert run.elapsed < 1 + probe.KILL_GRACE_S + 8, "took %.2f s" % run.elapsed
    assert frames.content["stdout"] == "partial\n"
    assert frames.complete
    assert wait_gone(marker) == []


def test_a_tool_that_ignores_term_is_killed_one_second_later(bin_dir, remote_tmp):
    marker = unique_sleep()
    fake_tool(bin_dir, "gputool", "trap '' TERM; sleep %s" % marker)
    run = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=1)
    assert "timeout" in run.frames().values
    assert run.elapsed < 1 + probe.KILL_GRACE_S + 8, "took %.2f s" % run.elapsed  # not the tool's minutes
    assert wait_gone(marker) == []


def test_the_exec_ends_even_when_signals_cannot_end_the_tool(bin_dir, remote_tmp, monkeypatch):
    """A tool stuck in the kernel survives SIGKILL; the watchdog then wakes the shell, which answers anyway.

    Simulated by making the script's kill helper a no-op (a test cannot make an unkillable process), so
    only the watchdog's USR1 can end the shell's wait.
    """
    kill_helper = 'k() { kill "-$1" "-$p" 2>/dev/null; kill "-$1" "$p" 2>/dev/null; }'
    assert kill_helper in probe._SCRIPT
    monkeypatch.setattr(probe, "_SCRIPT", probe._SCRIPT.replace(kill_helper, "k() { :; }"))
    marker = unique_sleep()
    fake_tool(bin_dir, "gputool", "echo started; sleep %s" % marker)
    try:
        run = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=1)
        frames = run.frames()
        assert "timeout" in frames.values and frames.complete
        assert frames.content["stdout"] == "started\n"
        assert run.elapsed < 1 + probe.KILL_GRACE_S + 8, "took %.2f s" % run.elapsed  # not the tool's minutes
        assert processes_with(marker), "the simulated unkillable tool should still be running"
        # Single flight: while it lives, the next probes start no sibling; they answer "busy" at once,
        # naming its process group.
        monkeypatch.undo()
        for _index in range(2):
            again = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=1)
            busy = again.frames().values.get("busy", "")
            assert busy.startswith("g") and int(busy[1:]) > 1, again.stdout
            assert "stdout" not in again.frames().content and again.frames().complete
            outcome = probe.evaluate(agent="a", cmd="gputool", backend="nvidia", exec_stdout=again.stdout,
                                     exec_stderr=again.stderr, exec_rc=again.rc, started=again.started,
                                     ended=again.ended, host_metrics=True)
            assert (outcome.ok, outcome.reason) == (False, "tool_still_running")
            assert "process group %s" % busy[1:] in outcome.msg and outcome.snapshot is None
            assert outcome.host is not None and outcome.host["load1"] is not None  # the host still answered
        assert len(processes_with(marker)) == 1
    finally:
        for pid in processes_with(marker):  # the tool this test started and disarmed the kills for
            os.kill(pid, 9)
    assert wait_gone(marker) == []
    # Once it is gone, the lock is taken over and the tool runs again.
    fake_tool(bin_dir, "gputool", "echo back")
    assert run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=1).frames().content["stdout"] == "back\n"
    assert leftovers(remote_tmp) == []


def _probe_in_background(bin_dir: Path, remote_tmp: Path, timeout_s: float) -> subprocess.Popen:
    script = probe.remote_script("gputool", timeout_s=timeout_s, host_metrics=False)
    env = {"PATH": "%s:/usr/bin:/bin" % bin_dir, "TMPDIR": str(remote_tmp), "HOME": str(remote_tmp)}
    return subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_probes_at_the_same_moment_run_the_tool_one_at_a_time(bin_dir, remote_tmp):
    runs = remote_tmp.parent / "runs.log"
    fake_tool(bin_dir, "gputool", "echo start >> %s; sleep 0.5; echo end >> %s; echo ok" % (runs, runs))
    probes = [_probe_in_background(bin_dir, remote_tmp, 5) for _index in range(3)]
    outputs = [proc.communicate(timeout=60)[0].decode() for proc in probes]
    # Each probe waited for the one before it (they fit in the 2 s a probe waits), and got its answer.
    assert [probe.split_frames(out).content["stdout"] for out in outputs] == ["ok\n"] * 3
    assert runs.read_text().split() == ["start", "end"] * 3  # never two runs of the tool at once
    assert leftovers(remote_tmp) == []


def test_a_probe_that_waited_too_long_answers_busy(bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", "sleep 4; echo slow")
    first = _probe_in_background(bin_dir, remote_tmp, 10)
    time.sleep(0.5)
    second = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=10)
    busy = second.frames().values.get("busy", "")
    assert busy == "s%d" % first.pid, second.stdout  # the probe shell that holds the lock
    outcome = probe.evaluate(agent="a", cmd="gputool", backend="nvidia", exec_stdout=second.stdout,
                             exec_stderr=second.stderr, exec_rc=second.rc, started=second.started,
                             ended=second.ended, host_metrics=True)
    assert outcome.reason == "probe_busy" and "another hwledger probe (pid %d)" % first.pid in outcome.msg
    assert probe.split_frames(first.communicate(timeout=60)[0].decode()).content["stdout"] == "slow\n"


def test_a_lock_left_by_a_dead_probe_or_planted_junk_is_taken_over(bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", "echo ok")
    lock_dir = remote_tmp / ("hwledger-probe-%d" % os.getuid())
    lock_dir.mkdir(mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    # A process group whose only member is a zombie (never reaped: as under a PID 1 that does not reap).
    zombie = subprocess.Popen([shutil.which("setsid"), "true"])
    deadline = time.time() + 10
    while Path("/proc/%d/stat" % zombie.pid).read_text().rsplit(") ", 1)[1][0] != "Z" and time.time() < deadline:
        time.sleep(0.02)
    for target in ("s%d" % dead.pid, "g%d" % dead.pid, "g%d" % zombie.pid, "junk; rm -rf /", "g1x"):
        (lock_dir / "lock").symlink_to(target)
        run = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=5)
        assert run.frames().content["stdout"] == "ok\n", (target, run.stdout)
        assert not os.path.lexists(lock_dir / "lock")
    zombie.wait()


def test_ssh_command_starts_sh_with_the_script(bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", "echo ok")
    script = probe.remote_script("gputool", timeout_s=5, host_metrics=False)
    env = {"PATH": "%s:/usr/bin:/bin" % bin_dir, "TMPDIR": str(remote_tmp)}
    # What sshd does with the command: hand it to the login shell (here bash, if present, else sh).
    login_shell = shutil.which("bash") or "/bin/sh"
    command = probe.ssh_command(script)
    assert command.startswith("exec /bin/sh -c ")  # the login shell is replaced, not kept waiting
    proc = subprocess.run([login_shell, "-c", command], capture_output=True, env=env, timeout=30, check=False)
    frames = probe.split_frames(proc.stdout.decode())
    assert frames is not None and frames.content["stdout"] == "ok\n" and frames.complete


def test_the_tools_children_are_killed_with_it(bin_dir, remote_tmp):
    marker = unique_sleep()
    fake_tool(bin_dir, "gputool", "sleep %s & sleep %s; wait" % (marker, marker))
    run = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=1)
    assert "timeout" in run.frames().values
    assert wait_gone(marker) == []


def test_a_fast_tool_does_not_wait_for_the_watchdog(bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", "echo ok")
    run = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=30)
    assert run.frames().content["stdout"] == "ok\n"
    assert run.elapsed < 10  # milliseconds normally; the watchdog's timeout is 30 s


def test_the_private_directory_is_removed(bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", 'ls -ld "$(dirname "$(readlink -f /proc/$$/fd/1)")"; echo x >&2')
    frames = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp).frames()
    # The tool saw a private directory (drwx------) under TMPDIR ...
    assert frames.content["stdout"].startswith("drwx------")
    assert str(remote_tmp) in frames.content["stdout"]
    # ... and nothing of it is left but the (empty, private) directory of the single-flight lock.
    assert [p.name for p in remote_tmp.iterdir()] == ["hwledger-probe-%d" % os.getuid()]
    lock_dir = remote_tmp / ("hwledger-probe-%d" % os.getuid())
    assert list(lock_dir.iterdir()) == [] and stat.S_IMODE(lock_dir.stat().st_mode) == 0o700


def test_huge_output_is_cut_on_the_host(bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", "head -c 5000000 /dev/zero | tr '\\0' x")
    run = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp)
    frames = run.frames()
    # Cut to the cap (limit + 1 byte), so the controller knows by the length alone that it was cut.
    assert len(frames.content["stdout"]) == probe.STDOUT_CAP
    assert leftovers(remote_tmp) == []


def test_host_metrics_come_back_even_when_the_tool_fails(bin_dir, remote_tmp):
    run = run_probe("no-such-gpu-tool", bin_dir=bin_dir, remote_tmp=remote_tmp)
    frames = run.frames()
    host = probe.parse_host_metrics(frames.content.get("loadavg"), frames.content.get("meminfo"),
                                    frames.values.get("cpus"))
    assert host["cpu_count"] == len(os.sched_getaffinity(0))
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M).group(1))
    assert host["mem_total_bytes"] == total_kib * 1024
    assert 0 < host["mem_available_bytes"] <= host["mem_total_bytes"]
    assert all(isinstance(host[key], float) and host[key] >= 0 for key in ("load1", "load5", "load15"))


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("nproc_body, expected", [
    ("echo 12", 12),
    ("printf '6 (of 8)\\n'", 6),   # anything after the leading digits is dropped
    ("exit 1", 3),                  # a failing nproc: getconf's answer
    ("echo x12", None),             # no leading digits: no count
])
def test_the_cpu_count_is_nproc_s_leading_digits(shell, bin_dir, remote_tmp, nproc_body, expected):
    fake_tool(bin_dir, "nproc", nproc_body)
    fake_tool(bin_dir, "getconf", "echo 3")
    fake_tool(bin_dir, "gputool", "echo ok")
    frames = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, shell=shell).frames()
    host = probe.parse_host_metrics(None, None, frames.values.get("cpus"))
    assert host["cpu_count"] == expected


def test_the_host_metrics_start_one_process_at_most():
    """They run on every host at every heartbeat: builtins only, apart from nproc/getconf."""
    script = probe.remote_script("x", timeout_s=1, host_metrics=True)
    metrics = script[script.index('if [ "$M" = 1 ]'):]
    assert metrics.count("$(") == 1 and " | " not in metrics


def test_no_host_metrics_when_not_asked(bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", "echo ok")
    frames = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, host_metrics=False).frames()
    assert "loadavg" not in frames.content and "cpus" not in frames.values
    assert frames.complete


def test_the_script_runs_without_the_appended_sleep(bin_dir, remote_tmp):
    fake_tool(bin_dir, "gputool", "echo ok")
    frames = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp, suffix="").frames()
    assert frames.content["stdout"] == "ok\n" and frames.complete


def test_splitting_compiles_no_pattern_per_token(bin_dir, remote_tmp, monkeypatch):
    """Every exec has a new random token: a pattern compiled per token would miss re's cache every time."""
    fake_tool(bin_dir, "gputool", "echo ok")
    run = run_probe("gputool", bin_dir=bin_dir, remote_tmp=remote_tmp)

    def no_compile(*args, **kwargs):
        raise AssertionError("re.compile called while splitting frames")

    monkeypatch.setattr(probe.re, "compile", no_compile)
    frames = run.frames()
    assert frames.content["stdout"] == "ok\n" and frames.complete


def test_a_frame_line_with_another_token_ends_the_frames():
    token, other = "hwl" + "a" * 24, "hwl" + "b" * 24
    text = ("HWLEDGER-PROBE/1 {t}\n{t} stdout -\nok\n{t} end\n{o} rc 0\n{t} rc 0\n{t} done\n"
            .format(t=token, o=other))
    frames = probe.split_frames(text)
    assert frames.content == {"stdout": "ok"} and "rc" not in frames.values and not frames.complete


def test_every_script_gets_a_fresh_token():
    first = probe.remote_script("x", timeout_s=1, host_metrics=False)
    second = probe.remote_script("x", timeout_s=1, host_metrics=False)
    token_re = re.compile(r"^B=(hwl[0-9a-f]{24})$", re.M)
    assert token_re.search(first).group(1) != token_re.search(second).group(1)


@pytest.mark.parametrize("bad", ["", "   ", "a\0b"])
def test_empty_or_nul_commands_are_refused(bad):
    with pytest.raises(ValueError):
        probe.remote_script(bad, timeout_s=1, host_metrics=False)


@pytest.mark.parametrize("bad", [0, -1, 3601, True, "10"])
def test_timeouts_out_of_range_are_refused(bad):
    with pytest.raises(ValueError):
        probe.remote_script("x", timeout_s=bad, host_metrics=False)


# ---------------------------------------------------------------------------------------------------
# evaluate: the controller side, fed by real runs of the script


def evaluate(run: Run, cmd: str, *, backend: str = "auto", host_metrics: bool = True, agent: str = "box1") -> dict:
    """The outcome of a real probe run, as the gpu_query action returns it (its module result)."""
    return probe.evaluate(agent=agent, cmd=cmd, backend=backend, exec_stdout=run.stdout, exec_stderr=run.stderr,
                          exec_rc=run.rc, started=run.started, ended=run.ended,
                          host_metrics=host_metrics).module_result()


def fake_output(bin_dir: Path, tool: str, text: str, rc: int = 0) -> None:
    output = bin_dir / (tool + ".out")
    output.write_text(text)
    fake_tool(bin_dir, tool, 'cat "%s"; exit %d' % (output, rc))


def replay(bin_dir: Path, tool: str, fixture: str, rc: int = 0) -> None:
    fake_tool(bin_dir, tool, 'cat "%s"; exit %d' % (FIXTURES / fixture, rc))


def test_nvidia_capture_becomes_a_snapshot(bin_dir, remote_tmp):
    replay(bin_dir, "nvidia-smi",
           "nvidia/csv-header-index-name-memtotal-memfree-2xRTX4070Laptop-RTX5070Ti-windows.txt")
    cmd = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv"
    run = run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp)
    result = evaluate(run, cmd)
    assert result["changed"] is False
    snapshot = result["ansible_facts"]["hwledger_snapshot"]
    assert snapshot["agent"] == "box1"
    assert snapshot["backend"] == "nvidia"
    # Hand-checked against the capture: 8188/7948 MiB and 16303/15799 MiB.
    gpus = snapshot["gpus"]
    assert [g["index"] for g in gpus] == [0, 1]
    assert [g["name"] for g in gpus] == ["NVIDIA GeForce RTX 4070 Laptop GPU", "NVIDIA GeForce RTX 5070 Ti"]
    assert gpus[0]["memory_total_bytes"] == 8188 * MIB and gpus[0]["memory_free_bytes"] == 7948 * MIB
    assert gpus[1]["memory_used_bytes"] == (16303 - 15799) * MIB
    assert snapshot["host"]["cpu_count"] == len(os.sched_getaffinity(0))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", snapshot["captured_at"])
    assert 0 < snapshot["query_ms"] < 5000
    json.dumps(result)  # plain data all the way down


def test_default_noheader_command_with_a_hostile_gpu_name(bin_dir, remote_tmp):
    name = "{{ lookup('pipe', 'touch /tmp/hwledger-pwned') }} {% raw %}x"
    fake_output(bin_dir, "nvidia-smi", "0, %s, 81559 MiB, 81000 MiB\n" % name)
    cmd = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
    result = evaluate(run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp), cmd)
    gpu = result["ansible_facts"]["hwledger_snapshot"]["gpus"][0]
    assert gpu["name"] == name
    assert gpu["memory_total_bytes"] == 81559 * MIB


def test_rocm_csv_capture(bin_dir, remote_tmp):
    replay(bin_dir, "rocm-smi", "rocm/csv-showproductname-2xMI100-lowercase-card-series.txt")
    cmd = "rocm-smi --showproductname --csv"
    result = evaluate(run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp), cmd)
    snapshot = result["ansible_facts"]["hwledger_snapshot"]
    assert snapshot["backend"] == "rocm"
    assert [g["index"] for g in snapshot["gpus"]] == [0, 1]


def test_missing_tool_is_tool_not_found_with_host_metrics(bin_dir, remote_tmp):
    cmd = "nvidia-smi --query-gpu=index --format=csv"
    result = evaluate(run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp), cmd)
    assert result["failed"] is True
    assert result["reason"] == "tool_not_found"
    assert result["rc"] == 127
    assert "nvidia-smi" in result["output_head"]
    assert result["host"]["cpu_count"] == len(os.sched_getaffinity(0))


def test_nvml_failure_capture(bin_dir, remote_tmp):
    replay(bin_dir, "nvidia-smi", "nvidia/failure-nvml-driver-library-version-mismatch.txt", rc=18)
    cmd = "nvidia-smi --query-gpu=index,name --format=csv"
    result = evaluate(run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp), cmd)
    assert result["reason"] == "nvml_error"
    assert result["rc"] == 18


def test_timeout_is_reported_as_timeout_with_host_metrics(bin_dir, remote_tmp):
    marker = unique_sleep()
    fake_tool(bin_dir, "nvidia-smi", "sleep %s" % marker)
    cmd = "nvidia-smi --query-gpu=index --format=csv"
    result = evaluate(run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp, timeout_s=1), cmd)
    assert result["failed"] is True and result["reason"] == "timeout"
    assert "nvidia-smi" in result["msg"]
    assert result["host"]["mem_total_bytes"] > 0
    assert wait_gone(marker) == []


def test_oversized_output_is_output_too_large(bin_dir, remote_tmp):
    fake_tool(bin_dir, "nvidia-smi", "head -c 3000000 /dev/zero | tr '\\0' 7")
    cmd = "nvidia-smi --query-gpu=index --format=csv"
    result = evaluate(run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp), cmd)
    assert result["reason"] == "output_too_large"
    assert len(result["output_head"]) <= telemetry.OUTPUT_HEAD_CHARS


def test_binary_output_is_unparseable_not_a_crash(bin_dir, remote_tmp):
    fake_tool(bin_dir, "nvidia-smi", "head -c 4000 /dev/urandom")
    cmd = "nvidia-smi --query-gpu=index,name --format=csv"
    result = evaluate(run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp), cmd)
    assert result["failed"] is True
    assert result["reason"] == "unparseable"


def test_pty_line_endings_are_undone(bin_dir, remote_tmp):
    replay(bin_dir, "nvidia-smi", "nvidia/csv-header-index-name-memtotal-memfree-2xRTX4070Laptop-RTX5070Ti-windows.txt")
    cmd = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv"
    run = run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp)
    plain = evaluate(run, cmd)
    run.stdout = run.stdout.replace("\n", "\r\n")
    through_pty = evaluate(run, cmd)
    assert through_pty["ansible_facts"]["hwledger_snapshot"]["gpus"] == plain["ansible_facts"]["hwledger_snapshot"]["gpus"]


def test_a_login_banner_before_the_header_is_ignored(bin_dir, remote_tmp):
    fake_tool(bin_dir, "nvidia-smi", "printf '0, GPU A, 1024 MiB, 1000 MiB\\n'")
    cmd = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
    run = run_probe(cmd, bin_dir=bin_dir, remote_tmp=remote_tmp)
    run.stdout = "Welcome to gpu-box!\nHWLEDGER-PROBE/1 not-a-token\n" + run.stdout
    gpus = evaluate(run, cmd)["ansible_facts"]["hwledger_snapshot"]["gpus"]
    assert [g["name"] for g in gpus] == ["GPU A"]


def synthetic(exec_stdout: str, exec_stderr: str = "", exec_rc: int = 0, host_metrics: bool = True) -> dict:
    return probe.evaluate(agent="box1", cmd="nvidia-smi", backend="auto", exec_stdout=exec_stdout,
                          exec_stderr=exec_stderr, exec_rc=exec_rc, started=1.0, ended=2.0,
                          host_metrics=host_metrics).module_result()


def test_ssh_host_key_change_is_host_key_changed():
    stderr = ("@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
              "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
              "Host key verification failed.\n")
    result = synthetic("", stderr, 255)
    assert result["reason"] == "host_key_changed"
    assert result["rc"] == 255
    assert "re-key" in result["msg"]


def test_unknown_host_key_is_host_key_unknown():
    result = synthetic("", "No ED25519 host key is known for [127.0.0.5]:2222 and you have requested strict "
                           "checking.\nHost key verification failed.\n", 255)
    assert result["reason"] == "host_key_unknown"
    assert "hwledger fleet register-ssh" in result["msg"] and "hwledger-agent-box1" in result["msg"]


CHANGED_STDERR = (
    "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
    "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
    "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
    "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n"
    "Offending ED25519 key in /home/u/.config/hwledger/known_hosts:3\n"
    "Host key for hwledger-agent-box1 has changed and you have requested strict checking.\n"
    "Host key verification failed.\n")


@pytest.mark.parametrize("stderr, expected", [
    (CHANGED_STDERR, "host_key_changed"),
    # Only the "Offending" line left (e.g. the banner cut off): still a changed key.
    ("Offending ECDSA key in /k:1\nHost key verification failed.\n", "host_key_changed"),
    ("No ED25519 host key is known for hwledger-agent-box1 and you have requested strict checking.\n"
     "Host key verification failed.\n", "host_key_unknown"),
    # ssh said nothing more than the generic line: nothing shows a change, so the key is unknown.
    ("Host key verification failed.\r\n", "host_key_unknown"),
    # Ansible's unreachable message embeds ssh's stderr.
    ("Failed to connect to the host via ssh: " + CHANGED_STDERR, "host_key_changed"),
    ("Failed to connect to the host via ssh: Host key verification failed.", "host_key_unknown"),
    ("ssh: connect to host 10.0.0.9 port 22: Connection refused\n", None),
    ("kex_exchange_identification: read: Connection reset by peer\n", None),
    ("Permission denied (publickey).\n", None),
    ("", None),
    (None, None),
])
def test_classify_ssh_failure(stderr, expected):
    assert probe.classify_ssh_failure(stderr) == expected


def test_other_ssh_failures_are_unreachable():
    result = synthetic("", "ssh: connect to host 10.0.0.9 port 22: Connection refused\n", 255)
    assert result["reason"] == "unreachable"
    assert "Connection refused" in result["msg"]


def test_no_header_is_unparseable():
    result = synthetic("fish: Unknown command\n", "", 127)
    assert result["reason"] == "unparseable"
    assert "fish: Unknown command" in result["output_head"]


def test_output_cut_before_the_exit_status():
    token = "hwl" + "a" * 24
    cut = "HWLEDGER-PROBE/1 %s\n%s stdout 10\n0, GPU A, \n%s end\n" % (token, token, token)
    assert synthetic(cut, "", 0)["reason"] == "unparseable"
    assert synthetic(cut, "Connection to x closed by remote host.\n", 255)["reason"] == "unreachable"


def test_probe_setup_failure_is_reported_with_host_metrics():
    token = "hwl" + "b" * 24
    out = ("HWLEDGER-PROBE/1 {t}\n{t} fatal -\nmktemp -d failed in /tmp, /tmp and /root\n{t} end\n"
           "{t} loadavg -\n1.50 1.00 0.50 1/2 3\n\n{t} end\n{t} meminfo -\nMemTotal: 1000 kB\n\n{t} end\n"
           "{t} cpus 4\n{t} done\n").format(t=token)
    result = synthetic(out)
    assert result["reason"] == "unparseable"
    assert "mktemp -d failed" in result["msg"]
    assert result["host"] == {"cpu_count": 4, "load1": 1.5, "load5": 1.0, "load15": 0.5,
                              "mem_total_bytes": 1024000, "mem_available_bytes": None}


@pytest.mark.parametrize("loadavg, meminfo, cpus, expected", [
    ("0.00 0.01 0.05 1/1 1\n", "MemTotal: 16 kB\nMemAvailable: 8 kB\n", "2",
     {"cpu_count": 2, "load1": 0.0, "load5": 0.01, "load15": 0.05, "mem_total_bytes": 16384,
      "mem_available_bytes": 8192}),
    (None, None, None, dict.fromkeys(("cpu_count", "load1", "load5", "load15", "mem_total_bytes",
                                      "mem_available_bytes"))),
    ("9" * 50 + " x -1\n", "MemTotal: " + "9" * 40 + " kB\n", "0",
     dict.fromkeys(("cpu_count", "load1", "load5", "load15", "mem_total_bytes", "mem_available_bytes"))),
])
def test_host_metric_parsing_is_bounded(loadavg, meminfo, cpus, expected):
    assert probe.parse_host_metrics(loadavg, meminfo, cpus) == expected


def test_exec_timeout_failure_names_the_budget():
    result = probe.exec_timeout_failure(agent="box1", timeout_s=10).module_result()
    assert result["failed"] is True and result["reason"] == "timeout" and result["rc"] is None
    assert result["answered"] is False
    assert "13 s" in result["msg"]
    assert probe.controller_deadline(10) == 10 + probe.CONTROLLER_GRACE_S


def test_iso_utc_is_utc_with_z():
    assert probe.iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert probe.iso_utc(1700000000.5) == "2023-11-14T22:13:20.500Z"


def test_a_liveness_check_runs_no_tool_and_answers_with_the_host_metrics(bin_dir, remote_tmp):
    calls = remote_tmp.parent / "calls"
    fake_tool(bin_dir, "gputool", "echo called >> %s; echo ok" % calls)
    script = probe.remote_script("gputool", timeout_s=5, host_metrics=True, query=False)
    env = {"PATH": "%s:/usr/bin:/bin" % bin_dir, "TMPDIR": str(remote_tmp), "HOME": str(remote_tmp)}
    started = time.time()
    proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, env=env, timeout=30, check=False)
    frames = probe.split_frames(proc.stdout.decode())
    assert frames.complete and "stdout" not in frames.content and "rc" not in frames.values
    assert not calls.exists() and list(remote_tmp.iterdir()) == []  # no tool, no temp dir, no lock
    outcome = probe.evaluate(agent="a", cmd="gputool", backend="nvidia", exec_stdout=proc.stdout.decode(),
                             exec_stderr="", exec_rc=proc.returncode, started=started, ended=time.time(),
                             host_metrics=True, query=False)
    assert outcome.ok and outcome.snapshot is None and outcome.host["mem_total_bytes"] > 0
    # Cut short, it is not an answer.
    cut = probe.evaluate(agent="a", cmd="gputool", backend="nvidia", exec_stdout=proc.stdout.decode()[:-8],
                         exec_stderr="", exec_rc=1, started=started, ended=time.time(), host_metrics=True,
                         query=False)
    assert not cut.ok
