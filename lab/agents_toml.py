"""Write ssh-agents.toml files for tests (the standard library reads TOML but does not write it)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(value: str) -> str:
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def agents_toml(agents: list[dict[str, Any]]) -> str:
    """TOML text with one [[agents]] table per dict; a dict value becomes a sub-table
    ([agents.bastion]); None values are left out (so a test can drop a field)."""
    blocks = []
    for agent in agents:
        lines = ["[[agents]]"]
        tables = []
        for key, value in agent.items():
            if value is None:
                continue
            if isinstance(value, dict):
                tables.append((key, value))
            else:
                lines.append(f"{_key(key)} = {_value(value)}")
        for key, table in tables:
            lines += ["", f"[agents.{_key(key)}]"]
            lines += [f"{_key(k)} = {_value(v)}" for k, v in table.items() if v is not None]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def write_agents_toml(path: Path, agents: list[dict[str, Any]]) -> Path:
    """Write ``agents`` as an ssh-agents.toml at ``path`` with mode 0600 (what hwledger expects)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        f.write(agents_toml(agents))
    return path
