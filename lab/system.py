"""Host-level plumbing for the test lab: commands, processes, login accounts and the crash registry.

Everything the lab starts is found again by a marker in its environment (``HWLEDGER_LAB_HOST=<lab
id>:<host name>``): the sshd listener gets it from ``Popen(env=...)``, and every session process gets
it from ``SetEnv`` in the host's sshd_config.  A process that was re-parented to init (a fake tool's
``sleep`` whose ssh client went away) still carries it, so stopping a host never depends on the
process tree being intact.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ansible_collections.hwledger.fleet.plugins.plugin_utils import processes

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MARKER_VAR = "HWLEDGER_LAB_HOST"
NAME_PREFIX = "hwl-"
ACCOUNT_COMMENT = "hwledger test lab"
REGISTRY_DIR = Path("/run/hwledger-lab")


class LabUnavailable(RuntimeError):
    """The lab cannot run here (not root, sshd missing, no network namespaces); tests should skip."""


class LabError(RuntimeError):
    """Something the lab set up failed; the message names the command or host and what it said."""


def run(argv: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a system command with a fixed environment; raise LabError (with its stderr) on failure."""
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={"PATH": SYSTEM_PATH, "LC_ALL": "C"},
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"`{shlex.join(argv)}` failed with exit code {proc.returncode}: {detail}")
    return proc


# --- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str
    markers: tuple[str, ...]
    sshd_title: str  # "" unless this is an sshd process (see lab_processes)


def _read_markers(pid: int) -> tuple[str, ...]:
    prefix = MARKER_VAR.encode() + b"="
    return tuple(
        entry[len(prefix) :].decode(errors="replace")
        for entry in processes.environ(pid).split(b"\0")
        if entry.startswith(prefix)
    )


def _read_sshd_title(pid: int) -> str:
    title = processes.cmdline(pid).replace(b"\0", b" ").decode(errors="replace").strip()
    return title if title.startswith(("sshd", "/usr/sbin/sshd")) else ""


def scan_processes() -> list[ProcInfo]:
    """Every process with the lab's view of it (markers, sshd title), from the project's /proc reader."""
    return [
        ProcInfo(proc.pid, proc.ppid, proc.state, _read_markers(proc.pid), _read_sshd_title(proc.pid))
        for proc in (processes.table() or {}).values()
    ]


def start_time(pid: int) -> int | None:
    proc = processes.read(pid)
    return None if proc is None else proc.start_ticks


