# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The heartbeat probe: one POSIX-sh script, run as ONE exec on the GPU host, and its evaluation.

Used by the ``hwledger.fleet.gpu_query`` action plugin, by ``hwledger gpu parse`` and by the app's
direct-ssh heartbeat, so there is one script and one parser.

What the remote needs: a POSIX ``sh`` with ``mktemp``, ``head -c``, ``rm`` and ``sleep`` (coreutils or
busybox); ``setsid``, ``nproc`` (or ``getconf``), and ``id``, ``ln``, ``readlink``, ``mv`` (the single-flight
lock) are used when present. No Python. The script

* runs the configured query command with ``/bin/sh -c`` (in its own process group when ``setsid`` exists),
  stdin from /dev/null, stdout and stderr into two files of a private ``mktemp -d`` directory (0700, removed
  by a trap whatever happens), with a file-size limit so a runaway tool cannot fill the disk;
* runs the tool only when no other run of it by this user is alive on the host (a lock in a private
  ``$XDG_RUNTIME_DIR/hwledger-probe`` directory, or ``hwledger-probe-<uid>`` beside the temp dir where
  that is not set; see the script), else answers ``busy``;
* runs a watchdog that, after ``timeout_s``, sends TERM to the tool (its process group), KILL one second
  later, and then wakes the main shell with USR1 so that even a tool stuck in the kernel cannot keep the
  exec open;
* prints framed sections. A random token chosen here, on the controller, starts every frame line, so a
  tool's output cannot end a section by accident. The token is discoverable from the header line
  (``HWLEDGER-PROBE/1 <token>``), which is printed before the tool starts.

Frames (``T`` is the token; an empty line comes before the header)::

    HWLEDGER-PROBE/1 T
    T stdout -                 # a content section: its name and "-", then its content (at most
    <stdout, capped>           # STDOUT_CAP bytes: one more than is accepted, so an over-long output
    T end                      # shows by its length), a newline that is not part of it, the end line
    T stderr - / <stderr, at most STDERR_CAP bytes> / T end
    T rc <exit status of the tool>
    T timeout                  # only when the watchdog fired
    T busy s<pid> | g<pgid>    # instead of stdout/stderr/rc: the tool is already running (single flight)
    T fatal - / <message> / T end                                 # only when the probe could not run the tool
    T loadavg - / <first bytes of /proc/loadavg> / T end          # host metrics, when asked for
    T meminfo - / <MemTotal and MemAvailable lines> / T end
    T cpus <online CPU count, or empty>
    T done
    T log <job_id> ...         # after "done", only when asked: running jobs' logs (job_log_read)

The remote is not trusted: everything parsed here is bounded and treated as data. The token is not a
secret from the remote host (it can read its own process list); it only protects against accidental
collisions, which is all a host that controls its own output could be protected against anyway.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import secrets
import shlex

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log_read, telemetry
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import (
    NO_ANSWER,
    ProbeOutcome,
    classify_ssh_failure,
)

PROBE_VERSION = 1
HEADER_PREFIX = "HWLEDGER-PROBE/%d " % PROBE_VERSION

