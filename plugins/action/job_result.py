# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Validate a fetched job result on the controller and publish it (hwledger.fleet.job_result)."""

from __future__ import annotations

import hashlib
import os
import stat

from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.plugin_utils import jobs

ARGUMENT_SPEC = {
    "results_dir": {"type": "path", "required": True},
    "job_id": {"type": "str", "required": True},
    "sha256": {"type": "str", "default": ""},
    "discard": {"type": "bool", "default": False},
}


class RefusedResult(Exception):
    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


def _read_bounded(path: str) -> bytes:
    """The bytes of a regular, non-symlink file of at most RESULT_MAX_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RefusedResult("result_missing", "no fetched result at %s" % path) from None
    except OSError as exc:
        raise RefusedResult("result_not_regular_file", "cannot open %s: %s" % (path, to_text(exc))) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RefusedResult("result_not_regular_file", "%s is not a regular file" % path)
        if info.st_size > jobs.RESULT_MAX_BYTES:
            raise RefusedResult("result_too_large", "result is %d bytes, over the limit of %d"
                                % (info.st_size, jobs.RESULT_MAX_BYTES))
        return handle.read(jobs.RESULT_MAX_BYTES + 1)


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def verify_and_publish(results_dir: str, job_id: str, runner_stdout: str) -> dict:
    """Validate <results_dir>/.<job_id>.json.unverified and rename it to <results_dir>/<job_id>.json.
    Raises RefusedResult (the unverified file is removed)."""
    staging = str(jobs.staging_path(results_dir, job_id))
    final = str(jobs.result_path(results_dir, job_id))
    try:
        raw = _read_bounded(staging)
        parsed = jobs.validate_result(raw, expected_job_id=job_id)
        expected = jobs.parse_sha256_line(runner_stdout)
        actual = hashlib.sha256(raw).hexdigest()
        if expected is not None and expected != actual:
            raise RefusedResult("result_checksum_mismatch", "the fetched result's sha256 %s differs from the %s "
                                "the runner printed" % (actual, expected))
    except jobs.ResultError as exc:
        _remove(staging)
        raise RefusedResult(exc.reason, str(exc)) from None
    except RefusedResult:
        _remove(staging)
        raise
    os.chmod(staging, 0o600)
    os.replace(staging, final)
    return {"result": parsed, "path": final, "sha256": actual}


class ActionModule(ActionBase):
    """Runs on the controller only: it never opens a connection to the host."""

    _requires_connection = False
    _supports_check_mode = False
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        results_dir = os.path.abspath(args["results_dir"])
        try:
            job_id = jobs.validate_job_id(args["job_id"])
        except jobs.JobSpecError as exc:
            result.update(failed=True, reason="invalid_job", msg=str(exc))
            return result
        if args["discard"]:
            result["changed"] = _remove(str(jobs.staging_path(results_dir, job_id)))
            return result
        try:
            published = verify_and_publish(results_dir, job_id, args["sha256"])
        except RefusedResult as exc:
            result.update(failed=True, reason=exc.reason, msg="result of job %s refused (%s): %s"
                          % (job_id, exc.reason, exc))
            return wrap_var(result)
        result.update(changed=True, **published)
        # The result came from the remote host: it is data and must never be templated.
        return wrap_var(result)
