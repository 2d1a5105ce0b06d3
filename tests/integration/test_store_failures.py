"""A store that cannot be used is said loudly, never a traceback, never silence (reliability audit,
case 6): the database deleted or replaced while `serve` runs, a read-only store, a full disk, a damaged
file. Read-only and full file systems are real ones, mounted in a private mount namespace of the command
(`unshare --mount`), so nothing outside the test sees them."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time

import pytest

from hwledger.server import EXIT_STORE_FAILED
from tests.integration.fleet_support import wait_for

UNSHARE = shutil.which("unshare")
pytestmark = pytest.mark.skipif(UNSHARE is None, reason="unshare (util-linux) is needed for a private mount")


def _agent_online(fleet_env, name) -> bool:
    with fleet_env.store() as store:
        row = store.get_agent(name)
        return row is not None and row.state == "online"


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_serve_stops_loudly_when_its_store_goes_away(fleet_env, fresh_host, how):
    fleet_env.register(fresh_host)
    server = fleet_env.serve("--interval", "0.5")
    wait_for(lambda: _agent_online(fleet_env, fresh_host.name), timeout=60, what="the agent online")
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            fleet_env.db.with_name(fleet_env.db.name + suffix).unlink(missing_ok=True)
    else:
        other = fleet_env.db.with_name("other.db")
        shutil.copy(fleet_env.db, other)
        other.replace(fleet_env.db)
    # Stopped within a few ticks (60 s is far beyond them), with its own exit status and a clear line.
    assert server.wait(timeout=60) == EXIT_STORE_FAILED
    log = fleet_env.server_log()
    assert "CRITICAL stopping: the store" in log and ("was deleted" if how == "deleted" else "was replaced") in log
    assert "Traceback" not in log


def _in_private_mount(fleet_env, mount: str, *hw_args: str) -> subprocess.CompletedProcess:
    """Run `hwledger ARGS` with the store's directory remounted as `mount` says, for that command only."""
    data = shlex.quote(str(fleet_env.data_dir))
    hw = shlex.join([sys.executable, "-m", "hwledger", *hw_args])
    script = f"set -e; {mount.format(dir=data)}; exec {hw}"
    return subprocess.run([UNSHARE, "--mount", "sh", "-c", script], env=fleet_env.env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


def test_a_read_only_store_is_a_clear_error_for_every_command(fleet_env, fresh_host):
    fleet_env.register(fresh_host)
    read_only = "mount --bind {dir} {dir}; mount -o remount,bind,ro {dir}"
    for args in (["job", "submit", "--agent", fresh_host.name, "--", "true"],
                 ["fleet", "status"], ["job", "list"], ["fleet", "remove", fresh_host.name]):
        proc = _in_private_mount(fleet_env, read_only, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "read-only" in proc.stderr and str(fleet_env.db) in proc.stderr, (args, proc.stderr)


def test_a_full_disk_is_a_clear_error(fleet_env, fresh_host):
    fleet_env.register(fresh_host)
    # The store copied into a tmpfs with no room left beside it.
    full = ("cp -a {dir} /tmp/hwl-full-src; mount -t tmpfs -o size=%dk tmpfs {dir}; cp -a /tmp/hwl-full-src/. {dir}; "
            "head -c 100000000 /dev/zero > {dir}/filler 2>/dev/null || true")
    size_kib = sum(path.stat().st_size for path in fleet_env.data_dir.rglob("*") if path.is_file()) // 1024 + 256
    proc = _in_private_mount(fleet_env, full % size_kib, "job", "submit", "--agent", fresh_host.name, "--",
                             "sh", "-c", "x" * 100_000)
    shutil.rmtree("/tmp/hwl-full-src", ignore_errors=True)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "free some space" in proc.stderr, proc.stderr


def test_a_damaged_store_is_a_clear_error(fleet_env, fresh_host):
    fleet_env.register(fresh_host)
    for suffix in ("-wal", "-shm"):
        fleet_env.db.with_name(fleet_env.db.name + suffix).unlink(missing_ok=True)
    fleet_env.db.write_bytes(b"this is not an sqlite database\n" * 200)
    for args in (["fleet", "status"], ["job", "list"], ["job", "submit", "--agent", fresh_host.name, "--", "true"]):
        proc = fleet_env.hw(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "not an intact hwledger store" in proc.stderr or "could not be read" in proc.stderr, proc.stderr


def test_an_untouched_store_never_stops_the_server(fleet_env):
    """A guard for the deletion check: an untouched store is never taken for a replaced one."""
    server = fleet_env.serve("--interval", "0.2")
    time.sleep(2)
    assert server.poll() is None, fleet_env.server_log()
