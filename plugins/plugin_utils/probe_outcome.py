# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""A host's answer to one probe (``ProbeOutcome``), whichever way it was asked, and the one classifier of
ssh's own failure messages.

``probe`` builds the script and evaluates its exec into a ProbeOutcome; the ``gpu_query`` action turns one
into its module result and the app reads it back (``module_result`` / ``from_module_result``), so both
transports hand the server the same object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ansible_collections.hwledger.fleet.plugins.plugin_utils import telemetry
from ansible_collections.hwledger.fleet.plugins.plugin_utils.tool_parsing import clean_text

# ssh's own messages (exit status 255) about host keys. OpenSSH ends both a changed and an unknown key
# with "Host key verification failed."; only a changed one comes with the banner (and the "Offending
# ... key in FILE:LINE" line, which names the entry that no longer matches).
_HOST_KEY_CHANGED_RE = re.compile(
    r"REMOTE HOST IDENTIFICATION HAS CHANGED|^Offending (?:[A-Za-z0-9-]{1,32} key|key for IP) in ", re.MULTILINE)
_HOST_KEY_FAILED_MARKER = "Host key verification failed"
# ssh's messages come first and are short: a longer text is only searched this far.
_SSH_MESSAGE_CHARS = 65536

# The exec itself did not come back before the controller's deadline: the host did not answer. The
# module result says "timeout" (its documented reason) with ``answered: false``; the app counts it as a
# missed heartbeat, as it does "unreachable".
NO_ANSWER = "no_answer"
MISS_REASONS = frozenset({"unreachable", NO_ANSWER})


@dataclass(frozen=True)
class ProbeOutcome:
    """One host's answer to one probe, whichever way it was asked (the ``gpu_query`` action, the app's
    fan-out, ``hwledger gpu parse``): a snapshot, or a classified failure.

    ``answered`` is False when the host did not run the probe: it could not be reached (or its host key
    was refused), or the exec did not come back before the controller's deadline. ``host`` carries the
    host metrics that came back with a failure. Every string is clean text (``tool_parsing.clean_text``).
    ``job_logs``: what the exec read of running jobs' logs when it was asked to (``job_log_read.LogChunk``,
    raw bytes: the job's output is data for the job log, never for a message).
    """

    ok: bool
    snapshot: dict | None = None
    reason: str | None = None
    msg: str = ""
    rc: int | None = None
    output_head: str = ""
    host: dict | None = None
    answered: bool = True
    job_logs: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "msg", clean_text(self.msg))
        object.__setattr__(self, "output_head", clean_text(self.output_head))

    @classmethod
    def success(cls, snapshot: dict) -> "ProbeOutcome":
        return cls(True, snapshot=snapshot)

    @classmethod
    def failure(cls, reason: str, msg: str, *, agent: str, rc: int | None = None, head: str = "",
                host: dict | None = None, answered: bool = True) -> "ProbeOutcome":
        """A failure; ``msg`` is prefixed with the agent's name (once)."""
        if reason != NO_ANSWER and reason not in telemetry.REASONS:
            raise ValueError("unknown failure reason %r" % (reason,))
        if agent and not msg.startswith("%s: " % agent):
            msg = "%s: %s" % (agent, msg)
        return cls(False, reason=reason, msg=msg, rc=rc, output_head=head, host=host, answered=answered)

    @classmethod
    def from_query_failure(cls, failure: telemetry.QueryFailure, *, agent: str,
                           host: dict | None = None) -> "ProbeOutcome":
        return cls.failure(failure.reason, failure.msg, agent=agent, rc=failure.rc, head=failure.output_head,
                           host=host)

    @classmethod
    def unreachable(cls, msg: str, *, agent: str = "") -> "ProbeOutcome":
        """The connection failed before the probe ran (Ansible's "unreachable"): host-key trouble or not,
        classified by the one classifier of ssh's messages."""
        reason = classify_ssh_failure(msg) or "unreachable"
        return cls(False, reason=reason, msg=msg[:MAX_MSG_CHARS], answered=False)

    def module_result(self) -> dict:
        """The ``gpu_query`` module result: the snapshot as facts, ``alive`` (with ``host``) for a liveness
        check, or ``failed`` with ``msg``, ``reason``, ``rc``, ``output_head`` and ``answered`` (plus ``host``
        when host metrics came back)."""
        if self.ok and self.snapshot is None:  # a liveness check: no facts, so a cached snapshot stays
            return {"changed": False, "alive": True, "host": self.host}
        if self.ok:
            return {"changed": False, "ansible_facts": {"hwledger_snapshot": self.snapshot}}
        result = {
            "failed": True,
            "msg": self.msg,
            "reason": "timeout" if self.reason == NO_ANSWER else self.reason,
            "rc": self.rc,
            "output_head": self.output_head,
            "answered": self.answered,
        }
        if self.host is not None:
            result["host"] = self.host
        return result

    @classmethod
    def from_module_result(cls, result: dict) -> "ProbeOutcome":
        """The inverse of ``module_result`` (the app reads the action's result from Ansible's events)."""
        facts = result.get("ansible_facts") or {}
        snapshot = facts.get("hwledger_snapshot") if isinstance(facts, dict) else None
        if not result.get("failed") and isinstance(snapshot, dict):
            return cls.success(snapshot)
        if not result.get("failed") and result.get("alive") is True:
            host = result.get("host") if isinstance(result.get("host"), dict) else None
            return cls(True, snapshot=None, host=host)
        reason = str(result.get("reason") or "error")
        if isinstance(result.get("answered"), bool):
            answered = result["answered"]
        else:  # a result without the key (an older collection): an exec timeout has no rc and no host metrics
            answered = not (reason == "timeout" and result.get("rc") is None and "host" not in result)
        if reason == "timeout" and not answered:
            reason = NO_ANSWER
        host = result.get("host") if isinstance(result.get("host"), dict) else None
        rc = result.get("rc") if isinstance(result.get("rc"), int) else None
        return cls(False, reason=reason, msg=str(result.get("msg") or "")[:MAX_MSG_CHARS], rc=rc,
                   output_head=str(result.get("output_head") or ""), host=host, answered=answered)

    @property
    def missed(self) -> bool:
        """The host did not answer (a missed heartbeat), as opposed to a GPU tool failing on a host that did."""
        return not self.ok and self.reason in MISS_REASONS


# A failure message is for people; this much of one is kept wherever it is stored.
MAX_MSG_CHARS = 2000


def classify_ssh_failure(stderr: str) -> str | None:
    """The failure reason for what ssh printed when it failed: ``"host_key_changed"``, ``"host_key_unknown"``
    or None (not a host key problem: the caller reports it as ``"unreachable"``).

    ``host_key_changed`` needs OpenSSH's "REMOTE HOST IDENTIFICATION HAS CHANGED" banner or its
    "Offending ... key" line; "Host key verification failed" without them means no key is pinned for the
    host (or ssh gave no detail), ``host_key_unknown``. Works on ssh's stderr as it is and on a message
    that embeds it (Ansible's "Failed to connect to the host via ssh: ..."); only its first 64 KiB are read.
    """
    text = (stderr or "")[:_SSH_MESSAGE_CHARS]
    if _HOST_KEY_CHANGED_RE.search(text):
        return "host_key_changed"
    if _HOST_KEY_FAILED_MARKER in text:
        return "host_key_unknown"
    return None
