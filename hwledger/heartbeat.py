"""Heartbeats: the transport protocol, the Ansible transport, agent states, and recording outcomes.

A transport runs one heartbeat over a set of agents and answers with each host's ``probe.ProbeOutcome``
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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ansible_collections.hwledger.fleet.plugins.plugin_utils import hostvars, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe import ProbeOutcome

from hwledger.ansible_runs import AnsibleRuns, PlaybookRun
from hwledger.store import AgentRow, AgentUpdate, StateChange, Store, StoreError

log = logging.getLogger("hwledger.heartbeat")

DEFAULT_QUERY_TIMEOUT_S = 10
OFFLINE_AFTER_MISSES = 3
HEARTBEAT_PLAYBOOK = "hwledger.fleet.heartbeat_facts"
# The playbook's run-wide CI check (fail when asked); serve reads every host's outcome instead.
HEARTBEAT_SKIP_TAGS = "hwledger_ci"

BLOCKING_REASONS = frozenset({"host_key_changed"})
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
    answers while slow hosts still hold the tick open.
    """

    def tick(self, agents: Sequence[Agent], *, cancel: Callable[[], bool], on_outcome: OnOutcome | None = None,
             on_progress: Callable[[], None] | None = None) -> dict[str, ProbeOutcome]:
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
             on_progress: Callable[[], None] | None = None) -> dict[str, ProbeOutcome]:
        del on_progress  # the outcomes are read when the run ends
        if not agents:
            return {}
        run = self.runs.run_playbook(
            HEARTBEAT_PLAYBOOK,
            inventory=hostvars.inventory(agents, self.policy),
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


def decide_agent_state(row: AgentRow, outcome: ProbeOutcome) -> AgentUpdate:
    """The 3-miss rule and friends: the state an agent moves to after one heartbeat."""
    if outcome.ok:
        return AgentUpdate("online", 0, seen=True)
    reason = outcome.reason or "error"
    msg = outcome.msg or None
    if reason in BLOCKING_REASONS:
        return AgentUpdate("host_key_changed", row.consecutive_misses, reason, msg)
    if reason == HOST_KEY_UNKNOWN:
        detail = f" ({msg})" if msg else ""
        return AgentUpdate("error", row.consecutive_misses, reason, HOST_KEY_UNKNOWN_MSG + detail)
    if outcome.missed:
        misses = row.consecutive_misses + 1
        if misses >= OFFLINE_AFTER_MISSES:
            state = "offline"
        elif row.last_seen is None:
            state = "pending"
        else:
            state = "stale"
        return AgentUpdate(state, misses, reason, msg)
    # The host answered; its GPU tool failed.
    return AgentUpdate("error", 0, reason, msg, seen=True)


def record_outcomes(store: Store, outcomes: Mapping[str, ProbeOutcome]) -> list[StateChange]:
    """Write one batch of outcomes (snapshots, states, events) to the store in one transaction."""
    return store.record_heartbeats(outcomes, decide_agent_state)


class TickRecorder:
    """Writes a tick's outcomes to the store while the tick runs, in batches at most FLUSH_EVERY_S
    apart (``on_outcome`` / ``on_progress`` of the transport protocol). A host that hangs until its
    deadline then no longer holds back the others' snapshots: they are in the store within a fraction
    of a second of their answer, not at the end of the tick."""

    FLUSH_EVERY_S = 0.25

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: dict[str, ProbeOutcome] = {}
        self.recorded: set[str] = set()
        self.changes: list[StateChange] = []
        self._last_flush = time.monotonic()

    def on_outcome(self, name: str, outcome: ProbeOutcome) -> None:
        self.pending[name] = outcome

    def on_progress(self) -> None:
        if self.pending and time.monotonic() - self._last_flush >= self.FLUSH_EVERY_S:
            try:
                self.flush()
            except StoreError as exc:  # the end of the tick records what is still pending
                log.warning("recording heartbeats during the tick failed (retried at its end): %s", exc)

    def flush(self) -> None:
        batch = self.pending
        self._last_flush = time.monotonic()
        if batch:
            self.changes += record_outcomes(self.store, batch)
            self.pending = {}
            self.recorded.update(batch)
