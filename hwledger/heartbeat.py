"""Heartbeats: the transport protocol, the Ansible transport, agent states, and recording outcomes.

A transport runs one heartbeat over a set of agents and answers with each host's ``probe_outcome.ProbeOutcome``
(the one outcome type, whichever way the host was asked). Two transports exist: ``SshFanoutHeartbeat``
(``hwledger.fanout``, the default: the probe over reused OpenSSH masters, all hosts at once) and
``AnsibleHeartbeat`` here (the ``hwledger.fleet.heartbeat_facts`` playbook through ansible-runner). Either
way the same probe runs and the same parser reads it, so a host ends in the same state whichever transport asked.

Agent states: `pending` (registered, never answered), `online`, `stale` (1 or 2 missed heartbeats),
`offline` (3 or more), `error` (the host answers but its GPU tool fails, or no host key is pinned for
it: the message says to register it), `host_key_changed` (the host presented another key than the
pinned one: no heartbeat, no job, until it is registered again).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents, hostvars, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger import hostkeys
from hwledger.ansible_runs import AnsibleRuns, PlaybookRun
from hwledger.errors import UserError
from hwledger.store import AgentRow, AgentUpdate, StateChange, Store, StoreError

log = logging.getLogger("hwledger.heartbeat")

DEFAULT_QUERY_TIMEOUT_S = 10
OFFLINE_AFTER_MISSES = 3
HEARTBEAT_PLAYBOOK = "hwledger.fleet.heartbeat_facts"
# The playbook's run-wide CI check (fail when asked); serve reads every host's outcome instead.
HEARTBEAT_SKIP_TAGS = "hwledger_ci"

BLOCKING_REASONS = frozenset({"host_key_changed"})
# A problem on this side (a private key ssh cannot use): the agent is in error, the host is not blamed.
KEY_UNUSABLE = "key_unusable"
BASTION_CHECK_TIMEOUT_S = 5
# The host is there, but did not run this probe: not a miss, not a new state.
NEUTRAL_REASONS = frozenset({"probe_busy"})
# Offline agents are dialled again after this long, doubling up to the maximum (reset when one answers).
BACKOFF_FIRST_S = 30
BACKOFF_MAX_S = 300
# No key is pinned for the host (ssh: "No ... host key is known"): nothing is blocked, since nothing was
# ever trusted, but the agent cannot be reached until someone registers it (the message says how).
HOST_KEY_UNKNOWN = "host_key_unknown"
HOST_KEY_UNKNOWN_MSG = "no pinned host key: run hwledger fleet register-ssh (--replace) for this agent"

OnOutcome = Callable[[str, ProbeOutcome], None]


class HeartbeatRunError(Exception):
    """The heartbeat run itself failed (no host was asked): a controller problem, not a host's."""


class HeartbeatTransport(Protocol):
    """Runs one heartbeat over a set of agents. Hosts missing from the answer were not asked (run
    cancelled, controller failure) and keep their state.

    A transport that learns outcomes one by one calls ``on_outcome(name, outcome)`` as each arrives and
    ``on_progress()`` every fraction of a second while hosts are still out, so the caller can record the
    answers while slow hosts still hold the tick open. `budget_s` is how long the tick may wait for new
    connections (hosts that have not answered lately); a transport that can leave them running in the
    background reports them later (the fan-out does), one that cannot ignores it. The agents named in
    `liveness` get a liveness check instead of the GPU query: an ``ok`` outcome without a snapshot.
    """

    def tick(self, agents: Sequence[Agent], *, cancel: Callable[[], bool], on_outcome: OnOutcome | None = None,
             on_progress: Callable[[], None] | None = None, budget_s: float | None = None,
             liveness: Collection[str] = ()) -> dict[str, ProbeOutcome]:
        ...


