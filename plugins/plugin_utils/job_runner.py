# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""The hwledger job runner: executes one job on a GPU host and writes its result.

Run as ``hwledger run JOB.json --output RESULT.json`` where hwledger is installed, or, on a host that has
only python3, as the one-file bundle the job role stages (``job_bundle.bundle()``: this module and the standard-
library-only modules it needs, ``python3 runner.pyz run JOB.json --output RESULT.json``). So it and
everything it imports stay standard library only and Python 3.8 compatible.

What the runner guarantees (see docs/jobs.md):

* the argv runs without a shell, stdin from /dev/null, in a new session (its own process group), with a
  minimal environment (PATH, HOME, LANG, ... from the runner's own environment) plus the job's env;
* stdout and stderr are read through pipes into ring buffers: at most 64 KiB of each is kept, however
  much the job prints; the job's env values (those of MIN_SECRET_CHARS characters or more, but the GPU
  selection variables) are masked in them as they come (``masked_values``, ``job_log.Masker``), so neither
  the result nor the log holds them; with a log directory (``--log-dir``, or ``HWLEDGER_JOB_LOG_DIR`` as the job role
  sets it) both are also written, as they come, to a bounded rotating log there (``job_log``: at most
  2 MiB on disk) that the controller follows;
* at ``timeout_s`` the job gets SIGTERM, then SIGKILL after a grace period;
* when the job ends (exit, signal or timeout) every process it left behind is killed: its process group
  always; on Linux also every other descendant, including ones that called setsid() or double-forked,
  because the runner makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER) so orphans are
  re-parented to it and can be found through /proc.  Not covered: processes the job asked someone else
  to start (systemd, cron, at, ssh to another host) and processes stuck in uninterruptible sleep;
* a result is written for every outcome it can observe, atomically (``private_files.write_atomically``);
  an output path that is a symlink or not a regular file is refused.  The sha256 of the written bytes is
  printed on stdout (``<hex>  <path>``, the sha256sum format) so the controller can check what it read.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log, private_files, processes
from ansible_collections.hwledger.fleet.plugins.plugin_utils.job_schema import (
    DEFAULT_TIMEOUT_S,
    MIN_SECRET_CHARS,
    TAIL_BYTES,
    VISIBLE_DEVICES_VARS,
    JobSpecError,
    encode_result,
    load_job_file,
    make_result,
    new_job,
    validate_job,
    validate_job_id,
)

KILL_GRACE_S = 5.0  # SIGTERM -> SIGKILL
DRAIN_S = 2.0  # how long output is still read after the job's processes are gone


# Exit codes of the runner itself (`hwledger run`, `python3 jobs.py run`).
EXIT_SUCCEEDED = 0  # the job exited 0                                result state succeeded
EXIT_FAILED = 1  # the job exited non-zero or was killed by a signal  result state failed
EXIT_INVALID = 2  # bad usage, or the job file/spec is invalid         result state error (invalid_job)
EXIT_TIMED_OUT = 3  # the job ran past timeout_s and was killed        result state timed_out
EXIT_NO_RESULT = 4  # the result could not be written (see stderr)     no result file
EXIT_NOT_STARTED = 5  # the command could not be started               result state error
EXIT_RUNNER_ERROR = 6  # the runner was interrupted or failed itself    result state error
EXIT_CODES_HELP = """\
exit codes:
  0  the job exited 0 (result state "succeeded")
  1  the job exited non-zero or was killed by a signal (state "failed")
  2  usage error, or the job file is invalid (state "error", reason "invalid_job")
  3  the job ran past timeout_s and was killed (state "timed_out")
  4  the result file could not be written (nothing written; the reason is on stderr)
  5  the command could not be started: not found, not executable, bad workdir (state "error")
  6  the runner was interrupted (SIGTERM/SIGINT/SIGHUP) or failed itself (state "error")
On success the sha256 of the result file is printed on stdout as "<hex>  <path>".
"""

_EXIT_BY_STATE = {"succeeded": EXIT_SUCCEEDED, "failed": EXIT_FAILED, "timed_out": EXIT_TIMED_OUT}
_EXIT_BY_REASON = {
    "invalid_job": EXIT_INVALID,
    "command_not_found": EXIT_NOT_STARTED,
    "permission_denied": EXIT_NOT_STARTED,
    "workdir_unavailable": EXIT_NOT_STARTED,
    "exec_failed": EXIT_NOT_STARTED,
    "interrupted": EXIT_RUNNER_ERROR,
    "runner_error": EXIT_RUNNER_ERROR,
}

