"""Private directories, atomic writes and locks: the one home of each (plugin_utils.private_files)."""

from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import private_files


def test_private_dirs_are_tightened_and_symlinks_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    private_files.ensure_private_dir(loose, tighten=True)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(loose)
    with pytest.raises(private_files.PrivatePathError, match="not a plain directory"):
        private_files.ensure_private_dir(link, tighten=True)
