"""`hwledger job`: submit, list, show, logs, cancel. The server (`hwledger fleet serve`) runs the jobs."""

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
from hwledger.job_follow import print_log
from hwledger.placement import AUTO, AgentView, Request, never_fits, note_text, size_text
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
                    "shell on the agent. With --agent auto and a GPU request (--min-free-vram, --gpus, "
                    "--gpu-name, or the job file's resources) the server places it at dispatch on the GPUs of "
                    "an online agent whose latest snapshot is fresh (younger than two heartbeat intervals) and "
                    "shows it only those GPUs (CUDA_VISIBLE_DEVICES, or ROCR_VISIBLE_DEVICES on AMD); until "
                    "then `job show` and `job list` say why it waits. A job with a GPU request holds only its "
                    "GPUs (other such jobs run on the agent's other GPUs); one without holds its whole agent.",
        epilog="examples:\n  hwledger job submit --agent gpu1 -- nvidia-smi -L\n"
               "  hwledger job submit --agent gpu1 --timeout 600 --file train.json\n"
               "  hwledger job submit --agent auto --min-free-vram 40GiB -- python3 train.py\n"
               "  hwledger job submit --agent auto --gpus 2 --gpu-name 'H100*' --min-free-vram 70G -- torchrun ...\n"
               "  hwledger job submit --agent gpu1 --gpus 1 -- python3 eval.py   # one GPU of gpu1, not all of it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("--agent", metavar="NAME|auto",
                        help="the agent to run it on, or `auto`: the server picks the agent and GPUs that fit the "
                             "GPU request (the default when the job asks for GPUs)")
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

    logs = sub.add_parser(
        "logs", parents=[files], help="print a job's output; -f follows it until it ends",
        description="Print what the store holds of a job's output: the server reads it from the agent at every "
                    "heartbeat while the job runs (lines appear within two ticks), and the end of it from the "
                    "job's result. The job's stdout goes to stdout and its stderr to stderr; control characters "
                    "(escape sequences, carriage returns) are shown escaped, never sent to the terminal. The "
                    "store keeps the newest 4 MiB of each job's output; what was dropped or lost is said.",
        epilog="examples:\n"
               "  hwledger job logs 3f2a                  # what is there now (a finished job: what was kept)\n"
               "  hwledger job logs -f 3f2a               # follow it; exit with the job's exit code\n"
               "  hwledger job logs -f --stderr 3f2a      # only its stderr\n"
               "  hwledger job logs 3f2a > out.txt        # its stdout to a file (escaped), stderr on the terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    logs.add_argument("job_id", metavar="ID", help="job id (or a unique prefix of it)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing until the job ends (waiting for a queued one to start), then print its "
                           "final state and exit with its exit code (128+N when signal N killed it; 1 when it "
                           "timed out, was lost or cancelled)")
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--stdout", dest="streams", action="store_const", const=("stdout",), help="only its stdout")
    which.add_argument("--stderr", dest="streams", action="store_const", const=("stderr",), help="only its stderr")
    logs.set_defaults(func=cmd_logs, streams=("stdout", "stderr"))

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
    gpus = parser.add_argument_group(
        "GPU request (the job file's \"resources\"; any of these makes one, overriding the file's field)")
    gpus.add_argument("--min-free-vram", metavar="SIZE",
                      help="free memory each GPU must have, e.g. 40GiB (= 40G = 42949672960); KB/MB/GB are "
                           "powers of 1000")
    gpus.add_argument("--gpus", type=int, metavar="N", help="how many GPUs the job needs (default 1)")
    gpus.add_argument("--gpu-name", metavar="GLOB",
                      help="only GPUs whose name matches, case-insensitive, from any word of the name on: "
                           "'H100*' matches 'NVIDIA H100 80GB HBM3', 'MI100*' matches '... [Instinct MI100]'")
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
    asked = {key: value for key, value in (("gpus", args.gpus), ("min_free_vram", args.min_free_vram),
                                           ("gpu_name", args.gpu_name)) if value is not None}
    if asked:
        resources = spec.get("resources")
        spec["resources"] = {**(resources if isinstance(resources, dict) else {}), **asked}
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
    request = Request.of_spec(spec)
    agent = args.agent or (AUTO if request is not None else None)
    if agent is None:
        raise UserError("give the agent: --agent NAME, or --agent auto with a GPU request (--min-free-vram SIZE, "
                        "--gpus N) to let the server place the job")
    if agent == AUTO and request is None:
        raise UserError("--agent auto places a job on GPUs: say what it needs with --min-free-vram SIZE and/or "
                        "--gpus N (or give the job file a \"resources\" section)")
    with _store(args) as store:
        if request is not None:
            views = [AgentView.of_snapshot(row.name, row.state, snap.data if snap else None, None)
                     for row in store.list_agents() if agent in (AUTO, row.name)
                     for snap in [store.latest_snapshot(row.name)]]
            impossible = never_fits(request, views)
            if impossible:
                raise UserError(f"{impossible}: the job could never start; ask for less (its latest GPU data: "
                                "`hwledger fleet status`)")
        job = store.submit_job(agent, spec, job_id=spec["job_id"], timeout_s=spec.get("timeout_s"),
                               max_attempts=args.max_attempts)
    if args.json:
        print(dumps(job_to_dict(job)))
    else:
        print(job.id)
        if agent == AUTO:
            where = f"queued, to be placed on {request.describe()} of an online agent"
        elif request is not None:
            where = f"queued for {request.describe()} of {agent}"
        else:
            where = f"queued for {agent}"
        print(f"{where}; it starts on a heartbeat at which that fits (`hwledger fleet serve` must be running; "
              "`hwledger job show` says why it waits)", file=sys.stderr)
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
        notes = {job.id: _waits_because(store, job) for job in jobs if job.state == "queued"}
    if not jobs:
        print("no jobs")
        return 0
    rows = [[job.id, printable(job.agent), job.state, human_age(age_seconds(job.created_at)),
             "" if job.exit_code is None else str(job.exit_code),
             printable(" ".join(job.spec.get("command") or []), limit=50)] for job in jobs]
    headers = ["JOB", "AGENT", "STATE", "CREATED", "EXIT", "COMMAND"]
    if any(notes.values()) or any(job.placement for job in jobs):
        # Where a placed job runs, and why a queued one waits (its whole reason is in `job show`).
        for row, job in zip(rows, jobs):
            row.append(printable(notes.get(job.id) or _gpus_of(job.placement), limit=100))
        headers.append("GPUS / WAITS FOR")
    print(table(rows, headers))
    return 0


