"""`hwledger gpu parse`: show what hwledger makes of a GPU tool's output.

It goes through the same code as the `hwledger.fleet.gpu_query` action plugin and the heartbeat
(`probe.evaluate_tool_output`), so what it prints is what a heartbeat would store.
"""

from __future__ import annotations

import argparse
import shlex
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
            "the snapshot as JSON, or the failure (reason, message) with exit status 1. The format is "
            "recognised from the output itself (JSON, CSV with a header line, the rocm-smi and amd-smi "
            "tables); only nvidia-smi CSV without a header (--format=csv,noheader) needs --cmd, because "
            "nothing but the command's --query-gpu= list says which column is which."
        ),
        epilog=(
            "examples:\n"
            "  nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv | hwledger gpu parse -\n"
            "  rocm-smi --showproductname --showmeminfo vram --json > out.json; hwledger gpu parse out.json\n"
            "  hwledger gpu parse --cmd 'nvidia-smi --query-gpu=index,memory.free --format=csv,noheader' out.txt"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parse.add_argument("file", metavar="FILE", help="the tool's standard output, or - for stdin")
    parse.add_argument(
        "--cmd", metavar="CMD",
        help="the command that produced the output; needed only for nvidia-smi CSV without a header line, "
             "whose columns are named by its --query-gpu= list",
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
    if args.cmd is not None and not args.cmd.strip():
        raise UserError("--cmd is empty; give the command that produced the output, e.g. "
                        f"--cmd '{DEFAULT_GPU_QUERY_CMD}', or leave --cmd out")
    stdout = _read(args.file, "FILE")
    stderr = _read(args.stderr, "--stderr file") if args.stderr else ""
    now = time.time()
    # Without --cmd the parsers get no command, so the backend and the columns come from the output alone.
    outcome = probe.evaluate_tool_output(
        agent=args.agent, cmd=args.cmd or "", backend=args.backend, stdout=stdout, stderr=stderr,
        rc=args.rc, started=now, ended=now,
    )
    # Only output that would parse with the command is in question: with a non-zero exit status the
    # output is not trusted, whatever the command.
    if not outcome.ok and args.cmd is None and args.rc == 0 and outcome.reason == "unparseable" \
            and telemetry.needs_command(stdout, args.backend):
        raise UserError(
            "this looks like nvidia-smi CSV without a header line (--format=csv,noheader): only the command's "
            "--query-gpu= list says which column is which. Give the command that produced it, e.g.\n"
            f"  hwledger gpu parse --cmd '{DEFAULT_GPU_QUERY_CMD}' {shlex.quote(args.file)}\n"
            "or capture it with --format=csv, whose header line names the columns")
    if not outcome.ok:
        print(dumps(outcome.module_result()))
        print(f"hwledger: gpu parse: {printable(outcome.reason)}: {printable(outcome.msg)}", file=sys.stderr)
        return 1
    print(dumps(outcome.snapshot))
    return 0
