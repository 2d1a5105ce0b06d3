# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""The job role's remote steps: POSIX sh scripts run with one exec each over the host's own connection,
and the reading of what they print. Used by the job_start and job_wait action plugins.

Why sh and not Ansible modules: a module is a Python start and a file transfer on the remote per task
(about 20 of them made a trivial job take 11 s), and it needs Ansible's interpreter discovery, which picks
the first ``python3.X`` on the login shell's PATH, a broken pyenv shim included. These scripts need only
``sh`` and coreutils/busybox tools; the one Python they run is the ``python3`` of the remote PATH that the
start script has just checked (it runs, and it is 3.8 or newer), for the staged runner only.

What they keep from the module-based role (docs/jobs.md):

* the private directory is ``mktemp -d`` (random name, 0700, checked: a directory of ours, not a link);
  ``job.json`` (0600) and ``runner.pyz`` come on the exec's **stdin** and are written with sh builtins and
  ``cat`` under ``set -C`` (never through an existing file), so the job's env values are in no argv;
* the runner is started detached (``setsid`` when present, stdio on files), so a dropped SSH connection
  does not stop it; a small sh wrapper writes its exit status to ``runner.rc`` (atomically, by rename);
  ``HWLEDGER_JOB_LOG_DIR`` tells it to log the job's output in the private dir (``job_log``);
* ``result.json`` is inspected with ``ls -lnd`` (an lstat: no open, so a FIFO cannot block it), and read
  with ``head -c LIMIT+1 --`` (so a file swapped after the check cannot flood the controller);
* this user's ``hwledger-job-*`` directories older than the stale age are swept (``find``: no link followed);
* a job is started at most once: before anything of it is written, another private directory of the same job
  id (this user's, not a link) or a live process of this user whose argument is a ``job.json`` of that job
  refuses the start (``job_already_started``), leaving what is there untouched;
* a job whose run was cut off is found again by its id (``find_script``, for the reconcile of a restarted
  server): its directories, its runner if it still runs, and the traces of its launch.

Every value put into a script is shell-quoted here; every line read back is parsed strictly, and anything
unexpected is an error that quotes a bounded piece of the remote's text.
"""

from __future__ import annotations

import re
import secrets
import shlex

START_MARK = "HWLEDGER-JOB-START"
ERROR_MARK = "HWLEDGER-JOB-ERROR"
RUNNER_OUT_BYTES = 4096  # the runner prints one sha256 line
RUNNER_ERR_BYTES = 2000  # the tail of its stderr, for a failure message
SHOWN_CHARS = 300

_JOB_DIR = re.compile(r"^/(?:[A-Za-z0-9._-]+/)*hwledger-job-[A-Za-z0-9._-]+$")
_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
START_REASONS = ("no_runner", "private_dir", "input", "job_already_started")
# The files the runner's wrapper creates as it starts (its stdio), ends (runner.rc) and the runner's result:
# any of them in a job's dir proves its runner was launched (job.json and runner.pyz come before the launch).
LAUNCH_TRACES = ("runner.out", "runner.err", "runner.rc", "result.json")

# sh: the runs of job $id that are still running (this user's processes with an argument DIR/job.json, DIR
# one of the job's private dirs: the runner's wrapper and the runner), one line per run (its job.json path),
# each once. The id is in a variable, never in the script's text next to the pattern, so no shell running this
# script (whose command line holds it) can match (the first grep's own command line does, and is dropped by the
# exact match). Only sh builtins besides tr and grep.
_RUNS_OF_JOB = r"""runs_of_job() {
  # One grep reads every command line for the job's dir name (a busy host has thousands of processes:
  # two processes per candidate would cost seconds); only its few hits are looked at argument by argument.
  for cmdline in $(grep -l -F -- "hwledger-job-$id-" /proc/[0-9]*/cmdline 2>/dev/null); do
    [ -O "${cmdline%/cmdline}" ] || continue
    tr '\000' '\n' < "$cmdline" 2>/dev/null | grep -x -- "/.*/hwledger-job-$id-[^/]*/job[.]json"
  done | { seen=' '; while IFS= read -r run; do
    case $seen in *" $run "*) ;; *) seen="$seen$run "; printf '%s\n' "$run" ;; esac
  done; }
}
"""
_AGE = re.compile(r"^(\d+)([smhdw]?)$")
_AGE_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class RemoteStepError(Exception):
    """A remote step failed; ``reason`` is machine-readable, the message is for people."""

    def __init__(self, reason, msg):
        super().__init__(msg)
        self.reason = reason


def _show(text):
    text = str(text).strip()
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def is_job_dir(path):
    """A remote path that can only be a job's private directory: absolute, plain characters, no '..'."""
    return (isinstance(path, str) and bool(_JOB_DIR.match(path)) and "/../" not in path + "/"
            and "/./" not in path + "/")


