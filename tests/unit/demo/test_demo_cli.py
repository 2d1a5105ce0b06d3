"""`python -m demo`'s command line, without starting a fleet: help, and stopping when nothing runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from demo.__main__ import next_steps
from tests.toolchains import REPO


def demo(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "demo", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


def test_help_prints_help_and_runs_nothing(tmp_path: Path):
    result = demo("--help", "--dir", str(tmp_path / "d"))
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m demo") and "--keep" in result.stdout and "--down" in result.stdout
    assert not (tmp_path / "d").exists()


def test_down_with_nothing_up_says_so(tmp_path: Path):
    result = demo("--down", "--dir", str(tmp_path / "none"))
    assert result.returncode == 0, result.stderr
    assert "nothing to stop" in result.stdout


def test_next_steps_name_the_demo_files_and_demo_down(tmp_path: Path):
    lines = next_steps(tmp_path / "d")
    assert lines[0] == f". {tmp_path / 'd' / 'env'}"
    assert f"-i {tmp_path / 'd' / 'demo.hwledger.yml'}" in " ".join(lines)
    assert lines[-1] == f"make demo-down DEMO_DIR={tmp_path / 'd'}"


def test_a_directory_that_is_not_the_demos_is_left_alone(tmp_path: Path):
    """--dir names a directory the demo empties first: never one that is not a demo directory."""
    (tmp_path / "precious.txt").write_text("keep me")
    result = demo("--dir", str(tmp_path))
    assert result.returncode == 1
    assert "not a demo directory" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
