"""The fleet's files: the ssh control directory (short enough for a unix socket, stable per store), and
the store's directory (created private, never chmod-ed when it exists, refused when others can write
to it)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils.ssh import MAX_CONTROL_DIR_BYTES

from hwledger.cli import main
from hwledger.fleet import Fleet
from hwledger.errors import UserError
from hwledger.store import Store


def _fleet(db: Path) -> Fleet:
    return Fleet(db.parent / "ssh-agents.toml", db.parent / "known_hosts", db)


def test_control_dir_is_short_enough_for_a_unix_socket(tmp_path):
    short = tmp_path / "d" / "fleet.db"
    long = tmp_path / ("x" * 80) / "fleet.db"
    other = tmp_path / ("y" * 80) / "fleet.db"
    try:
        for db in (short, long):
            policy = _fleet(db).policy()  # creates the control dir
            directory = Path(policy.control_dir)
            assert directory == _fleet(db).control_dir
            assert len(os.fsencode(str(directory))) <= MAX_CONTROL_DIR_BYTES
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        if len(str(short.parent / "cm")) <= MAX_CONTROL_DIR_BYTES:
            assert _fleet(short).control_dir == short.parent / "cm"
        # Stable: the same store always gets the same sockets (masters are reused across processes).
        assert _fleet(long).control_dir == _fleet(long).control_dir
        assert _fleet(long).control_dir != _fleet(other).control_dir
        assert _fleet(long).control_dir.parent == Path("/tmp") / f"hwledger-{os.getuid()}"
    finally:
        for db in (short, long, other):
            directory = _fleet(db).control_dir
            if directory.parent == Path("/tmp") / f"hwledger-{os.getuid()}":
                shutil.rmtree(directory, ignore_errors=True)


def test_a_shared_existing_store_dir_is_refused_and_left_as_it_is(tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: `--db /tmp/fleet.db` must not turn /tmp into 0700
    with pytest.raises(UserError, match="writable by group or others.*private directory"):
        Store.open(shared / "fleet.db")
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert not (shared / "fleet.db").exists()
    # A command that writes the store (the read-only ones only say there is no store here).
    assert main(["job", "submit", "--agent", "gpu1", "--db", str(shared / "fleet.db"), "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "private directory" in err and "Traceback" not in err
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777


def test_an_existing_store_dir_only_we_can_write_is_used_unchanged(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    mine.chmod(0o755)
    Store.open(mine / "fleet.db").close()
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(mine / "fleet.db").st_mode) == 0o600


def test_missing_store_dirs_are_created_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        Store.open(tmp_path / "a" / "b" / "fleet.db").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700


def test_a_store_dir_that_cannot_be_created_is_a_clear_error(capsys):
    with pytest.raises(UserError, match="cannot create the directory /dev/null/sub"):
        Store.open("/dev/null/sub/fleet.db")
    assert main(["job", "submit", "--agent", "gpu1", "--db", "/dev/null/x.db", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "store's directory /dev/null is not a plain directory" in err and "Traceback" not in err
