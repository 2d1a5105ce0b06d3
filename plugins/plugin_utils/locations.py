# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Where hwledger keeps its files (XDG defaults; each one overridable by flag and by environment).

Precedence for every path: the command-line flag (or the inventory plugin's option), then the
environment variable, then the XDG default.

| file | default | environment |
| --- | --- | --- |
| agents config | `$XDG_CONFIG_HOME/hwledger/ssh-agents.toml` | `HWLEDGER_CONFIG` |
| pinned host keys | `$XDG_CONFIG_HOME/hwledger/known_hosts` | `HWLEDGER_KNOWN_HOSTS` |
| store | `$XDG_DATA_HOME/hwledger/fleet.db` | `HWLEDGER_DB` |

Everything else the app writes (job results, ansible-runner private dirs, ssh control sockets) lives in
the store's directory, so pointing `HWLEDGER_DB` elsewhere moves all of it together. The app and the
inventory plugin resolve these the same way, so with the same environment they use the same files and
the same ssh control sockets (``ssh.control_dir_for``).
Plain Python, standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_CONFIG = "HWLEDGER_CONFIG"
ENV_KNOWN_HOSTS = "HWLEDGER_KNOWN_HOSTS"
ENV_DB = "HWLEDGER_DB"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var, "")
    # The XDG spec says relative values are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def _pick(flag: str | os.PathLike | None, env: str, default: Path) -> Path:
    if flag:
        return Path(flag).expanduser()
    value = os.environ.get(env, "")
    if value:
        return Path(value).expanduser()
    return default


def config_path(flag: str | os.PathLike | None = None) -> Path:
    """The `ssh-agents.toml` to read and edit."""
    return _pick(flag, ENV_CONFIG, _xdg("XDG_CONFIG_HOME", ".config") / "hwledger" / "ssh-agents.toml")


def known_hosts_path(flag: str | os.PathLike | None = None) -> Path:
    """hwledger's own known_hosts: the host keys pinned by `register-ssh` (never ~/.ssh/known_hosts)."""
    return _pick(flag, ENV_KNOWN_HOSTS, _xdg("XDG_CONFIG_HOME", ".config") / "hwledger" / "known_hosts")


def db_path(flag: str | os.PathLike | None = None) -> Path:
    """The SQLite store."""
    return _pick(flag, ENV_DB, _xdg("XDG_DATA_HOME", ".local/share") / "hwledger" / "fleet.db")


def data_dir(db: str | os.PathLike) -> Path:
    """The directory of the store; results, run dirs and control sockets live under it."""
    return Path(db).parent
