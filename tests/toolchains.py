"""The ansible-core toolchains the collection is tested on (meta/runtime.yml: >=2.18.0,<2.20.0).

- "2.19": the project virtualenv that runs pytest (requirements/runtime.txt pins ansible-core 2.19).
- "2.18": ``.venv-2.18`` beside it, made by scripts/bootstrap.sh from requirements/ansible-2.18.txt
  (another location with HWLEDGER_ANSIBLE_218_VENV).

``toolchain("2.18")`` skips the calling test when that virtualenv is missing on a developer machine,
but fails it under CI=true: ``make test`` in CI must never pass without having run 2.18.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLCHAIN_NAMES = ("2.18", "2.19")


@dataclass(frozen=True)
class Toolchain:
    name: str  # the ansible-core minor version it must provide, e.g. "2.18"
    bin_dir: Path  # the virtualenv's bin directory (python, ansible, ansible-playbook, ...)

    def exe(self, program: str) -> str:
        return str(self.bin_dir / program)

    def core_version(self) -> str:
        """The ansible-core version this toolchain really imports."""
        proc = subprocess.run([self.exe("python"), "-c", "import ansible.release as r; print(r.__version__)"],
                              capture_output=True, text=True, timeout=60, check=False, env=self.env(),
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise AssertionError(f"{self.exe('python')} cannot import ansible: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment minus anything that would steer ansible or Python elsewhere:
        no ANSIBLE_* settings (ansible.cfg in the checkout applies) and no PYTHONPATH (the toolchain
        must find the collection through its own hwledger_fleet_checkout.pth and ansible.cfg)."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("ANSIBLE_") and key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", os.defpath)])
        env.update({"ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0"})
        env.update(extra or {})
        return env

    def run(self, program: str, *args: str, extra_env: Mapping[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one of the toolchain's programs from the checkout root (so its ansible.cfg applies)."""
        return subprocess.run([self.exe(program), *args], cwd=REPO, env=self.env(extra_env), capture_output=True,
                              text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def venv_218() -> Path:
    return Path(os.environ.get("HWLEDGER_ANSIBLE_218_VENV") or REPO / ".venv-2.18")


def toolchain(name: str) -> Toolchain:
    """The named toolchain; for a missing 2.18 venv: pytest.skip here, pytest.fail under CI."""
    if name == "2.19":
        return Toolchain("2.19", Path(sys.executable).parent)
    if name != "2.18":
        raise ValueError(f"unknown toolchain {name!r}; known: {', '.join(TOOLCHAIN_NAMES)}")
    venv = venv_218()
    if not (venv / "bin" / "ansible-playbook").is_file():
        reason = (f"ansible-core 2.18 toolchain missing: {venv}/bin/ansible-playbook does not exist. "
                  "Create it with scripts/bootstrap.sh (or: python3 -m venv .venv-2.18 && "
                  ".venv-2.18/bin/pip install -r requirements/ansible-2.18.txt)")
        if in_ci():
            pytest.fail(reason + " [CI=true: the 2.18 tests must run, not skip]", pytrace=False)
        pytest.skip(reason)
    return Toolchain("2.18", venv / "bin")


def require_program(program: str, package: str) -> str:
    """The path of a system program the test needs (Debian `package`, installed by scripts/bootstrap.sh when
    run as root): pytest.skip on a developer machine without it, pytest.fail under CI=true."""
    import shutil  # pylint: disable=import-outside-toplevel

    path = shutil.which(program)
    if path is None:
        reason = (f"{program} is not installed: apt-get install {package} (scripts/bootstrap.sh does it when run "
                  "as root)")
        if in_ci():
            pytest.fail(reason + " [CI=true: this test must run, not skip]", pytrace=False)
        pytest.skip(reason)
    return path