class AnsibleHeartbeat:
    """The heartbeat as `ansible-playbook hwledger.fleet.heartbeat_facts`, through the app's runner wrapper.

    That playbook is the lean machine entry (one task, literal keywords, no summary): a tick costs about a
    one-task raw play. The knobs go as extra vars, which the gpu_query action reads itself.
    """

    def __init__(self, runs: AnsibleRuns, policy: ssh.SshPolicy, *,
                 query_timeout_s: int = DEFAULT_QUERY_TIMEOUT_S, host_metrics: bool = True):
        self.runs = runs
        self.policy = policy
        self.query_timeout_s = query_timeout_s
        self.host_metrics = host_metrics

    def tick(self, agents: Sequence[Agent], *, cancel: Callable[[], bool], on_outcome: OnOutcome | None = None,
             on_progress: Callable[[], None] | None = None, budget_s: float | None = None,
             liveness: Collection[str] = ()) -> dict[str, ProbeOutcome]:
        del on_progress, budget_s  # the outcomes are read when the run ends; a run cannot leave hosts behind
        if not agents:
            return {}
        # Each agent's own query_timeout_s reaches gpu_query through its hwledger_agent host var; the
        # liveness checks through hwledger_liveness_check. The run-wide knobs are extra vars.
        run = self.runs.run_playbook(
            HEARTBEAT_PLAYBOOK,
            inventory=hostvars.inventory(agents, self.policy, liveness=liveness),
            extravars={"hwledger_gpu_query_timeout": self.query_timeout_s,
                       "hwledger_host_metrics": self.host_metrics},
            cancel=cancel,
            label="heartbeat",
            skip_tags=HEARTBEAT_SKIP_TAGS,
        )
        outcomes = self.outcomes(run)
        if not outcomes and run.status not in ("canceled",):
            raise HeartbeatRunError(run.failure_text())
        if on_outcome is not None:
            for name, outcome in outcomes.items():
                on_outcome(name, outcome)
        return outcomes

    @staticmethod
    def outcomes(run: PlaybookRun) -> dict[str, ProbeOutcome]:
        found: dict[str, ProbeOutcome] = {}
        for host, events in run.host_events.items():
            for event in events:
                if event.event == "runner_on_unreachable":
                    found[host] = ProbeOutcome.unreachable(str(event.res.get("msg") or ""), agent=host)
                    break
                if event.action.endswith("gpu_query"):
                    found[host] = ProbeOutcome.from_module_result(event.res)
                    break
        return found


# ---------------------------------------------------------------------------------------------
# Agent states


def decide_agent_state(row: AgentRow, outcome: ProbeOutcome, now: datetime | None = None) -> AgentUpdate:
    """The 3-miss rule and friends: the state an agent moves to after one heartbeat."""
    now = now or datetime.now(timezone.utc)
    if outcome.ok:
        return _answered(row, outcome)
    reason = outcome.reason or "error"
    msg = outcome.msg or None
    if reason in BLOCKING_REASONS:
        return AgentUpdate("host_key_changed", row.consecutive_misses, reason, msg)
    if reason == HOST_KEY_UNKNOWN:
        detail = f" ({msg})" if msg else ""
        return AgentUpdate("error", row.consecutive_misses, reason, HOST_KEY_UNKNOWN_MSG + detail)
    if reason == KEY_UNUSABLE:
        return AgentUpdate("error", row.consecutive_misses, reason, msg)
    if reason in NEUTRAL_REASONS:
        # The host is there, and another poller is running its GPU tool right now (single flight): neither
        # a miss nor a new state, just the reason. (A tool left over from an earlier probe, stuck in the
        # driver, is `tool_still_running`: an error like any failing tool.)
        return AgentUpdate(row.state, row.consecutive_misses, reason, msg, seen=True,
                           next_attempt_at=row.next_attempt_at)
    if outcome.missed:
        misses = row.consecutive_misses + 1
        if misses >= OFFLINE_AFTER_MISSES:
            state = "offline"
        elif row.last_seen is None:
            state = "pending"
        else:
            state = "stale"
        return AgentUpdate(state, misses, reason, msg, next_attempt_at=next_attempt(misses, now))
    # The host answered; its GPU tool failed.
    return AgentUpdate("error", 0, reason, msg, seen=True)


class QueryPacing:
    """Which agents run their GPU tool this tick. An agent with `min_query_interval_s` gets a liveness
    check (the same exec without the tool) until that long has passed since its tool last ran: a tool
    that is slow or fragile when called often (some drivers hang under frequent NVML calls) runs at its
    own pace, while the heartbeat still says every tick whether the host is there. Kept in memory: a
    restarted server queries every agent at its first tick."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last_run: dict[str, float] = {}

    def liveness_only(self, agents: Sequence[Agent]) -> set[str]:
        now = self.clock()
        return {agent.name for agent in agents if agent.min_query_interval_s
                and now - self._last_run.get(agent.name, float("-inf")) < agent.min_query_interval_s}

    def note(self, outcomes: Mapping[str, ProbeOutcome], liveness: Collection[str]) -> None:
        """Remember when each agent's tool ran: an answer to a GPU query (failed or not), not a miss."""
        now = self.clock()
        for name, outcome in outcomes.items():
            if name not in liveness and not outcome.missed:
                self._last_run[name] = now


