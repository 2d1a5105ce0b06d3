"""Where hwledger keeps its files: flag > environment > XDG default, private directories, and the store's
directory (created private, never chmod-ed when it exists, refused when others can write to it)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import MAX_CONTROL_DIR_BYTES
from hwledger import paths
from hwledger.cli import main
from hwledger.errors import UserError
from hwledger.store import Store


def test_precedence_flag_then_environment_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "HWLEDGER_CONFIG", "HWLEDGER_KNOWN_HOSTS", "HWLEDGER_DB"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    assert paths.config_path() == home / ".config/hwledger/ssh-agents.toml"
    assert paths.known_hosts_path() == home / ".config/hwledger/known_hosts"
    assert paths.db_path() == home / ".local/share/hwledger/fleet.db"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    assert paths.config_path() == tmp_path / "xdg/hwledger/ssh-agents.toml"
    assert paths.db_path() == home / ".local/share/hwledger/fleet.db"
    monkeypatch.setenv("HWLEDGER_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("HWLEDGER_CONFIG", str(tmp_path / "env.toml"))
    assert paths.db_path() == tmp_path / "env.db"
    assert paths.config_path() == tmp_path / "env.toml"
    assert paths.db_path(str(tmp_path / "flag.db")) == tmp_path / "flag.db"
    assert paths.results_dir(tmp_path / "d" / "fleet.db") == tmp_path / "d" / "results"


def test_control_dir_is_short_enough_for_a_unix_socket(tmp_path):
    short = tmp_path / "d" / "fleet.db"
    long = tmp_path / ("x" * 80) / "fleet.db"
    other = tmp_path / ("y" * 80) / "fleet.db"
    try:
        for db in (short, long):
            directory = paths.control_dir(db)
            assert len(os.fsencode(str(directory))) <= MAX_CONTROL_DIR_BYTES
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        if len(str(short.parent / "cm")) <= MAX_CONTROL_DIR_BYTES:
            assert paths.control_dir(short) == short.parent / "cm"
        # Stable: the same store always gets the same sockets (masters are reused across processes).
        assert paths.control_dir(long) == paths.control_dir(long)
        assert paths.control_dir(long) != paths.control_dir(other)
        assert paths.control_dir(long).parent == Path("/tmp") / f"hwledger-{os.getuid()}"
    finally:
        for db in (short, long, other):
            directory = paths.control_dir(db)
            if directory.parent == Path("/tmp") / f"hwledger-{os.getuid()}":
                shutil.rmtree(directory, ignore_errors=True)


def test_private_dirs_are_tightened_and_symlinks_refused(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    paths.ensure_private_dir(loose)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(loose)
    with pytest.raises(UserError, match="not a plain directory"):
        paths.ensure_private_dir(link)


def test_a_shared_existing_store_dir_is_refused_and_left_as_it_is(tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: `--db /tmp/fleet.db` must not turn /tmp into 0700
    with pytest.raises(UserError, match="writable by group or others.*private directory"):
        Store.open(shared / "fleet.db")
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert not (shared / "fleet.db").exists()
    assert main(["job", "list", "--db", str(shared / "fleet.db")]) == 2
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
    assert main(["job", "list", "--db", "/dev/null/x.db"]) == 2
    err = capsys.readouterr().err
    assert "store's directory /dev/null is not a plain directory" in err and "Traceback" not in err
