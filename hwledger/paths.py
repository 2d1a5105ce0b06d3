"""Where hwledger keeps its files (XDG defaults; each one overridable by flag and by environment).

Precedence for every path: the command-line flag, then the environment variable, then the XDG default.

| file | default | environment |
| --- | --- | --- |
| agents config | `$XDG_CONFIG_HOME/hwledger/ssh-agents.toml` | `HWLEDGER_CONFIG` |
| pinned host keys | `$XDG_CONFIG_HOME/hwledger/known_hosts` | `HWLEDGER_KNOWN_HOSTS` |
| store | `$XDG_DATA_HOME/hwledger/fleet.db` | `HWLEDGER_DB` |

Everything else the app writes (fetched job results, ansible-runner private dirs, SSH control sockets)
lives in the store's directory, so pointing `HWLEDGER_DB` somewhere else moves all of it together.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import MAX_CONTROL_DIR_BYTES

from hwledger.errors import UserError

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


def data_dir(db: Path) -> Path:
    """The directory of the store; results, run dirs and control sockets live under it."""
    return db.parent


def results_dir(db: Path) -> Path:
    """Controller directory where the job playbook drops `<job_id>.json`."""
    return data_dir(db) / "results"


def runs_dir(db: Path) -> Path:
    """Parent of the per-run ansible-runner private data dirs (each removed after its run)."""
    return data_dir(db) / "runs"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) as 0700 and refuse a directory another user could tamper with.

    Why: a world-writable or foreign-owned state dir lets another local user plant files or
    symlinks where the app writes results and run dirs.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path} is not a plain directory; remove it or point hwledger elsewhere")
    if info.st_uid != os.getuid():
        raise UserError(f"{path} is owned by uid {info.st_uid}, not by you; hwledger keeps private files there")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def control_dir(db: Path) -> Path:
    """A directory for ssh ControlPath sockets whose path is short enough for a unix socket.

    Under the data dir when it fits; otherwise a per-user, per-store directory under /tmp named by
    a hash of the data dir (stable, so masters are reused across ticks and across processes).
    """
    preferred = data_dir(db) / "cm"
    # ControlPath is "<dir>/%C" (40 hex characters) and ssh adds a random suffix while creating the
    # socket; the agents module knows the limit (one home for ssh options).
    if len(os.fsencode(str(preferred))) <= MAX_CONTROL_DIR_BYTES:
        return ensure_private_dir(preferred)
    digest = hashlib.sha256(os.fsencode(str(data_dir(db).resolve()))).hexdigest()[:12]
    base = ensure_private_dir(Path("/tmp") / f"hwledger-{os.getuid()}")
    return ensure_private_dir(base / digest)
