# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""rocm-smi output: ``--csv``, ``--json`` (one line or pretty-printed) and the plain ``GPU[n] : key: value``
lines (read with the TextFSM template ``templates/rocm_smi_gpu_lines.textfsm``).

All three forms carry the same key strings (FORMATS.md: CSV columns are the JSON keys; the plain lines
print the same keys), so each is first turned into ``{card index: {key: text}}`` and one function maps
that to a GPU record. Keys differ across ROCm 4 to 7 (``Card series`` -> ``Card Series``, ``GPU ID`` ->
``Device ID``, ...); the lists below hold every name seen for the values the snapshot needs.

``fields`` holds every key of the card with rocm-smi's text, None for ``N/A`` (including
``N/A (Secondary die)``). ``WARNING:`` lines (ROCm 7.1 prints one before the output) are skipped.
Memory: ``VRAM Total Memory (B)`` and ``VRAM Total Used Memory (B)`` are bytes; free = total - used.
"""

from __future__ import annotations

import json
import re

from ansible_collections.hwledger.fleet.plugins.plugin_utils.tool_parsing import (
    MAX_GPUS,
    QueryFailure,
    clip,
    complete_memory,
    new_gpu,
    parse_bytes,
    parse_number,
    run_template,
    unparseable,
)

TOOL = "rocm-smi"
SUGGESTED_QUERY = "rocm-smi --showproductname --showuse --showtemp --showpower --showmeminfo vram --json"

# The first present, available value wins.
NAME_KEYS = ("Device Name", "Card Series", "Card series")
UUID_KEYS = ("Unique ID",)
TEMPERATURE_KEYS = ("Temperature (Sensor edge) (C)", "Temperature (Sensor junction) (C)")
POWER_KEYS = ("Current Socket Graphics Package Power (W)", "Average Graphics Package Power (W)")
UTILIZATION_KEYS = ("GPU use (%)",)
VRAM_TOTAL_KEY = "VRAM Total Memory (B)"
VRAM_USED_KEY = "VRAM Total Used Memory (B)"

_CARD_RE = re.compile(r"card([0-9]{1,4})")
# ROCm 4.3.0 printed the raw vendor id (0x1002) as "Card series": an id, not a name.
_HEX_ID_RE = re.compile(r"0x[0-9A-Fa-f]{1,16}")
_NO_DRM_RE = re.compile(r"(?m)^ERROR: No DRM devices available")


def classify_failure(text: str, rc: int | None) -> QueryFailure | None:
    """The failure rocm-smi's own message describes, or None (its argparse errors are handled by telemetry)."""
    if "No DRM devices" in text and _NO_DRM_RE.search(text):
        return QueryFailure(
            "no_devices",
            "rocm-smi found no AMD GPU (\"No DRM devices available\"%s): the amdgpu driver is not loaded "
            "or sees no device. Check `lsmod | grep amdgpu`, `dmesg` and that the SSH user may open "
            "/dev/dri and /dev/kfd (groups render and video)." % (", exit status %d" % rc if rc else ""))
    return None


def parse(cmd: str, stdout: str) -> list[dict]:
    """GPU records from rocm-smi output in any of its three forms. Raises QueryFailure (unparseable)."""
    del cmd  # the output says which form it is; the command line is not needed
    text = _without_warnings(stdout)
    first = text.lstrip()
    if first.startswith("{"):
        cards = _cards_from_json(text)
    elif first.startswith("device,"):
        cards = _cards_from_csv(text)
    elif first.startswith(("GPU[", "=", "ERROR:")):
        cards = _cards_from_table(text)
    elif first.startswith("name,"):
        cards = {}  # the newer system-only CSV ("name, value" / "Driver version", ...): no card rows
    elif not first:
        raise unparseable("rocm-smi printed nothing but warnings (or nothing at all).")
    else:
        raise unparseable(
            "this is not rocm-smi --json, --csv or GPU[n] output: it starts with %r. A command such as "
            "`%s` gives output hwledger reads." % (clip(first.split("\n", 1)[0]), SUGGESTED_QUERY))
    if not cards:
        raise unparseable(
            "rocm-smi printed no per-GPU values (only system-wide ones such as the driver version); add "
            "per-GPU options, e.g. `%s`." % SUGGESTED_QUERY)
    if len(cards) > MAX_GPUS:
        raise unparseable("rocm-smi printed %d cards; more than %d is not a GPU list." % (len(cards), MAX_GPUS))
    return [_gpu_from_card(index, cards[index]) for index in sorted(cards)]


