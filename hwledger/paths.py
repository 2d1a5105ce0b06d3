"""Where hwledger keeps its files (XDG defaults; each one overridable by flag and by environment).

Precedence for every path: the command-line flag, then the environment variable, then the XDG default.

| file | default | environment |
| --- | --- | --- |
| agents config | `$XDG_CONFIG_HOME/hwledger/ssh-agents.toml` | `HWLEDGER_CONFIG` |
| pinned host keys | `$XDG_CONFIG_HOME/hwledger/known_hosts` | `HWLEDGER_KNOWN_HOSTS` |
| store | `$XDG_DATA_HOME/hwledger/fleet.db` | `HWLEDGER_DB` |

Everything else the app writes (fetched job results, ansible-runner private dirs, SSH control sockets)
lives in the store's directory, so pointing `HWLEDGER_DB` somewhere else moves all of it together.
That directory is created 0700 when missing; an existing one is never chmod-ed, and refused when group or
others can write to it (`ensure_data_dir`).
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


def _make_dirs(path: Path) -> bool:
    """Create `path` and every missing parent as 0700 (as XDG asks for its base dirs). True when `path`
    itself was created here. `Path.mkdir(parents=True)` would give the parents the umask's mode instead."""
    missing = []
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    created = False
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
            created = directory == path
        except FileExistsError:
            created = False  # another process made it meanwhile: checked like any existing dir
        except OSError as exc:
            raise UserError(f"cannot create the directory {directory}: {exc.strerror or exc}; "
                            "point hwledger at a path it can create (e.g. the default ~/.local/share/hwledger)"
                            ) from None
    return created


def _plain_dir_of_ours(path: Path, what: str) -> os.stat_result:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{what} {path} is not a plain directory; remove it or point hwledger elsewhere")
    if info.st_uid != os.getuid():
        raise UserError(f"{what} {path} is owned by uid {info.st_uid}, not by you; hwledger keeps private "
                        "files there")
    return info


def ensure_data_dir(path: Path) -> Path:
    """The store's directory: created 0700 when missing; an existing one is used as it is, never chmod-ed.

    Why never chmod-ed: the user chose it (`--db /tmp/fleet.db`), and tightening /tmp, say, would break
    every other program using it. Why refused when group- or world-writable: another local user could
    plant files or symlinks where hwledger writes the store, results and run dirs.
    """
    if _make_dirs(path):
        return path
    info = _plain_dir_of_ours(path, "the store's directory")
    if info.st_mode & 0o022:
        raise UserError(f"the store's directory {path} is writable by group or others (mode "
                        f"{stat.S_IMODE(info.st_mode):04o}), so another user could tamper with hwledger's files "
                        "there; keep the store in a private directory (e.g. the default ~/.local/share/hwledger, "
                        "or a new directory: hwledger creates it 0700)")
    return path


def ensure_private_dir(path: Path) -> Path:
    """One of hwledger's own directories (`results/`, `runs/`, `cm/` beside the store, `/tmp/hwledger-<uid>`):
    created 0700 (with any missing parent), refused when it is a symlink or another user's, and forced
    back to 0700 when it is looser: it is hwledger's by name, so nobody else's mode is changed.
    """
    _make_dirs(path)
    if _plain_dir_of_ours(path, "hwledger's directory").st_mode & 0o077:
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
        ensure_data_dir(data_dir(db))
        return ensure_private_dir(preferred)
    digest = hashlib.sha256(os.fsencode(str(data_dir(db).resolve()))).hexdigest()[:12]
    base = ensure_private_dir(Path("/tmp") / f"hwledger-{os.getuid()}")
    return ensure_private_dir(base / digest)
