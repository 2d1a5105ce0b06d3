# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""nvidia-smi ``--query-gpu=... --format=csv[,noheader][,nounits]``: the one parser of that format.

Format facts used here (tests/fixtures/gpu/FORMATS.md, all captures from drivers 465 to 610, Linux and
Windows): header names and values are separated by ``", "``; the header names the queried fields in
query order, with the unit appended as `` [MiB]``; ``nounits`` keeps the header units and drops the
value units; ``noheader`` drops the header line only; one row per GPU.

Columns: with a header they come from the header; with ``noheader`` they come from the command's own
``--query-gpu=`` list, with the documented aliases (``gpu_name`` ...) replaced by the name nvidia-smi
prints in a header, so a GPU's ``fields`` keys are the same whichever form was used. ``fields`` keys are
the header's field names without the unit suffix (``memory.total``, not ``memory.total [MiB]``), and its
values are the tool's text (``"81559 MiB"``), or None for an unavailable marker.

Unavailable markers (``[N/A]``, bare ``N/A``, ``[Not Supported]``, ``[Unknown Error]``,
``[Requested functionality has been deprecated]``, ``[Function Not Found]``, any other bracketed
text, an empty value) become None. A per-GPU fault marker such as ``[GPU requires reset]`` also sets
that GPU's ``health``; the other GPUs of the host are unaffected.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ansible_collections.hwledger.fleet.plugins.plugin_utils.tool_parsing import (
    MAX_GPUS,
    MIB,
    QueryFailure,
    clip,
    complete_memory,
    content_lines,
    new_gpu,
    parse_bytes,
    parse_index,
    parse_number,
    unparseable,
)

TOOL = "nvidia-smi"
# The query an agent runs unless its gpu_query_cmd says otherwise (the spec's default), and the command
# this parser suggests when a query cannot be read. It lives with the parser of its output; the agents
# schema takes its default from here.
DEFAULT_GPU_QUERY_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
SEPARATOR = ", "
MAX_COLUMNS = 1024

# Markers that say the GPU itself is in trouble, not just that one value is missing. "GPU requires
# reset" is in a capture; "GPU is lost" is NVML's text for NVML_ERROR_GPU_IS_LOST (not captured yet).
FAULT_MARKERS = frozenset({"GPU requires reset", "GPU is lost"})
# Bare (unbracketed) texts that mean "no value". "ERR!" is what nvidia-smi's own table prints for a
# failed sensor read; harmless to accept here too.
_BARE_UNAVAILABLE = frozenset({"", "N/A", "ERR!"})

# `--help-query-gpu` lists these as '"canonical" or "alias"'; a header shows the canonical name
# (FORMATS.md observed it for gpu_name -> name). clocks_throttle_reasons.* / clocks_event_reasons.*
# are left alone: which of the two a header prints depends on the driver version.
ALIASES = {
    "gpu_name": "name",
    "gpu_serial": "serial",
    "gpu_uuid": "uuid",
    "gpu_bus_id": "pci.bus_id",
    "inforom.image": "inforom.img",
    "inforom.power": "inforom.pwr",
    "gpu_operation_mode.current": "gom.current",
    "gpu_operation_mode.pending": "gom.pending",
    "retired_pages.sbe": "retired_pages.single_bit_ecc.count",
    "retired_pages.dbe": "retired_pages.double_bit.count",
    "clocks.gr": "clocks.current.graphics",
    "clocks.sm": "clocks.current.sm",
    "clocks.mem": "clocks.current.memory",
    "clocks.video": "clocks.current.video",
    "clocks.applications.gr": "clocks.applications.graphics",
    "clocks.applications.mem": "clocks.applications.memory",
    "clocks.default_applications.gr": "clocks.default_applications.graphics",
    "clocks.default_applications.mem": "clocks.default_applications.memory",
    "clocks.max.gr": "clocks.max.graphics",
    "clocks.max.mem": "clocks.max.memory",
}

