# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""hwledger jobs: the job spec, the result, and the runner that executes a job on a remote host.

One file, three uses:

* the schema (``validate_job``, ``validate_result``, ``result_path``) used on the controller by the
  ``hwledger.fleet.job_spec`` / ``hwledger.fleet.job_result`` action plugins and by the app;
* the runner (``run_job``), wrapped by ``hwledger run JOB.json --output RESULT.json``;
* a standalone script: the job role copies this file into the job's private directory on a remote
  that has python3 but no ``hwledger`` and runs ``python3 jobs.py run JOB.json --output RESULT.json``.

So it imports only the standard library and stays compatible with Python 3.8.

What the runner guarantees (see docs/jobs.md):

* the argv runs without a shell, stdin from /dev/null, in a new session (its own process group), with a
  minimal environment (PATH, HOME, LANG, ... from the runner's own environment) plus the job's env;
* stdout and stderr are read through pipes into ring buffers: at most 64 KiB of each is kept, however
  much the job prints, and nothing is written to disk;
* at ``timeout_s`` the job gets SIGTERM, then SIGKILL after a grace period;
* when the job ends (exit, signal or timeout) every process it left behind is killed: its process group
  always; on Linux also every other descendant, including ones that called setsid() or double-forked,
  because the runner makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER) so orphans are
  re-parented to it and can be found through /proc.  Not covered: processes the job asked someone else
  to start (systemd, cron, at, ssh to another host) and processes stuck in uninterruptible sleep;
* a result is written for every outcome it can observe, atomically (0600 temp file opened with
  O_CREAT|O_EXCL|O_NOFOLLOW in the output's directory, fsync, rename); an output path that is a symlink
  or not a regular file is refused.  The sha256 of the written bytes is printed on stdout
  (``<hex>  <path>``, the sha256sum format) so the controller can check what it fetched.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import hashlib
import json
import math
import os
import re
import secrets
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid

JOB_SCHEMA_VERSION = 1
RESULT_SCHEMA_VERSION = 1

DEFAULT_TIMEOUT_S = 3600
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week; the job role's stale-dir sweep relies on this bound
TAIL_BYTES = 64 * 1024  # the last bytes of stdout and of stderr kept in the result
RESULT_MAX_BYTES = 1024 * 1024  # worst case of two escaped 64 KiB tails fits with room to spare
JOB_FILE_MAX_BYTES = 1024 * 1024
METADATA_MAX_BYTES = 16 * 1024
ARGV_MAX_BYTES = 128 * 1024
ENV_MAX_BYTES = 128 * 1024
TEXT_MAX_CHARS = 1024  # model_ref
PATH_MAX_CHARS = 4096  # workdir
ERROR_MESSAGE_MAX_CHARS = 4096  # result["error"]["message"]
KILL_GRACE_S = 5.0  # SIGTERM -> SIGKILL
DRAIN_S = 2.0  # how long output is still read after the job's processes are gone
# The job role sets Ansible's async limit to timeout_s + RUNNER_OVERHEAD_S so that the runner, not
# async_wrapper (which would kill only the runner), always ends the job.
RUNNER_OVERHEAD_S = 120

JOB_KEYS = ("schema_version", "job_id", "command", "env", "workdir", "timeout_s", "model_ref", "metadata")
RESULT_KEYS = (
    "schema_version", "job_id", "state", "exit_code", "signal", "started_at", "finished_at",
    "duration_s", "stdout_tail", "stderr_tail", "stdout_bytes", "stderr_bytes", "host", "error",
)
STATES = ("succeeded", "failed", "timed_out", "error")
ERROR_REASONS = (
    "invalid_job",  # the job file or spec did not validate
    "command_not_found",  # argv[0] not found (on the job's PATH)
    "permission_denied",  # argv[0] found but not executable
    "workdir_unavailable",  # workdir missing or not a directory
    "exec_failed",  # any other failure to start the command
    "interrupted",  # the runner got SIGTERM/SIGINT/SIGHUP; the job was killed
    "runner_error",  # a bug or an unexpected failure in the runner itself
)

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

# Copied from the runner's own environment into the job's (when set); the job's env comes on top.
BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "USER", "LOGNAME", "SHELL", "TMPDIR", "TZ")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UUID_EXAMPLE = "0f8fad5b-d9cb-469f-a165-70867728950e"