def _waits_because(store: Store, job: JobRow) -> str | None:
    """Why a queued job is not placed yet, with the age of the best candidate's snapshot now."""
    note = job.placement_note
    if not isinstance(note, dict):
        return None
    snapshot = store.latest_snapshot(note["agent"]) if isinstance(note.get("agent"), str) else None
    return note_text(note, age_seconds(snapshot.recorded_at) if snapshot else None)


def _gpus_of(placement: dict | None) -> str:
    """"GPU 0, 3" of a placement ("" for a job that holds its whole agent)."""
    gpus = [str(gpu.get("index")) for gpu in (placement or {}).get("gpus") or []]
    return f"GPU {', '.join(gpus)}" if gpus else ""


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
        waits = _waits_because(store, job) if job.state == "queued" else None
    if args.json:
        data = job_to_dict(job)
        data["waits_because"] = waits
        data["events"] = [{"at": e.at, "kind": e.kind, **e.detail} for e in events]
        print(dumps(data))
        return 0
    print(f"job      {job.id}")
    print(f"agent    {printable(job.agent)}")
    print(f"state    {job.state}{' (cancel requested)' if job.cancel_requested and not job.terminal else ''}")
    print(f"command  {printable(' '.join(job.spec.get('command') or []))}")
    request = Request.of_spec(job.spec)
    if request is not None:
        print(f"asks     {printable(request.describe())}")
    if waits:
        print(f"waits    {printable(waits)}")
    _print_placement(job.placement)
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


def _print_placement(placement: dict | None) -> None:
    """Where a placed job went and why. GPU names and UUIDs came from the host: escaped like any remote text."""
    if not isinstance(placement, dict):
        return
    for gpu in placement.get("gpus") or []:
        uuid = f" {printable(gpu['uuid'])}" if gpu.get("uuid") else ""
        print(f"gpu      {printable(gpu.get('index'))}: {printable(gpu.get('name') or '?')}{uuid} "
              f"({size_text(gpu.get('free_bytes'))} free at placement)")
    for key, value in sorted((placement.get("env") or {}).items()):
        print(f"env      {printable(key)}={printable(value)}")
    if placement.get("why"):
        print(f"placed   {printable(placement['why'])}")


def cmd_logs(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    if store is None:
        raise UserError(f"no job {args.job_id!r}: there is no store")
    with store:
        job = _find(store, args.job_id)
        return print_log(store, job, follow=args.follow, streams=args.streams, out=sys.stdout, err=sys.stderr)


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
