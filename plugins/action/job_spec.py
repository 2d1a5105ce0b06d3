# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Validate a job spec on the controller before anything touches the remote (hwledger.fleet.job_spec)."""

from __future__ import annotations

import os

from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.plugin_utils import jobs

ARGUMENT_SPEC = {
    "job": {"type": "dict"},
    "job_file": {"type": "path"},
    "results_dir": {"type": "path", "required": True},
}


# What job_spec returns in place of each env value in `spec` (the exact values are only in job_json).
ENV_VALUE_MASK = "********"


class UnsafeResultsDir(Exception):
    """results_dir cannot be created, or is not a private directory of ours."""


def prepare_results_dir(path: str, create: bool) -> str:
    """The absolute results directory, created 0700 when missing (not in check mode). An existing one
    must be a real directory of ours that nobody else can write to: results are published there."""
    path = os.path.abspath(path)
    if create and not os.path.lexists(path):
        try:
            os.makedirs(path, mode=0o700)
        except FileExistsError:
            pass  # created meanwhile (by a parallel run): checked below like any existing directory
        except OSError as exc:
            raise UnsafeResultsDir("cannot create results_dir %s: %s" % (path, to_text(exc))) from None
    if not create and not os.path.lexists(path):
        return path  # check mode: it would be created
    problem = jobs.private_dir_problem(path)
    if problem is not None:
        raise UnsafeResultsDir("results_dir is not safe for job results: %s" % problem)
    return path


def masked_spec(job: dict) -> dict:
    """The validated job with its env values replaced by ENV_VALUE_MASK (the names stay): env values are
    often tokens, and the spec is returned to the play, where -v, callbacks and AWX events would show it."""
    return dict(job, env={name: ENV_VALUE_MASK for name in job["env"]})


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
        try:
            results_dir = prepare_results_dir(args["results_dir"], create=not self._task.check_mode)
        except UnsafeResultsDir as exc:
            result.update(failed=True, reason="results_dir_unsafe", msg=str(exc))
            return wrap_var(result)
        result.update(
            changed=False,
            job_id=job["job_id"],
            spec=masked_spec(job),
            job_json=jobs.encode_job(job).decode("utf-8"),
            async_s=jobs.async_seconds(job),
            results_dir=results_dir,
            result_path=str(jobs.result_path(results_dir, job["job_id"])),
            result_max_bytes=jobs.RESULT_MAX_BYTES,
            runner_source=os.path.abspath(jobs.__file__),
            # job_json holds the exact env values (often tokens): hide this result from every callback
            # (the screen at any -v, ansible-runner/AWX events). The registered variable keeps it for the
            # copy to the remote. A failure above is not hidden: its messages carry no env value.
            _ansible_no_log=True,
        )
        # Everything returned is data: strings from the job must never be templated again.
        return wrap_var(result)
