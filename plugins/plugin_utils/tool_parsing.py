# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""What every GPU-tool parser shares: the failure type, the GPU record, bounded number parsing.

``telemetry`` is the public face (it re-exports the names here); the per-tool modules
(``nvidia_smi``, ``rocm_smi``, ``amd_smi``) import this module instead of ``telemetry`` so that
``telemetry`` can import them without an import cycle.

All input handled here comes from GPU hosts that may not be trusted: numbers are parsed only after a
length check (a 100000-digit "memory.total" is an error, not a CPU burn), and remote strings are
only ever used as values or as keys inside a GPU's ``fields`` dict.
"""

from __future__ import annotations

import functools
import io
import os
import re

try:  # textfsm reads the human tables; JSON and CSV need only the standard library.
    import textfsm
except ImportError:  # pragma: no cover - exercised only where textfsm is missing
    textfsm = None

SCHEMA_VERSION = 1

# Machine-readable failure reasons. The parsers raise the first eight; the probe adds the rest.
REASONS = frozenset({
    "tool_not_found", "driver_unavailable", "nvml_error", "no_devices", "invalid_query",
    "invalid_arguments", "unparseable", "output_too_large",
    "timeout", "tool_still_running", "probe_busy", "host_key_changed", "host_key_unknown", "unreachable",
})

MAX_OUTPUT_BYTES = 1 << 20
# A host with more GPU rows than this is not reporting GPUs (and each row costs a dict of fields).
MAX_GPUS = 1024
# Longest numeric text we convert; longer is rejected before int()/float() ever sees it.
MAX_NUMBER_CHARS = 40
# Longest line a text table may have (keeps the template regexes' work per line small).
MAX_TABLE_LINE = 4096

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

HEALTH_OK = "ok"
MIB = 1 << 20

# The keys of one GPU in the snapshot, in the order DESIGN.md lists them.
GPU_KEYS = (
    "index", "name", "uuid", "memory_total_bytes", "memory_used_bytes", "memory_free_bytes",
    "utilization_gpu_percent", "temperature_c", "power_draw_w", "health", "fields",
)

# number, optional single space, optional unit that does not start with a digit or space.
# Bounded quantifiers keep a hostile value from costing more than a few steps.
_QUANTITY_RE = re.compile(r"(-?[0-9]{1,18}(?:\.[0-9]{1,18})?) ?([^0-9\s.-]\S{0,7})?")
_INTEGER_RE = re.compile(r"[0-9]{1,18}")
# Lone surrogates are what undecodable bytes become with surrogateescape; U+FFFD with "replace".
_BINARY_RE = re.compile("[\x00\ufffd\udc80-\udcff]")


class QueryFailure(Exception):
    """A GPU query that produced no snapshot: ``reason`` (one of REASONS) and a ``msg`` a person can act on."""

    def __init__(self, reason: str, msg: str, *, rc: int | None = None, output_head: str = ""):
        if reason not in REASONS:
            raise ValueError("unknown failure reason %r" % (reason,))
        super().__init__(msg)
        self.reason = reason
        self.msg = msg
        self.rc = rc
        self.output_head = output_head

    def __repr__(self) -> str:
        return "QueryFailure(%r, %r, rc=%r)" % (self.reason, self.msg, self.rc)


def unparseable(msg: str) -> QueryFailure:
    return QueryFailure("unparseable", msg)


def new_gpu(index: int | None = None) -> dict:
    """A GPU record with every documented key; values the tool did not give stay None."""
    gpu: dict = dict.fromkeys(GPU_KEYS)
    gpu["index"] = index
    gpu["health"] = HEALTH_OK
    gpu["fields"] = {}
    return gpu


def complete_memory(gpu: dict) -> dict:
    """Fill whichever of total/used/free is missing from the other two (exact integer arithmetic).

    A tool that reports inconsistent numbers (used + free > total) gets nothing derived.
    """
    total, used, free = gpu["memory_total_bytes"], gpu["memory_used_bytes"], gpu["memory_free_bytes"]
    if total is not None and used is None and free is not None and free <= total:
        gpu["memory_used_bytes"] = total - free
    elif total is not None and free is None and used is not None and used <= total:
        gpu["memory_free_bytes"] = total - used
    return gpu


def looks_binary(text: str) -> bool:
    """True when the text holds NUL bytes or bytes that were not valid UTF-8."""
    return _BINARY_RE.search(text) is not None


def split_quantity(text: str) -> tuple[str, str]:
    """``"81559 MiB"`` -> ``("81559", "MiB")``; ``"32"`` -> ``("32", "")``. ValueError when not a quantity."""
    text = text.strip()
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError("value %s... is too long to be a number" % text[:16])
    match = _QUANTITY_RE.fullmatch(text)
    if match is None:
        raise ValueError("%r is not a number" % text)
    return match.group(1), match.group(2) or ""


def to_number(digits: str) -> int | float:
    """Integer text stays int; text with a decimal point becomes float. Input is already bounded."""
    return float(digits) if "." in digits else int(digits)


def parse_number(text: str, units: tuple[str, ...] = ("",)) -> int | float:
    """A number with one of the accepted units (``""`` = bare). ValueError otherwise."""
    digits, unit = split_quantity(text)
    if unit not in units:
        raise ValueError("%r has unit %r, expected %s" % (text, unit, " or ".join(repr(u) for u in units)))
    return to_number(digits)


def parse_bytes(text: str, factors: dict[str, int]) -> int:
    """An integer amount in one of ``factors``' units (``""`` = bare), as exact bytes."""
    digits, unit = split_quantity(text)
    if unit not in factors:
        raise ValueError("%r has unit %r, expected %s" % (text, unit, " or ".join(repr(u) for u in factors)))
    if _INTEGER_RE.fullmatch(digits) is None:
        raise ValueError("%r is not a whole number of %s" % (text, unit or "bytes"))
    return int(digits) * factors[unit]


