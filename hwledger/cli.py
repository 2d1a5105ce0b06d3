"""The `hwledger` console script: one argparse tree, one module per command group.

Each module in `hwledger.commands` exposes `register(subparsers)`, which adds its parser(s) and sets
`func` (a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import os
import sys

from hwledger import __version__
from hwledger.display import printable
from hwledger.errors import UserError

COMMAND_MODULES = ("fleet", "job", "gpu", "run")
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)
EXIT_OS_ERROR = 1


def build_parser(only: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hwledger",
        description="Agentless GPU fleet over SSH: register hosts, watch their GPUs, run jobs.",
    )
    parser.add_argument("--version", action="version", version=f"hwledger {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in only:
        module = __import__(f"hwledger.commands.{name}", fromlist=["register"])
        module.register(sub)
    return parser


def _requested_command(argv: list[str]) -> str | None:
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMAND_MODULES else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the command group asked for: `hwledger run` executes on GPU hosts and must not
    # depend on the controller side (ansible-runner, the store) importing there.
    command = _requested_command(argv)
    parser = build_parser((command,) if command else COMMAND_MODULES)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`hwledger job list | head`): nothing more to say, and nobody to say it to.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # A file hwledger had to read or write (a full disk, a permission, a path that is not a directory).
        where = f" ({exc.filename})" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}")
        return EXIT_OS_ERROR
    except Exception as exc:  # pylint: disable=broad-exception-caught
        # SQLite failing under a read (a damaged or vanished store): writes already say it through
        # StoreError. sqlite3 is looked up, not imported: `hwledger run` on a GPU host never loads it.
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is None or not isinstance(exc, sqlite3.Error):
            raise
        _error(f"the store could not be read: {exc}. Check the file given by --db / HWLEDGER_DB (restore it, or "
               "move it away to start a new one)")
        return UserError.exit_code


def _error(message: str) -> None:
    # Messages can quote remote text (an ssh error, a host's output): escape control characters, keep lines.
    lines = message.split("\n")
    print("hwledger: error: " + "\n".join(printable(line) for line in lines), file=sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail (and print) again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (captured by a test): there is no final flush to fail


if __name__ == "__main__":
    sys.exit(main())