# ----------------------------------------------------------------------------------------------------
# Errors


class JobSpecError(ValueError):
    """A job spec that does not validate.  ``errors`` lists (field, message) pairs, one per problem."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.field = self.errors[0][0] if self.errors else None
        super().__init__("\n".join("%s: %s" % (field, msg) for field, msg in self.errors))


class ResultError(ValueError):
    """A result file that must not be trusted.  ``reason``: result_too_large, result_not_json,
    result_invalid or result_wrong_job."""

    def __init__(self, reason, msg):
        self.reason = reason
        super().__init__(msg)


class ResultWriteError(Exception):
    """The runner could not write its result file (refused path, I/O error)."""


def _show(value, limit=80):
    """A short, escaped rendering of an untrusted value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# The job spec


def validate_job_id(value):
    """Return the canonical (lowercase) form of a job id, or raise JobSpecError.

    Only a UUID in its 8-4-4-4-12 hex form is accepted: the id names files on the remote and on the
    controller, so nothing path-like ('/', '..') can get through.
    """
    if not isinstance(value, str):
        raise JobSpecError([("job_id", "must be a UUID string such as %s, got %s" % (_UUID_EXAMPLE, type(value).__name__))])
    if not _UUID_RE.match(value):
        hint = " (it must not contain '/' or '..': the id names files)" if ("/" in value or ".." in value) else ""
        raise JobSpecError([("job_id", "must be a UUID such as %s, got %s%s" % (_UUID_EXAMPLE, _show(value), hint))])
    return str(uuid.UUID(value))


def _check_schema_version(value, errors, field="schema_version", supported=JOB_SCHEMA_VERSION):
    if value is None:
        return supported
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append((field, "must be the integer %d, got %s" % (supported, _show(value))))
    elif value != supported:
        errors.append((field, "version %d is not supported: this hwledger understands version %d" % (value, supported)))
    return value


def _check_command(value, errors):
    if isinstance(value, str):
        errors.append(("command", "must be a list of arguments (argv), not a string: no shell is used. Pass "
                                  "[\"nvidia-smi\", \"-L\"], or [\"sh\", \"-c\", %s] if you really need a shell"
                       % json.dumps(value[:60])))
        return value
    if not isinstance(value, list) or not value:
        errors.append(("command", "must be a non-empty list of strings (argv), e.g. [\"nvidia-smi\", \"-L\"]; got %s"
                       % _show(value)))
        return value
    for index, arg in enumerate(value):
        if not isinstance(arg, str):
            errors.append(("command[%d]" % index, "must be a string, got %s %s" % (type(arg).__name__, _show(arg))))
        elif "\x00" in arg:
            errors.append(("command[%d]" % index, "must not contain a NUL character"))
    if isinstance(value[0], str) and not value[0]:
        errors.append(("command[0]", "the program name must not be empty"))
    size = sum(len(arg.encode("utf-8", "surrogatepass")) + 1 for arg in value if isinstance(arg, str))
    if size > ARGV_MAX_BYTES:
        errors.append(("command", "is %d bytes long, over the limit of %d: pass large data in a file" % (size, ARGV_MAX_BYTES)))
    return value


def _check_env(value, errors):
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(("env", "must be a mapping of variable names to string values, got %s" % _show(value)))
        return value
    size = 0
    for name, item in value.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            errors.append(("env", "variable name %s is not valid: use letters, digits and '_', not starting with a digit"
                           % _show(name)))
            continue
        if not isinstance(item, str):
            errors.append(("env.%s" % name, "must be a string, got %s %s: quote it, e.g. \"%s\""
                           % (type(item).__name__, _show(item), item if isinstance(item, (int, float)) else "...")))
            continue
        if "\x00" in item:
            errors.append(("env.%s" % name, "must not contain a NUL character"))
        size += len(name) + len(item.encode("utf-8", "surrogatepass")) + 2
    if size > ENV_MAX_BYTES:
        errors.append(("env", "is %d bytes, over the limit of %d" % (size, ENV_MAX_BYTES)))
    return dict(value)


