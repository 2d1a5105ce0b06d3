# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The one reader of the process table (``/proc`` on Linux).

Used by the job runner on the GPU host (the job's process tree), the gpu_query action (the ssh client
it started), the app (an orphaned ansible-playbook found by its private directory) and the test lab.
Standard library only and Python 3.8 compatible: the job runner carries it to the GPU hosts.

Where there is no ``/proc``, ``table()`` returns None and the lookups find nothing: callers fall back to
what they can do without it (a process group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC = "/proc"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str           # "R", "S", "D", "Z" (zombie: exited, waiting to be reaped), ...
    start_ticks: int     # start time in clock ticks since boot: with the pid, names one process for good

    @property
    def zombie(self):
        return self.state in ("Z", "X")


def read(pid):
    """The process ``pid``, or None when it does not exist (or cannot be read)."""
    try:
        with open("%s/%d/stat" % (PROC, pid), "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses, so split after the
    # last ")".
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]), fields[0].decode("ascii", "replace"),
                    int(fields[19]))
    except (IndexError, ValueError):
        return None


def table():
    """{pid: Proc} of every process now, or None where there is no /proc."""
    try:
        names = os.listdir(PROC)
    except OSError:
        return None
    procs = {}
    for name in names:
        if name.isdigit():
            proc = read(int(name))
            if proc is not None:  # gone meanwhile
                procs[proc.pid] = proc
    return procs


def _read_bytes(pid, what):
    try:
        with open("%s/%d/%s" % (PROC, pid, what), "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def cmdline(pid):
    """The command line of ``pid`` as bytes (arguments NUL-separated), b"" when it is gone."""
    return _read_bytes(pid, "cmdline")


def environ(pid):
    """The initial environment of ``pid`` as bytes (entries NUL-separated), b"" when unreadable."""
    return _read_bytes(pid, "environ")


def alive(pid):
    """True while ``pid`` exists and is not a zombie (a zombie has already released everything)."""
    proc = read(pid)
    return proc is not None and not proc.zombie


def children(pid, procs=None):
    """The pids whose parent is ``pid``."""
    procs = table() if procs is None else procs
    return {proc.pid for proc in (procs or {}).values() if proc.ppid == pid}


def descendants(roots, procs):
    """``roots`` and every descendant of them found in ``procs``."""
    by_parent = {}
    for proc in procs.values():
        by_parent.setdefault(proc.ppid, []).append(proc.pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(by_parent.get(pid, ()))
    return found


def mentioning(text):
    """{pid: command line (arguments joined by spaces)} of live processes, this one left out, whose command
    line contains ``text``: a unique marker or an exact path (a run's private dir), never a program name."""
    needle = os.fsencode(os.fspath(text)) if not isinstance(text, bytes) else text
    me = os.getpid()
    found = {}
    for pid, proc in (table() or {}).items():
        if pid == me or proc.zombie:
            continue
        line = cmdline(pid)
        if needle in line:
            found[pid] = line.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    return found


def call_with_deadline(func, deadline_s):
    """``(True, func())`` when ``func`` returns within ``deadline_s`` (its exception re-raised here), else
    ``(False, pids)`` after SIGTERM to ``pids``, the children this process had then.

    For an action plugin around one exec of its connection, whose own timeout bounds only connection
    set-up: Ansible forks a fresh worker process per host and task, so the worker's children at that
    moment are the ssh client(s) this exec started (a multiplexing master is that client's child and
    survives). /proc is scanned only past the deadline, never for an exec that answers.
    """
    import signal  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel

    outcome = {}

    def target():
        try:
            outcome["value"] = func()
        except BaseException as exc:  # pylint: disable=broad-exception-caught
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="hwledger-bounded-exec", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():
        started_here = children(os.getpid())
        for pid in started_here:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        worker.join(1.0)
        return False, started_here
    if "error" in outcome:
        raise outcome["error"]
    return True, outcome["value"]