# Columns that only a process list (--query-compute-apps / --query-accounted-apps) has.
_PROCESS_COLUMNS = frozenset({"pid", "process_name", "used_gpu_memory", "used_memory"})
# Field names a header may start with; used only when the command does not say whether there is one.
_COMMON_FIELDS = frozenset({"index", "name", "uuid", "serial", "count", "pstate", "timestamp"})

# nvidia-smi's outputs other than --query-gpu CSV, recognised by their own text so that the failure can
# say what was run and what to run instead (FORMATS.md; the H200 captures in tests/fixtures/gpu/nvidia).
# Each pattern is anchored on text only that output prints: the table's "| NVIDIA-SMI <version>" banner,
# the "==NVSMI LOG==" title of -q, the XML root element of -q -x, the "# gpu" column line of dmon/pmon.
OTHER_OUTPUTS = (
    ("nvidia-smi's human-readable table (`nvidia-smi` without --query-gpu)", re.compile(r"(?m)^\| NVIDIA-SMI \S")),
    ("the text report of `nvidia-smi -q`", re.compile(r"(?m)^=+NVSMI LOG=+[ \t\r]*$")),
    ("the XML report of `nvidia-smi -q -x`", re.compile(r"<nvidia_smi_log>")),
    ("the monitoring output of `nvidia-smi dmon` (or pmon)", re.compile(r"\A\s*# gpu\s")),
)
_OTHER_OUTPUT_CHARS = 4096  # each marker is in the first lines of its output
# What to run instead: with its header line, the output names its own columns.
CSV_WITH_HEADER_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv"

_QUERY_OPTION_RE = re.compile(r"--query-([a-z][a-z-]{0,40})(?:=|\s+)(?:\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_.,]*))")
_FORMAT_OPTION_RE = re.compile(r"--format(?:=|\s+)[\"']?([A-Za-z, ]{0,60})")
_HEADER_NAME_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_.]{0,127})(?: \[([^\[\]]{1,24})\])?")


@dataclass(frozen=True)
class CsvQuery:
    """What the command line says about the output."""

    kind: str | None            # "gpu", "compute-apps", ...; None when the command has no --query-*
    fields: tuple[str, ...]     # the query list with aliases replaced; () when not in the command
    header: bool | None         # True: csv with header, False: noheader, None: no --format in the command


@functools.lru_cache(maxsize=512)
def parse_command(cmd: str) -> CsvQuery:
    """Read ``--query-X=...`` and ``--format=...`` from a command line (any wrapping: sudo, srun, sh -c)."""
    query = _QUERY_OPTION_RE.search(cmd or "")
    kind, fields = None, ()
    if query is not None:
        kind = query.group(1)
        listed = next(group for group in query.groups()[1:] if group is not None)
        names = (name.strip() for name in listed.split(","))
        fields = tuple(ALIASES.get(name, name) for name in names if name)
    fmt = _FORMAT_OPTION_RE.search(cmd or "")
    header = None
    if fmt is not None:
        options = {option.strip() for option in fmt.group(1).split(",")}
        header = "noheader" not in options
    return CsvQuery(kind=kind, fields=fields, header=header)


# --------------------------------------------------------------------------------------------------
# Failures nvidia-smi reports as text (FORMATS.md "Failures")

_NVML_RE = re.compile(r"(?m)^Failed to initialize NVML: ?(.{0,200}?)[ \t\r]*$")
_NVML_LIBRARY_RE = re.compile(r"(?m)^NVML library version: ?(.{0,40}?)[ \t\r]*$")
_NO_DEVICES_RE = re.compile(r"(?m)^No devices were found[ \t\r]*$")
# Straight quotes in the byte-exact capture, curly ones in a Windows user's paste.
_INVALID_FIELD_RE = re.compile(r"(?m)^Field [\"'\u201c\u201d]?(.{1,100}?)[\"'\u201c\u201d]? is not a valid field to query")
_OPTION_ERROR_RE = re.compile(r"(?m)^(?:ERROR: )?(.{0,300}?)[ \t]*Please run 'nvidia-smi -h' for help\.?[ \t\r]*$")


