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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hwledger",
        description="Agentless GPU fleet over SSH: register hosts, watch their GPUs, run jobs.",
    )
    parser.add_argument("--version", action="version", version=f"hwledger {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module = __import__(f"hwledger.commands.{name}", fromlist=["register"])
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
