"""`hwledger fleet prune`, and the options of `hwledger fleet serve` that watch the fleet (`--http`) and keep
the store small (`--jobs-older-than`, `--events-older-than`): registered by `hwledger.commands.fleet`."""

from __future__ import annotations

import argparse
from typing import Any

from hwledger.display import dumps, human_bytes
from hwledger.errors import UserError
from hwledger.fleet import Fleet
from hwledger.store import Store
from hwledger.pruning import DEFAULT_EVENTS_OLDER_THAN, DEFAULT_JOBS_OLDER_THAN, NEVER, HourlyPrune, cuts, parse_age

AGE_HELP = "(m, h, d or w; at least 1d; '" + NEVER + "' keeps them all)"


def _add_ages(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument("--jobs-older-than", default=DEFAULT_JOBS_OLDER_THAN, metavar="AGE",
                        help=f"{what} finished jobs (with their results) that finished longer ago than AGE "
                             f"{AGE_HELP}; queued and running jobs are never removed (default %(default)s)")
    parser.add_argument("--events-older-than", default=DEFAULT_EVENTS_OLDER_THAN, metavar="AGE",
                        help=f"{what} events (the append-only history) older than AGE {AGE_HELP} "
                             "(default %(default)s)")


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    watch = serve.add_argument_group("watching the fleet over HTTP (off unless --http is given)")
    watch.add_argument("--http", metavar="ADDR:PORT",
                       help="serve /metrics (Prometheus), / (status page), /api/fleet and /api/jobs, read-only, on "
                            "ADDR:PORT, e.g. 127.0.0.1:9835 (port 0: any free port, logged)")
    watch.add_argument("--http-token-file", metavar="PATH",
                       help="require `Authorization: Bearer <token>` with the token in PATH (mode 0600); needed "
                            "for any address other than loopback")
    keep = serve.add_argument_group("retention (applied at start and then once an hour)")
    _add_ages(keep, what="remove")


def serve_companions(args: argparse.Namespace, fleet: Fleet) -> list[Any]:
    """What runs beside the loop: the hourly prune, and the HTTP server when --http is given. Everything
    that can be refused (a bad address, a token file others can read, a bad age) is refused here, before
    the server starts."""
    jobs_age = parse_age(args.jobs_older_than, "--jobs-older-than")
    events_age = parse_age(args.events_older_than, "--events-older-than")
    if args.http_token_file and not args.http:
        raise UserError("--http-token-file needs --http ADDR:PORT")
    companions: list[Any] = []
    metrics = None
    if args.http:
        # Imported here: only `serve --http` needs prometheus-client and the page.
        from hwledger.web.http import WatchServer, http_options  # pylint: disable=import-outside-toplevel
        from hwledger.web.metrics import FleetMetrics  # pylint: disable=import-outside-toplevel

        options = http_options(args.http, args.http_token_file)
        metrics = FleetMetrics(lambda: Store.open(fleet.db, read_only=True))
        companions.append(WatchServer(options, fleet, metrics, interval_s=args.interval))

    def count_pruned(report) -> None:
        if metrics is not None:
            metrics.pruned.labels("jobs").inc(report.jobs)
            metrics.pruned.labels("events").inc(report.events)

    if jobs_age is not None or events_age is not None or args.http:
        companions.insert(0, HourlyPrune(fleet, jobs_age=jobs_age, events_age=events_age, on_pruned=count_pruned))
    return companions


# ---------------------------------------------------------------------------------------------
# prune


def add_prune_parser(sub, files: argparse.ArgumentParser) -> None:
    prune = sub.add_parser(
        "prune", parents=[files], help="remove old finished jobs and old events, and shrink the store",
        description="Remove finished jobs and events older than the given ages, then give the freed space back "
                    "to the filesystem. Events younger than the cut stay append-only (the store refuses to "
                    "delete them). `hwledger fleet serve` applies the same limits once an hour; this command "
                    "also rewrites, once, a store made before incremental vacuum (a full VACUUM: it holds the "
                    "store's write lock while it runs, so stop the server first for a big store).",
        epilog="examples:\n  hwledger fleet prune --dry-run\n"
               "  hwledger fleet prune --jobs-older-than 14d --events-older-than 180d",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_ages(prune, what="remove")
    prune.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    prune.add_argument("--json", action="store_true", help="print the report as JSON")
    prune.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    jobs_before, events_before = cuts(parse_age(args.jobs_older_than, "--jobs-older-than"),
                                      parse_age(args.events_older_than, "--events-older-than"))
    fleet = Fleet.from_options(config=args.config, known_hosts=args.known_hosts, db=args.db)
    with fleet.open_store() as store:
        report = store.prune(jobs_before=jobs_before, events_before=events_before, dry_run=args.dry_run,
                             full_vacuum=True, wait_for_readers=True)
    if args.json:
        print(dumps(report.as_dict()))
        return 0
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {report.jobs} finished job(s) that finished before {report.jobs_before or 'never (kept)'}")
    print(f"{verb} {report.events} event(s) from before {report.events_before or 'never (kept)'}")
    if report.dry_run:
        print(f"store: {human_bytes(report.size_before)} ({report.size_before} bytes); nothing changed")
        return 0
    how = {"incremental": "freed pages given back", "full": "rewritten once (full VACUUM; incremental from now on)",
           None: "nothing to give back"}[report.vacuum]
    print(f"store: {human_bytes(report.size_before)} -> {human_bytes(report.size_after)} "
          f"({report.size_before} -> {report.size_after} bytes; {how}) in {report.seconds:.1f} s")
    return 0