def classify_failure(text: str, rc: int | None) -> QueryFailure | None:
    """The failure nvidia-smi's message (stdout and stderr together) describes, or None.

    Each pattern is searched only when its fixed words are in the text, so a normal output costs a few
    substring scans.
    """
    status = _exit_note(rc)
    if "couldn't communicate with the NVIDIA driver" in text:
        return QueryFailure(
            "driver_unavailable",
            "nvidia-smi couldn't communicate with the NVIDIA driver%s: the kernel driver is not loaded or "
            "not installed on the host. Check there with `lsmod | grep nvidia` and `dmesg`, then install "
            "or load the driver." % status)
    nvml = _NVML_RE.search(text) if "Failed to initialize NVML" in text else None
    if nvml is not None:
        return _nvml_failure(nvml.group(1), text, status)
    if "No devices were found" in text and _NO_DEVICES_RE.search(text):
        return QueryFailure(
            "no_devices",
            "nvidia-smi found no NVIDIA GPU on the host: \"No devices were found\"%s. The driver is loaded "
            "but sees no usable device; check `lspci | grep -i nvidia` and `dmesg` (RmInitAdapter errors). "
            "A GPU newer than the driver also looks like this." % status)
    invalid = _INVALID_FIELD_RE.search(text) if "is not a valid field to query" in text else None
    if invalid is not None:
        field = invalid.group(1)
        return QueryFailure(
            "invalid_query",
            "nvidia-smi does not know the field %r in --query-gpu%s. `nvidia-smi --help-query-gpu` on "
            "that host lists the valid names; remove or rename %r in gpu_query_cmd." % (field, status, field))
    option = _OPTION_ERROR_RE.search(text) if "Please run 'nvidia-smi -h'" in text else None
    if option is not None:
        return QueryFailure(
            "invalid_arguments",
            "nvidia-smi rejected its arguments%s: %s gpu_query_cmd must be a GPU query such as `%s`."
            % (status, option.group(1).strip() or "(no detail).", DEFAULT_GPU_QUERY_CMD))
    return _failure_from_exit_status(rc)


def _exit_note(rc: int | None) -> str:
    return " (exit status %d)" % rc if rc else ""


def _nvml_failure(detail: str, text: str, status: str) -> QueryFailure:
    lowered = detail.lower()
    if "version mismatch" in lowered:
        library = _NVML_LIBRARY_RE.search(text)
        library_note = " (NVML library version %s)" % library.group(1) if library else ""
        msg = ("NVML failed to initialize%s: the NVIDIA kernel driver and the user-space library differ%s. "
               "This usually follows a driver upgrade without a reboot: reboot the host or reload the "
               "nvidia kernel modules." % (status, library_note))
    elif "no supported gpus" in lowered:
        msg = ("NVML failed to initialize%s: No supported GPUs were found. The driver is loaded but no GPU "
               "it supports is bound to it; check `lspci -k` and the driver's supported-GPU list." % status)
    else:
        msg = ("NVML failed to initialize%s: %s. Check that the NVIDIA driver is loaded and that the SSH "
               "user may open /dev/nvidia* (in a container the device nodes and driver libraries must be "
               "mounted)." % (status, clip(detail, 120) or "no detail"))
    return QueryFailure("nvml_error", msg)


# nvidia-smi(1) RETURN VALUE (the list FORMATS.md quotes, cut after 14; 15 as the NVIDIA GPU Operator
# documentation words it): exit status -> (reason when the status alone says it, meaning).
EXIT_STATUS = {
    2: ("invalid_arguments", "invalid argument or flag"),
    3: (None, "operation not available on the target device"),
    4: (None, "no permission"),
    6: (None, "a query to find an object was unsuccessful"),
    8: (None, "external power cables not attached"),
    9: ("driver_unavailable", "the NVIDIA driver is not loaded"),
    10: (None, "the kernel detected an interrupt issue with a GPU"),
    12: ("nvml_error", "the NVML shared library couldn't be found or loaded"),
    13: ("nvml_error", "the local NVML doesn't implement this function"),
    14: (None, "the infoROM is corrupted"),
    15: (None, "the GPU has fallen off the bus or has otherwise become inaccessible"),
}