# Where the job role tells the runner to write the job's log (the private dir). An environment variable
# rather than only the flag: an older `hwledger` installed on a host ignores it (and writes no log) where
# it would refuse an unknown flag and fail the job. Never passed on to the job (BASE_ENV_KEYS).
LOG_DIR_ENV = "HWLEDGER_JOB_LOG_DIR"

# Copied from the runner's own environment into the job's (when set); the job's env comes on top.
BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "USER", "LOGNAME", "SHELL", "TMPDIR", "TZ")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


# Env variables whose values are never masked: the GPU selection that hwledger's placement adds to the job's
# env (hwledger.placement.launch_spec: CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES) and its kin. They are
# not secrets, and their values (GPU UUIDs, long enough to be masked) are what a job's output names its GPUs
# by: masking them would hide which GPUs the job used.
UNMASKED_ENV = frozenset(VISIBLE_DEVICES_VARS)


def masked_values(job):
    """The values the runner masks in what the job prints: every env value of MIN_SECRET_CHARS characters or
    more but those of UNMASKED_ENV, as bytes: as the job's environment holds them (os.fsencode, which
    subprocess uses) and in UTF-8 (the same on a UTF-8 host)."""
    values = set()
    for name, value in sorted(job["env"].items()):
        if name in UNMASKED_ENV or len(value) < MIN_SECRET_CHARS:
            continue
        values.add(value.encode("utf-8", "surrogatepass"))
        try:
            values.add(os.fsencode(value))
        except UnicodeError:
            pass  # not in the environment either: Popen refuses it
    return sorted(values, key=len, reverse=True)


def mask_text(text, values):
    """A message (str) with the values (bytes, UTF-8) masked."""
    if not values:
        return text
    return job_log.mask(text.encode("utf-8", "surrogatepass"), values).decode("utf-8", "surrogatepass")


def _masked_error(error, values):
    """An error dict whose message may quote the job's env (PATH, its argv, an exception): masked before
    make_result cuts it to its size limit, so no part of a value is left at the cut."""
    if error is None or not values:
        return error
    return dict(error, message=mask_text(error["message"], values))


