# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Start a job on the remote with one exec (hwledger.fleet.job_start); the script is plugin_utils/job_remote.py.

The job JSON and the runner travel on the exec's standard input (``in_data``), never on a command line.
Only the directory, the pid and the runner's name come back; nothing of the job is in the result.
A job is started at most once: an earlier start of the same job id on the remote (another private dir of it,
or its runner still running) fails the task with reason ``job_already_started`` before anything is written.
"""

from __future__ import annotations

from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.action import ActionBase
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.modules import job_start as job_start_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_remote, job_schema, module_doc

ARGUMENT_SPEC = module_doc.argument_spec(job_start_doc.DOCUMENTATION)
ARGUMENT_SPEC["job"]["no_log"] = True  # its job_json holds the job's env values (the doc format has no such key)


class ActionModule(ActionBase):
    """One exec over the host's connection."""

    TRANSFERS_FILES = False
    _requires_connection = True
    _supports_check_mode = False
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        host = str((task_vars or {}).get("inventory_hostname", "the host"))
        job = args["job"]
        try:
            job_id = job_schema.validate_job_id(job.get("job_id"))
            job_json = job.get("job_json")
            if not isinstance(job_json, str):
                raise ValueError("job holds no job_json: give the whole registered result of job_spec")
            minutes = job_remote.stale_minutes(args["stale_age"]) if args["stale_age"] else 0
            script = job_remote.start_script(job_id, runner=args["runner"], tmp_base=args["tmp_base"],
                                             stale_age_minutes=minutes)
            bundle = None
            if args["runner"] != "hwledger":
                if not job.get("runner_source"):
                    raise ValueError("job holds no runner_source, which runner=%s needs" % args["runner"])
                with open(str(job["runner_source"]), "rb") as handle:
                    bundle = handle.read()
            data = job_remote.start_input(to_bytes(job_json), bundle)
        except (job_schema.JobSpecError, ValueError, OSError) as exc:
            result.update(failed=True, reason="invalid_job", msg="%s: cannot start the job: %s" % (host, to_text(exc)))
            return result
        executed = self._low_level_execute_command(script, sudoable=False, in_data=data)
        try:
            started = job_remote.parse_start(executed.get("rc"), executed.get("stdout", ""), executed.get("stderr", ""))
        except job_remote.RemoteStepError as exc:
            msg = "%s cannot run hwledger jobs: %s" % (host, exc)
            if exc.reason == "job_already_started":
                # A job is started at most once: the remote shows an earlier start of it, and nothing was
                # touched there (the new private dir is removed again).
                msg = ("job_already_started - job %s was started on %s before (%s); it is not started again. "
                       "hwledger fleet serve follows that run instead (hwledger.fleet.job_reconcile); by hand, "
                       "remove the old dir first (hwledger.fleet.job_cleanup) to run the job again."
                       % (job_id, host, exc))
            elif exc.reason == "no_runner":
                msg += (". The job role needs python3 (>= 3.8) on the remote for the runner, or hwledger "
                        "installed there (pip install hwledger-fleet).")
            # Remote text, returned as data.
            result.update(failed=True, reason=exc.reason, msg=wrap_var(msg))
            return result
        result.update(changed=True, **started)
        return result
