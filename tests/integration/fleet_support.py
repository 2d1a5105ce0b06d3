"""Helpers for the fleet server's integration tests: a private set of hwledger files per test (the
fleet_env fixture in conftest.py), the CLI run as a real process, waiting, and finding files by content
(processes are found by an exact path with tests.procs, never by a program name)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh

from hwledger.fleet import Fleet
from hwledger.store import Store

REPO = Path(__file__).resolve().parents[2]


@dataclass
class FleetEnv:
    root: Path
    config: Path
    known_hosts: Path
    db: Path
    env: dict[str, str]
    canary: str
    servers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path) -> "FleetEnv":
        cfg = root / "cfg"
        cfg.mkdir(mode=0o700, parents=True)
        canary = f"HWL-CANARY-{secrets.token_hex(6)}"
        env = dict(os.environ)
        env.update({
            "HWLEDGER_CONFIG": str(cfg / "ssh-agents.toml"),
            "HWLEDGER_KNOWN_HOSTS": str(cfg / "known_hosts"),
            "HWLEDGER_DB": str(root / "data" / "fleet.db"),
            # A secret-looking variable in the app's environment: it must never reach a file.
            "HWLEDGER_TEST_SECRET_TOKEN": canary,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "collections")]),
        })
        env.pop("HWLEDGER_CRASH_AT", None)
        return cls(root, cfg / "ssh-agents.toml", cfg / "known_hosts", root / "data" / "fleet.db", env, canary)

    @property
    def data_dir(self) -> Path:
        return self.db.parent

    def fleet(self) -> Fleet:
        return Fleet(self.config, self.known_hosts, self.db)

    def store(self) -> Store:
        return Store.open(self.db)

    def hw(self, *args: str, timeout: float = 180, extra_env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
        env = dict(self.env, **(extra_env or {}))
        return subprocess.run([sys.executable, "-m", "hwledger", *args], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)

    def register(self, host, *, name: str | None = None, extra: tuple[str, ...] = ("--skip-heartbeat",),
                 key: str | None = None) -> subprocess.CompletedProcess:
        """Register a lab host, trusting its key (tests that check confirmation do it by hand)."""
        args = ["fleet", "register-ssh", "--host", f"{host.user}@{host.address}:{host.port}",
                "--key", key or str(host.lab.client_key), "--name", name or host.name, "--accept-new-host-key"]
        if host.bastion is not None:
            b = host.bastion
            args += ["--bastion", f"{b.user}@{b.address}:{b.port}"]
        proc = self.hw(*args, *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def serve(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        env = dict(self.env, **(extra_env or {}))
        log = open(self.root / f"serve-{len(self.servers)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "hwledger", "fleet", "serve", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.servers.append(proc)
        return proc

    def server_log(self, index: int = -1) -> str:
        logs = sorted(self.root.glob("serve-*.log"), key=lambda p: int(p.stem.split("-")[1]))
        return logs[index].read_text(errors="replace") if logs else ""

    def cleanup(self) -> None:
        """Stop the servers started here and remove the store's control socket dir when it is the
        per-store fallback under /tmp (the one under the data dir goes with tmp_path)."""
        self.stop_servers()
        remove_fallback_control_dir(self.db)

    def stop_servers(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.servers.clear()


def remove_fallback_control_dir(db: Path) -> None:
    directory = Path(ssh.control_dir_for(db.parent))
    if directory.parent == Path("/tmp") / f"hwledger-{os.getuid()}":
        shutil.rmtree(directory, ignore_errors=True)


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under `root` (any depth) that contains one of `needles`."""
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {needle[:20]!r}" for needle in needles if needle in data]
    return hits
