"""A copy of the checkout to build from, so a test never writes into the checkout itself (setuptools writes
build/ and *.egg-info into the tree it builds; ansible-galaxy's build reads the whole tree)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Not copied from the checkout: big, holding sockets, or a build's leftovers.
NOT_COPIED_TOP_LEVEL = {".git", ".demo", ".pytest_cache", "build", "dist"}


def copy_checkout(dest: Path) -> None:
    """The checkout's files as a clean clone plus whatever untracked files it has, without virtualenvs,
    caches and build leftovers; symlinks stay symlinks (collections/ansible_collections/hwledger/fleet points
    back to the copy's root)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__"}
        if Path(directory) == REPO:
            skipped |= {name for name in names if name in NOT_COPIED_TOP_LEVEL or name.startswith(".venv")
                        or name.endswith(".tar.gz")}
        for name in names:
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                skipped.add(name)  # sockets and fifos left by a lab or demo run
        return skipped

    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
