"""`hwledger run JOB.json --output RESULT.json`: the job runner on a remote host.

A thin wrapper: the runner lives in the collection's `plugins/plugin_utils/jobs.py`, the one file the
job role also copies to remotes without `hwledger` and runs with `python3 jobs.py run`.
"""

from __future__ import annotations

import argparse

from ansible_collections.hwledger.fleet.plugins.plugin_utils import jobs

DESCRIPTION = """\
Run one hwledger job on this host and write its result.

The job file is JSON (schema_version, job_id, command as an argv list, env, workdir, timeout_s,
model_ref, metadata). The command runs without a shell in its own session with a minimal environment
plus the job's env; at timeout_s it gets SIGTERM, then SIGKILL; when it ends, every process it left
behind is killed. The result (state, exit code, signal, times, the last 64 KiB of stdout and stderr)
is written atomically with mode 0600; an output path that is a symlink is refused.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a job file on this host and write its result (the remote side of a job)",
        description=DESCRIPTION,
        epilog=jobs.EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jobs.add_run_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return jobs.run_job_file(args.job, args.output)
