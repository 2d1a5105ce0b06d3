"""The `hwledger` entry point: every command has --help, and `hwledger run` stays controller-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hwledger.cli import COMMAND_MODULES, main


@pytest.mark.parametrize("argv", [[], *([name] for name in COMMAND_MODULES)])
def test_every_command_group_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "usage: hwledger" in capsys.readouterr().out


def test_hwledger_run_imports_nothing_from_the_controller_side():
    # `hwledger run` executes on GPU hosts: it must not need ansible, ansible-runner or the store.
    probe = (
        "import sys\n"
        "from hwledger.cli import main\n"
        "try:\n"
        "    main(['run', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = [m for m in ('ansible', 'ansible_runner', 'hwledger.store', 'hwledger.server', 'sqlite3')"
        " if m in sys.modules]\n"
        "print('LOADED=' + ','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "LOADED="