def next_attempt(misses: int, now: datetime) -> str | None:
    """When an agent that missed `misses` heartbeats in a row is dialled next: every tick until it is
    offline, then after BACKOFF_FIRST_S, doubling up to BACKOFF_MAX_S. Dead hosts then cost almost nothing,
    and a host that comes back is heard from within BACKOFF_MAX_S."""
    if misses < OFFLINE_AFTER_MISSES:
        return None
    delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(misses - OFFLINE_AFTER_MISSES, 16))
    return (now + timedelta(seconds=delay)).isoformat(timespec="milliseconds")


def _answered(row: AgentRow, outcome: ProbeOutcome) -> AgentUpdate:
    if outcome.snapshot is None:
        # A liveness answer between two GPU queries (min_query_interval_s): the host is there, the GPUs were
        # not asked, so a degraded agent stays degraded.
        state = row.state if row.state == "degraded" else "online"
        return AgentUpdate(state, 0, row.state_reason if state == "degraded" else None,
                           row.state_msg if state == "degraded" else None, seen=True)
    gpus = [gpu for gpu in outcome.snapshot.get("gpus") or [] if isinstance(gpu, dict)]
    seen = {_gpu_key(gpu): gpu for gpu in gpus}
    expected = _expected_gpus(row)
    missing = [gpu for gpu in expected if gpu["key"] not in seen] if expected is not None else []
    if missing:
        names = "; ".join(f"GPU {gpu.get('index')} ({gpu.get('name') or 'unknown'}, {gpu['key']})" for gpu in missing)
        return AgentUpdate(
            "degraded", 0, "gpu_missing",
            f"{len(missing)} of the {len(expected)} GPUs this agent had did not answer: {names}. A GPU that fell "
            "off the bus needs the host looked at (dmesg, nvidia-smi -q); if it was removed on purpose, register "
            "the agent again (hwledger fleet register-ssh --replace) to forget it", seen=True)
    grown = expected is None or len(seen) > len(expected)
    learned = json.dumps([{"key": key, "index": gpu.get("index"), "name": gpu.get("name")}
                          for key, gpu in seen.items()], sort_keys=True) if grown else None
    return AgentUpdate("online", 0, seen=True, expected_gpus=learned)


def _gpu_key(gpu: dict) -> str:
    """A GPU's identity across heartbeats: its UUID where the tool reports one, else its index."""
    uuid = gpu.get("uuid")
    return str(uuid) if isinstance(uuid, str) and uuid else f"index {gpu.get('index')}"


def _expected_gpus(row: AgentRow) -> list[dict] | None:
    try:
        expected = json.loads(row.expected_gpus) if row.expected_gpus else None
    except ValueError:
        return None
    return expected if isinstance(expected, list) else None


def record_outcomes(store: Store, outcomes: Mapping[str, ProbeOutcome]) -> list[StateChange]:
    """Write one batch of outcomes (snapshots, states, events) to the store in one transaction."""
    return store.record_heartbeats(outcomes, decide_agent_state)


class TickRecorder:
    """Writes a tick's outcomes to the store while the tick runs, in batches at most FLUSH_EVERY_S
    apart (``on_outcome`` / ``on_progress`` of the transport protocol). A host that hangs until its
    deadline then no longer holds back the others' snapshots: they are in the store within a fraction
    of a second of their answer, not at the end of the tick.

    On the way, an unreachable host's outcome is explained where this side can tell why (`explain`): a
    private key ssh cannot use is named at once; an agent behind a bastion is held until the end of the
    tick, when the bastion's own host key is checked (`check_bastions`)."""

    FLUSH_EVERY_S = 0.25

    def __init__(self, store: Store, agents: Mapping[str, Agent] | None = None) -> None:
        self.store = store
        self.agents = agents or {}
        self.pending: dict[str, ProbeOutcome] = {}
        self.held: dict[str, ProbeOutcome] = {}
        self.outcomes: dict[str, ProbeOutcome] = {}   # what was (or will be) recorded, explained
        self.changes: list[StateChange] = []
        self._last_flush = time.monotonic()

    def on_outcome(self, name: str, outcome: ProbeOutcome) -> None:
        agent = self.agents.get(name)
        if agent is not None:
            outcome = explain(agent, outcome)
            if needs_bastion_check(agent, outcome):
                self.held[name] = outcome
                return
        self.pending[name] = self.outcomes[name] = outcome

    def on_progress(self) -> None:
        if self.pending and time.monotonic() - self._last_flush >= self.FLUSH_EVERY_S:
            try:
                self.flush()
            except StoreError as exc:  # the end of the tick records what is still pending
                log.warning("recording heartbeats during the tick failed (retried at its end): %s", exc)

    def finish(self, outcomes: Mapping[str, ProbeOutcome], policy: ssh.SshPolicy | None) -> dict[str, ProbeOutcome]:
        """At the end of the tick: take the outcomes the transport returned without reporting them one by
        one, settle the held ones (bastion checks), record the rest. Returns every outcome, explained."""
        for name, outcome in outcomes.items():
            if name not in self.outcomes and name not in self.held:
                self.on_outcome(name, outcome)
        if self.held:
            checked = check_bastions({name: (self.agents[name], o) for name, o in self.held.items()}, policy)
            self.pending.update(checked)
            self.outcomes.update(checked)
            self.held = {}
        self.flush()
        return dict(self.outcomes)

    def flush(self) -> None:
        batch = self.pending
        self._last_flush = time.monotonic()
        if batch:
            self.changes += record_outcomes(self.store, batch)
            self.pending = {}


