"""`hwledger gpu parse`: show what hwledger makes of a GPU tool's output.

It goes through the same code as the `hwledger.fleet.gpu_query` action plugin and the heartbeat
(`probe.evaluate_tool_output`), so what it prints is what a heartbeat would store.
"""

from __future__ import annotations

import argparse
import sys
import time

from ansible_collections.hwledger.fleet.plugins.plugin_utils import probe, telemetry
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD

from hwledger.display import dumps, printable
from hwledger.errors import UserError

BACKENDS = ("auto", "nvidia", "rocm", "amdsmi")
# Read one byte more than the parsers accept, so that an oversized file is reported as such.
READ_LIMIT = telemetry.MAX_OUTPUT_BYTES + 1


def register(subparsers) -> None:
    gpu = subparsers.add_parser("gpu", help="GPU telemetry tools", description="GPU telemetry tools.")
    sub = gpu.add_subparsers(dest="gpu_command", metavar="SUBCOMMAND")
    sub.required = True
    parse = sub.add_parser(
        "parse",
        help="parse a GPU tool's output the way a heartbeat does",
        description=(
            "Parse the output of nvidia-smi, rocm-smi or amd-smi exactly as the heartbeat does and print "
            "the snapshot as JSON, or the failure (reason, message) with a non-zero exit status."
        ),
        epilog=(
            "example: nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader "
            "| hwledger gpu parse -"
        ),
    )
    parse.add_argument("file", metavar="FILE", help="the tool's standard output, or - for stdin")
    parse.add_argument(
        "--cmd", default=DEFAULT_GPU_QUERY_CMD,
        help="the command that produced the output (its field list names the columns of noheader CSV; "
             "default: %(default)s)",
    )
    parse.add_argument("--rc", type=int, default=0, metavar="N", help="the tool's exit status (default: 0)")
    parse.add_argument("--stderr", metavar="FILE", help="the tool's standard error, if you have it")
    parse.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="which tool's format to expect (default: auto, from the command and output)")
    parse.add_argument("--agent", default="local", help="agent name to put in the snapshot (default: local)")
    parse.set_defaults(func=run_parse)


def _read(path: str, what: str) -> str:
    """At most READ_LIMIT bytes of a file (or stdin for -), decoded as UTF-8 with replacement."""
    if path == "-":
        data = sys.stdin.buffer.read(READ_LIMIT)
    else:
        try:
            with open(path, "rb") as handle:
                data = handle.read(READ_LIMIT)
        except FileNotFoundError:
            raise UserError(f"{what} {path!r} does not exist; give the file that holds the tool's output, "
                            "or - to read standard input") from None
        except IsADirectoryError:
            raise UserError(f"{what} {path!r} is a directory; give the file that holds the tool's output") from None
        except OSError as exc:
            raise UserError(f"cannot read {what} {path!r}: {exc.strerror}") from None
    return data.decode("utf-8", errors="replace")


def run_parse(args: argparse.Namespace) -> int:
    if not args.cmd.strip():
        raise UserError("--cmd is empty; give the command that produced the output, e.g. "
                        f"--cmd '{DEFAULT_GPU_QUERY_CMD}'")
    stdout = _read(args.file, "FILE")
    stderr = _read(args.stderr, "--stderr file") if args.stderr else ""
    now = time.time()
    outcome = probe.evaluate_tool_output(
        agent=args.agent, cmd=args.cmd, backend=args.backend, stdout=stdout, stderr=stderr,
        rc=args.rc, started=now, ended=now,
    )
    if not outcome.ok:
        print(dumps(outcome.module_result()))
        print(f"hwledger: gpu parse: {printable(outcome.reason)}: {printable(outcome.msg)}", file=sys.stderr)
        return 1
    print(dumps(outcome.snapshot))
    return 0