def exit_meaning(rc: int | None) -> str | None:
    """What nvidia-smi(1) says an exit status means, or None."""
    return EXIT_STATUS[rc][1] if rc in EXIT_STATUS else None


def _failure_from_exit_status(rc: int | None) -> QueryFailure | None:
    reason = EXIT_STATUS[rc][0] if rc in EXIT_STATUS else None
    if reason is None:
        return None
    return QueryFailure(reason, "nvidia-smi exited with status %d and no message: %s (nvidia-smi(1))."
                        % (rc, exit_meaning(rc)))


# --------------------------------------------------------------------------------------------------
# The CSV itself


def other_output(stdout: str) -> str | None:
    """What the output is when it is one of nvidia-smi's outputs that hwledger does not read (the table,
    ``-q``, ``-q -x``, ``dmon``), else None."""
    head = (stdout or "")[:_OTHER_OUTPUT_CHARS]
    return next((what for what, pattern in OTHER_OUTPUTS if pattern.search(head)), None)


def is_headerless_csv(stdout: str) -> bool:
    """Whether the output looks like ``--format=csv,noheader`` rows: CSV whose first line is not a header,
    so that only the command's ``--query-gpu=`` list can say which column is which."""
    lines = content_lines(stdout)
    if not lines or other_output(stdout) is not None:
        return False
    header = parse_header(lines[0][1])
    return header is None or not _looks_like_header(header)


def parse(cmd: str, stdout: str) -> list[dict]:
    """GPU records from nvidia-smi CSV output. Raises QueryFailure (unparseable) when it is not a GPU list."""
    query = parse_command(cmd)
    if query.kind is not None and query.kind != "gpu":
        raise _process_list_failure("the command asks for --query-%s" % query.kind)
    other = other_output(stdout)
    if other is not None:
        raise unparseable(
            "this is %s, which hwledger does not read: it reads nvidia-smi's --query-gpu=... --format=csv "
            "output. Run `%s` instead (any --query-gpu= field list works)." % (other, CSV_WITH_HEADER_CMD))
    lines = content_lines(stdout)
    if not lines:
        raise unparseable("nvidia-smi printed no GPU rows (empty output).")
    columns, rows = _columns_and_rows(query, lines)
    if len(rows) > MAX_GPUS:
        raise unparseable("nvidia-smi printed %d rows; more than %d is not a GPU list." % (len(rows), MAX_GPUS))
    if not rows:
        raise unparseable("nvidia-smi printed a header but no GPU rows.")
    return [_gpu_from_row(columns, line_no, line) for line_no, line in rows]


def _columns_and_rows(query: CsvQuery, lines: list[tuple[int, str]]):
    """[(name, unit)] for the columns, and the data lines."""
    first_no, first = lines[0]
    header = parse_header(first)
    has_header = query.header
    if has_header is None:  # the command does not say: decide from the text
        has_header = header is not None and _looks_like_header(header)
    if has_header:
        if header is None:
            raise unparseable(
                "expected nvidia-smi's header line (the command asks for --format=csv without noheader) "
                "but line %d is %r. If the output has no header, add noheader to --format." % (first_no, clip(first)))
        if _PROCESS_COLUMNS.intersection(name for name, _unit in header):
            raise _process_list_failure("the header has pid/process_name columns")
        return header, lines[1:]
    if not query.fields:
        raise unparseable(
            "cannot tell which column is which: the output has no header line and the command has no "
            "--query-gpu= list. Use a command such as `%s`." % DEFAULT_GPU_QUERY_CMD)
    return [(name, "") for name in query.fields], lines


def parse_header(line: str) -> list[tuple[str, str]] | None:
    """``"index, memory.total [MiB]"`` -> ``[("index", ""), ("memory.total", "MiB")]``; None if not a header."""
    names = line.strip().split(SEPARATOR)
    if len(names) > MAX_COLUMNS:
        return None
    columns = []
    for name in names:
        match = _HEADER_NAME_RE.fullmatch(name.strip())
        if match is None:
            return None
        columns.append((match.group(1), match.group(2) or ""))
    return columns