def _show(value, limit=80):
    """A short, escaped rendering of an untrusted value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Processes: the job's tree


def _set_child_subreaper(on):
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4); True when it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # local: not every Python build has it, and only Linux needs it

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1 if on else 0, 0, 0, 0) == 0  # 36 = PR_SET_CHILD_SUBREAPER
    except (ImportError, OSError, AttributeError):
        return False


class _JobTree:
    """The processes of one job: its process group, its session and (on Linux, as a subreaper) every
    descendant, including those that left the group with setsid() and were re-parented to us."""

    def __init__(self):
        self.leader = None
        self.subreaper = _set_child_subreaper(True)
        table = processes.table()
        self.visible = table is not None  # without /proc only the process group can be killed
        # Children we already had (e.g. a test harness's servers) are not the job's.
        self.preexisting = processes.children(os.getpid(), table or {})

    def started(self, pid):
        self.leader = pid

    def members(self):
        """Live (non-zombie) pids of the job, and our own zombie children that belong to it."""
        table = processes.table()
        if table is None or self.leader is None:
            return set(), set()
        me = os.getpid()
        roots = {self.leader}
        if self.subreaper:
            roots |= processes.children(me, table) - self.preexisting
        found = processes.descendants(roots & set(table), table)
        # Its process group and its session, whoever their parent is now.
        found |= {pid for pid, proc in table.items() if self.leader in (proc.pgid, proc.sid)}
        found.discard(me)
        live = {pid for pid in found if not table[pid].zombie}
        our_zombies = {pid for pid in found if table[pid].zombie and table[pid].ppid == me and pid != self.leader}
        return live, our_zombies

    def signal_all(self, signum):
        if self.leader is None:
            return
        try:
            os.killpg(self.leader, signum)
        except OSError:
            pass  # no member left
        live, _zombies = self.members()
        for pid in live:
            if pid == self.leader:
                continue  # signalled through the group (or already gone)
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def reap(self, zombies):
        for pid in zombies:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def alive(self, leader_done):
        live, zombies = self.members()
        self.reap(zombies)
        if leader_done:
            live.discard(self.leader)
        return bool(live)

    def close(self):
        if self.subreaper:
            _set_child_subreaper(False)


# ----------------------------------------------------------------------------------------------------
# The runner


class _Tail:
    """Keeps the last `limit` bytes of a stream and counts all of them."""

    def __init__(self, limit=TAIL_BYTES):
        self.limit = limit
        self.buffer = bytearray()
        self.total = 0

    def feed(self, data):
        self.total += len(data)
        self.buffer += data
        if len(self.buffer) > 2 * self.limit:
            del self.buffer[: -self.limit]

    def data(self):
        return bytes(self.buffer[-self.limit:])


class _Output:
    """Reads the job's stdout and stderr pipes without blocking into two bounded tails (and the log), with
    the job's env values masked (`values`: bytes). Each stream goes through its own masker, and what comes
    out of it is what the tail keeps, what the log gets and what the byte counts count; the few bytes a
    masker keeps back (the end of a read that may be the start of a value) come out with the next read or
    at the stream's end."""

    def __init__(self, proc, log=None, values=()):
        self.proc = proc
        self.log = log
        self.selector = selectors.DefaultSelector()
        self.tails = {}
        self.maskers = {}
        self.streams = {proc.stdout.fileno(): "o", proc.stderr.fileno(): "e"}
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            self.tails[stream.fileno()] = _Tail()
            self.maskers[stream.fileno()] = job_log.Masker(values)
            self.selector.register(stream.fileno(), selectors.EVENT_READ)
        self.stdout = self.tails[proc.stdout.fileno()]
        self.stderr = self.tails[proc.stderr.fileno()]

    def open(self):
        return bool(self.selector.get_map())

    def pump(self, timeout):
        """Read what is there (waiting at most `timeout` seconds for something)."""
        if not self.open():
            time.sleep(max(0.0, timeout))
            return
        for key, _events in self.selector.select(max(0.0, timeout)):
            for _chunk in range(16):  # a few reads per wake-up keeps up with a fast writer
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(key.fd)
                    self._keep(key.fd, self.maskers[key.fd].flush())
                    break
                self._keep(key.fd, self.maskers[key.fd].feed(data))

    def _keep(self, fd, masked):
        if not masked:
            return
        self.tails[fd].feed(masked)
        if self.log is not None:
            self.log.write(self.streams[fd], masked)

    def drain(self, seconds):
        deadline = time.monotonic() + seconds
        while self.open() and time.monotonic() < deadline:
            self.pump(min(0.1, deadline - time.monotonic()))

    def close(self):
        for fd, masker in self.maskers.items():  # a stream still open (a process holds it): its end is now
            self._keep(fd, masker.flush())
        self.selector.close()
        self.proc.stdout.close()
        self.proc.stderr.close()