def is_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie has already released everything)."""
    return processes.alive(pid)


def sshd_title_user(title: str) -> str:
    """The login account an sshd connection process names in its title ("sshd: USER@notty",
    "sshd: USER [priv]", "sshd: USER"), "" for other titles."""
    if not title.startswith("sshd: ") or title.startswith("sshd: /"):
        return ""
    return re.split(r"[@ \[]", title[len("sshd: ") :], maxsplit=1)[0]


def lab_processes(
    accept: Callable[[str], bool], roots: Iterable[int] = (), title_matches: Callable[[str], bool] = lambda t: False
) -> set[int]:
    """Pids of a lab or host, with every descendant of each:

    - processes carrying a marker value that ``accept`` takes (the sessions' commands);
    - ``roots`` (the sshd listeners we started);
    - sshd processes whose title ``title_matches``.  sshd's setproctitle writes over its environment,
      so sshd processes themselves cannot be found by marker; their titles name the config path
      (listener) or the login account (per-connection processes)."""
    procs = scan_processes()
    found = {p.pid for p in procs if any(accept(m) for m in p.markers)}
    found |= {p.pid for p in procs if p.sshd_title and title_matches(p.sshd_title)}
    found |= {pid for pid in roots if is_alive(pid)}
    found = processes.descendants(found, {p.pid: p for p in procs})
    found.discard(os.getpid())
    return found


def terminate(pids: set[int], *, grace: float = 2.0, reap: Callable[[], None] = lambda: None) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left; raise LabError on survivors.

    ``reap`` collects our own children (Popen.poll) so they do not linger as zombies."""
    _signal_all(pids, signal.SIGTERM)
    if _wait_gone(pids, grace, reap):
        return
    _signal_all(pids, signal.SIGKILL)
    if not _wait_gone(pids, 5.0, reap):
        survivors = sorted(pid for pid in pids if is_alive(pid))
        raise LabError(f"lab processes {survivors} survived SIGKILL")


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: set[int], seconds: float, reap: Callable[[], None]) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        reap()
        if not any(is_alive(pid) for pid in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Popen preexec_fn: the kernel sends SIGTERM to the child when the lab's process dies.

    This is the safety net for a test run that is killed outright (no atexit, no fixture teardown):
    the sshd listeners go with it.  The next lab removes whatever else is left (see reap_stale_labs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --- login accounts -----------------------------------------------------------------------------


def create_alias_account(name: str, home: Path, lab_id: str, *, shell: str = "/bin/sh") -> None:
    """Create a uid-0 alias account whose login shell is ``shell`` (/bin/sh) and whose HOME is ``home``.

    Why not log in as root: sshd starts root's login shell, and bash sources ~/.bashrc even for a
    non-interactive ``ssh host cmd``; root's rc files may prepend their own PATH (this very machine's
    .bashrc puts pyenv's python3 first), which would defeat the point of a remote PATH without python3.
    /bin/sh (dash) reads no rc file for ``sh -c``, so sshd's SetEnv PATH is exactly the remote PATH.

    Why uid 0 at all: the test lab's hosts live in pytest's private (0700, root-only) temp dirs, and the
    tests rewrite the remote's files between and during steps (fake tool behaviour, hostile runner
    scripts, files planted where the job role writes); a uid-0 login reaches them as the tests do. Nothing
    of hwledger needs root on a GPU host: a lab made with ``Lab(root, unprivileged=True)`` (the demo's)
    logs in with ordinary accounts instead (create_login_account). No password ('*', not '!': sshd with
    UsePAM no refuses locked accounts).

    ``shell="/bin/bash"`` makes the other kind of host on purpose: bash sources ``~/.bashrc`` for ``ssh host
    cmd``, so an rc file there changes the remote PATH as a rented box's does (pyenv, conda)."""
    _useradd([
        "useradd", "--system", "--non-unique", "--uid", "0", "--gid", "0",
        "--no-create-home", "--no-user-group", "--home-dir", str(home), "--shell", shell,
        "--password", "*", "--comment", f"{ACCOUNT_COMMENT} {lab_id}", name,
    ])  # fmt: skip


def create_login_account(name: str, home: Path, lab_id: str) -> tuple[int, int]:
    """Create an ordinary (unprivileged) system account, login shell /bin/sh, HOME ``home``, group
    nogroup; returns its (uid, gid). The caller makes HOME and what the login must write its own."""
    _useradd([
        "useradd", "--system", "--no-create-home", "--no-user-group", "--gid", "nogroup",
        "--home-dir", str(home), "--shell", "/bin/sh", "--password", "*",
        "--comment", f"{ACCOUNT_COMMENT} {lab_id}", name,
    ])  # fmt: skip
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _useradd(argv: list[str]) -> None:
    # Several test runs may edit /etc/passwd at once: useradd gives up at once on a held lock.
    for _attempt in range(100):
        proc = run(argv, check=False)
        if proc.returncode == 0:
            return
        if "lock" not in proc.stderr:
            break
        time.sleep(0.05)
    raise LabError(f"could not create lab account {argv[-1]}: {proc.stderr.strip()}")


def delete_account(name: str) -> None:
    # -f: an alias account shares uid 0 with running processes, which plain userdel refuses.
    # Without -r the home directory (inside the lab dir) is left alone.
    for _attempt in range(100):
        proc = run(["userdel", "-f", name], check=False)
        if proc.returncode == 0 or "does not exist" in proc.stderr:
            return
        if "lock" not in proc.stderr:
            break
        time.sleep(0.05)
    raise LabError(f"could not delete lab account {name}: {proc.stderr.strip()}")


def lab_accounts() -> list[str]:
    """Names of the alias accounts any lab created (matched by name prefix and comment)."""
    names = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) >= 5 and fields[0].startswith(NAME_PREFIX) and fields[4].startswith(ACCOUNT_COMMENT):
            names.append(fields[0])
    return names


# --- registry of running labs (for cleaning up after a crashed run) -------------------------------


def register_lab(lab_id: str, root: Path) -> None:
    REGISTRY_DIR.mkdir(mode=0o700, exist_ok=True)
    record = {"pid": os.getpid(), "start_time": start_time(os.getpid()), "root": str(root)}
    (REGISTRY_DIR / f"{lab_id}.json").write_text(json.dumps(record))


def unregister_lab(lab_id: str) -> None:
    (REGISTRY_DIR / f"{lab_id}.json").unlink(missing_ok=True)


@dataclass(frozen=True)
class LabRecord:
    alive: bool  # its owner process still runs
    root: str | None


def registered_labs() -> dict[str, LabRecord]:
    """Every registered lab by id."""
    labs: dict[str, LabRecord] = {}
    if not REGISTRY_DIR.is_dir():
        return labs
    for path in REGISTRY_DIR.glob("*.json"):
        try:
            record = json.loads(path.read_text())
            alive = start_time(int(record["pid"])) == record["start_time"]
            root = str(record["root"])
        except (OSError, ValueError, KeyError, TypeError):
            alive, root = False, None
        labs[path.stem] = LabRecord(alive, root)
    return labs