def _looks_like_header(columns: list[tuple[str, str]]) -> bool:
    # A lone "Enabled" or "P0" value also matches the name pattern; real field names have a dot, an
    # underscore, a unit, or are one of the short common ones.
    return any(unit or "." in name or "_" in name or name in _COMMON_FIELDS for name, unit in columns)


def _process_list_failure(what: str) -> QueryFailure:
    return unparseable(
        "this is a process list (%s), not a GPU list. Query GPUs instead, e.g. `%s`."
        % (what, DEFAULT_GPU_QUERY_CMD))


def _split_row(columns: list[tuple[str, str]], line_no: int, line: str) -> list[str]:
    values = line.split(SEPARATOR)
    extra = len(values) - len(columns)
    if extra == 0:
        return values
    names = [name for name, _unit in columns]
    # No value in any capture contains ", ", but a GPU name is free text: if the row has too many
    # values and there is a name column, the surplus can only belong to it.
    if extra > 0 and "name" in names:
        at = names.index("name")
        return values[:at] + [SEPARATOR.join(values[at:at + extra + 1])] + values[at + extra + 1:]
    raise unparseable(
        "line %d has %d values but the query has %d columns (%s): %r."
        % (line_no, len(values), len(columns), ", ".join(names[:6]) + (", ..." if len(names) > 6 else ""),
           clip(line)))


def _value(raw: str) -> tuple[str | None, str | None]:
    """(value or None when unavailable, fault marker text or None)."""
    text = raw.strip()
    if text in _BARE_UNAVAILABLE:
        return None, None
    if text[0] == "[" and text[-1] == "]":
        marker = text[1:-1].strip()
        return None, marker if marker in FAULT_MARKERS else None
    return text, None


def _memory(text: str, unit: str) -> int:
    # nvidia-smi reports memory in MiB (the header says [MiB]; nounits drops only the value's unit).
    if unit not in ("", "MiB"):
        raise ValueError("header unit [%s], expected [MiB]" % unit)
    return parse_bytes(text, {"MiB": MIB, "": MIB})


def _percent(text: str, unit: str) -> int | float:
    return parse_number(text, ("%", ""))


def _celsius(text: str, unit: str) -> int | float:
    return parse_number(text, ("", "C"))


def _watts(text: str, unit: str) -> int | float:
    return float(parse_number(text, ("W", "")))


def _text(text: str, unit: str) -> str:
    return text


def _index(text: str, unit: str) -> int:
    return parse_index(text)


# snapshot key -> (columns to read it from, first present wins; converter)
_STANDARD = (
    ("index", ("index",), _index),
    ("name", ("name",), _text),
    ("uuid", ("uuid",), _text),
    ("memory_total_bytes", ("memory.total",), _memory),
    ("memory_used_bytes", ("memory.used",), _memory),
    ("memory_free_bytes", ("memory.free",), _memory),
    ("utilization_gpu_percent", ("utilization.gpu",), _percent),
    ("temperature_c", ("temperature.gpu",), _celsius),
    ("power_draw_w", ("power.draw", "power.draw.average", "power.draw.instant"), _watts),
)


def _gpu_from_row(columns: list[tuple[str, str]], line_no: int, line: str) -> dict:
    gpu = new_gpu()
    fields: dict = {}
    units: dict = {}
    for (name, unit), raw in zip(columns, _split_row(columns, line_no, line)):
        value, fault = _value(raw)
        fields[name] = value
        units[name] = unit
        if fault is not None and gpu["health"] == "ok":
            gpu["health"] = fault
    for key, names, convert in _STANDARD:
        name = next((n for n in names if fields.get(n) is not None), None)
        if name is None:
            continue
        try:
            gpu[key] = convert(fields[name], units[name])
        except ValueError as exc:
            raise unparseable("line %d, column %s: %s." % (line_no, name, exc)) from None
    gpu["fields"] = fields
    return complete_memory(gpu)
