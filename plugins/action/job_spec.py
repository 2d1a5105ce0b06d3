# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Validate a job spec on the controller before anything touches the remote (hwledger.fleet.job_spec)."""

from __future__ import annotations

import os

from ansible.errors import AnsibleActionFail
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.plugin_utils import jobs

ARGUMENT_SPEC = {
    "job": {"type": "dict"},
    "job_file": {"type": "path"},
    "results_dir": {"type": "path", "required": True},
}


def _prepare_results_dir(path: str, create: bool) -> str:
    """The absolute results directory; created 0700 when missing (not in check mode)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return path
    if os.path.lexists(path):
        raise AnsibleActionFail("results_dir %s exists and is not a directory" % path)
    if create:
        try:
            os.makedirs(path, mode=0o700)
        except OSError as exc:
            raise AnsibleActionFail("cannot create results_dir %s: %s" % (path, to_text(exc))) from None
    return path


class ActionModule(ActionBase):
    """Runs on the controller only: it never opens a connection to the host."""

    _requires_connection = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(
            argument_spec=ARGUMENT_SPEC,
            mutually_exclusive=[("job", "job_file")],
            required_one_of=[("job", "job_file")],
        )
        source = "job_file %s" % args["job_file"] if args.get("job_file") else "hwledger_job"
        try:
            raw = jobs.load_job_file(args["job_file"]) if args.get("job_file") else args["job"]
            job = jobs.validate_job(raw)
        except jobs.JobSpecError as exc:
            result.update(
                failed=True,
                reason="invalid_job",
                msg="invalid job (%s):\n%s" % (source, exc),
                errors=[{"field": field, "message": message} for field, message in exc.errors],
            )
            return wrap_var(result)
        results_dir = _prepare_results_dir(args["results_dir"], create=not self._task.check_mode)
        result.update(
            changed=False,
            job_id=job["job_id"],
            spec=job,
            job_json=jobs.encode_job(job).decode("utf-8"),
            async_s=jobs.async_seconds(job),
            results_dir=results_dir,
            result_path=str(jobs.result_path(results_dir, job["job_id"])),
            staging_path=str(jobs.staging_path(results_dir, job["job_id"])),
            result_max_bytes=jobs.RESULT_MAX_BYTES,
            runner_source=os.path.abspath(jobs.__file__),
        )
        # Everything returned is data: strings from the job must never be templated again.
        return wrap_var(result)
