# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Validate a job spec on the controller before anything touches the remote (hwledger.fleet.job_spec)."""

from __future__ import annotations

import hashlib
import os

from ansible import constants as C
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.modules import job_spec as job_spec_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_bundle, job_schema, module_doc, private_files

# The options as ansible-doc shows them (plugins/modules/job_spec.py).
ARGUMENT_SPEC = module_doc.argument_spec(job_spec_doc.DOCUMENTATION)


# What job_spec returns in place of each env value in `spec` (the exact values are only in job_json).
ENV_VALUE_MASK = "********"


class UnsafeResultsDir(Exception):
    """results_dir cannot be created, or is not a private directory of ours."""


def prepare_results_dir(path: str, create: bool) -> str:
    """The absolute results directory, created 0700 when missing (not in check mode). An existing one
    must be a real directory of ours that nobody else can write to: results are published there."""
    path = os.path.abspath(path)
    if not create and not os.path.lexists(path):
        return path  # check mode: it would be created
    try:
        private_files.ensure_private_dir(path, "results_dir")
    except private_files.PrivatePathError as exc:
        raise UnsafeResultsDir("results_dir is not safe for job results: %s" % to_text(exc)) from None
    return path


def runner_bundle_path() -> str:
    """The job runner as one file (``job_bundle.bundle()``), written once per run of Ansible into its
    local temp dir (removed when Ansible exits), named by its content so parallel hosts share it."""
    data = job_bundle.bundle()
    path = os.path.join(C.DEFAULT_LOCAL_TMP, "hwledger-runner-%s.pyz" % hashlib.sha256(data).hexdigest()[:16])
    if not os.path.exists(path):
        private_files.write_atomically(path, data)
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
            raw = job_schema.load_job_file(args["job_file"]) if args.get("job_file") else args["job"]
            job = job_schema.validate_job(raw)
        except job_schema.JobSpecError as exc:
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
            job_json=job_schema.encode_job(job).decode("utf-8"),
            async_s=job_schema.async_seconds(job),
            results_dir=results_dir,
            result_path=str(job_schema.result_path(results_dir, job["job_id"])),
            result_max_bytes=job_schema.RESULT_MAX_BYTES,
            runner_source=runner_bundle_path(),
            # job_json holds the exact env values (often tokens): hide this result from every callback
            # (the screen at any -v, ansible-runner/AWX events). The registered variable keeps it for the
            # copy to the remote. A failure above is not hidden: its messages carry no env value.
            _ansible_no_log=True,
        )
        # Everything returned is data: strings from the job must never be templated again.
        return wrap_var(result)