def parse_index(text: str) -> int:
    text = text.strip()
    if len(text) > 9 or not text.isdigit() or not text.isascii():
        raise ValueError("%r is not a GPU index" % text[:20])
    return int(text)


def clean_text(text: str) -> str:
    """Remote text made safe to keep and to serialise anywhere (JSON, SQLite, a log line).

    Bytes that were not UTF-8 arrive as lone surrogates (decoded with surrogateescape), which every
    encoder refuses; they become visible escapes (``\\xff``), so the message still shows what was sent.
    Other lone surrogates become ``\\udXXX`` escapes. Control characters are left for the display layer
    (a terminal or a page) to escape: they are valid text.
    """
    if not text:
        return text or ""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match) -> str:
    code = ord(match.group())
    # U+DC80..U+DCFF stand for the undecodable bytes 0x80..0xFF (surrogateescape).
    return "\\x%02x" % (code - 0xDC00) if 0xDC80 <= code <= 0xDCFF else "\\u%04x" % code


def clean_tree(value):
    """``clean_text`` applied to every string (keys included) of a JSON-like value."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_tree(key): clean_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_tree(item) for item in value]
    return value


def clip(text: str, limit: int = 80) -> str:
    """A short, single-line excerpt of remote text for an error message."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


def content_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every non-blank line; CRLF tolerated.

    Splits on ``\\n`` only (not ``str.splitlines``), so a ``\\r`` or form feed inside a value stays in
    the value instead of cutting the line in two.
    """
    lines = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            lines.append((number, line))
    return lines


@functools.lru_cache(maxsize=None)
def _template_text(name: str) -> str:
    with open(os.path.join(TEMPLATE_DIR, name), encoding="utf-8") as handle:
        return handle.read()


def run_template(name: str, text: str, what: str) -> list[dict]:
    """Rows (dicts keyed by the template's Values) of ``text`` read with ``templates/<name>``.

    ``what`` names the output in messages. A line the template does not accept makes the whole
    output unparseable (the templates end with an ``Error`` rule), so a table in an unexpected layout
    is reported rather than half read.
    """
    if textfsm is None:
        raise unparseable(
            "reading %s needs the Python package textfsm on the controller (pip install textfsm); or "
            "make the command print JSON (--json)." % what)
    text = text.replace("\r\n", "\n")
    if any(len(line) > MAX_TABLE_LINE for line in text.split("\n")):
        raise unparseable("%s has a line longer than %d characters; that is not a GPU table." % (what, MAX_TABLE_LINE))
    fsm = textfsm.TextFSM(io.StringIO(_template_text(name)))
    try:
        rows = fsm.ParseText(text)
    except textfsm.TextFSMError as exc:
        line = str(exc).partition("Input Line: ")[2]
        raise unparseable("%s: line not understood: %r." % (what, clip(line or str(exc)))) from None
    return [dict(zip(fsm.header, row)) for row in rows]
