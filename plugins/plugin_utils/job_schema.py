# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""The hwledger job spec and job result: their schema, validation and encoding.

Used on the controller by the ``hwledger.fleet.job_spec`` / ``hwledger.fleet.job_result`` action plugins
and by the app (``hwledger job``, the server), and on the GPU host by the runner (``job_runner``), which
validates the job it is given and writes its result with ``make_result``. Standard library only and
Python 3.8 compatible, since it travels to the GPU hosts with the runner (docs/jobs.md).

Everything read here may come from elsewhere (a job file, a result file written on a remote host):
strict JSON (no NaN, no duplicate keys, bounded integers), bounded sizes, every field checked.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import re
import socket
import stat
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
# The job role sets Ansible's async limit to timeout_s + RUNNER_OVERHEAD_S so that the runner, not
# async_wrapper (which would kill only the runner), always ends the job.
RUNNER_OVERHEAD_S = 120

JOB_KEYS = ("schema_version", "job_id", "command", "env", "workdir", "timeout_s", "model_ref", "metadata",
            "resources")
# `resources`: what a job needs of the GPUs it is placed on (`hwledger fleet serve` reads it; the runner
# accepts it and ignores it). See _check_resources.
RESOURCE_KEYS = ("gpus", "min_free_vram", "gpu_name")
MAX_GPUS = 64
MAX_VRAM_BYTES = 1 << 50  # 1 PiB: anything above is a typo
GPU_NAME_MAX_CHARS = 128
# What the server sets for a job with `resources` (the GPUs it chose); a job's own env must not set them.
VISIBLE_DEVICES_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL")
# Env values at least this long are masked in what a job prints (the runner, job_runner.masked_values) and in
# every string `/api/jobs` serves (hwledger.web.api). Shorter ones ("1", "true", "fast") are not: masking them
# everywhere would garble the output and protect nothing.
MIN_SECRET_CHARS = 6
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


_SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?) ?([A-Za-z]*)$")
# Binary for K/M/G/T with or without "iB" (as nvidia-smi's MiB, and docker's 40g); the SI units KB/MB/GB/TB
# are decimal, as they are everywhere else.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tib": 1 << 40,
    "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
}


def parse_size(value):
    """A memory size in bytes (int) from 42949672960, "42949672960", "40GiB", "40 GiB", "40G", "1.5TiB" or
    "40GB". K, M, G, T and KiB, MiB, GiB, TiB are powers of 1024 (40G = 40GiB = 42949672960); KB, MB, GB, TB
    are powers of 1000. Case does not matter. Raises ValueError saying what is accepted."""
    example = "\"40GiB\" (= \"40G\" = 42949672960 bytes) or \"512MiB\""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be a size such as %s, got %s" % (example, _show(value)))
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value.strip())
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS or len(value) > 40:
            raise ValueError("%s is not a size: write a number and a unit (B, KiB, MiB, GiB, TiB; K, M, G, T are "
                             "the same; KB, MB, GB, TB are powers of 1000), e.g. %s" % (_show(value), example))
        number = match.group(1)
        size = int(number) * _SIZE_UNITS[unit] if "." not in number else int(float(number) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError("must be more than 0 bytes, got %s" % _show(value))
    if size > MAX_VRAM_BYTES:
        raise ValueError("%s is more memory than any GPU has (at most 1 PiB); e.g. %s" % (_show(value), example))
    return size


def _check_resources(value, errors, env):
    """The job's GPU request, normalised: {gpus, min_free_vram (bytes or None), gpu_name (or None)}; None
    when the spec has none (then the key stays out of the normalised spec, which an older runner reads)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.append(("resources", "must be a mapping such as {\"gpus\": 1, \"min_free_vram\": \"40GiB\", "
                                    "\"gpu_name\": \"H100*\"}, got %s" % _show(value)))
        return None
    errors.extend(("resources.%s" % key, msg) for key, msg in _unknown_key_errors(value, RESOURCE_KEYS, "resources"))
    gpus = value.get("gpus", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
        errors.append(("resources.gpus", "must be a whole number of GPUs from 1 to %d, got %s" % (MAX_GPUS, _show(gpus))))
    min_free = value.get("min_free_vram")
    if min_free is not None:
        try:
            min_free = parse_size(min_free)
        except ValueError as exc:
            errors.append(("resources.min_free_vram", str(exc)))
    name = value.get("gpu_name")
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > GPU_NAME_MAX_CHARS
                             or _CONTROL_RE.search(name)):
        errors.append(("resources.gpu_name", "must be a glob of at most %d printable characters matched against the "
                                             "GPU's name, e.g. \"H100*\" or \"*MI100*\", got %s"
                       % (GPU_NAME_MAX_CHARS, _show(name))))
    for var in VISIBLE_DEVICES_VARS:
        if isinstance(env, dict) and var in env:
            errors.append(("env.%s" % var, "is set by hwledger to the GPUs it places a job with resources on: remove it "
                                           "from env (or remove resources and choose the GPUs yourself)"))
    return {"gpus": gpus, "min_free_vram": min_free, "gpu_name": name}


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
    """Validate a job spec (a dict, e.g. parsed JSON) and return it normalised: every key present (but
    `resources`, present only when given), defaults filled, job_id canonical, sizes in bytes.  Raises
    JobSpecError naming each bad field."""
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
    resources = _check_resources(obj.get("resources"), errors, obj.get("env"))
    if resources is not None:
        job["resources"] = resources
    if errors:
        raise JobSpecError(errors)
    job["command"] = list(job["command"])
    return job


def new_job(command, **kw):
    """A new, validated job spec with a fresh job_id (kw: env, workdir, timeout_s, model_ref, metadata,
    resources)."""
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


def parse_sha256_line(text):
    """The hex digest from the runner's stdout ("<hex>  <path>"), or None."""
    for line in (text or "").splitlines():
        token = line.strip().split(" ", 1)[0].lower()
        if _SHA256_RE.match(token):
            return token
    return None