def _check_workdir(value, errors):
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        errors.append(("workdir", "must be an absolute path (a non-empty string), got %s" % _show(value)))
    elif not value.startswith("/"):
        errors.append(("workdir", "must be an absolute path on the remote host, got %s" % _show(value)))
    elif "\x00" in value or len(value) > PATH_MAX_CHARS:
        errors.append(("workdir", "must not contain NUL and must be at most %d characters" % PATH_MAX_CHARS))
    return value


def _check_timeout(value, errors):
    if value is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        errors.append(("timeout_s", "must be a number of seconds, got %s" % _show(value)))
    elif value <= 0:
        errors.append(("timeout_s", "must be positive, got %s" % _show(value)))
    elif value > MAX_TIMEOUT_S:
        errors.append(("timeout_s", "must be at most %d (a week), got %s" % (MAX_TIMEOUT_S, _show(value))))
    return value


def _check_model_ref(value, errors):
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > TEXT_MAX_CHARS or _CONTROL_RE.search(value):
        errors.append(("model_ref", "must be a non-empty string of at most %d printable characters, got %s"
                       % (TEXT_MAX_CHARS, _show(value))))
    return value


def _check_metadata(value, errors):
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.append(("metadata", "must be a JSON object (mapping), got %s" % _show(value)))
        return value
    try:
        size = len(json.dumps(value, allow_nan=False, separators=(",", ":")).encode("utf-8"))
    except (TypeError, ValueError, RecursionError) as exc:
        errors.append(("metadata", "must hold only JSON values (strings, numbers, booleans, null, lists, "
                                   "objects with string keys): %s" % exc))
        return value
    if size > METADATA_MAX_BYTES:
        errors.append(("metadata", "is %d bytes as JSON, over the limit of %d" % (size, METADATA_MAX_BYTES)))
    return value


def _unknown_key_errors(obj, valid_keys, what):
    errors = []
    for key in obj:
        if key in valid_keys:
            continue
        close = difflib.get_close_matches(str(key), valid_keys, n=1, cutoff=0.6)
        hint = "did you mean %r?" % close[0] if close else "valid keys: %s" % ", ".join(valid_keys)
        errors.append((str(key)[:60], "unknown key in %s: %s" % (what, hint)))
    return errors


def validate_job(obj):
    """Validate a job spec (a dict, e.g. parsed JSON) and return it normalised: every key present,
    defaults filled, job_id canonical.  Raises JobSpecError naming each bad field."""
    if not isinstance(obj, dict):
        raise JobSpecError([("job", "must be a JSON object (mapping) with at least job_id and command, got %s"
                             % type(obj).__name__)])
    errors = _unknown_key_errors(obj, JOB_KEYS, "the job spec")
    job = {"schema_version": _check_schema_version(obj.get("schema_version"), errors)}
    if "job_id" not in obj:
        errors.append(("job_id", "is required: a UUID such as %s" % _UUID_EXAMPLE))
    else:
        try:
            job["job_id"] = validate_job_id(obj["job_id"])
        except JobSpecError as exc:
            errors.extend(exc.errors)
    if "command" not in obj:
        errors.append(("command", "is required: the argv to run, e.g. [\"nvidia-smi\", \"-L\"]"))
    else:
        job["command"] = _check_command(obj["command"], errors)
    job["env"] = _check_env(obj.get("env"), errors)
    job["workdir"] = _check_workdir(obj.get("workdir"), errors)
    job["timeout_s"] = _check_timeout(obj.get("timeout_s"), errors)
    job["model_ref"] = _check_model_ref(obj.get("model_ref"), errors)
    job["metadata"] = _check_metadata(obj.get("metadata"), errors)
    if errors:
        raise JobSpecError(errors)
    job["command"] = list(job["command"])
    return job


def new_job(command, **kw):
    """A new, validated job spec with a fresh job_id (kw: env, workdir, timeout_s, model_ref, metadata)."""
    spec = dict(kw)
    spec.setdefault("job_id", str(uuid.uuid4()))
    spec["schema_version"] = JOB_SCHEMA_VERSION
    spec["command"] = command
    return validate_job(spec)


