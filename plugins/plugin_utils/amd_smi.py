# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""amd-smi output: ``--json`` (a list of per-GPU objects) and the ``monitor`` table (read with the TextFSM
template ``templates/amd_smi_monitor.textfsm``).

JSON (FORMATS.md "amd-smi"): ``[{"gpu": 0, "power": {"socket_power": {"value": 10, "unit": "W"}}, ...}]``;
numbers are ``{"value": n, "unit": u}`` objects, unavailable entries the string ``"N/A"``. ``fields`` is
the object flattened to dotted keys (``power.socket_power``) with the tool's text (``"10 W"``).

Memory: amd-smi's "MB" is MiB. amdsmi computes ``vram_total`` and ``vram_used`` as bytes / (1024 * 1024)
(``amdsmi_get_gpu_vram_usage`` in amd_smi_lib), and the captured MI300X-class table shows
``196300 MB``, which only fits 192 GiB of HBM as MiB. So bytes = MB x 1048576.
"""

from __future__ import annotations

import json
import re

from ansible_collections.hwledger.fleet.plugins.plugin_utils.tool_parsing import (
    MAX_GPUS,
    MIB,
    clip,
    complete_memory,
    new_gpu,
    parse_bytes,
    parse_index,
    parse_number,
    run_template,
    unparseable,
)

TOOL = "amd-smi"
SUGGESTED_QUERY = "amd-smi metric --json"
MEMORY_FACTORS = {"MB": MIB}
MAX_FIELDS = 4096
MAX_DEPTH = 8

# JSON paths, the first present and available wins.
_JSON_PATHS = {
    "name": (("asic", "market_name"),),
    "uuid": (("uuid",),),
    "memory_total_bytes": (("mem_usage", "total_vram"), ("vram", "size")),
    "memory_used_bytes": (("mem_usage", "used_vram"),),
    "memory_free_bytes": (("mem_usage", "free_vram"),),
    "utilization_gpu_percent": (("usage", "gfx_activity"),),
    "temperature_c": (("temperature", "edge"), ("temperature", "hotspot")),
    "power_draw_w": (("power", "socket_power"), ("power", "current_socket_power"),
                     ("power", "average_socket_power")),
}

# monitor table columns -> snapshot keys
_MONITOR_COLUMNS = {
    "POWER": "power_draw_w",
    "GPU_TEMP": "temperature_c",
    "GFX_UTIL": "utilization_gpu_percent",
    "VRAM_USED": "memory_used_bytes",
    "VRAM_TOTAL": "memory_total_bytes",
    "VRAM_FREE": "memory_free_bytes",
}

_CELL_SPLIT_RE = re.compile(r"\s{2,}")


def parse(cmd: str, stdout: str) -> list[dict]:
    """GPU records from amd-smi JSON or monitor-table output. Raises QueryFailure (unparseable)."""
    del cmd  # the output says which form it is
    text = "\n".join(line for line in stdout.replace("\r\n", "\n").split("\n") if not line.startswith("WARNING:"))
    first = text.lstrip()
    if first.startswith("["):
        gpus = _gpus_from_json(text)
    elif first.startswith("GPU"):
        gpus = _gpus_from_monitor(text)
    elif not first:
        raise unparseable("amd-smi printed nothing but warnings (or nothing at all).")
    else:
        raise unparseable(
            "this is not amd-smi --json or `amd-smi monitor` output: it starts with %r. A command such as "
            "`%s` gives output hwledger reads." % (clip(first.split("\n", 1)[0]), SUGGESTED_QUERY))
    if not gpus:
        raise unparseable("amd-smi printed no GPU.")
    if len(gpus) > MAX_GPUS:
        raise unparseable("amd-smi printed %d GPUs; more than %d is not a GPU list." % (len(gpus), MAX_GPUS))
    return gpus


# --------------------------------------------------------------------------------------------------
# JSON


def _gpus_from_json(text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except RecursionError:
        raise unparseable("amd-smi's JSON is nested too deeply to be GPU data.") from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal past Python's digit limit
        raise unparseable("amd-smi's output is not valid JSON: %s." % clip(str(exc), 120)) from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise unparseable("amd-smi's JSON is not a list of per-GPU objects.")
    if len(data) > MAX_GPUS:
        raise unparseable("amd-smi printed %d GPUs; more than %d is not a GPU list." % (len(data), MAX_GPUS))
    return [_gpu_from_object(position, item) for position, item in enumerate(data)]


def _gpu_from_object(position: int, item: dict) -> dict:
    gpu = new_gpu(_json_index(item.get("gpu"), position))
    target = None
    try:
        for target, paths in _JSON_PATHS.items():
            found = _first_available(item, paths)
            if found is not None:
                gpu[target] = _convert(target, found)
    except ValueError as exc:
        raise unparseable("amd-smi GPU %s, %s: %s." % (gpu["index"], target, exc)) from None
    fields: dict = {}
    _flatten(item, "", fields, 0)
    gpu["fields"] = fields
    return complete_memory(gpu)


def _json_index(value, position: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10 ** 6:
        return value
    raise unparseable("amd-smi JSON object %d has no valid \"gpu\" index (%r)." % (position, clip(repr(value), 40)))


def _lookup(item: dict, path: tuple[str, ...]):
    node = item
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _first_available(item: dict, paths: tuple[tuple[str, ...], ...]):
    for path in paths:
        node = _lookup(item, path)
        if node is not None and _text(node) is not None:
            return node
    return None


def _text(node) -> str | None:
    """The tool's text for a leaf: ``{"value": 10, "unit": "W"}`` -> ``"10 W"``; ``"N/A"`` -> None."""
    if isinstance(node, dict):
        if "value" not in node:
            return None
        value, unit = _text(node["value"]), node.get("unit")
        if value is None:
            return None
        return "%s %s" % (value, unit) if isinstance(unit, str) and unit else value
    if isinstance(node, bool):
        return "true" if node else "false"
    if isinstance(node, (int, float)):
        return str(node)  # json.loads already refused integers past Python's digit limit
    if isinstance(node, str):
        return None if node.strip() in ("", "N/A") else node
    return None