# ---------------------------------------------------------------------------------------------
# Explaining an unreachable host from this side


def explain(agent: Agent, outcome: ProbeOutcome) -> ProbeOutcome:
    """An unreachable host whose private key (or its bastion's) ssh cannot use: say which file and what
    is wrong with it (ssh itself only says "Permission denied (publickey)"). A local stat, cheap; and when
    the host did refuse the login, a check that ssh can load the key at all (a passphrase it cannot ask
    for, not a private key): one ssh-keygen run, on that failure only."""
    if outcome.reason != "unreachable":
        return outcome
    for field_name, path, whose in agents.agent_key_files(agent):
        problem = agents.key_file_problem(path, field_name, whose)
        if problem is None and "Permission denied" in f"{outcome.msg}\n{outcome.output_head}":
            try:
                hostkeys.check_private_key(path, option=field_name)
            except UserError as exc:
                problem = f"{exc} ({whose}'s key)"
        if problem is not None:
            return ProbeOutcome(False, reason=KEY_UNUSABLE, msg=f"{agent.name}: {problem}", rc=outcome.rc,
                                output_head=outcome.output_head, answered=False)
    return outcome


def needs_bastion_check(agent: Agent, outcome: ProbeOutcome) -> bool:
    return agent.bastion is not None and outcome.reason == "unreachable"


def check_bastions(held: Mapping[str, tuple[Agent, ProbeOutcome]], policy: ssh.SshPolicy | None
                   ) -> dict[str, ProbeOutcome]:
    """For agents behind a bastion that could not be reached: check each bastion's own host key (once per
    bastion, in parallel). A bastion whose key changed blocks its agents (`host_key_changed`, naming the
    bastion); one that does not answer either is named in the message. With ControlPersist, OpenSSH sends
    the ProxyCommand's messages to /dev/null, so without this a re-keyed bastion reads as "unreachable"."""
    if policy is None:
        return {name: outcome for name, (_agent, outcome) in held.items()}
    bastions = {ssh.bastion_known_hosts_alias(agent.bastion): agent.bastion for agent, _o in held.values()}
    with ThreadPoolExecutor(max_workers=min(16, len(bastions))) as pool:
        verdicts = dict(zip(bastions, pool.map(
            lambda bastion: hostkeys.check_host_key(bastion, policy, timeout_s=BASTION_CHECK_TIMEOUT_S),
            bastions.values())))
    explained = {}
    for name, (agent, outcome) in held.items():
        bastion = agent.bastion
        alias = ssh.bastion_known_hosts_alias(bastion)
        reason, said = verdicts[alias]
        where = f"the bastion {bastion.ssh_user}@{bastion.hostname}:{bastion.ssh_port}"
        last = (said.strip().splitlines() or ["no message"])[-1]
        if reason == "host_key_changed":
            explained[name] = ProbeOutcome(
                False, reason=reason, answered=False, rc=outcome.rc,
                msg=f"{name}: {where} presented a host key that is not the one pinned for it (alias {alias} in "
                    "hwledger's known_hosts): nothing was sent through it. Check the bastion out of band, then "
                    f"pin its new key (hwledger fleet register-ssh --replace for this agent, with --bastion): {last}")
        elif reason == "host_key_unknown":
            explained[name] = ProbeOutcome(
                False, reason=reason, answered=False, rc=outcome.rc,
                msg=f"{name}: no host key is pinned for {where} (alias {alias}); register the agent again "
                    f"(hwledger fleet register-ssh --replace, with --bastion): {last}")
        elif reason == "unreachable":
            explained[name] = ProbeOutcome(
                False, reason="unreachable", answered=False, rc=outcome.rc, output_head=outcome.output_head,
                msg=f"{outcome.msg} ({where} does not answer either: {last})")
        else:
            explained[name] = outcome  # the bastion is fine: the agent behind it is the one that is down
    return explained
