"""Finding this machine's live processes by their command line (the lab's remotes are this machine too)."""

from __future__ import annotations

import os


def processes_mentioning(text: str | os.PathLike) -> dict[int, str]:
    """{pid: command line} of live (non-zombie) processes, this one left out, whose command line (its
    arguments joined by spaces) contains `text`: a unique marker or an exact path, never a program name."""
    needle = os.fsencode(str(text))
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ")
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != b"Z":
            found[int(entry)] = cmdline.decode(errors="replace")
    return found


def live_pids_matching(text: str | os.PathLike) -> list[int]:
    """The pids of processes_mentioning(text)."""
    return list(processes_mentioning(text))
