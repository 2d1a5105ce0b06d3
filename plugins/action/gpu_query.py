# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Action plugin for hwledger.fleet.gpu_query: one exec over the host's connection, parsed here.

A thin adapter: the script and its evaluation live in plugin_utils/probe.py (shared with the app's
direct-ssh heartbeat and ``hwledger gpu parse``); the documentation is plugins/modules/gpu_query.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.modules import gpu_query as gpu_query_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import module_doc, probe, processes
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD

display = Display()

# The options as ansible-doc shows them (plugins/modules/gpu_query.py): one spec, never two.
ARGUMENT_SPEC = module_doc.argument_spec(gpu_query_doc.DOCUMENTATION)


def _terminate(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


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
        timeout = args["timeout"]
        try:
            cmd = args["cmd"] if args["cmd"] is not None else self._host_command(task_vars)
            probe.check_timeout(timeout)
            script = probe.remote_script(cmd, timeout_s=timeout, host_metrics=args["host_metrics"])
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
                host_metrics=args["host_metrics"],
            )
        # Everything in the outcome came from the host. ansible-core already treats action results as
        # untrusted (2.19 data tagging; 2.18's executor marks them unsafe); marking them here as well keeps
        # them data whatever path they take, e.g. a caller of this action that bypasses the executor.
        result.update(wrap_var(outcome.module_result()))
        result["changed"] = False
        return result

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
        thread and this thread stops waiting at the deadline. The ssh client started for it (a child of
        this worker process) is then terminated so that nothing is left behind; a multiplexing master
        is that client's child and survives. Errors of the connection (unreachable host) are re-raised
        here so that Ansible reports them as usual.
        """
        outcome: dict = {}

        def target() -> None:
            try:
                # sudoable=False: no become and, above all, no "-tt" pseudo-terminal, which would merge
                # the script's stdout and stderr and turn LF into CRLF.
                outcome["result"] = self._low_level_execute_command(script, sudoable=False)
            except BaseException as exc:  # pylint: disable=broad-exception-caught
                outcome["error"] = exc

        worker = threading.Thread(target=target, name="hwledger-gpu-query", daemon=True)
        worker.start()
        worker.join(deadline_s)
        if worker.is_alive():
            # Ansible forks a fresh worker process for each host and task, so its children now are the
            # ones this exec started. /proc is scanned only here, past the deadline: a scan costs
            # milliseconds on a controller with a thousand ssh masters, too much for every exec.
            started_here = processes.children(os.getpid())
            display.vvv("hwledger.fleet.gpu_query: no answer within %.1f s; terminating %s"
                        % (deadline_s, sorted(started_here) or "nothing"))
            _terminate(started_here)
            worker.join(1.0)
            return None
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
