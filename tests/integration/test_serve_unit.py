"""examples/hwledger-serve.service does what its comments say: its ExecStart, run as systemd would (%h
expanded, its Environment= set, nothing else on PATH), serves a real lab host from the default files; a
second copy exits 2, the status RestartPreventExitStatus= names; its KillSignal stops it with 0 within
TimeoutStopSec, so Restart=on-failure does not restart it; its log goes to stderr (the journal)."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hwledger.store import Store
from lab import SshHost
from tests.integration.fleet_support import remove_fallback_control_dir, wait_for
from tests.toolchains import REPO

pytestmark = pytest.mark.root

UNIT = REPO / "examples" / "hwledger-serve.service"
HWLEDGER = Path(sys.executable).parent / "hwledger"  # this checkout's console script, in its virtualenv


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of the [Service] section (a key may repeat, as Environment= does)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _sep, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def expand(value: str, home: Path) -> str:
    return value.replace("%h", str(home))


@pytest.fixture
def home(tmp_path: Path):
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    # Where the unit expects it (`pip install --user`); this checkout's console script stands in.
    (home / ".local" / "bin" / "hwledger").symlink_to(HWLEDGER)
    yield home
    remove_fallback_control_dir(home / ".local" / "share" / "hwledger" / "fleet.db")


def test_unit_exec_start_serves_and_stops_as_documented(home: Path, fresh_host: SshHost, tmp_path: Path):
    settings = unit_settings(UNIT.read_text())
    argv = [expand(word, home) for word in shlex.split(settings["ExecStart"][0])]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    env.update(expand(value, home).split("=", 1) for value in settings["Environment"])
    db = Path(env["HWLEDGER_DB"])
    assert db == home / ".local" / "share" / "hwledger" / "fleet.db"  # the defaults, spelled out

    register = subprocess.run(
        [argv[0], "fleet", "register-ssh", "--host", f"{fresh_host.user}@{fresh_host.address}:{fresh_host.port}",
         "--key", str(fresh_host.lab.client_key), "--name", "unit-box", "--accept-new-host-key", "--skip-heartbeat"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert register.returncode == 0, register.stdout + register.stderr
    assert Path(env["HWLEDGER_CONFIG"]).is_file()

    log_path = tmp_path / "journal.log"
    with open(log_path, "wb") as log:
        service = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        def online() -> bool:
            with Store.open(db) as store:
                return any(row.name == "unit-box" and row.state == "online" for row in store.list_agents())
        wait_for(online, 60, what="the unit's serve to record the host online")

        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 2, second.stderr
        assert str(second.returncode) in settings["RestartPreventExitStatus"][0].split()
        assert "already serves" in second.stderr

        service.send_signal(getattr(signal, settings["KillSignal"][0]))
        assert service.wait(timeout=int(settings["TimeoutStopSec"][0])) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    assert settings["Restart"] == ["on-failure"]  # exit 0 is not a failure: no restart after a stop
    assert "serving the agents of" in log_path.read_text()


def test_unit_file_is_valid_for_systemd(tmp_path: Path):
    """systemd-analyze verify, where systemd is installed, with ExecStart pointing at a hwledger that exists
    (verify checks the program, and %h is the home of whoever runs the check)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("ExecStart=%h/.local/bin/hwledger", f"ExecStart={HWLEDGER}"))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
