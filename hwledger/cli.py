"""The `hwledger` console script: one argparse tree, one module per command group.

Each module in `hwledger.commands` exposes `register(subparsers)`, which adds its parser(s) and sets
`func` (a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import sys

from hwledger import __version__
from hwledger.errors import UserError

COMMAND_MODULES = ("fleet", "job", "gpu", "run")


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
        print(f"hwledger: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