def encode_job(job):
    """The job as the JSON bytes the runner reads (validated first)."""
    return (json.dumps(validate_job(job), sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def async_seconds(job):
    """The Ansible async limit for a validated job: longer than the runner can ever take."""
    return int(math.ceil(float(job["timeout_s"]))) + RUNNER_OVERHEAD_S


# ----------------------------------------------------------------------------------------------------
# Strict JSON


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _bounded_int(text):
    if len(text) > 20:
        raise ValueError("integer with %d digits" % len(text))
    return int(text)


def _unique_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("duplicate key %r" % key)
        obj[key] = value
    return obj


def loads_strict(text):
    """json.loads that refuses NaN/Infinity, huge integers and duplicate keys (ValueError)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_bounded_int,
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply")


def load_job_file(path):
    """Read and validate a job file (JSON, at most JOB_FILE_MAX_BYTES, a regular file)."""
    try:
        # O_NONBLOCK: opening a FIFO planted at the path must not hang; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise JobSpecError([("job file", "%s is not a regular file" % path)])
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(JOB_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise JobSpecError([("job file", "cannot read %s: %s" % (path, exc.strerror or exc))])
    if len(raw) > JOB_FILE_MAX_BYTES:
        raise JobSpecError([("job file", "%s is larger than %d bytes" % (path, JOB_FILE_MAX_BYTES))])
    try:
        obj = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise JobSpecError([("job file", "%s is not valid JSON: %s" % (path, exc))])
    return obj


# ----------------------------------------------------------------------------------------------------
# The result


def _utc_timestamp(epoch):
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def make_result(job_id, state, *, started, finished, exit_code=None, signal_number=None, stdout=b"",
                stderr=b"", stdout_bytes=0, stderr_bytes=0, error=None):
    """A result dict (times are epoch seconds; stdout/stderr raw tail bytes)."""
    if error is not None:
        error = {"reason": error["reason"], "message": error["message"][:ERROR_MESSAGE_MAX_CHARS]}
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "job_id": job_id,
        "state": state,
        "exit_code": exit_code,
        "signal": signal_number,
        "started_at": _utc_timestamp(started),
        "finished_at": _utc_timestamp(finished),
        "duration_s": round(max(0.0, finished - started), 6),
        "stdout_tail": decode_tail(stdout, cut=stdout_bytes > len(stdout)),
        "stderr_tail": decode_tail(stderr, cut=stderr_bytes > len(stderr)),
        "stdout_bytes": max(stdout_bytes, len(stdout)),
        "stderr_bytes": max(stderr_bytes, len(stderr)),
        "host": socket.gethostname()[:255],
        "error": error,
    }


def decode_tail(data, limit=TAIL_BYTES, cut=None):
    """The last `limit` bytes as valid UTF-8 text: cut at a byte boundary, skip the continuation bytes of
    a character cut in half (when the stream was cut), and replace anything invalid with U+FFFD."""
    cut = len(data) > limit if cut is None else (cut or len(data) > limit)
    data = bytes(data[-limit:]) if len(data) > limit else bytes(data)
    if cut:
        skip = 0
        while skip < 3 and skip < len(data) and 0x80 <= data[skip] <= 0xBF:
            skip += 1
        data = data[skip:]
    return data.decode("utf-8", "replace")


def encode_result(result):
    return (json.dumps(result, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def _is_int(value, low, high):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _result_field_errors(obj):
    errors = []
    if obj.get("schema_version") != RESULT_SCHEMA_VERSION or isinstance(obj.get("schema_version"), bool):
        errors.append("schema_version must be %d" % RESULT_SCHEMA_VERSION)
    if obj.get("state") not in STATES:
        errors.append("state must be one of %s" % ", ".join(STATES))
    if obj.get("exit_code") is not None and not _is_int(obj.get("exit_code"), 0, 255):
        errors.append("exit_code must be null or an integer 0-255")
    if obj.get("signal") is not None and not _is_int(obj.get("signal"), 1, 128):
        errors.append("signal must be null or a signal number")
    for key in ("started_at", "finished_at"):
        if not isinstance(obj.get(key), str) or not _TIMESTAMP_RE.match(obj[key]):
            errors.append("%s must be an ISO 8601 UTC timestamp" % key)
    duration = obj.get("duration_s")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 <= duration <= 10 * MAX_TIMEOUT_S:
        errors.append("duration_s must be a non-negative number")
    for key in ("stdout_tail", "stderr_tail"):
        if not isinstance(obj.get(key), str) or len(obj[key]) > TAIL_BYTES:
            errors.append("%s must be a string of at most %d characters" % (key, TAIL_BYTES))
    for key in ("stdout_bytes", "stderr_bytes"):
        if not _is_int(obj.get(key), 0, 1 << 62):
            errors.append("%s must be a non-negative integer" % key)
    host = obj.get("host")
    if not isinstance(host, str) or len(host) > 255 or _CONTROL_RE.search(host):
        errors.append("host must be a printable string of at most 255 characters")
    errors.extend(_result_error_field_errors(obj.get("error")))
    errors.extend(_result_consistency_errors(obj))
    return errors


def _result_error_field_errors(error):
    if error is None:
        return []
    if (not isinstance(error, dict) or set(error) != {"reason", "message"} or error["reason"] not in ERROR_REASONS
            or not isinstance(error["message"], str) or len(error["message"]) > ERROR_MESSAGE_MAX_CHARS):
        return ["error must be null or {reason: one of %s, message: text}" % ", ".join(ERROR_REASONS)]
    return []


def _result_consistency_errors(obj):
    state, code, sig, error = obj.get("state"), obj.get("exit_code"), obj.get("signal"), obj.get("error")
    if state == "succeeded" and (code != 0 or sig is not None or error is not None):
        return ["a succeeded result must have exit_code 0, no signal and no error"]
    if state == "failed" and (error is not None or (code in (None, 0) and sig is None)):
        return ["a failed result must have a non-zero exit_code or a signal, and no error"]
    if state == "error" and error is None:
        return ["an error result must say what went wrong in error"]
    return []


def validate_result(raw_bytes, *, expected_job_id):
    """Check a fetched result file before anything trusts it; return the parsed result.

    Raises ResultError with reason result_too_large, result_not_json, result_invalid or
    result_wrong_job."""
    expected = validate_job_id(expected_job_id)
    if len(raw_bytes) > RESULT_MAX_BYTES:
        raise ResultError("result_too_large", "result is %d bytes, over the limit of %d" % (len(raw_bytes), RESULT_MAX_BYTES))
    try:
        obj = loads_strict(bytes(raw_bytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ResultError("result_not_json", "result is not valid JSON: %s" % exc)
    if not isinstance(obj, dict):
        raise ResultError("result_invalid", "result must be a JSON object")
    unknown = sorted(str(key)[:60] for key in obj if key not in RESULT_KEYS)
    missing = [key for key in RESULT_KEYS if key not in obj]
    if unknown or missing:
        raise ResultError("result_invalid", "result has unknown keys %s / lacks keys %s" % (unknown, missing))
    if obj["job_id"] != expected:
        raise ResultError("result_wrong_job", "result is for job %s, expected %s" % (_show(obj["job_id"]), expected))
    errors = _result_field_errors(obj)
    if errors:
        raise ResultError("result_invalid", "result is not a valid hwledger result: " + "; ".join(errors))
    return obj


def result_path(results_dir, job_id):
    """The controller path of a job's result: <results_dir>/<job_id>.json, from a validated UUID only."""
    from pathlib import Path  # local: keeps the module's import list short for the remote copy

    name = validate_job_id(job_id) + ".json"
    base = os.path.abspath(os.fspath(results_dir))
    path = os.path.abspath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:  # cannot happen for a UUID; kept as the last line of defence
        raise JobSpecError([("job_id", "result path %s escapes %s" % (path, base))])
    return Path(path)


def staging_path(results_dir, job_id):
    """Where the job role fetches a result before it is validated (a dot file next to result_path)."""
    final = result_path(results_dir, job_id)
    return final.with_name("." + final.name + ".unverified")


def parse_sha256_line(text):
    """The hex digest from the runner's stdout ("<hex>  <path>"), or None."""
    for line in (text or "").splitlines():
        token = line.strip().split(" ", 1)[0].lower()
        if _SHA256_RE.match(token):
            return token
    return None


# ----------------------------------------------------------------------------------------------------
# Writing the result


def _dir_fd_supported():
    return all(func in os.supports_dir_fd for func in (os.open, os.rename, os.stat, os.unlink))


def _refuse_unsafe_target(name, dir_fd, display):
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if dir_fd is not None else os.lstat(name)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ResultWriteError("refusing to write %s: it is a symlink" % display)
    if not stat.S_ISREG(info.st_mode):
        raise ResultWriteError("refusing to write %s: it exists and is not a regular file" % display)


def write_result(path, result):
    """Write a result atomically and return the sha256 hex digest of the bytes written (see write_atomically)."""
    return write_atomically(path, encode_result(result))


def write_atomically(path, data):
    """Write `data` to `path` atomically and return the sha256 hex digest of the bytes written.

    A temp file is created next to the target with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600, written,
    fsync'ed and renamed over the target; a target that is a symlink or not a regular file is refused
    (ResultWriteError).  Used by the runner for result.json and by the controller to publish a result.
    """
    display = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(display))
    if not name:
        raise ResultWriteError("output path %r names a directory, not a file" % display)
    use_dir_fd = _dir_fd_supported()
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)) if use_dir_fd else None
    except OSError as exc:
        raise ResultWriteError("cannot open the output directory %s: %s" % (directory, exc.strerror or exc))
    try:
        at = (lambda leaf: leaf) if use_dir_fd else (lambda leaf: os.path.join(directory, leaf))
        _refuse_unsafe_target(at(name), dir_fd, display)
        tmp = _create_temp(directory, name, dir_fd, at, data)
        try:
            _refuse_unsafe_target(at(name), dir_fd, display)
            os.rename(at(tmp), at(name), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            _unlink_quietly(at(tmp), dir_fd)
            raise
        if dir_fd is not None:
            try:
                os.fsync(dir_fd)
            except OSError:
                pass  # some file systems cannot fsync a directory; the rename is still atomic
    except OSError as exc:
        raise ResultWriteError("cannot write %s: %s" % (display, exc.strerror or exc))
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()


def private_dir_problem(path):
    """Why `path` is not a safe private directory for results, or None when it is: it must be a real
    directory (not a symlink), owned by the effective user, and writable by nobody else.  Another user
    who can write there could plant or swap result files (or symlinks) under the names we publish."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "%s does not exist" % path
    except OSError as exc:
        return "cannot inspect %s: %s" % (path, exc.strerror or exc)
    if stat.S_ISLNK(info.st_mode):
        return ("%s is a symlink (to %s); give the real directory instead, so nobody can re-point it"
                % (path, os.path.realpath(path)))
    if not stat.S_ISDIR(info.st_mode):
        return "%s exists and is not a directory" % path
    if info.st_uid != os.geteuid():
        return ("%s is owned by uid %d, not by you (uid %d); use a directory of your own"
                % (path, info.st_uid, os.geteuid()))
    if info.st_mode & 0o022:
        return ("%s is writable by %s (mode %04o): another user could plant files there; run chmod go-w %s "
                "(or chmod 700) or choose another directory"
                % (path, "group and others" if info.st_mode & 0o022 == 0o022 else
                   "its group" if info.st_mode & 0o020 else "others", stat.S_IMODE(info.st_mode), path))
    return None


def _create_temp(directory, name, dir_fd, at, data):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _attempt in range(5):
        tmp = ".%s.%s.tmp" % (name, secrets.token_hex(8))
        try:
            fd = os.open(at(tmp), flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue  # someone planted that name: pick another, never reuse it
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(at(tmp), dir_fd)
            raise
        os.close(fd)
        return tmp
    raise ResultWriteError("could not create a temp file in %s: every name tried already existed" % directory)


def _unlink_quietly(path, dir_fd):
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------
# Processes: the job's tree


def _read_proc_table():
    """{pid: (ppid, pgid, sid, state)} from /proc (Linux), or None where /proc is not there."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    table = {}
    for entry in names:
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as handle:
                raw = handle.read()
        except OSError:
            continue  # gone meanwhile
        fields = raw[raw.rfind(b")") + 2:].split()  # the comm field may hold spaces and parentheses
        try:
            table[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[3]), fields[0].decode("ascii", "replace"))
        except (IndexError, ValueError):
            continue
    return table


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
        table = _read_proc_table()
        self.visible = table is not None  # without /proc only the process group can be killed
        table = table or {}
        me = os.getpid()
        # Children we already had (e.g. a test harness's servers) are not the job's.
        self.preexisting = {pid for pid, row in table.items() if row[0] == me}

    def started(self, pid):
        self.leader = pid

    def members(self):
        """Live (non-zombie) pids of the job, and our own zombie children that belong to it."""
        table = _read_proc_table()
        if table is None or self.leader is None:
            return set(), set()
        me = os.getpid()
        roots = {self.leader}
        if self.subreaper:
            roots |= {pid for pid, row in table.items() if row[0] == me and pid not in self.preexisting}
        children = {}
        for pid, row in table.items():
            children.setdefault(row[0], []).append(pid)
        found, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid in found or pid not in table:
                continue
            found.add(pid)
            todo.extend(children.get(pid, ()))
        found |= {pid for pid, row in table.items() if row[1] == self.leader or row[2] == self.leader}
        found.discard(me)
        live = {pid for pid in found if table[pid][3] != "Z"}
        our_zombies = {pid for pid in found if table[pid][3] == "Z" and table[pid][0] == me and pid != self.leader}
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
    """Reads the job's stdout and stderr pipes without blocking into two bounded tails."""

    def __init__(self, proc):
        self.proc = proc
        self.selector = selectors.DefaultSelector()
        self.tails = {}
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            self.tails[stream.fileno()] = _Tail()
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
                    break
                self.tails[key.fd].feed(data)

    def drain(self, seconds):
        deadline = time.monotonic() + seconds
        while self.open() and time.monotonic() < deadline:
            self.pump(min(0.1, deadline - time.monotonic()))

    def close(self):
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


