"""`hwledger job`: submit, list, show, cancel. The server (`hwledger fleet serve`) runs the jobs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema

from hwledger.display import dumps, human_age, printable, table
from hwledger.errors import UserError
from hwledger.fleet import Fleet
from hwledger.reports import DEFAULT_JOB_LIMIT, job_list, job_to_dict
from hwledger.store import JOB_STATES, MAX_ATTEMPTS_LIMIT, JobRow, Store, age_seconds, shown_spec


def register(subparsers) -> None:
    job = subparsers.add_parser("job", help="queue jobs for agents and follow them",
                                description="Queue a job for an agent; `hwledger fleet serve` dispatches it on "
                                            "the next heartbeat the agent answers.")
    sub = job.add_subparsers(dest="job_command", metavar="SUBCOMMAND")
    sub.required = True

    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--db", metavar="PATH",
                       help="the store [$HWLEDGER_DB, default ~/.local/share/hwledger/fleet.db]")

    submit = sub.add_parser(
        "submit", parents=[files], help="queue a job",
        description="Queue a job: a JSON job file (--file) or a command after --. The command runs without a "
                    "shell on the agent.",
        epilog="examples:\n  hwledger job submit --agent gpu1 -- nvidia-smi -L\n"
               "  hwledger job submit --agent gpu1 --timeout 600 --file train.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("--agent", required=True, metavar="NAME", help="the agent to run it on")
    submit.add_argument("--file", metavar="JOB.json", help="a job spec file (job_id is generated when absent)")
    submit.add_argument("--json", action="store_true", help="print the queued job as JSON")
    submit.add_argument("--max-attempts", type=_attempts, default=1, metavar="N",
                        help="run it at most N times: a job lost after its command started (its host died, the "
                             "server was stopped) is queued again while attempts remain; failures before the "
                             "command started do not count (default 1)")
    _add_spec_arguments(submit)
    submit.set_defaults(func=cmd_submit)

    new = sub.add_parser(
        "new", help="print a new job spec (JSON) for a command, without queueing it",
        description="Print a validated job spec with a fresh job_id for the command after --. Write it to a file "
                    "for `hwledger job submit --file` or the hwledger.fleet.job playbook (hwledger_job_file). "
                    "Nothing is stored and no store is needed.",
        epilog="example:\n  hwledger job new --timeout 600 --env MODE=fast -- python3 train.py --epochs 1 > job.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_spec_arguments(new)
    new.set_defaults(func=cmd_new)

    listing = sub.add_parser("list", parents=[files], help="list jobs")
    listing.add_argument("--agent", metavar="NAME")
    listing.add_argument("--state", action="append", choices=JOB_STATES, help="only jobs in this state (repeatable)")
    listing.add_argument("--limit", type=int, default=DEFAULT_JOB_LIMIT, metavar="N", help="at most N jobs, newest (default 200)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    show = sub.add_parser("show", parents=[files], help="show a job, its result and history")
    show.add_argument("job_id", metavar="ID", help="job id (or a unique prefix of it)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    cancel = sub.add_parser("cancel", parents=[files], help="cancel a job",
                            description="Cancel a queued or dispatched job at once (nothing of it has "
                                        "started); a running one is stopped by the server and its remote "
                                        "temp dir removed.")
    cancel.add_argument("job_id", metavar="ID")
    cancel.set_defaults(func=cmd_cancel)


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, metavar="S", help="seconds before the job is killed "
                        f"(default {job_schema.DEFAULT_TIMEOUT_S})")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the command (repeatable); KEY alone takes the value of "
                             "KEY in this environment, so a secret is not on the command line")
    parser.add_argument("--workdir", metavar="DIR",
                        help="working directory on the agent (default: the login user's HOME there)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                        help="the command and its arguments, after --")


def _attempts(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_ATTEMPTS_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_ATTEMPTS_LIMIT}, got {value}")
    return value


def _store(args: argparse.Namespace) -> Store:
    return Fleet.from_options(db=args.db).open_store()


def _existing_store(args: argparse.Namespace) -> Store | None:
    """The store for a command that only reads it (or finds a job in it): None, said on stderr, when there
    is none, which is then not created."""
    fleet = Fleet.from_options(db=args.db)
    store = fleet.existing_store()
    if store is None:
        print(f"hwledger: {fleet.no_store_note()}", file=sys.stderr)
    return store


def _spec_error(exc: job_schema.JobSpecError, where: str) -> UserError:
    lines = [f"{where}: {field}: {message}" for field, message in exc.errors]
    return UserError("invalid job:\n  " + "\n  ".join(lines))


def build_spec(args: argparse.Namespace) -> dict:
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if getattr(args, "file", None) and command:
        raise UserError("give either --file JOB.json or a command after --, not both")
    if not getattr(args, "file", None) and not command:
        raise UserError("nothing to run: give a command after --, e.g. hwledger job new -- nvidia-smi -L"
                        if args.job_command == "new" else
                        "nothing to run: give --file JOB.json or a command after --, e.g. "
                        "hwledger job submit --agent NAME -- nvidia-smi -L")
    if getattr(args, "file", None):
        try:
            spec = job_schema.load_job_file(args.file)
        except job_schema.JobSpecError as exc:
            raise _spec_error(exc, args.file) from None
        if not isinstance(spec, dict):
            raise UserError(f"{args.file}: a job file is a JSON object with at least \"command\"")
        spec.setdefault("job_id", str(uuid.uuid4()))
        where = args.file
    else:
        spec = {"job_id": str(uuid.uuid4()), "command": command}
        where = "command line"
    if args.timeout is not None:
        spec["timeout_s"] = int(args.timeout) if float(args.timeout).is_integer() else args.timeout
    if args.env:
        env = dict(spec.get("env") or {})
        for pair in args.env:
            key, sep, value = pair.partition("=")
            if not sep and key in os.environ:
                value = os.environ[key]  # the value stays off the command line (and the shell's history)
            elif not sep or not key:
                raise UserError(f"--env {pair!r}: write it as KEY=VALUE, or KEY alone with KEY set in the "
                                "environment")
            env[key] = value
        spec["env"] = env
    if args.workdir:
        spec["workdir"] = args.workdir
    spec.setdefault("schema_version", job_schema.JOB_SCHEMA_VERSION)
    try:
        return job_schema.validate_job(spec)
    except job_schema.JobSpecError as exc:
        raise _spec_error(exc, where) from None


def cmd_new(args: argparse.Namespace) -> int:
    print(json.dumps(build_spec(args), sort_keys=True, indent=2))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    with _store(args) as store:
        job = store.submit_job(args.agent, spec, job_id=spec["job_id"], timeout_s=spec.get("timeout_s"),
                               max_attempts=args.max_attempts)
    if args.json:
        print(dumps(job_to_dict(job)))
    else:
        print(job.id)
        print(f"queued for {args.agent}; it starts on the next heartbeat the agent answers "
              "(`hwledger fleet serve` must be running)", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    store = _existing_store(args)
    if store is None:
        print("[]" if args.json else "no jobs")
        return 0
    with store:
        if args.json:
            print(dumps(job_list(store, agent=args.agent, states=args.state, limit=args.limit)))
            return 0
        jobs = store.list_jobs(agent=args.agent, states=args.state, newest=args.limit)
    if not jobs:
        print("no jobs")
        return 0
    rows = [[job.id, printable(job.agent), job.state, human_age(age_seconds(job.created_at)),
             "" if job.exit_code is None else str(job.exit_code),
             printable(" ".join(job.spec.get("command") or []), limit=50)] for job in jobs]
    print(table(rows, ["JOB", "AGENT", "STATE", "CREATED", "EXIT", "COMMAND"]))
    return 0


def _find(store: Store, job_id: str) -> JobRow:
    job = store.find_job(job_id)
    if job is None:
        raise UserError(f"no job {job_id!r}; see `hwledger job list`")
    return job


def cmd_show(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    if store is None:
        raise UserError(f"no job {args.job_id!r}: there is no store")
    with store:
        job = _find(store, args.job_id)
        events = store.list_events(job_id=job.id)
    if args.json:
        data = job_to_dict(job)
        data["events"] = [{"at": e.at, "kind": e.kind, **e.detail} for e in events]
        print(dumps(data))
        return 0
    print(f"job      {job.id}")
    print(f"agent    {printable(job.agent)}")
    print(f"state    {job.state}{' (cancel requested)' if job.cancel_requested and not job.terminal else ''}")
    print(f"command  {printable(' '.join(job.spec.get('command') or []))}")
    env = shown_spec(job.spec).get("env") or {}
    if env:
        print(f"env      {printable(' '.join(f'{name}={value}' for name, value in sorted(env.items())))}")
    print(f"attempts {job.attempts} of {job.max_attempts}")
    for label, value in (("created", job.created_at), ("started", job.started_at), ("launched", job.launched_at),
                         ("finished", job.finished_at)):
        if value:
            print(f"{label:<8} {value}")
    if job.exit_code is not None:
        print(f"exit     {job.exit_code}")
    if job.error:
        print(f"error    {printable(job.error)}")
    if job.remote_dir:
        print(f"remote   {printable(job.remote_dir)}{' (clean-up pending)' if job.cleanup_pending else ''}")
    result = job.result or {}
    for stream in ("stdout_tail", "stderr_tail"):
        text = result.get(stream)
        if text:
            print(f"--- {stream.replace('_tail', '')} (last {len(text)} characters) ---")
            # Job output comes from the remote: every control character is escaped, newlines kept.
            print("\n".join(printable(line) for line in text.splitlines()))
    print("--- history ---")
    for event in events:
        if event.kind == "job_state":
            extra = f" ({printable(event.detail.get('error'), limit=200)})" if event.detail.get("error") else ""
            print(f"{event.at}  {event.detail.get('old') or '-'} -> {event.detail.get('new')}{extra}")
        else:
            print(f"{event.at}  {event.kind}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    if store is None:
        raise UserError(f"no job {args.job_id!r}: there is no store")
    with store:
        job = _find(store, args.job_id)
        state = job.state if job.terminal else store.request_cancel(job.id)
    if job.terminal:
        print(f"job {job.id} already ended ({state}); nothing to cancel")
        return 1
    if state == "cancelled":
        print(f"job {job.id} cancelled")
    elif state in ("dispatched", "running"):
        print(f"job {job.id} is {state}: the server stops it and records it as cancelled")
    else:
        print(f"job {job.id} ended ({state}) before the cancel arrived")
        return 1
    return 0
