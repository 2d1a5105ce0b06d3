# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Find out on the remote what became of a job whose run was cut off (hwledger.fleet.job_reconcile_find), for
the job role's reconcile tasks; the scripts are in plugin_utils/job_remote.py, the checks and the bounded read
are job_wait's.
"""

from __future__ import annotations

import posixpath
import time

from ansible.plugins.action import ActionBase
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.action.job_wait import ActionModule as JobWait
from ansible_collections.hwledger.fleet.plugins.modules import job_reconcile_find as job_reconcile_find_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_remote, job_schema, module_doc

ARGUMENT_SPEC = module_doc.argument_spec(job_reconcile_find_doc.DOCUMENTATION)


class ActionModule(JobWait):
    """Short execs over the host's connection; no module."""

    def run(self, tmp=None, task_vars=None):
        result = ActionBase.run(self, tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        host = str((task_vars or {}).get("inventory_hostname", "the host"))
        try:
            job_id = job_schema.validate_job_id(args["job_id"])
            base = args["tmp_base"]
            if args["dir"]:
                if not (job_remote.is_job_dir(args["dir"])
                        and posixpath.basename(args["dir"]).startswith("hwledger-job-%s-" % job_id)):
                    raise ValueError("%r is not a private directory of job %s" % (args["dir"][:200], job_id))
                base = posixpath.dirname(args["dir"])
            script = job_remote.find_script(job_id, tmp_base=base)
        except (job_schema.JobSpecError, ValueError) as exc:
            result.update(failed=True, reason="invalid_job", msg="invalid_job - %s" % exc)
            return result
        try:
            found = self._follow(script, job_id, args["wait_s"], max(args["poll_s"], 0.1))
            dirs = found["dirs"]
            if len(dirs) > 1:
                raise job_remote.RemoteStepError(
                    "job_dirs_ambiguous", "job_dirs_ambiguous - %d private directories of job %s on %s; not read "
                    "(remove them with hwledger.fleet.job_cleanup, one at a time)" % (len(dirs), job_id, host))
            path = dirs[0] if dirs else None
            traces = found["traces"].get(path, []) if path else []
            running = bool(found["runs"])
            reconciled = {"found": path is not None, "dir": path, "running": running,
                          "launched": running or bool(traces), "result": "result.json" in traces}
            result.update(changed=False, reconciled=reconciled, removed=False)
            if path is None or running:
                return wrap_var(result)  # nothing there, or its runner runs on: leave its directory
            if reconciled["result"]:
                self._read(result, path, args["result_max_bytes"], host)
            else:
                self._exec(job_remote.remove_command(path))
                result.update(changed=True, removed=True)
        except job_remote.RemoteStepError as exc:
            result.update(failed=True, reason=exc.reason, msg=wrap_var(str(exc)))
            return result
        return wrap_var(result)

    def _follow(self, script: str, job_id: str, wait_s: int, poll_s: float) -> dict:
        """The find, again every poll_s while a runner of the job runs, for at most wait_s seconds."""
        deadline = time.monotonic() + max(0, wait_s)
        while True:
            found = job_remote.parse_find(self._exec(script)["stdout"], job_id)
            if not found["runs"] or time.monotonic() + poll_s > deadline:
                return found
            time.sleep(poll_s)

    def _read(self, result: dict, path: str, max_bytes: int, host: str) -> None:
        """job_wait's checks on result.json, then its bounded read (which removes the dir); a result that
        fails a check is not read, and its dir is removed before the failure is reported."""
        token = job_remote.new_token()
        inspected = job_remote.parse_inspect(self._exec(job_remote.inspect_script(path, token))["stdout"], token)
        try:
            self._check(inspected, max_bytes, host, None, "done")
        except job_remote.RemoteStepError:
            self._exec(job_remote.remove_command(path))
            result.update(removed=True)
            raise
        read = self.read_result(path, max_bytes)
        result.update(changed=True, removed=read["rc"] == 0, read=read, runner_stdout=inspected["out"],
                      # The raw bytes read (as hex), validated by job_result next: hidden from every callback.
                      _ansible_no_log=True)
