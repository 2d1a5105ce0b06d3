"""`hwledger fleet`: register-ssh, list, status, remove, serve (its watching and retention options, and
`prune`, live in `fleet_watch`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shlex
import socket
import sys
import textwrap

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import probe, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agent_values import DEFAULT_SSH_PORT, parse_destination
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD

from hwledger import agents_file, hostkeys
from hwledger.commands import fleet_watch
from hwledger.display import dumps, human_age, human_bytes, printable, table
from hwledger.errors import UserError
from hwledger.fanout import DEFAULT_MAX_PARALLEL, SshFanoutHeartbeat
from hwledger.fleet import Fleet, agent_record
from hwledger.heartbeat import DEFAULT_QUERY_TIMEOUT_S, HeartbeatRunError, record_outcomes
from hwledger.reports import DEFAULT_STALE_AFTER_S, effective_state, status_items
from hwledger.store import JOB_ACTIVE_STATES, Store

# The serve loop's own defaults, repeated here so that `--help` does not import the server (which only
# the serve command itself needs); a test checks they agree.
DEFAULT_INTERVAL_S = 5.0
DEFAULT_MAX_PARALLEL_JOBS = 4
MAX_INTERVAL_S = 86400  # a day; beyond it a wait's timeout can overflow, and nobody means it
EXIT_HOST_KEY_UNCONFIRMED = 3
# What `serve` exits with (cli.main maps UserError to 2 and OSError to 1); a service manager restarts on 1,
# not on 2 (examples/hwledger-serve.service, RestartPreventExitStatus=2).
SERVE_EXIT_STATUSES = (
    "exit status:\n"
    "  0    stopped by SIGTERM or SIGINT, or --once / --max-ticks done\n"
    "  1    a file it had to read or write failed (e.g. a full disk): worth a restart\n"
    "  2    a usage or setup error a restart cannot fix: a bad option, a store directory others can write\n"
    "       to, a store from a newer hwledger, another serve already serving this store\n"
    "  4    its store went away while it ran (deleted, replaced, unwritable, damaged or full): a\n"
    "       restart opens, or creates, the store at its path again\n"
    "  130  interrupted (Ctrl-C) while starting up")
EXIT_HEARTBEAT_FAILED = 1


def register(subparsers) -> None:
    fleet = subparsers.add_parser("fleet", help="register GPU hosts, watch them, serve heartbeats and jobs",
                                  description="Register GPU hosts reached over SSH, watch them, serve heartbeats.")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    sub.required = True

    files = argparse.ArgumentParser(add_help=False)
    group = files.add_argument_group("files (each also settable by environment)")
    group.add_argument("--config", metavar="PATH",
                       help="ssh-agents.toml [$HWLEDGER_CONFIG, default ~/.config/hwledger/ssh-agents.toml]")
    group.add_argument("--known-hosts", metavar="PATH",
                       help="hwledger's pinned host keys "
                            "[$HWLEDGER_KNOWN_HOSTS, default ~/.config/hwledger/known_hosts]")
    group.add_argument("--db", metavar="PATH",
                       help="the store [$HWLEDGER_DB, default ~/.local/share/hwledger/fleet.db]")

    _add_register(sub, files)

    listing = sub.add_parser("list", parents=[files], help="list registered agents",
                             description="List the agents of ssh-agents.toml with their registration details "
                                         "and the state `fleet status` shows.")
    listing.add_argument("--json", action="store_true", help="print JSON")
    _add_stale_after(listing)
    listing.set_defaults(func=cmd_list)

    status = sub.add_parser("status", parents=[files], help="state, last seen, GPUs and memory of every agent",
                            description="Show each agent's state, when it last answered, its GPUs and their memory.")
    status.add_argument("--json", action="store_true", help="print JSON")
    _add_stale_after(status)
    status.set_defaults(func=cmd_status)

    remove = sub.add_parser("remove", parents=[files], help="remove an agent",
                            description="Remove an agent from ssh-agents.toml (comments kept), unpin its host "
                                        "key (and its bastion's, when no other agent uses that bastion) and "
                                        "mark it removed in the store; its queued jobs are cancelled. Refused "
                                        "while one of its jobs is dispatched or running, unless --force.")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--force", action="store_true",
                        help="remove it even while a job runs on it: that job is cancelled (its remote temp dir "
                             "may stay on the host, as its key is no longer pinned)")
    remove.set_defaults(func=cmd_remove)

    serve_about = (
        "Every --interval seconds, one heartbeat over all agents (by default every host probed at once over its "
        "reused SSH connection; with --transport ansible, the hwledger.fleet.heartbeat_facts playbook through "
        "ansible-runner); queued jobs go to agents that answered, through the hwledger.fleet.job playbook. "
        "SIGTERM or SIGINT stops it within 2 seconds. It logs to stderr. examples/hwledger-serve.service runs it "
        "as a systemd service.")
    # Filled here: the raw formatter keeps the exit-status table of the epilog as written.
    serve = sub.add_parser("serve", parents=[files], help="run heartbeats and jobs",
                           description=textwrap.fill(serve_about, 79, break_on_hyphens=False),
                           epilog=SERVE_EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S",
                       help="seconds between heartbeat ticks (default %(default)s)")
    ticks = serve.add_mutually_exclusive_group()
    ticks.add_argument("--once", action="store_true", help="run one tick (and any job it dispatches), then exit")
    ticks.add_argument("--max-ticks", type=int, metavar="N",
                       help="run N ticks at the interval (and the jobs they dispatch), then exit")
    serve.add_argument("--query-timeout", type=int, default=DEFAULT_QUERY_TIMEOUT_S, metavar="S",
                       help="seconds a host's GPU tool may run (default %(default)s)")
    serve.add_argument("--max-parallel-jobs", type=int, default=DEFAULT_MAX_PARALLEL_JOBS, metavar="N",
                       help="jobs running at once across agents; one per agent (default %(default)s)")
    serve.add_argument("--transport", choices=("fanout", "ansible"), default="fanout",
                       help="fanout (default): one exec per host over its reused ssh connection, all hosts at "
                            "once; ansible: the hwledger.fleet.heartbeat_facts playbook through ansible-runner "
                            "each tick (same probe, parser and ssh options; about the cost of a one-task "
                            "ansible-playbook, several times the fanout's)")
    serve.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL, metavar="N",
                       help="ssh processes at once in a fanout tick (default %(default)s)")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    fleet_watch.add_serve_options(serve)
    serve.set_defaults(func=cmd_serve)
    fleet_watch.add_prune_parser(sub, files)


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more (`nan`, `inf` and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds, 0 or more, e.g. 30")
    return value


def _add_stale_after(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stale-after", type=_seconds, default=DEFAULT_STALE_AFTER_S, metavar="S",
                        help="show an online agent as stale when its last answer is older than S seconds "
                             "(e.g. the server is not running; default %(default)s)")


def _fleet(args: argparse.Namespace) -> Fleet:
    return Fleet.from_options(config=args.config, known_hosts=args.known_hosts, db=args.db)


# ---------------------------------------------------------------------------------------------
# register-ssh


def _add_register(sub, files: argparse.ArgumentParser) -> None:
    reg = sub.add_parser(
        "register-ssh", parents=[files], help="register a GPU host reached over SSH",
        description=(
            "Check the key, fetch the host's SSH key (through the bastion when given) and pin it once you "
            "confirm its fingerprint, append the agent to ssh-agents.toml (comments kept), record it in the "
            "store and run one heartbeat."),
        epilog=(
            "examples:\n"
            "  hwledger fleet register-ssh --host root@gpu1.example.com --key ~/.ssh/id_ed25519 \\\n"
            "      --host-key-fingerprint SHA256:...   (as printed by ssh-keygen -lf on the host)\n"
            "  hwledger fleet register-ssh --host ubuntu@10.0.0.7 --key ~/.ssh/id_ed25519 \\\n"
            "      --bastion root@bastion.example.com --bastion-key ~/.ssh/bastion --accept-new-host-key"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reg.add_argument("--host", required=True, metavar="USER@HOST[:PORT]",
                     help="login and address of the GPU host (IPv6: user@[2001:db8::1]:22)")
    reg.add_argument("--key", required=True, metavar="PATH", help="private key to log in with")
    reg.add_argument("--name", metavar="NAME", help="agent name (default: the host)")
    reg.add_argument("--port", type=int, metavar="PORT", help="SSH port (default: from --host, else 22)")
    reg.add_argument("--bastion", metavar="USER@HOST[:PORT]", help="jump host that reaches the GPU host")
    reg.add_argument("--bastion-key", metavar="PATH", help="private key for the bastion (default: --key)")
    reg.add_argument("--gpu-query-cmd", metavar="CMD",
                     help=f"GPU query command (default: {DEFAULT_GPU_QUERY_CMD})")
    confirm = reg.add_mutually_exclusive_group()
    confirm.add_argument("--host-key-fingerprint", metavar="SHA256:...",
                         help="the host key fingerprint you checked out of band; pinned only if it matches")
    confirm.add_argument("--accept-new-host-key", action="store_true",
                         help="trust the key the host presents now (trust on first use), and the bastion's")
    reg.add_argument("--bastion-host-key-fingerprint", metavar="SHA256:...",
                     help="the bastion's host key fingerprint, when the bastion is not pinned yet")
    reg.add_argument("--replace", action="store_true",
                     help="re-register an existing agent of that name (e.g. after its host key changed)")
    reg.add_argument("--skip-heartbeat", action="store_true", help="do not run the first heartbeat")
    reg.set_defaults(func=cmd_register_ssh)


def _destination(text: str, option: str) -> tuple[str, str, int | None]:
    try:
        return parse_destination(text)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None


def _build_agent(args: argparse.Namespace, key: hostkeys.ClientKey,
                 bastion_key: hostkeys.ClientKey | None) -> agents_schema.Agent:
    user, host, port_in_host = _destination(args.host, "--host")
    if args.port is not None and port_in_host is not None and args.port != port_in_host:
        raise UserError(f"--host gives port {port_in_host} but --port gives {args.port}; give one of them")
    port = args.port or port_in_host or DEFAULT_SSH_PORT
    bastion = None
    if args.bastion:
        b_user, b_host, b_port = _destination(args.bastion, "--bastion")
        assert bastion_key is not None
        try:
            bastion = agents_schema.Bastion(hostname=b_host, ssh_user=b_user, ssh_key_path=str(bastion_key.path),
                                            ssh_port=b_port or DEFAULT_SSH_PORT)
        except ValueError as exc:
            raise UserError(f"--bastion: {exc}") from None
    name = args.name or host
    try:
        return agents_schema.Agent(
            name=name, hostname=host, ssh_user=user, ssh_key_path=str(key.path), ssh_port=port,
            gpu_query_cmd=args.gpu_query_cmd or DEFAULT_GPU_QUERY_CMD, bastion=bastion,
        )
    except ValueError as exc:
        hint = " (give --name)" if not args.name and str(exc).startswith("name") else ""
        raise UserError(f"{exc}{hint}") from None


def _resolve_ip(agent: agents_schema.Agent) -> str | None:
    """The address the host name resolves to here; None behind a bastion when it does not resolve."""
    try:
        infos = socket.getaddrinfo(agent.hostname, agent.ssh_port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        if agent.bastion is not None:
            return None  # an internal name only the bastion can resolve
        raise UserError(f"--host: cannot resolve {agent.hostname!r}: {exc.strerror or exc}") from None
    return infos[0][4][0] if infos else None


def _learn(agent: agents_schema.Agent, *, seed: list[tuple[str, hostkeys.HostKey]]) -> hostkeys.HostKey:
    return hostkeys.learn_host_key(agent, seed=seed,
                                   what=f"{agent.name} ({agent.ssh_user}@{agent.hostname}:{agent.ssh_port})")


def _learn_bastion(bastion: agents_schema.Bastion) -> hostkeys.HostKey:
    return hostkeys.learn_host_key(bastion, what=f"bastion {bastion.ssh_user}@{bastion.hostname}:{bastion.ssh_port}")


def _confirm_command(args: argparse.Namespace, target_fp: str | None, bastion_fp: str | None) -> str:
    argv = ["hwledger", "fleet", "register-ssh", "--host", args.host, "--key", args.key]
    for option, value in (("--name", args.name), ("--port", args.port), ("--bastion", args.bastion),
                          ("--bastion-key", args.bastion_key), ("--gpu-query-cmd", args.gpu_query_cmd),
                          ("--config", args.config), ("--known-hosts", args.known_hosts), ("--db", args.db)):
        if value is not None:
            argv += [option, str(value)]
    if args.replace:
        argv.append("--replace")
    if target_fp:
        argv += ["--host-key-fingerprint", target_fp]
    if bastion_fp:
        argv += ["--bastion-host-key-fingerprint", bastion_fp]
    return shlex.join(argv)


def _check_bastion_key(args: argparse.Namespace, fleet: Fleet, bastion: agents_schema.Bastion,
                       unconfirmed: list[str]) -> tuple[hostkeys.HostKey, bool]:
    """The bastion's key and whether it must be pinned now. Appends to `unconfirmed` when not confirmed."""
    alias = ssh.bastion_known_hosts_alias(bastion)
    presented = _learn_bastion(bastion)
    print(f"bastion {bastion.hostname}:{bastion.ssh_port} host key: {presented.describe()}")
    pinned = hostkeys.pinned_keys(fleet.known_hosts, alias)
    if pinned:
        if presented.blob not in {k.blob for k in pinned}:
            raise UserError(
                f"the bastion {bastion.hostname}:{bastion.ssh_port} now presents {presented.describe()}, which is "
                f"NOT the key pinned for it ({', '.join(k.fingerprint for k in pinned)}). Someone may be in between, "
                f"or the bastion was re-installed: check it out of band before doing anything else")
        return presented, False
    expected = args.bastion_host_key_fingerprint
    if expected:
        expected = hostkeys.normalize_fingerprint(expected, option="--bastion-host-key-fingerprint")
        if expected != presented.fingerprint:
            raise UserError(f"the bastion presents {presented.fingerprint}, not the expected {expected}: "
                            "nothing was pinned. Check the bastion's key out of band")
        return presented, True
    if args.accept_new_host_key:
        return presented, True
    unconfirmed.append(f"bastion {bastion.hostname}:{bastion.ssh_port}: {presented.describe()}")
    return presented, True


