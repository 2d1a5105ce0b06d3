# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Action plugin for hwledger.fleet.gpu_query: one exec over the host's connection, parsed here.

A thin adapter: the script and its evaluation live in plugin_utils/probe.py (shared with the app's
direct-ssh heartbeat and ``hwledger gpu parse``); the documentation is plugins/modules/gpu_query.py.
"""

from __future__ import annotations

import time

from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.modules import gpu_query as gpu_query_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import hostvars, module_doc, probe, probe_outcome, processes
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD

display = Display()

# The options as ansible-doc shows them (plugins/modules/gpu_query.py): one spec, never two.
ARGUMENT_SPEC = module_doc.argument_spec(gpu_query_doc.DOCUMENTATION)
DEFAULT_TIMEOUT_S = 10


def summary(host: str, outcome: probe_outcome.ProbeOutcome) -> str:
    """The one line the heartbeat playbook prints for a host that answered (or failed to)."""
    if not outcome.ok:
        msg = outcome.msg or "no message"
        if msg.startswith(host + ": "):
            msg = msg[len(host) + 2:]
        reason = "timeout" if outcome.reason == probe_outcome.NO_ANSWER else (outcome.reason or "error")
        return "%s: FAILED (%s): %s" % (host, reason, msg)
    snapshot = outcome.snapshot
    if snapshot is None:  # a liveness check: the host answered; its GPU tool was not run this time
        parts = ["%s: alive (GPU query skipped: its min_query_interval_s has not passed)" % host]
        _add_load(parts, outcome.host)
        return "; ".join(parts)
    parts = ["%s: %d GPU(s) (%s, %s ms)" % (host, len(snapshot["gpus"]), snapshot["backend"], snapshot["query_ms"])]
    for gpu in snapshot["gpus"]:
        free, total = gpu.get("memory_free_bytes"), gpu.get("memory_total_bytes")
        if _is_number(free) and _is_number(total):
            memory = "%d of %d MiB free" % (int(free / 1048576), int(total / 1048576))
        else:
            memory = "memory unknown"
        health = "" if gpu.get("health") == "ok" else " (%s)" % gpu.get("health")
        parts.append("[%s] %s: %s%s" % (gpu.get("index"), gpu.get("name"), memory, health))
    _add_load(parts, snapshot.get("host"))
    return "; ".join(parts)


def _add_load(parts: list, host_metrics) -> None:
    if isinstance(host_metrics, dict) and _is_number(host_metrics.get("load1")):
        load = "load %s" % host_metrics["load1"]
        if _is_number(host_metrics.get("cpu_count")):
            load += " on %s CPUs" % host_metrics["cpu_count"]
        available, total = host_metrics.get("mem_available_bytes"), host_metrics.get("mem_total_bytes")
        if _is_number(available) and _is_number(total):
            load += ", %s of %s GiB memory available" % (round(available / 1073741824, 1), round(total / 1073741824, 1))
        parts.append(load)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ActionModule(ActionBase):
    """Run the probe script with the host's connection and return the snapshot as facts."""

    TRANSFERS_FILES = False
    _requires_connection = True
    _supports_check_mode = True  # the query only reads
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp  # nothing is transferred

        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        agent = self._agent_name(task_vars)
        try:
            timeout = args["timeout"]
            if timeout is None:
                timeout = self._agent_timeout(task_vars)
            if timeout is None:
                timeout = self._knob(task_vars, "hwledger_gpu_query_timeout", DEFAULT_TIMEOUT_S, int)
            host_metrics = args["host_metrics"]
            if host_metrics is None:
                host_metrics = self._knob(task_vars, "hwledger_host_metrics", True, boolean)
            query = not self._knob(task_vars, hostvars.LIVENESS_VAR, False, boolean)
            cmd = args["cmd"] if args["cmd"] is not None else self._host_command(task_vars)
            probe.check_timeout(timeout)
            script = probe.remote_script(cmd, timeout_s=timeout, host_metrics=host_metrics, query=query)
        except ValueError as exc:
            result.update(failed=True, msg="hwledger.fleet.gpu_query on %s: %s" % (agent, exc))
            return result

        started = time.time()
        executed = self._execute_bounded(script, probe.controller_deadline(timeout))
        ended = time.time()
        if executed is None:
            outcome = probe.exec_timeout_failure(agent=agent, timeout_s=timeout)
        else:
            outcome = probe.evaluate(
                agent=agent,
                cmd=cmd,
                backend=args["backend"],
                exec_stdout=executed.get("stdout", ""),
                exec_stderr=executed.get("stderr", ""),
                exec_rc=executed.get("rc", 0),
                started=started,
                ended=ended,
                host_metrics=host_metrics,
                query=query,
            )
        # Everything in the outcome came from the host. ansible-core already treats action results as
        # untrusted (2.19 data tagging; 2.18's executor marks them unsafe); marking them here as well keeps
        # them data whatever path they take, e.g. a caller of this action that bypasses the executor.
        result.update(wrap_var(outcome.module_result()))
        result["summary"] = wrap_var(summary(str(task_vars.get("inventory_hostname", agent)), outcome))
        result["changed"] = False
        return result

    def _knob(self, task_vars: dict, name: str, default, convert):
        """A play knob (host, group or extra var) read here rather than templated into the task's arguments:
        a template in a per-host task is compiled, and its filters loaded, in every host's worker process,
        which costs more than the exec itself (docs/performance.md)."""
        value = task_vars.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, str) and "{{" in value:
            value = self._templar.template(value)
        try:
            return convert(value)
        except (TypeError, ValueError):
            raise ValueError("%s must be %s, got %r" % (name, "a number" if convert is int else "a boolean",
                                                        value)) from None

    @staticmethod
    def _agent_timeout(task_vars: dict):
        """The agent's own query_timeout_s (ssh-agents.toml, in its hwledger_agent host var), or None."""
        agent = task_vars.get("hwledger_agent")
        value = agent.get("query_timeout_s") if isinstance(agent, dict) else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("hwledger_agent.query_timeout_s must be a number, got %r" % (value,))
        return value

    @staticmethod
    def _agent_name(task_vars: dict) -> str:
        agent = task_vars.get("hwledger_agent")
        if isinstance(agent, dict) and isinstance(agent.get("name"), str) and agent["name"]:
            return str(agent["name"])
        return str(task_vars.get("inventory_hostname", "localhost"))

    @staticmethod
    def _host_command(task_vars: dict) -> str:
        """hwledger_gpu_query_cmd as the inventory set it (verbatim, never templated), or the default."""
        cmd = task_vars.get("hwledger_gpu_query_cmd")
        if cmd is None or cmd == "":
            return DEFAULT_GPU_QUERY_CMD
        if not isinstance(cmd, str):
            raise ValueError("hwledger_gpu_query_cmd must be a string, got %s" % type(cmd).__name__)
        return str(cmd)

    def _execute_bounded(self, script: str, deadline_s: float) -> dict | None:
        """Run the script with the connection; None when it did not come back within ``deadline_s``.

        The connection's own ``timeout`` only bounds connection set-up, so the exec runs in a helper
        thread and this thread stops waiting at the deadline; the ssh client started for it is then
        terminated (``processes.call_with_deadline``). Errors of the connection (unreachable host) are
        re-raised here so that Ansible reports them as usual.
        """
        # sudoable=False: no become and, above all, no "-tt" pseudo-terminal, which would merge the
        # script's stdout and stderr and turn LF into CRLF.
        done, value = processes.call_with_deadline(
            lambda: self._low_level_execute_command(script, sudoable=False), deadline_s)
        if not done:
            display.vvv("hwledger.fleet.gpu_query: no answer within %.1f s; terminated %s"
                        % (deadline_s, sorted(value) or "nothing"))
            return None
        return value