class _Interrupts:
    """SIGTERM/SIGINT/SIGHUP to the runner: stop the job and report it (main thread only)."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def job_environment(job, base=None):
    """The job's environment: a few variables from `base` (default: os.environ), the job's env on top."""
    base = os.environ if base is None else base
    env = {key: base[key] for key in BASE_ENV_KEYS if key in base}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(job["env"])
    env["HWLEDGER_JOB_ID"] = job["job_id"]
    return env


def _start(job, env, cwd):
    """Popen the job, or return (None, error dict) when it cannot start."""
    if not os.path.isdir(cwd):
        return None, {"reason": "workdir_unavailable", "message": "workdir %s does not exist or is not a directory" % cwd}
    try:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with  # closed by _Output.close
            job["command"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=cwd, start_new_session=True, close_fds=True,
        )
    except FileNotFoundError as exc:
        if exc.filename == cwd:
            return None, {"reason": "workdir_unavailable", "message": "workdir %s does not exist" % cwd}
        return None, {"reason": "command_not_found",
                      "message": "command not found: %s (PATH=%s)" % (_show(job["command"][0]), env.get("PATH", ""))}
    except PermissionError as exc:
        return None, {"reason": "permission_denied", "message": "cannot execute %s: %s" % (_show(job["command"][0]), exc.strerror)}
    except (OSError, ValueError) as exc:
        return None, {"reason": "exec_failed", "message": "cannot start %s: %s" % (_show(job["command"][0]), exc)}
    return proc, None


def _stop(tree, proc, output, grace):
    """SIGTERM to the whole tree, up to `grace` seconds to go, then SIGKILL until nothing is left."""
    tree.signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        output.pump(0.05)
        done = proc.poll() is not None
        if done and not tree.alive(leader_done=True):
            break
    for _round in range(50):  # a fork bomb may need several rounds; each round kills what it sees
        tree.signal_all(signal.SIGKILL)
        proc.poll()
        output.pump(0.02)
        if proc.returncode is not None and not tree.alive(leader_done=True):
            break
    if proc.returncode is None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel (uninterruptible sleep): reported without an exit status


def _supervise(job, proc, tree, output, interrupts, grace):
    """Wait for the job (reading its output) until it exits, times out or we are interrupted.
    Returns 'exited', 'timed_out' or 'interrupted'."""
    deadline = time.monotonic() + float(job["timeout_s"])
    how = "exited"
    while proc.poll() is None:
        if interrupts.received is not None:
            how = "interrupted"
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            how = "timed_out"
            break
        output.pump(min(0.1, remaining))
    if how != "exited" or not tree.visible or tree.alive(leader_done=True):
        # After a timeout or an interrupt, or when the job exited and left processes behind.
        _stop(tree, proc, output, grace if how != "exited" else min(grace, 1.0))
    output.drain(DRAIN_S)
    return how


def _execute(job, grace, log_dir=None):
    """Run the validated job and return the outcome as result fields (state, codes, output...)."""
    values = masked_values(job)
    env = job_environment(job)
    cwd = job["workdir"] or env.get("HOME") or "/"
    started = time.time()
    tree = _JobTree()
    log = None
    try:
        with _Interrupts() as interrupts:
            proc, error = _start(job, env, cwd)
            if proc is None:
                return make_result(job["job_id"], "error", started=started, finished=time.time(),
                                   error=_masked_error(error, values))
            tree.started(proc.pid)
            log = job_log.LogWriter(log_dir) if log_dir else None
            output = _Output(proc, log, values)
            try:
                how = _supervise(job, proc, tree, output, interrupts, grace)
            finally:
                if proc.poll() is None:  # only on an exception in _supervise
                    _stop(tree, proc, output, 0)
                output.close()
    finally:
        tree.close()
        if log is not None:
            log.close()
    return _outcome(job, proc.returncode, how, interrupts, output, started)


def _outcome(job, returncode, how, interrupts, output, started):
    exit_code = returncode if returncode is not None and returncode >= 0 else None
    signal_number = -returncode if returncode is not None and returncode < 0 else None
    error = None
    if how == "timed_out":
        state = "timed_out"
    elif how == "interrupted":
        state = "error"
        error = {"reason": "interrupted", "message": "the runner received signal %d and killed the job" % interrupts.received}
    elif returncode == 0:
        state = "succeeded"
    else:
        state = "failed"
    return make_result(
        job["job_id"], state, started=started, finished=time.time(), exit_code=exit_code,
        signal_number=signal_number, stdout=output.stdout.data(), stderr=output.stderr.data(),
        stdout_bytes=output.stdout.total, stderr_bytes=output.stderr.total, error=error,
    )


def _job_id_if_valid(spec):
    try:
        return validate_job_id(spec.get("job_id")) if isinstance(spec, dict) else None
    except JobSpecError:
        return None


def exit_code_for(result):
    if result["state"] == "error":
        return _EXIT_BY_REASON.get(result["error"]["reason"], EXIT_RUNNER_ERROR)
    return _EXIT_BY_STATE[result["state"]]


def _deliver(result, output, stdout, stderr):
    """Write the result, print its sha256; return the runner's exit code."""
    try:
        digest = private_files.write_atomically(output, encode_result(result))
    except private_files.PrivatePathError as exc:
        stderr.write("hwledger run: error: %s\n" % exc)
        return EXIT_NO_RESULT
    stdout.write("%s  %s\n" % (digest, output))
    stdout.flush()
    if result["error"] is not None:
        stderr.write("hwledger run: %s: %s\n" % (result["error"]["reason"], result["error"]["message"]))
    return exit_code_for(result)


