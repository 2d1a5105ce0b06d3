# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""GPU telemetry: from a GPU tool's output (stdout, stderr, exit status) to the ``hwledger_snapshot``
fact, or to a classified failure.

The public face of the parsers. One parser per format lives in its own module:
``nvidia_smi`` (``--query-gpu`` CSV), ``rocm_smi`` (``--csv``, ``--json``, plain ``GPU[n]`` lines),
``amd_smi`` (``--json``, ``monitor`` table); the TextFSM templates for the text tables are in
``templates/``. This module picks the parser, recognises the failures the tools print, bounds the
input, and builds the snapshot.

Snapshot (DESIGN.md)::

    {schema_version, agent, backend, captured_at, query_ms,
     gpus: [{index, name, uuid, memory_total_bytes, memory_used_bytes, memory_free_bytes,
             utilization_gpu_percent, temperature_c, power_draw_w, health, fields}],
     host: {...}}            # only when the caller measured host metrics

Values absent from the output or unavailable (``[N/A]``, ``[Not Supported]``, ...) are None. Memory is
exact integer bytes. ``health`` is ``"ok"`` or the per-GPU fault marker's text (``"GPU requires
reset"``). ``fields`` holds every column/key the tool printed for that GPU, keyed by its name, with the
tool's text: remote strings are used as keys only there, never as snapshot or fact keys, and are
returned as plain data (a GPU name ``{{ ... }}`` stays that literal string).
"""

from __future__ import annotations

import re
import shlex

from ansible_collections.hwledger.fleet.plugins.plugin_utils import amd_smi, nvidia_smi, rocm_smi
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD
from ansible_collections.hwledger.fleet.plugins.plugin_utils.tool_parsing import (
    GPU_KEYS,
    HEALTH_OK,
    MAX_OUTPUT_BYTES,
    REASONS,
    SCHEMA_VERSION,
    QueryFailure,
    clip,
    looks_binary,
    unparseable,
)

__all__ = [
    "BACKENDS", "GPU_KEYS", "MAX_OUTPUT_BYTES", "REASONS", "SCHEMA_VERSION", "QueryFailure",
    "build_snapshot", "classify_failure", "command_warnings", "detect_backend",
    "fix_showmeminfo", "needs_command", "output_head", "parse_gpus", "tool_in_command",
]

BACKENDS = ("nvidia", "rocm", "amdsmi")
TOOL_BACKENDS = {"nvidia-smi": "nvidia", "rocm-smi": "rocm", "amd-smi": "amdsmi"}
_PARSERS = {"nvidia": nvidia_smi.parse, "rocm": rocm_smi.parse, "amdsmi": amd_smi.parse}

OUTPUT_HEAD_LINES = 10
OUTPUT_HEAD_CHARS = 2000

SHOWMEMINFO_TYPES = "vram, vis_vram, gtt or all"

_WORD_RE = re.compile(r"[^\s'\";|&()<>`]+")
_MONITOR_HEADER_RE = re.compile(r"GPU[ \t]+[A-Z]")

# The shell's own messages for a missing command: "/bin/sh: nvidia-smi: command not found" (bash),
# "sh: 1: nvidia-smi: not found" (dash), "sudo: nvidia-smi: command not found",
# "bash: line 1: /opt/x/rocm-smi: No such file or directory"; and cmd.exe's.
_SHELL_MISSING_SUFFIXES = (": command not found", ": not found", ": No such file or directory")
_NOT_RECOGNIZED_RE = re.compile(r"'([^'\n]{1,200})' is not recognized as an internal or external command")
# Shell messages are short and come first: only this much of the output is searched for them.
_SHELL_MESSAGE_CHARS = 4096
_ARGPARSE_RE = re.compile(r"(?m)^([\w.-]{1,64}): error: (.{1,500}?)[ \t]*$")
_SHOWMEMINFO_WITHOUT_TYPE_RE = re.compile(r"--showmeminfo(?=\s+-|\s*$|\s*[;|&)'\"])")

# --------------------------------------------------------------------------------------------------
# Which tool


def tool_in_command(cmd: str) -> str | None:
    """``"nvidia-smi"``, ``"rocm-smi"`` or ``"amd-smi"`` when the command runs one (any path, ``.exe``,
    behind sudo/srun/sh -c), else None."""
    for word in _WORD_RE.findall(cmd or ""):
        name = word.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].lower()
        name = name[:-4] if name.endswith(".exe") else name
        if name in TOOL_BACKENDS:
            return name
    return None


def detect_backend(cmd: str, stdout: str) -> str:
    """``"nvidia"``, ``"rocm"`` or ``"amdsmi"``: from the tool the command names, else from the output."""
    tool = tool_in_command(cmd)
    if tool is not None:
        return TOOL_BACKENDS[tool]
    if nvidia_smi.other_output(stdout) is not None:
        return "nvidia"  # before the "=" test below: `nvidia-smi -q` starts with "==...NVSMI LOG==..."
    lines = (line.strip() for line in (stdout or "")[:4096].split("\n"))
    head = next((line for line in lines if line and not line.startswith("WARNING:")), "")
    if head.startswith("["):
        return "amdsmi"
    if head.startswith(("{", "device,", "GPU[", "=")):
        return "rocm"
    if _MONITOR_HEADER_RE.match(head):
        return "amdsmi"
    return "nvidia"


def needs_command(stdout: str, backend: str = "auto") -> bool:
    """Whether this output can be read only with the command that produced it: nvidia-smi CSV without a
    header line, whose columns are named by nothing but the command's ``--query-gpu=`` list. Every other
    format (JSON, CSV with a header, the rocm-smi and amd-smi tables) names its own columns. A shape test:
    ask it about output that did not parse without a command (a tool's one-line error looks headerless too)."""
    resolved = detect_backend("", stdout) if backend == "auto" else backend
    return resolved == "nvidia" and nvidia_smi.is_headerless_csv(stdout)


# --------------------------------------------------------------------------------------------------
# Parsing


def parse_gpus(cmd: str, stdout: str, stderr: str, rc: int | None, backend: str = "auto") -> list[dict]:
    """The GPUs in one run of a GPU tool, or QueryFailure (with ``rc`` and ``output_head`` filled in).

    ``backend``: ``"auto"`` (from the command, else the output) or one of BACKENDS.
    """
    stdout, stderr = stdout or "", stderr or ""
    try:
        return _parse_gpus(cmd or "", stdout, stderr, rc, backend)
    except QueryFailure as failure:
        if failure.rc is None:
            failure.rc = rc
        if not failure.output_head:
            failure.output_head = output_head(stdout, stderr)
        raise


def _parse_gpus(cmd: str, stdout: str, stderr: str, rc: int | None, backend: str) -> list[dict]:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError("backend must be 'auto' or one of %s, not %r" % (", ".join(BACKENDS), backend))
    _check_size(cmd, stdout, "output")
    _check_size(cmd, stderr, "error output")
    if backend == "auto":
        backend = detect_backend(cmd, stdout)
    failure = classify_failure(cmd, stdout, stderr, rc, backend)
    if failure is not None:
        raise failure
    if rc:
        raise _unexplained_exit(cmd, stdout, stderr, rc, backend)
    if looks_binary(stdout):
        raise unparseable("the output of `%s` holds binary data (NUL or non-UTF-8 bytes), not GPU telemetry."
                          % clip(cmd, 120))
    return _PARSERS[backend](cmd, stdout)


def _check_size(cmd: str, text: str, what: str) -> None:
    # len() in characters is a lower bound of the UTF-8 size, so a huge text is refused before encoding it.
    size = len(text)
    if size <= MAX_OUTPUT_BYTES:
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_OUTPUT_BYTES:
        raise QueryFailure(
            "output_too_large",
            "the %s of `%s` is more than %d bytes: that is not GPU telemetry. Check gpu_query_cmd."
            % (what, clip(cmd, 120), MAX_OUTPUT_BYTES))


def classify_failure(cmd: str, stdout: str, stderr: str, rc: int | None, backend: str) -> QueryFailure | None:
    """The failure the tool (or the shell) reported, or None when the output is not a known failure."""
    text = stderr + "\n" + stdout if stderr else stdout
    failure = _tool_not_found(cmd, stdout, text, rc)
    if failure is None and ": error: " in text:
        failure = _argparse_failure(cmd, text, rc)
    if failure is None:
        failure = nvidia_smi.classify_failure(text, rc if backend == "nvidia" else None)
    if failure is None:
        failure = rocm_smi.classify_failure(text, rc)
    return failure


def _missing_command_in(text: str) -> str | None:
    """The command a shell said it could not find, or None."""
    head = text[:_SHELL_MESSAGE_CHARS]
    for line in head.split("\n"):
        line = line.rstrip()
        if line.endswith(_SHELL_MISSING_SUFFIXES):
            parts = line.split(": ")
            if len(parts) >= 3 and parts[-2].strip():
                return parts[-2].strip()
    match = _NOT_RECOGNIZED_RE.search(head)
    return match.group(1) if match else None


def _tool_not_found(cmd: str, stdout: str, text: str, rc: int | None) -> QueryFailure | None:
    shell_said = None
    # A working tool's output is not read as a shell message: only look when the shell's exit status
    # for "not found" (127) is there, unknown, or nothing came on stdout.
    if rc in (None, 127) or not stdout.strip():
        shell_said = _missing_command_in(text)
    if rc not in (126, 127) and shell_said is None:
        return None
    tool = shell_said or tool_in_command(cmd) or (cmd.split() or ["the GPU query"])[0]
    status = " (exit status %d)" % rc if rc else ""
    if rc == 126:
        return QueryFailure(
            "tool_not_found",
            "%r was found on the host but could not be executed%s: check its permissions and that it is "
            "a program for that host's architecture." % (clip(tool, 120), status))
    return QueryFailure(
        "tool_not_found",
        "%r was not found on the host%s: it must be on the PATH of the SSH user's non-interactive shell, "
        "which is often shorter than a login shell's (e.g. without /usr/local/bin or /opt/rocm/bin). Install "
        "the vendor's tools there, or give gpu_query_cmd the tool's full path." % (clip(tool, 120), status))


def _argparse_failure(cmd: str, text: str, rc: int | None) -> QueryFailure | None:
    match = _ARGPARSE_RE.search(text)
    if match is None:
        return None
    prog, error = match.group(1), match.group(2)
    status = " (exit status %d)" % rc if rc else ""
    if "--showmeminfo" in error and "expected" in error:
        fixed = fix_showmeminfo(cmd)
        return QueryFailure(
            "invalid_arguments",
            "%s rejected the command%s: \"%s\". --showmeminfo needs a memory type (%s), and in `%s` "
            "it has none. Use `%s`."
            % (prog, status, clip(error, 200), SHOWMEMINFO_TYPES, clip(cmd, 200),
               fixed or "rocm-smi --showmeminfo vram --csv"))
    return QueryFailure(
        "invalid_arguments",
        "%s rejected its arguments%s: \"%s\". Check gpu_query_cmd (`%s`) against `%s --help` on that host."
        % (prog, status, clip(error, 200), clip(cmd, 200), prog))


def _unexplained_exit(cmd: str, stdout: str, stderr: str, rc: int, backend: str) -> QueryFailure:
    tool = tool_in_command(cmd) or "the GPU query"
    meaning = nvidia_smi.exit_meaning(rc) if backend == "nvidia" else None
    first_line = next((line.strip() for line in (stderr + "\n" + stdout).split("\n") if line.strip()), "")
    return QueryFailure(
        "unparseable",
        "%s exited with status %d%s, so its output is not trusted as a result (%s). Run `%s` on the host "
        "to see what is wrong."
        % (tool, rc, " (nvidia-smi(1): %s)" % meaning if meaning else "",
           "first line: %r" % clip(first_line, 160) if first_line else "it printed nothing", clip(cmd, 200)))


def output_head(stdout: str, stderr: str = "") -> str:
    """The first lines of the output for a failure report: bounded, and safe to serialise as JSON."""
    joined = "\n".join(text for text in (stdout, stderr) if text and text.strip())
    head = "\n".join(joined[:OUTPUT_HEAD_CHARS * 2].split("\n")[:OUTPUT_HEAD_LINES])[:OUTPUT_HEAD_CHARS]
    # Undecodable bytes arrive as lone surrogates, which a UTF-8 encoder refuses: make them "?".
    return head.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\\0")


# --------------------------------------------------------------------------------------------------
# Advice before anything runs


def fix_showmeminfo(cmd: str) -> str | None:
    """The command with ``vram`` after a ``--showmeminfo`` that has no memory type, or None if none lacks one."""
    if tool_in_command(cmd) != "rocm-smi" or _SHOWMEMINFO_WITHOUT_TYPE_RE.search(cmd) is None:
        return None
    return _SHOWMEMINFO_WITHOUT_TYPE_RE.sub("--showmeminfo vram", cmd)


def command_warnings(cmd: str) -> list[str]:
    """Known-bad query commands, each warning with the fixed command. Empty when nothing is known wrong."""
    warnings = []
    tool = tool_in_command(cmd)
    fixed = fix_showmeminfo(cmd)
    if fixed is not None:
        warnings.append(
            "`%s` fails on real rocm-smi: --showmeminfo needs a memory type (%s) and argparse stops at the "
            "next option (\"expected at least one argument\"). Use `%s`." % (cmd, SHOWMEMINFO_TYPES, fixed))
    if tool == "nvidia-smi":
        warnings.extend(_nvidia_warnings(cmd))
    if tool == "amd-smi" and "--csv" in _words(cmd):
        warnings.append(
            "`%s`: amd-smi's CSV holds embedded lists for several metric groups and is not read by hwledger; "
            "use --json instead (e.g. `%s`)." % (cmd, amd_smi.SUGGESTED_QUERY))
    return warnings


def _words(cmd: str) -> list[str]:
    try:
        return shlex.split(cmd)
    except ValueError:
        return cmd.split()


def _nvidia_warnings(cmd: str) -> list[str]:
    query = nvidia_smi.parse_command(cmd)
    if query.kind is None:
        return ["`%s` has no --query-gpu=... list, so nvidia-smi prints its human table, which hwledger does "
                "not read. Use `%s`." % (cmd, DEFAULT_GPU_QUERY_CMD)]
    if query.kind != "gpu":
        return ["`%s` lists processes (--query-%s), not GPUs. Use `%s`."
                % (cmd, query.kind, DEFAULT_GPU_QUERY_CMD)]
    if query.header is None:
        return ["`%s` has no --format=csv: nvidia-smi requires it with --query-gpu. Use `%s --format=csv,noheader`."
                % (cmd, cmd.rstrip())]
    if not query.fields:
        return ["`%s` has an empty --query-gpu list. Use `%s`." % (cmd, DEFAULT_GPU_QUERY_CMD)]
    return []


# --------------------------------------------------------------------------------------------------
# Results


def build_snapshot(*, agent: str, backend: str, gpus: list[dict], captured_at: str, query_ms: float,
                   host: dict | None = None) -> dict:
    """The ``hwledger_snapshot`` fact: exactly DESIGN.md's keys (``host`` only when given)."""
    if backend not in BACKENDS:
        raise ValueError("backend must be one of %s, not %r" % (", ".join(BACKENDS), backend))
    snapshot = {
        "schema_version": SCHEMA_VERSION,
        "agent": agent,
        "backend": backend,
        "captured_at": captured_at,
        "query_ms": query_ms,
        "gpus": [_snapshot_gpu(gpu) for gpu in gpus],
    }
    if host is not None:
        snapshot["host"] = dict(host)
    return snapshot


def _snapshot_gpu(gpu: dict) -> dict:
    # Exactly the documented keys, whatever the dict handed in holds.
    record = {key: gpu.get(key) for key in GPU_KEYS}
    record["health"] = record["health"] or HEALTH_OK
    record["fields"] = dict(record["fields"] or {})
    return record