def stale_minutes(age):
    """``find -mmin`` minutes for an age in ansible.builtin.find's format (``8d``, ``36h``, ``600``)."""
    match = _AGE.match(str(age).strip().lower())
    if not match:
        raise ValueError("stale age %s is not a number of seconds, or of minutes, hours, days or weeks "
                         "(such as 8d)" % _show(age))
    seconds = int(match.group(1)) * _AGE_SECONDS[match.group(2)]
    return max(1, -(-seconds // 60))


# ----------------------------------------------------------------------------------------------------
# Start: private dir, sweep, job.json and runner.pyz from stdin, the runner detached

_START = r"""umask 077
id=@ID@
base=@BASE@
[ -n "$base" ] || base=${TMPDIR:-/tmp}
want=@RUNNER@
dir=
fail() { cat >/dev/null 2>&1; [ -n "$dir" ] && [ -d "$dir" ] && [ ! -h "$dir" ] && rm -rf -- "$dir"; printf '%s %s %s\n' @ERROR@ "$1" "$2"; exit 3; }
runner=
if [ "$want" != staged ] && command -v hwledger >/dev/null 2>&1; then runner=hwledger; fi
if [ -z "$runner" ]; then
  [ "$want" = hwledger ] && fail no_runner "hwledger is not on its PATH (hwledger_job_runner=hwledger)"
  py=$(command -v python3 2>/dev/null) || fail no_runner "python3 is not on its PATH"
  why=$("$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else "python " + sys.version.split()[0])' 2>&1 </dev/null) \
    || fail no_runner "python3 on its PATH ($py) does not run, or is older than 3.8: $why"
  runner=staged
fi
dir=$(mktemp -d "$base/hwledger-job-$id-XXXXXXXX") || { dir=; fail private_dir "cannot create a private directory in $base"; }
case $(ls -lnd -- "$dir" 2>/dev/null) in drwx------*) ;; *) fail private_dir "$dir is not a private directory" ;; esac
[ -d "$dir" ] && [ ! -h "$dir" ] && [ -O "$dir" ] || fail private_dir "$dir is not a directory of ours"
if [ @STALE@ -gt 0 ]; then
  find "$base/." ! -name . -prune -type d -name 'hwledger-job-*' -user "$(id -u)" -mmin +@STALE@ \
    -exec rm -rf -- {} + 2>/dev/null
fi
@RUNS_OF_JOB@
earlier=0
for other in "$base"/hwledger-job-"$id"-*; do
  [ "$other" = "$dir" ] && continue
  [ -d "$other" ] && [ ! -h "$other" ] && [ -O "$other" ] && earlier=$((earlier + 1))
done
running=$(runs_of_job | { n=0; while IFS= read -r run; do n=$((n + 1)); done; echo "$n"; })
if [ "$earlier" -gt 0 ] || [ "$running" -gt 0 ]; then
  fail job_already_started "$earlier other private dir(s) of it, $running runner(s) of it still running"
fi
IFS= read -r spec || fail input "no job spec on standard input"
(set -C; printf '%s\n' "$spec" > "$dir/job.json") || fail private_dir "cannot write $dir/job.json"
unset spec
if [ "$runner" = staged ]; then
  (set -C; cat > "$dir/runner.pyz") && [ -s "$dir/runner.pyz" ] || fail input "no runner on standard input"
  set -- "$py" "$dir/runner.pyz" run "$dir/job.json" --output "$dir/result.json"
else
  cat >/dev/null
  set -- hwledger run "$dir/job.json" --output "$dir/result.json"
fi
cd "$dir" || fail private_dir "cannot enter $dir"
detach=
command -v setsid >/dev/null 2>&1 && detach=setsid
# The runner logs the job's output as it comes into the private dir (job_log), where the heartbeat reads it.
HWLEDGER_JOB_LOG_DIR=$dir
export HWLEDGER_JOB_LOG_DIR
$detach sh -c 'd=$1; shift; "$@" >"$d/runner.out" 2>"$d/runner.err"; echo "$?" >"$d/runner.rc.tmp" && mv -f "$d/runner.rc.tmp" "$d/runner.rc"' \
  hwledger-job "$dir" "$@" </dev/null >/dev/null 2>&1 &
printf '%s %s %s %s\n' @START@ "$dir" "$!" "$runner"
"""


def start_script(job_id, *, runner="auto", tmp_base="", stale_age_minutes=0):
    """The start step (stdin: ``start_input``). Prints ``START_MARK DIR PID RUNNER`` or ``ERROR_MARK ...``."""
    if runner not in ("auto", "hwledger", "staged"):
        raise ValueError("runner must be auto, hwledger or staged, not %s" % _show(runner))
    _check_job_id(job_id)
    values = {"@BASE@": shlex.quote(tmp_base or ""), "@RUNNER@": runner, "@ID@": job_id,
              "@STALE@": str(int(stale_age_minutes)), "@START@": START_MARK, "@ERROR@": ERROR_MARK,
              "@RUNS_OF_JOB@": _RUNS_OF_JOB}
    return re.sub("|".join(values), lambda m: values[m.group(0)], _START)


def _check_job_id(job_id):
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ValueError("job_id %s is not a validated UUID" % _show(job_id))


def start_input(job_json, runner_bundle=None):
    """What the start step reads: the job JSON as one line, then the runner bundle (when it may be staged)."""
    line = job_json.rstrip(b"\n")
    if b"\n" in line or b"\r" in line:
        raise ValueError("the encoded job spec must be one line of JSON")
    return line + b"\n" + (runner_bundle or b"")


def parse_start(rc, stdout, stderr):
    """{"path", "pid", "runner"} from the start step's output, else RemoteStepError."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(ERROR_MARK + " "):
            reason, _sep, msg = line[len(ERROR_MARK) + 1:].partition(" ")
            raise RemoteStepError(reason if reason in START_REASONS else "start_failed", msg)
        if line.startswith(START_MARK + " "):
            fields = line.split(" ")
            if len(fields) == 4 and is_job_dir(fields[1]) and fields[2].isdigit() and fields[3] in ("hwledger", "staged"):
                return {"path": fields[1], "pid": int(fields[2]), "runner": fields[3]}
            break
    raise RemoteStepError("start_failed", "the job could not be started (exit code %s): %s %s"
                          % (rc, _show(stdout), _show(stderr)))


# ----------------------------------------------------------------------------------------------------
# Find a job whose run was cut off (reconcile)

_FIND = r"""id=@ID@
base=@BASE@
[ -n "$base" ] || base=${TMPDIR:-/tmp}
@RUNS_OF_JOB@
# The runs first, the files after: a runner that ends between the two has written its result before it
# ended, so the answer is "running" (looked at again) or "ended, with its result", never "ended, no result".
runs_of_job | while IFS= read -r run; do printf 'run %s\n' "$run"; done
for dir in "$base"/hwledger-job-"$id"-*; do
  [ -d "$dir" ] && [ ! -h "$dir" ] && [ -O "$dir" ] || continue
  printf 'dir %s\n' "$dir"
  for name in @TRACES@; do
    [ -e "$dir/$name" ] || [ -h "$dir/$name" ] && printf 'trace %s %s\n' "$dir" "$name"
  done
done
echo end
"""


def find_script(job_id, *, tmp_base=""):
    """This user's private dirs of a job (``dir PATH``), the traces of a launch in each (``trace PATH NAME``:
    LAUNCH_TRACES present, a link counts), the job.json of each run still running (``run PATH``), ``end``.

    ``tmp_base`` is where job_start made the dir (empty: the remote's ``$TMPDIR`` or ``/tmp``, as job_start)."""
    _check_job_id(job_id)
    values = {"@BASE@": shlex.quote(tmp_base or ""), "@ID@": job_id, "@RUNS_OF_JOB@": _RUNS_OF_JOB,
              "@TRACES@": " ".join(LAUNCH_TRACES)}
    return re.sub("|".join(values), lambda m: values[m.group(0)], _FIND)


def parse_find(stdout, job_id):
    """{"dirs": [...], "traces": {dir: [names]}, "runs": [job.json paths]} from the find step."""
    found = {"dirs": [], "traces": {}, "runs": []}
    prefix = "hwledger-job-%s-" % job_id
    complete = False
    for line in stdout.splitlines():
        kind, _sep, rest = line.partition(" ")
        if kind == "end" and not rest:
            complete = True
        elif kind == "dir" and is_job_dir(rest) and rest.rsplit("/", 1)[1].startswith(prefix):
            found["dirs"].append(rest)
            found["traces"][rest] = []
        elif kind == "trace":
            path, _sep, name = rest.rpartition(" ")
            if path in found["traces"] and name in LAUNCH_TRACES:
                found["traces"][path].append(name)
        elif kind == "run" and rest.endswith("/job.json") and is_job_dir(rest[:-len("/job.json")]):
            found["runs"].append(rest)
    if not complete:
        raise RemoteStepError("find_failed", "unexpected answer while looking for the job: %s" % _show(stdout))
    return found


# ----------------------------------------------------------------------------------------------------
# Poll, inspect, read


def poll_script(path, pid, wait_s=0.0):
    """Prints ``done RC``, ``running`` or ``gone`` (the runner's wrapper vanished without an exit status).

    With ``wait_s``, the remote checks every 50 ms for up to that long before answering ``running``: the
    first poll of a job sees a short job end within 50 ms for the cost of one exec (where ``sleep`` takes
    no fraction, the check is made once)."""
    d = shlex.quote(path)
    steps = int(round(float(wait_s) / 0.05))
    return ("d=%s; p=%d; n=%d\n"
            "while [ ! -f \"$d/runner.rc\" ] && [ \"$n\" -gt 0 ] && kill -0 \"$p\" 2>/dev/null && sleep 0.05 2>/dev/null; do\n"
            "  n=$((n - 1))\n"
            "done\n"
            "if [ -f \"$d/runner.rc\" ]; then echo \"done $(cat \"$d/runner.rc\")\"\n"
            "elif kill -0 \"$p\" 2>/dev/null; then echo running\n"
            "elif [ -f \"$d/runner.rc\" ]; then echo \"done $(cat \"$d/runner.rc\")\"\n"
            "else echo gone; fi\n" % (d, int(pid), steps))


def parse_poll(stdout):
    """("done", rc), ("running", None) or ("gone", None); RemoteStepError for anything else."""
    words = stdout.strip().split()
    if words == ["running"] or words == ["gone"]:
        return words[0], None
    if len(words) == 2 and words[0] == "done" and words[1].isdigit():
        return "done", int(words[1])
    raise RemoteStepError("poll_failed", "unexpected answer while polling the job: %s" % _show(stdout))


def inspect_script(path, token):
    """lstat of result.json (``ls -lnd``: never opened), our uid, the runner's stdout head and stderr tail,
    each after a line ``==<token> <name>`` (the token is random per call: the runner's output cannot fake one)."""
    d = shlex.quote(path)
    return ("d=%s\n"
            "echo '==%s stat'; ls -lnd -- \"$d/result.json\" 2>/dev/null\n"
            "echo '==%s uid'; id -u\n"
            "echo '==%s out'; [ -f \"$d/runner.out\" ] && head -c %d \"$d/runner.out\"\n"
            "echo; echo '==%s err'; [ -f \"$d/runner.err\" ] && tail -c %d \"$d/runner.err\"\n"
            "exit 0\n" % (d, token, token, token, RUNNER_OUT_BYTES, token, RUNNER_ERR_BYTES))


def new_token():
    return secrets.token_hex(12)


def parse_inspect(stdout, token):
    """{"stat": {...} or None, "uid": int or None, "out": str, "err": str} from the inspect step."""
    sections = {}
    current = None
    for line in stdout.split("\n"):
        if line.startswith("==%s " % token):
            current = line.split(" ", 1)[1]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    stat_lines = [line for line in sections.get("stat", []) if line.strip()]
    uid_lines = [line.strip() for line in sections.get("uid", []) if line.strip()]
    return {
        "stat": _parse_ls(stat_lines[0]) if stat_lines else None,
        "uid": int(uid_lines[0]) if uid_lines and uid_lines[0].isdigit() else None,
        "out": "\n".join(sections.get("out", [])).strip("\n"),
        "err": "\n".join(sections.get("err", [])).strip("\n"),
    }


def _parse_ls(line):
    """Type, owner uid and size from one ``ls -lnd`` line (POSIX: mode links owner group size ...)."""
    fields = line.split()
    if len(fields) < 5 or not fields[2].isdigit() or not fields[4].isdigit():
        raise RemoteStepError("result_not_regular_file", "unexpected listing of result.json: %s" % _show(line))
    kind = {"-": "file", "l": "link", "d": "directory"}.get(fields[0][:1], "other")
    return {"kind": kind, "uid": int(fields[2]), "size": int(fields[4])}


def read_command(path, max_bytes, *, then_remove=False):
    """The bounded read: ``head -c LIMIT+1 -- DIR/result.json`` (one byte past the limit tells it is too big).

    ``then_remove``: the same exec then removes the private directory (the bytes are on their way to the
    controller, which validates them; nothing else of the job is needed there), saving the role a step."""
    command = "head -c %d -- %s" % (int(max_bytes) + 1, shlex.quote(path + "/result.json"))
    if then_remove:
        command = "%s; status=$?; %s; exit $status" % (command, remove_command(path))
    return command


def remove_command(path):
    """Remove the private directory (``rm -rf`` never follows a link inside it)."""
    if not is_job_dir(path):
        raise ValueError("refusing to remove %s: not an hwledger job directory" % _show(path))
    return "rm -rf -- %s" % shlex.quote(path)