def run_job(spec, output, *, kill_grace_s=KILL_GRACE_S, stdout=None, stderr=None, log_dir=None):
    """Run a job spec (validated here) and write its result to `output`; return the runner's exit code
    (EXIT_* above).  Prints "<sha256>  <output>" on stdout once the result is written.  With `log_dir`
    (a private directory), the job's output is also logged there as it comes (`job_log`)."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    now = time.time()
    try:
        job = validate_job(spec)
    except JobSpecError as exc:
        result = make_result(_job_id_if_valid(spec), "error", started=now, finished=time.time(),
                             error={"reason": "invalid_job", "message": str(exc)})
        return _deliver(result, output, stdout, stderr)
    try:
        result = _execute(job, kill_grace_s, log_dir)
    except Exception as exc:  # pylint: disable=broad-exception-caught  # the result must still be written
        error = {"reason": "runner_error", "message": "%s: %s" % (type(exc).__name__, exc)}
        result = make_result(job["job_id"], "error", started=now, finished=time.time(),
                             error=_masked_error(error, masked_values(job)))
    return _deliver(result, output, stdout, stderr)


def run_job_file(job_path, output, **kw):
    """`hwledger run JOB.json --output RESULT.json`: load the job file, run it, write the result."""
    try:
        spec = load_job_file(job_path)
    except JobSpecError as exc:
        now = time.time()
        result = make_result(None, "error", started=now, finished=now,
                             error={"reason": "invalid_job", "message": str(exc)})
        return _deliver(result, output, kw.get("stdout") or sys.stdout, kw.get("stderr") or sys.stderr)
    return run_job(spec, output, **kw)


# ----------------------------------------------------------------------------------------------------
# Command line (`python3 runner.pyz ...`); `hwledger run` uses add_run_arguments and run_job_file.


def add_run_arguments(parser):
    parser.add_argument("job", metavar="JOB.json", help="the job spec (JSON)")
    parser.add_argument("--output", "-o", metavar="RESULT.json", required=True,
                        help="where to write the result (atomically, mode 0600; a symlink is refused)")
    parser.add_argument("--log-dir", metavar="DIR", default=os.environ.get(LOG_DIR_ENV) or None,
                        help="also write the job's stdout and stderr, as they come, to a bounded rotating log "
                             "in this private directory (at most %d MiB; the controller follows it) [$%s]"
                             % (job_log.KEEP_FILES * job_log.ROTATE_BYTES // (1024 * 1024), LOG_DIR_ENV))


def _parse_env_pairs(pairs):
    env = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep:
            raise JobSpecError([("env", "%s must look like NAME=VALUE" % _show(pair))])
        env[name] = value
    return env


def build_parser():
    parser = argparse.ArgumentParser(
        prog="hwledger-runner", description="hwledger job runner and job spec tool (standard library only).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP,
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    run = sub.add_parser("run", help="run a job and write its result", epilog=EXIT_CODES_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(run)
    check = sub.add_parser("validate", help="validate a job file and print it normalised")
    check.add_argument("job", metavar="JOB.json")
    new = sub.add_parser("new", help="print a new job spec (fresh job_id) for the given argv")
    new.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    new.add_argument("--workdir")
    new.add_argument("--env", action="append", metavar="NAME=VALUE")
    new.add_argument("--model-ref")
    new.add_argument("command", nargs=argparse.REMAINDER, metavar="-- ARGV...")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.action == "run":
        return run_job_file(args.job, args.output, log_dir=args.log_dir)
    try:
        if args.action == "validate":
            job = validate_job(load_job_file(args.job))
        else:
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            timeout = int(args.timeout_s) if float(args.timeout_s).is_integer() else args.timeout_s
            job = new_job(command, timeout_s=timeout, workdir=args.workdir, env=_parse_env_pairs(args.env),
                          model_ref=args.model_ref)
    except JobSpecError as exc:
        sys.stderr.write("hwledger-runner: invalid job:\n%s\n" % exc)
        return EXIT_INVALID
    sys.stdout.write(json.dumps(job, sort_keys=True, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