def _without_warnings(stdout: str) -> str:
    lines = stdout.replace("\r\n", "\n").split("\n")
    return "\n".join(line for line in lines if not line.startswith("WARNING:"))


def _card_index(key: str) -> int | None:
    match = _CARD_RE.fullmatch(key.strip())
    return int(match.group(1)) if match else None


def _cards_from_json(text: str) -> dict[int, dict]:
    try:
        data = json.loads(text)
    except RecursionError:
        raise unparseable("rocm-smi's JSON is nested too deeply to be GPU data.") from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal past Python's digit limit
        raise unparseable("rocm-smi's output is not valid JSON: %s." % clip(str(exc), 120)) from None
    if not isinstance(data, dict):
        raise unparseable("rocm-smi's JSON is a %s, expected an object with card0, card1, ... keys."
                          % type(data).__name__)
    cards = {}
    for key, values in data.items():
        index = _card_index(key)
        if index is not None and isinstance(values, dict):  # "system" and stray keys are not cards
            cards[index] = {name: _json_text(value) for name, value in values.items()}
    return cards


def _json_text(value) -> str | None:
    # rocm-smi prints every value as a string; anything else is tolerated only if it is a plain number.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _cards_from_csv(text: str) -> dict[int, dict]:
    lines = [line for line in text.split("\n") if line.strip()]
    header = [name.strip() for name in lines[0].split(",")]
    cards = {}
    for line_no, line in enumerate(lines[1:], start=2):
        if line.startswith("name,"):
            break  # rocm-smi since 2023 prints system-wide values after the cards as "name, value" rows
        values = [value.strip() for value in line.split(",")]
        if len(values) != len(header):
            # rocm-smi deletes commas from values (FORMATS.md), so a short or long row is a cut-off output.
            raise unparseable(
                "rocm-smi CSV line %d has %d values but the header has %d (the output looks cut off): %r."
                % (line_no, len(values), len(header), clip(line)))
        index = _card_index(values[0])
        if index is not None:  # "cardsystem" rows (2022 versions) hold system-wide values
            cards[index] = dict(zip(header[1:], values[1:]))
    return cards


def _cards_from_table(text: str) -> dict[int, dict]:
    cards: dict[int, dict] = {}
    for row in run_template("rocm_smi_gpu_lines.textfsm", text, "rocm-smi's table output"):
        cards.setdefault(int(row["GPU"]), {})[row["KEY"]] = row["VALUE"]
    return cards


def _available(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return None if not value or value.startswith("N/A") else value


def _first(fields: dict, keys: tuple[str, ...]) -> tuple[str, str] | tuple[None, None]:
    for key in keys:
        if fields.get(key) is not None:
            return key, fields[key]
    return None, None


def _gpu_from_card(index: int, card: dict) -> dict:
    fields = {key: _available(value) for key, value in card.items()}
    gpu = new_gpu(index)
    gpu["name"] = next((fields[key] for key in NAME_KEYS
                        if fields.get(key) is not None and not _HEX_ID_RE.fullmatch(fields[key])), None)
    gpu["uuid"] = _first(fields, UUID_KEYS)[1]
    key = None
    try:
        for key, target in ((VRAM_TOTAL_KEY, "memory_total_bytes"), (VRAM_USED_KEY, "memory_used_bytes")):
            if fields.get(key) is not None:
                gpu[target] = parse_bytes(fields[key], {"": 1})
        for keys, target in ((TEMPERATURE_KEYS, "temperature_c"), (POWER_KEYS, "power_draw_w"),
                             (UTILIZATION_KEYS, "utilization_gpu_percent")):
            key, text = _first(fields, keys)
            if text is not None:
                gpu[target] = parse_number(text)
    except ValueError as exc:
        raise unparseable("rocm-smi card%d, %r: %s." % (index, key, exc)) from None
    if gpu["power_draw_w"] is not None:
        gpu["power_draw_w"] = float(gpu["power_draw_w"])
    gpu["fields"] = fields
    return complete_memory(gpu)