def _execute(job, grace):
    """Run the validated job and return the outcome as result fields (state, codes, output...)."""
    env = job_environment(job)
    cwd = job["workdir"] or env.get("HOME") or "/"
    started = time.time()
    tree = _JobTree()
    try:
        with _Interrupts() as interrupts:
            proc, error = _start(job, env, cwd)
            if proc is None:
                return make_result(job["job_id"], "error", started=started, finished=time.time(), error=error)
            tree.started(proc.pid)
            output = _Output(proc)
            try:
                how = _supervise(job, proc, tree, output, interrupts, grace)
            finally:
                if proc.poll() is None:  # only on an exception in _supervise
                    _stop(tree, proc, output, 0)
                output.close()
    finally:
        tree.close()
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
        digest = write_result(output, result)
    except ResultWriteError as exc:
        stderr.write("hwledger run: error: %s\n" % exc)
        return EXIT_NO_RESULT
    stdout.write("%s  %s\n" % (digest, output))
    stdout.flush()
    if result["error"] is not None:
        stderr.write("hwledger run: %s: %s\n" % (result["error"]["reason"], result["error"]["message"]))
    return exit_code_for(result)


def run_job(spec, output, *, kill_grace_s=KILL_GRACE_S, stdout=None, stderr=None):
    """Run a job spec (validated here) and write its result to `output`; return the runner's exit code
    (EXIT_* above).  Prints "<sha256>  <output>" on stdout once the result is written."""
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
        result = _execute(job, kill_grace_s)
    except Exception as exc:  # pylint: disable=broad-exception-caught  # the result must still be written
        result = make_result(job["job_id"], "error", started=now, finished=time.time(),
                             error={"reason": "runner_error", "message": "%s: %s" % (type(exc).__name__, exc)})
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
# Command line (python3 jobs.py ...); `hwledger run` uses add_run_arguments and run_job_file.


def add_run_arguments(parser):
    parser.add_argument("job", metavar="JOB.json", help="the job spec (JSON)")
    parser.add_argument("--output", "-o", metavar="RESULT.json", required=True,
                        help="where to write the result (atomically, mode 0600; a symlink is refused)")


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
        prog="jobs.py", description="hwledger job runner and job spec tool (standard library only).",
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
        return run_job_file(args.job, args.output)
    try:
        if args.action == "validate":
            job = validate_job(load_job_file(args.job))
        else:
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            timeout = int(args.timeout_s) if float(args.timeout_s).is_integer() else args.timeout_s
            job = new_job(command, timeout_s=timeout, workdir=args.workdir, env=_parse_env_pairs(args.env),
                          model_ref=args.model_ref)
    except JobSpecError as exc:
        sys.stderr.write("jobs.py: invalid job:\n%s\n" % exc)
        return EXIT_INVALID
    sys.stdout.write(json.dumps(job, sort_keys=True, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