def _convert(target: str, node):
    text = _text(node)
    if target in ("name", "uuid"):
        return text
    if target.startswith("memory_"):
        return parse_bytes(text, MEMORY_FACTORS)
    if target == "power_draw_w":
        return float(parse_number(text, ("W", "")))
    if target == "temperature_c":
        return parse_number(text, ("C", "\u00b0C", ""))
    return parse_number(text, ("%", ""))


def _flatten(node, prefix: str, out: dict, depth: int) -> None:
    """Dotted keys for every leaf (a value object counts as a leaf), bounded in depth and count."""
    if len(out) >= MAX_FIELDS or depth > MAX_DEPTH:
        return
    if isinstance(node, dict) and not (set(node) <= {"value", "unit"} and "value" in node):
        for key, child in node.items():
            _flatten(child, "%s.%s" % (prefix, key) if prefix else str(key), out, depth + 1)
    elif isinstance(node, list):
        for position, child in enumerate(node):
            _flatten(child, "%s.%d" % (prefix, position), out, depth + 1)
    else:
        out[prefix] = _text(node)


# --------------------------------------------------------------------------------------------------
# monitor table


def _gpus_from_monitor(text: str) -> list[dict]:
    rows = run_template("amd_smi_monitor.textfsm", text, "amd-smi monitor's table")
    return [_gpu_from_monitor_row(row) for row in rows]


def _gpu_from_monitor_row(row: dict) -> dict:
    names = row["HEADER"].split()
    if not names:
        raise unparseable("amd-smi monitor's table: GPU row %s comes before the header line." % row["GPU"])
    cells = _CELL_SPLIT_RE.split(row["CELLS"]) if row["CELLS"] else []
    if len(cells) != len(names) - 1:
        raise unparseable(
            "amd-smi monitor's table: GPU %s has %d values for %d columns (%s); use `%s` instead."
            % (row["GPU"], len(cells), len(names) - 1, " ".join(names[1:]), SUGGESTED_QUERY))
    gpu = new_gpu(parse_index(row["GPU"]))
    fields = {name: (None if cell in ("N/A", "") else cell) for name, cell in zip(names[1:], cells)}
    try:
        for name, target in _MONITOR_COLUMNS.items():
            if fields.get(name) is not None:
                gpu[target] = _convert(target, fields[name])
    except ValueError as exc:
        raise unparseable("amd-smi monitor's table, GPU %s: %s." % (row["GPU"], exc)) from None
    gpu["fields"] = fields
    return complete_memory(gpu)