# Bytes of the tool's stdout / stderr the script sends back. One byte more than the parser accepts is
# sent, so "exactly the limit" and "over the limit" can be told apart.
STDOUT_CAP = telemetry.MAX_OUTPUT_BYTES + 1
STDERR_CAP = 64 * 1024
# The tool's files may grow to this many 512-byte blocks (ulimit -f) before the tool gets SIGXFSZ.
TOOL_FILE_LIMIT_BLOCKS = 2 * (telemetry.MAX_OUTPUT_BYTES // 512) + 16
# How long after the watchdog's TERM the KILL follows, on the remote.
KILL_GRACE_S = 1.0
# The controller gives up on an exec this long after the remote watchdog should have answered: it covers
# the KILL grace, the connection set-up of a first (non-multiplexed) connection and the transfer.
CONTROLLER_GRACE_S = 3.0
MAX_TIMEOUT_S = 3600.0

_CONTENT_SECTIONS = frozenset({"stdout", "stderr", "fatal", "loadavg", "meminfo"})
_LINE_SECTIONS = frozenset({"rc", "timeout", "busy", "cpus", "done"})
_TOKEN_PATTERN = r"hwl[0-9a-f]{24}"
_TOKEN_RE = re.compile("^" + re.escape(HEADER_PREFIX) + "(" + _TOKEN_PATTERN + r")\r?$", re.MULTILINE)
# One frame line: token, section name, optional argument. The token is captured and compared with the
# header's, so one compiled pattern serves every (random) token.
_FRAME_LINE_RE = re.compile("(" + _TOKEN_PATTERN + r") ([a-z]+)(?: ([^\n]*))?\n")
_INT_RE = re.compile(r"-?[0-9]{1,12}")


_SCRIPT = r"""B=@TOKEN@
C=@CMD@
T=@TIMEOUT@
M=@HOSTMETRICS@
Q=@QUERY@
printf '\n@HEADER@%s\n' "$B"
umask 077
d= p= w= to=0 L= lo=
[ "$Q" = 1 ] && for base in "${TMPDIR:-/tmp}" /tmp "${HOME:-/nonexistent}"; do
  d=$(mktemp -d "$base/hwledger-probe.XXXXXXXX" 2>/dev/null) && [ -d "$d" ] && break
  d=
done
k() { kill "-$1" "-$p" 2>/dev/null; kill "-$1" "$p" 2>/dev/null; }
cleanup() {
  [ -n "$w" ] && kill "$w" 2>/dev/null
  if [ -n "$p" ]; then
    k KILL
    # The tool outlived this probe (killed at its deadline, or the connection went): the lock now names
    # its process group, so no other run starts while anything of it is still alive (in the kernel).
    [ -n "$L" ] && ln -s "$g$p" "$L.$$" 2>/dev/null && mv -f "$L.$$" "$L" 2>/dev/null
    L=
  fi
  if [ -n "$L" ]; then rm -rf "$d" "$L"; elif [ -n "$d" ]; then rm -rf "$d"; fi
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 141' PIPE
trap 'exit 143' TERM
trap 'to=1' USR1
# Sizes are not measured (that would cost processes on every heartbeat): each section is capped at its
# limit + 1 byte, so the controller sees an over-long output by its length alone.
emit() {
  printf '%s %s -\n' "$B" "$1"
  head -c "$2" "$3" 2>/dev/null
  printf '\n%s end\n' "$B"
}
# Single flight: one GPU-tool run per remote user at a time. A tool stuck in the kernel survives the
# watchdog's KILL, and a new run every tick would pile up beside it. The lock is a symlink in a private
# directory of this user; its target says who holds it: "s<pid>" a probe running the tool now,
# "g<pgid>" the process group of a tool that outlived its probe. A dead holder's lock is taken over; a
# live probe is waited for (2 s), a live leftover tool is not: the answer is "busy" at once.
g=s
command -v setsid >/dev/null 2>&1 && g=g
# Whether the lock's holder ("s" pid or "g" process group $2) is alive. A zombie is not: where PID 1
# does not reap (many containers), a finished tool stays a zombie for good, and would hold the lock.
held() {
  [ "$1" = g ] && { kill -0 "-$2" 2>/dev/null || return 1; }
  [ "$1" = s ] && { kill -0 "$2" 2>/dev/null || return 1; }
  [ -r /proc/self/stat ] || return 0
  if [ "$1" = s ]; then
    read -r hs </proc/"$2"/stat 2>/dev/null || return 1
    hs=${hs##*) }
    [ "${hs%% *}" != Z ]
    return
  fi
  hg=$2
  for hf in /proc/[0-9]*/stat; do
    read -r hs <"$hf" 2>/dev/null || continue
    set -- ${hs##*) }
    [ "$3" = "$hg" ] && [ "$1" != Z ] && [ "$1" != X ] && return 0
  done
  return 1
}
if [ -n "$d" ] && command -v ln >/dev/null 2>&1 && command -v readlink >/dev/null 2>&1; then
  # One lock per user and machine: XDG_RUNTIME_DIR is exactly that (private, local) where logind sets it.
  if [ -n "${XDG_RUNTIME_DIR:-}" ] && [ -d "$XDG_RUNTIME_DIR" ] && [ -O "$XDG_RUNTIME_DIR" ]; then
    ld="$XDG_RUNTIME_DIR/hwledger-probe"
  else
    ld="${d%/*}/hwledger-probe-$(id -u 2>/dev/null)"
  fi
  [ -d "$ld" ] || mkdir -m 700 "$ld" 2>/dev/null
  if [ -d "$ld" ] && [ ! -L "$ld" ] && [ -O "$ld" ]; then
    li=0
    while :; do
      ln -s "s$$" "$ld/lock" 2>/dev/null && { lo=; L="$ld/lock"; break; }
      lo=$(readlink "$ld/lock" 2>/dev/null) || lo=
      lv=
      case $lo in
        s[1-9]*) case ${lo#s} in *[!0-9]*) ;; *) held s "${lo#s}" && lv=1 ;; esac ;;
        g[1-9]*) case ${lo#g} in *[!0-9]*) ;; *) held g "${lo#g}" && break ;; esac ;;
      esac
      [ -z "$lv" ] && rm -f "$ld/lock"
      li=$((li + 1))
      [ "$li" -ge 10 ] && break
      sleep 0.2
    done
  fi
fi
if [ "$Q" = 0 ]; then
  :  # a liveness check: the host metrics and "done" only
elif [ -n "$lo" ]; then
  printf '%s busy %.24s\n' "$B" "$lo"
elif [ -n "$d" ]; then
  ( ulimit -f @FILEBLOCKS@ 2>/dev/null
    command -v setsid >/dev/null 2>&1 && exec setsid /bin/sh -c "$C"
    exec /bin/sh -c "$C" ) </dev/null >"$d/o" 2>"$d/e" &
  p=$!
  ( trap 'kill "$s" 2>/dev/null; exit 0' TERM
    sleep "$T" & s=$!; wait "$s"
    : >"$d/t"
    k TERM
    sleep @GRACE@ & s=$!; wait "$s"
    k KILL
    kill -USR1 $$ ) </dev/null >/dev/null 2>&1 &
  w=$!
  wait "$p"; rc=$?
  kill "$w" 2>/dev/null; w=
  [ -e "$d/t" ] && to=1
  [ "$to" = 1 ] || p=
  emit stdout @STDOUTCAP@ "$d/o"
  emit stderr @STDERRCAP@ "$d/e"
  printf '%s rc %s\n' "$B" "$rc"
  [ "$to" = 1 ] && printf '%s timeout\n' "$B"
else
  printf '%s fatal -\nmktemp -d failed in %s, /tmp and %s\n%s end\n' "$B" "${TMPDIR:-/tmp}" "${HOME:-HOME}" "$B"
fi
if [ "$M" = 1 ]; then
  # Shell builtins only (no head/grep processes): this runs on every host at every heartbeat.
  la=; read -r la </proc/loadavg 2>/dev/null
  printf '%s loadavg -\n%.256s\n%s end\n' "$B" "$la" "$B"
  printf '%s meminfo -\n' "$B"
  while IFS= read -r l; do
    case $l in MemTotal:*|MemAvailable:*) printf '%.128s\n' "$l" ;; esac
  done </proc/meminfo 2>/dev/null
  printf '%s end\n' "$B"
  n=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null)
  printf '%s cpus %.9s\n' "$B" "${n%%[!0-9]*}"
fi
printf '%s done\n' "$B"
"""


def new_token() -> str:
    """A fresh frame token: 'hwl' and 24 hex digits (96 random bits)."""
    return "hwl" + secrets.token_hex(12)


def _sh_number(value: float) -> str:
    """A number as sleep(1) takes it: an integer when whole, else a plain decimal."""
    if float(value).is_integer():
        return str(int(value))
    return ("%.3f" % value).rstrip("0").rstrip(".")


def check_timeout(timeout_s: float) -> float:
    """The tool's time budget in seconds, validated (0 < timeout <= MAX_TIMEOUT_S)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ValueError("timeout must be a number of seconds, got %r" % (timeout_s,))
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError("timeout must be more than 0 and at most %d seconds, got %s" % (MAX_TIMEOUT_S, timeout_s))
    return float(timeout_s)


def remote_script(cmd: str, *, timeout_s: float, host_metrics: bool, token: str | None = None,
                  query: bool = True, log_reads=()) -> str:
    """The POSIX-sh probe for ONE exec: run ``cmd`` under a watchdog, frame its output, add host metrics.

    ``cmd`` is the operator-configured query command; it is passed to ``/bin/sh -c`` as it is (quoted
    here as one word), never combined with anything that came from a remote host. ``token`` is for tests
    only; by default every script gets a fresh random one. ``query=False`` makes a liveness check: the
    same exec without the GPU tool (an agent's ``min_query_interval_s`` has not passed yet).
    ``log_reads`` (``job_log_read.LogRead``): running jobs whose new log bytes this exec also reads, after
    the probe's frames (see ``job_log_read``).
    """
    if not isinstance(cmd, str) or not cmd.strip():
        raise ValueError("the GPU query command is empty; set gpu_query_cmd (or the cmd option)")
    if "\0" in cmd:
        raise ValueError("the GPU query command contains a NUL byte")
    timeout_s = check_timeout(timeout_s)
    token = token or new_token()
    if not re.fullmatch(_TOKEN_PATTERN, token):
        raise ValueError("a probe token is 'hwl' and 24 lowercase hex digits")
    replacements = {
        "@TOKEN@": token,
        "@HEADER@": HEADER_PREFIX,
        "@CMD@": shlex.quote(cmd),
        "@TIMEOUT@": _sh_number(timeout_s),
        "@HOSTMETRICS@": "1" if host_metrics else "0",
        "@QUERY@": "1" if query else "0",
        "@FILEBLOCKS@": str(TOOL_FILE_LIMIT_BLOCKS),
        "@GRACE@": _sh_number(KILL_GRACE_S),
        "@STDOUTCAP@": str(STDOUT_CAP),
        "@STDERRCAP@": str(STDERR_CAP),
    }
    # The command goes in last so that nothing in it can be mistaken for a placeholder. No newline at
    # the end: ansible may append " && sleep 0" to the script, which must stay on its last line.
    script = _SCRIPT
    for placeholder, value in replacements.items():
        if placeholder != "@CMD@":
            script = script.replace(placeholder, value)
    script = (script + job_log_read.script_piece(log_reads)).rstrip("\n")
    return script.replace("@CMD@", replacements["@CMD@"], 1)


def ssh_command(script: str) -> str:
    """The remote command for a plain ``ssh host COMMAND`` exec of ``script`` (the app's direct path).

    sshd hands COMMAND to the user's login shell, which may not be POSIX; this makes it run /bin/sh, as
    the Ansible path does (``_low_level_execute_command``). ``exec`` replaces the login shell instead of
    keeping it waiting.
    """
    return "exec /bin/sh -c " + shlex.quote(script)


def controller_deadline(timeout_s: float) -> float:
    """Seconds after which the controller stops waiting for the exec, whatever the remote does."""
    return check_timeout(timeout_s) + CONTROLLER_GRACE_S


# --------------------------------------------------------------------------------------------------
# Splitting the framed output


class Frames:
    """The sections found in one probe's output."""

    def __init__(self) -> None:
        self.content: dict[str, str] = {}
        self.values: dict[str, str] = {}
        self.complete = False
        self.token = ""
        self.end = 0  # where the text after the "done" line starts (complete frames only)
        self.crlf = False  # the exec went through a pseudo-terminal (the text was changed back)


def split_frames(text: str) -> Frames | None:
    """Parse the framed output; None when no probe header is present (the script did not run)."""
    header = _TOKEN_RE.search(text)
    if header is None:
        return None
    token = header.group(1)
    crlf = header.group(0).endswith("\r")
    if crlf:
        # The exec went through a pseudo-terminal, which turned every LF into CRLF; undo it.
        text = text.replace("\r\n", "\n")
        header = _TOKEN_RE.search(text)
        if header is None:  # pragma: no cover - the replacement cannot remove the header
            return None
    frames = Frames()
    frames.token = token
    frames.crlf = crlf
    end_marker = "\n" + token + " end\n"
    pos = header.end() + 1
    while pos < len(text):
        match = _FRAME_LINE_RE.match(text, pos)
        if match is None or match.group(1) != token:
            break  # anything else (a cut connection, junk) ends the frames; what was read stays
        name, arg = match.group(2), (match.group(3) or "")
        if name in _CONTENT_SECTIONS:
            end = text.find(end_marker, match.end())
            if end < 0:
                break
            frames.content[name] = text[match.end():end]
            pos = end + len(end_marker)
        elif name in _LINE_SECTIONS:
            frames.values[name] = arg
            pos = match.end()
            if name == "done":
                frames.complete = True
                frames.end = pos
                break
        else:
            break
    return frames


def _bounded_int(text: str | None) -> int | None:
    """An integer of at most 12 digits, or None; remote numbers are never parsed unbounded."""
    if text is None:
        return None
    text = text.strip()
    if not _INT_RE.fullmatch(text):
        return None
    return int(text)


def _bounded_float(text: str) -> float | None:
    if not re.fullmatch(r"[0-9]{1,9}(?:\.[0-9]{1,6})?", text):
        return None
    return float(text)


# --------------------------------------------------------------------------------------------------
# Host metrics


def parse_host_metrics(loadavg: str | None, meminfo: str | None, cpus: str | None) -> dict:
    """``host`` of the snapshot from the three host sections; a value that is missing or odd is None."""
    host: dict = {
        "cpu_count": None,
        "load1": None,
        "load5": None,
        "load15": None,
        "mem_total_bytes": None,
        "mem_available_bytes": None,
    }
    if loadavg:
        parts = loadavg.split()
        for key, part in zip(("load1", "load5", "load15"), parts[:3]):
            host[key] = _bounded_float(part)
    if meminfo:
        for line in meminfo.splitlines():
            match = re.fullmatch(r"(MemTotal|MemAvailable):\s+([0-9]{1,15})\s*kB", line.strip())
            if match:
                key = "mem_total_bytes" if match.group(1) == "MemTotal" else "mem_available_bytes"
                host[key] = int(match.group(2)) * 1024  # /proc/meminfo's "kB" are KiB
    count = _bounded_int(cpus) if cpus else None
    if count is not None and count > 0:
        host["cpu_count"] = count
    return host


def iso_utc(epoch_s: float) -> str:
    """ISO 8601 UTC with a Z, millisecond precision."""
    stamp = datetime.datetime.fromtimestamp(epoch_s, tz=datetime.timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def exec_timeout_failure(*, agent: str, timeout_s: float) -> ProbeOutcome:
    """The outcome when the exec itself did not come back within ``controller_deadline(timeout_s)``."""
    return ProbeOutcome.failure(
        NO_ANSWER,
        "%s: no answer within %s s (the tool's %s s plus %s s for the connection): the host, its ssh "
        "connection or the GPU tool hangs; check the host, or raise the timeout"
        % (agent, _sh_number(controller_deadline(timeout_s)), _sh_number(timeout_s), _sh_number(CONTROLLER_GRACE_S)),
        agent=agent, answered=False,
    )


def _ssh_failure(agent: str, exec_rc: int, exec_stdout: str, exec_stderr: str) -> ProbeOutcome:
    head = telemetry.output_head(exec_stderr, exec_stdout)
    reason = classify_ssh_failure(exec_stderr)
    if reason == "host_key_changed":
        msg = ("ssh refused the host key: it is not the key pinned for this host in hwledger's known_hosts (the "
               "host was re-installed, the address now points elsewhere, or someone is in between). Check the "
               "host out of band, then re-key it (hwledger fleet register-ssh).")
    elif reason == "host_key_unknown":
        msg = ("ssh refused to connect: no host key is pinned for this host (or its bastion) in hwledger's "
               "known_hosts; it was never registered, or its entry was removed. Register the host (hwledger "
               "fleet register-ssh pins its key once you confirm the fingerprint), or pin its key in that "
               "known_hosts under the alias hwledger-agent-%s." % agent)
    else:
        reason = "unreachable"
        msg = ("ssh could not reach the host or log in (exit status %d): %s"
               % (exec_rc, (telemetry.output_head(exec_stderr).splitlines() or ["no message from ssh"])[-1]))
    return ProbeOutcome.failure(reason, msg, agent=agent, rc=exec_rc, head=head, answered=False)


def evaluate_tool_output(*, agent: str, cmd: str, backend: str, stdout: str, stderr: str, rc: int,
                         started: float, ended: float, host: dict | None = None) -> ProbeOutcome:
    """Parse one GPU tool run (its exact stdout, stderr and exit status) into an outcome.

    The one place where a tool's output becomes a snapshot: ``evaluate`` calls it after unframing,
    ``hwledger gpu parse`` calls it on a file. The size limit is checked once, by the parsers' entry
    (``telemetry.parse_gpus``).
    """
    try:
        gpus = telemetry.parse_gpus(cmd, stdout, stderr, rc, backend)
        resolved = backend if backend != "auto" else telemetry.detect_backend(cmd, stdout)
        snapshot = telemetry.build_snapshot(
            agent=agent,
            backend=resolved,
            gpus=gpus,
            captured_at=iso_utc(started),
            query_ms=round(max(0.0, ended - started) * 1000.0, 1),
            host=host,
        )
    except telemetry.QueryFailure as exc:
        return ProbeOutcome.from_query_failure(exc, agent=agent, host=host)
    except Exception as exc:  # pylint: disable=broad-exception-caught
        # Remote output must never crash the heartbeat: a parser bug is reported as unparseable output.
        return ProbeOutcome.failure(
            "unparseable", "the output of %r could not be parsed (%s: %s)" % (cmd, type(exc).__name__, exc),
            agent=agent, rc=rc, head=telemetry.output_head(stdout, stderr), host=host)
    return ProbeOutcome.success(snapshot)


def _busy(agent: str, cmd: str, holder: str, host: dict | None) -> ProbeOutcome:
    """The probe found the host's GPU tool already running and did not start another (single flight)."""
    number = _bounded_int(holder[1:]) if holder[:1] in ("s", "g") else None
    if holder.startswith("g") and number is not None:
        msg = ("%r started by an earlier probe is still running on the host (process group %d): it outlived "
               "its timeout and its KILL, which a process stuck in the driver does. No new run is started beside "
               "it; check the host (dmesg, ps -o stat,cmd -g %d) and reset the GPU or the driver"
               % (cmd, number, number))
        return ProbeOutcome.failure("tool_still_running", msg, agent=agent, host=host)
    msg = ("another hwledger probe (pid %s) has been running %r on the host for over 2 s (a second poller of "
           "the same host, such as a hand-run heartbeat playbook beside serve); this probe did not start a "
           "second run" % (number if number is not None else "unknown", cmd))
    return ProbeOutcome.failure("probe_busy", msg, agent=agent, host=host)


def evaluate(*, agent: str, cmd: str, backend: str, exec_stdout: str, exec_stderr: str, exec_rc: int,
             started: float, ended: float, host_metrics: bool, query: bool = True, log_reads=()) -> ProbeOutcome:
    """Turn the exec of ``remote_script`` into the host's outcome (with ``job_logs`` when ``log_reads`` were
    asked for: the same reads as were given to ``remote_script``).

    For a liveness check (``query=False``) a complete answer is an ``ok`` outcome without a snapshot
    (the host is there; its GPUs were not asked), with the host metrics in ``host``.

    ``exec_*`` are what the connection returned for the whole script (stdout decoded with
    surrogateescape, or any error handler: only the tool's own bytes are affected); ``started`` and
    ``ended`` are controller wall-clock times (``time.time()``) around the exec.
    """
    exec_stdout = exec_stdout or ""
    exec_stderr = exec_stderr or ""
    frames = split_frames(exec_stdout)
    outcome = _outcome(frames, agent=agent, cmd=cmd, backend=backend, exec_stdout=exec_stdout,
                       exec_stderr=exec_stderr, exec_rc=exec_rc, started=started, ended=ended,
                       host_metrics=host_metrics, query=query)
    if log_reads and frames is not None and frames.complete and not frames.crlf:
        # The text was decoded with surrogateescape: encoding it the same way gives the exact bytes back.
        region = exec_stdout[frames.end:].encode("utf-8", "surrogateescape")
        chunks = job_log_read.parse(region, frames.token, log_reads)
        outcome = dataclasses.replace(outcome, job_logs=tuple(c for found in chunks.values() for c in found))
    return outcome


def _outcome(frames: Frames | None, *, agent: str, cmd: str, backend: str, exec_stdout: str, exec_stderr: str,
             exec_rc: int, started: float, ended: float, host_metrics: bool, query: bool) -> ProbeOutcome:
    if frames is None:
        if exec_rc == 255:
            return _ssh_failure(agent, exec_rc, exec_stdout, exec_stderr)
        return ProbeOutcome.failure(
            "unparseable",
            "the remote shell did not run the probe (exit status %s, no probe header in the output). The "
            "login shell must be able to run /bin/sh -c; check the host's shell and its start-up files."
            % exec_rc,
            agent=agent, rc=exec_rc, head=telemetry.output_head(exec_stdout, exec_stderr))

    host = None
    if host_metrics:
        host = parse_host_metrics(
            frames.content.get("loadavg"), frames.content.get("meminfo"), frames.values.get("cpus")
        )

    if not query and frames.complete and not frames.content.keys() & {"stdout", "fatal"}:
        return ProbeOutcome(True, snapshot=None, host=host)

    if "busy" in frames.values:
        return _busy(agent, cmd, frames.values["busy"], host)

    if "fatal" in frames.content:
        return ProbeOutcome.failure(
            "unparseable", "the probe could not run the query: %s" % frames.content["fatal"].strip()[:500],
            agent=agent, head=telemetry.output_head(frames.content["fatal"]), host=host)

    tool_rc = _bounded_int(frames.values.get("rc"))
    stdout = frames.content.get("stdout")
    stderr = frames.content.get("stderr", "")

    if "timeout" in frames.values:
        return ProbeOutcome.failure(
            "timeout",
            "%r did not finish within its timeout and was killed on the host; the GPU driver or the tool hangs "
            "(check the host: dmesg, nvidia-smi / rocm-smi by hand), or raise the timeout" % (cmd,),
            agent=agent, rc=tool_rc, head=telemetry.output_head(stdout or "", stderr), host=host)

    if stdout is None or tool_rc is None:
        if exec_rc == 255:
            return _ssh_failure(agent, exec_rc, exec_stdout, exec_stderr)
        return ProbeOutcome.failure(
            "unparseable",
            "the probe's output ended early (exit status %s): the connection or the remote shell stopped "
            "before the query's result was sent" % exec_rc,
            agent=agent, rc=exec_rc, head=telemetry.output_head(exec_stdout, exec_stderr), host=host)

    return evaluate_tool_output(
        agent=agent, cmd=cmd, backend=backend, stdout=stdout, stderr=stderr, rc=tool_rc,
        started=started, ended=ended, host=host,
    )