def cmd_register_ssh(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    key = hostkeys.check_private_key(args.key, option="--key")
    bastion_key = None
    if args.bastion:
        bastion_key = hostkeys.check_private_key(args.bastion_key or args.key, option="--bastion-key")
    elif args.bastion_key or args.bastion_host_key_fingerprint:
        raise UserError("--bastion-key and --bastion-host-key-fingerprint need --bastion")
    agent = _build_agent(args, key, bastion_key)
    existing = agents_file.read_agents(fleet.config)
    if any(a.name == agent.name for a in existing) and not args.replace:
        raise UserError(f"{fleet.config}: an agent named {agent.name!r} is already registered; choose another "
                        f"--name, or re-register it with --replace")
    fleet.policy()  # fail early on an unusable control dir / known_hosts path
    ip = _resolve_ip(agent)
    print(f"agent {agent.name}: {agent.ssh_user}@{agent.hostname}:{agent.ssh_port}"
          f"{f' ({ip})' if ip and ip != agent.hostname else ''}; key {key.fingerprint}")

    unconfirmed: list[str] = []
    seed: list[tuple[str, hostkeys.HostKey]] = []
    bastion_pin: hostkeys.HostKey | None = None
    if agent.bastion is not None:
        bastion_key_seen, must_pin = _check_bastion_key(args, fleet, agent.bastion, unconfirmed)
        seed = [(ssh.bastion_known_hosts_alias(agent.bastion), bastion_key_seen)]
        bastion_pin = bastion_key_seen if must_pin else None
    if unconfirmed:
        # The bastion is not trusted yet: do not go through it to the target.
        return _refuse_unconfirmed(args, unconfirmed, args.host_key_fingerprint,
                                   bastion_pin.fingerprint if bastion_pin else None)

    presented = _learn(agent, seed=seed)
    print(f"host key of {agent.name}: {presented.describe()}")
    if args.host_key_fingerprint:
        expected = hostkeys.normalize_fingerprint(args.host_key_fingerprint)
        if expected != presented.fingerprint:
            raise UserError(f"{agent.name} presents {presented.fingerprint}, not the expected {expected}: nothing "
                            "was pinned or registered. Someone may be in between, or you have the wrong "
                            "fingerprint: check the host's key out of band")
    elif not args.accept_new_host_key:
        unconfirmed.append(f"{agent.name}: {presented.describe()}")
        return _refuse_unconfirmed(args, unconfirmed, presented.fingerprint, args.bastion_host_key_fingerprint)

    agent = dataclasses.replace(agent, host_key_fingerprint=presented.fingerprint)
    agents_file.ensure_config_dir(fleet.config)
    if bastion_pin is not None:
        hostkeys.pin(fleet.known_hosts, ssh.bastion_known_hosts_alias(agent.bastion), [bastion_pin])
    hostkeys.pin(fleet.known_hosts, ssh.known_hosts_alias(agent), [presented])
    agents_file.append_agent(fleet.config, agent, replace=args.replace)
    with fleet.open_store() as store:
        store.upsert_agent(agent_record(agent, ip=ip, key_fingerprint=key.fingerprint,
                                        bastion_host_key_fingerprint=(
                                            seed[0][1].fingerprint if seed else None)))
        print(f"registered {agent.name} in {fleet.config}; host key pinned in {fleet.known_hosts}")
        if args.skip_heartbeat:
            return 0
        return _first_heartbeat(fleet, store, agent)


def _refuse_unconfirmed(args: argparse.Namespace, unconfirmed: list[str], target_fp: str | None,
                        bastion_fp: str | None) -> int:
    print("hwledger: not registered: these host keys are not confirmed yet:", file=sys.stderr)
    for line in unconfirmed:
        print(f"  {line}", file=sys.stderr)
    print("Check each fingerprint out of band (on the host: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
          "then confirm with:", file=sys.stderr)
    print(f"  {_confirm_command(args, target_fp, bastion_fp)}", file=sys.stderr)
    if not any(not line.startswith("bastion ") for line in unconfirmed):
        print("(the GPU host's own key is fetched through the bastion once the bastion is confirmed)", file=sys.stderr)
    print("or, trusting whatever answers now, add --accept-new-host-key", file=sys.stderr)
    return EXIT_HOST_KEY_UNCONFIRMED


def _first_heartbeat(fleet: Fleet, store: Store, agent: agents_schema.Agent) -> int:
    # The same transport `serve` uses by default: one probe over the connection just verified.
    transport = SshFanoutHeartbeat(fleet.policy())
    try:
        outcomes = transport.tick([agent], cancel=lambda: False)
    except HeartbeatRunError as exc:
        print(f"hwledger: first heartbeat could not run: {printable(exc)}", file=sys.stderr)
        return EXIT_HEARTBEAT_FAILED
    record_outcomes(store, outcomes)
    outcome = outcomes.get(agent.name)
    if outcome is None:
        print("hwledger: first heartbeat: no answer recorded", file=sys.stderr)
        return EXIT_HEARTBEAT_FAILED
    if not outcome.ok:
        print(f"hwledger: first heartbeat failed ({printable(outcome.reason)}): {printable(outcome.msg, limit=600)}",
              file=sys.stderr)
        print("The agent stays registered; `hwledger fleet serve` keeps trying.", file=sys.stderr)
        return EXIT_HEARTBEAT_FAILED
    gpus = (outcome.snapshot or {}).get("gpus") or []
    print(f"first heartbeat: {len(gpus)} GPU(s)")
    for gpu in gpus:
        print(f"  [{printable(gpu.get('index'))}] {printable(gpu.get('name'), limit=80)}: "
              f"{human_bytes(gpu.get('memory_free_bytes'))} free of {human_bytes(gpu.get('memory_total_bytes'))}")
    return 0


# ---------------------------------------------------------------------------------------------
# list / status / remove / serve


def cmd_list(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    configured = agents_file.read_agents(fleet.config)
    store = fleet.existing_store()
    rows = {}
    if store is not None:
        with store:
            rows = {row.name: row for row in store.list_agents()}
    elif configured:
        print(f"hwledger: {fleet.no_store_note()}", file=sys.stderr)
    items = []
    for agent in configured:
        row = rows.get(agent.name)
        bastion = agent.bastion
        items.append({
            "name": agent.name,
            "destination": f"{agent.ssh_user}@{agent.hostname}:{agent.ssh_port}",
            "bastion": f"{bastion.ssh_user}@{bastion.hostname}:{bastion.ssh_port}" if bastion else None,
            "ip": row.ip if row else None,
            "key_path": agent.ssh_key_path,
            "key_fingerprint": row.key_fingerprint if row else None,
            "host_key_fingerprint": agent.host_key_fingerprint or (row.host_key_fingerprint if row else None),
            "gpu_query_cmd": agent.gpu_query_cmd,
            "registered_at": row.registered_at if row else None,
            # Not in the store: in the file only (added by hand, or no store yet); the server records it
            # as pending when it first reads the file.
            "state": effective_state(row, args.stale_after) if row else "pending",
            "recorded_state": row.state if row else None,
        })
    if args.json:
        print(dumps(items))
        return 0
    if not items:
        print(f"no agents in {fleet.config}; add one with `hwledger fleet register-ssh`")
        return 0
    print(table([[printable(i["name"]), printable(i["destination"]), printable(i["bastion"] or "-"), i["state"],
                  printable(i["host_key_fingerprint"] or "-")] for i in items],
                ["AGENT", "DESTINATION", "VIA", "STATE", "HOST KEY"]))
    return 0


def _gpu_summary(gpus: list[dict]) -> str:
    if not gpus:
        return "-"
    names: dict[str, int] = {}
    for gpu in gpus:
        name = printable(gpu.get("name") or "?", limit=40)
        names[name] = names.get(name, 0) + 1
    return ", ".join(f"{count}x {name}" for name, count in names.items())


def cmd_status(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    store = fleet.existing_store()
    if store is None:
        print(f"hwledger: {fleet.no_store_note()}", file=sys.stderr)
        print("[]" if args.json else "no agents registered")
        return 0
    with store:
        items = status_items(store, args.stale_after)
    if args.json:
        print(dumps(items))
        return 0
    if not items:
        print("no agents registered; add one with `hwledger fleet register-ssh`")
        return 0
    rows = []
    for item in items:
        memory = "-"
        if item["gpus"]:
            memory = f"{human_bytes(item['memory_free_bytes'])} / {human_bytes(item['memory_total_bytes'])}"
        state = item["state"]
        if item["next_attempt_in_s"] is not None:
            state += f" (next try in {item['next_attempt_in_s']:.0f}s)"
        rows.append([printable(item["name"]), state, human_age(item["last_seen_age_s"]),
                     _gpu_summary(item["gpus"]), memory])
    print(table(rows, ["AGENT", "STATE", "LAST SEEN", "GPUS", "MEMORY FREE / TOTAL"]))
    for item in items:
        if item["reason"] and item["recorded_state"] != "online":
            print(f"{printable(item['name'])}: {item['recorded_state']} ({printable(item['reason'])}): "
                  f"{printable(item['msg'], limit=300)}")
    return 0


def _refuse_active_jobs(fleet: Fleet, name: str) -> None:
    with fleet.open_store() as store:
        active = store.list_jobs(agent=name, states=JOB_ACTIVE_STATES)
    if active:
        listing = ", ".join(f"{job.id} ({job.state})" for job in active)
        raise UserError(f"agent {name!r} has {len(active)} job(s) dispatched or running: {listing}. Wait for them "
                        f"(`hwledger job list --agent {name}`), cancel them (`hwledger job cancel ID`), or remove "
                        "the agent anyway with --force (the jobs are cancelled)")


def _bastion_still_used(configured: dict[str, agents_schema.Agent], agent: agents_schema.Agent) -> bool:
    """Whether another agent goes through the same bastion entry of known_hosts (same host and port,
    whatever its user or key)."""
    alias = ssh.bastion_known_hosts_alias(agent.bastion)
    return any(other.bastion is not None and ssh.bastion_known_hosts_alias(other.bastion) == alias
               for name, other in configured.items() if name != agent.name)


def cmd_remove(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    if not args.force:
        _refuse_active_jobs(fleet, args.name)
    configured = {a.name: a for a in agents_file.read_agents(fleet.config)}
    agent = configured.get(args.name)
    in_file = agents_file.remove_agent(fleet.config, args.name)
    unpinned = False
    if agent is not None:
        unpinned = hostkeys.unpin(fleet.known_hosts, ssh.known_hosts_alias(agent))
        if agent.bastion is not None and not _bastion_still_used(configured, agent):
            hostkeys.unpin(fleet.known_hosts, ssh.bastion_known_hosts_alias(agent.bastion))
    with fleet.open_store() as store:
        in_store = store.mark_agent_removed(args.name)
        cancelled, stopping = [], []
        for job in store.list_jobs(agent=args.name, states=["queued", *JOB_ACTIVE_STATES]):
            # Queued and dispatched jobs end at once; a running one is stopped by the server.
            (cancelled if store.request_cancel(job.id) == "cancelled" else stopping).append(job.id)
    if not (in_file or in_store):
        raise UserError(f"no agent named {args.name!r} in {fleet.config} or the store; see `hwledger fleet list`")
    print(f"removed {args.name}"
          f"{f' from {fleet.config}' if in_file else ''}"
          f"{'; host key unpinned' if unpinned else ''}"
          f"{f'; {len(cancelled)} job(s) cancelled' if cancelled else ''}"
          f"{f'; {len(stopping)} running job(s) asked to stop' if stopping else ''}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not math.isfinite(args.interval) or not 0 < args.interval <= MAX_INTERVAL_S:
        raise UserError(f"--interval must be a finite number of seconds above 0 and at most {MAX_INTERVAL_S}, "
                        f"got {args.interval}")
    try:
        probe.check_timeout(args.query_timeout)
    except ValueError as exc:
        raise UserError(f"--query-timeout: {exc}") from None
    if args.max_ticks is not None and args.max_ticks < 1:
        raise UserError("--max-ticks must be at least 1")
    if args.max_parallel_jobs < 1:
        raise UserError("--max-parallel-jobs must be at least 1")
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    # Third-party loggers stay at INFO at most: debug output of libraries may carry secrets.
    for name in ("ansible_runner",):
        logging.getLogger(name).setLevel(max(logging.INFO, getattr(logging, args.log_level)))
    if args.max_parallel < 1:
        raise UserError("--max-parallel must be at least 1")
    from hwledger.server import Server  # pylint: disable=import-outside-toplevel  # the one importer of the loop

    fleet = _fleet(args)
    companions = fleet_watch.serve_companions(args, fleet)
    transport = None  # Server's default: the ansible-runner heartbeat
    if args.transport == "fanout":
        transport = SshFanoutHeartbeat(fleet.policy(), query_timeout_s=args.query_timeout,
                                       max_parallel=args.max_parallel)
    server = Server(fleet, interval_s=args.interval, transport=transport,
                    max_parallel_jobs=args.max_parallel_jobs, query_timeout_s=args.query_timeout,
                    companions=companions)
    return server.run(once=args.once, max_ticks=args.max_ticks)
