"""`hwledger run JOB.json --output RESULT.json`: the job runner on a remote host.

A thin wrapper: the runner lives in the collection's `plugins/plugin_utils/job_runner.py`, which the job
role also stages as one file (`runner.pyz`) on remotes without `hwledger` and runs with `python3`.
"""

from __future__ import annotations

import argparse

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_runner

DESCRIPTION = """\
Run one hwledger job on this host and write its result.

The job file is JSON (schema_version, job_id, command as an argv list, env, workdir, timeout_s,
model_ref, metadata). The command runs without a shell in its own session with a minimal environment
plus the job's env; at timeout_s it gets SIGTERM, then SIGKILL; when it ends, every process it left
behind is killed. The result (state, exit code, signal, times, the last 64 KiB of stdout and stderr)
is written atomically with mode 0600; an output path that is a symlink is refused. With --log-dir
(or $HWLEDGER_JOB_LOG_DIR) stdout and stderr are also logged there as they come, bounded, for
`hwledger job logs -f` on the controller.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a job file on this host and write its result (the remote side of a job)",
        description=DESCRIPTION,
        epilog=job_runner.EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job_runner.add_run_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return job_runner.run_job_file(args.job, args.output, log_dir=args.log_dir)
