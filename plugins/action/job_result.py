# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Validate a job result read from the remote and publish it on the controller (hwledger.fleet.job_result)."""

from __future__ import annotations

import hashlib
import os
import re

from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.modules import job_result as job_result_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema, module_doc, private_files

# The options as ansible-doc shows them (plugins/modules/job_result.py).
ARGUMENT_SPEC = module_doc.argument_spec(job_result_doc.DOCUMENTATION)

STDERR_SHOWN_CHARS = 500  # of the remote reader's stderr, in a refusal message
_HEX_RE = re.compile(r"^[0-9a-fA-F\s]*$")


class RefusedResult(Exception):
    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


def result_bytes(read: dict, encoding: str = "text") -> bytes:
    """The bytes of result.json from the registered result of the task that read it on the remote with
    `head -c RESULT_MAX_BYTES+1` (so `stdout` holds at most one byte more than the limit), as they were
    (`text`) or as `od -An -v -tx1` printed them (`hex`)."""
    if read.get("failed") or read.get("rc") != 0:
        why = to_text(read.get("stderr") or read.get("msg") or "no output")[:STDERR_SHOWN_CHARS]
        raise RefusedResult("result_missing", "result.json could not be read on the remote (exit code %s): %r"
                            % (read.get("rc", "unknown"), why))
    text = read.get("stdout")
    if not isinstance(text, str):
        raise RefusedResult("result_missing", "the remote read of result.json returned no text")
    if encoding == "hex":
        return _from_hex(text)
    if len(text) > job_schema.RESULT_MAX_BYTES:
        # The reader stopped one byte past the limit: the file is bigger (or was swapped for something
        # endless, such as a symlink to /dev/zero, after it was checked).
        raise RefusedResult("result_too_large", "result.json holds more than %d bytes (the limit); not accepted"
                            % job_schema.RESULT_MAX_BYTES)
    try:
        # The runner writes ASCII only (job_schema.encode_result, ensure_ascii): these are exactly its bytes.
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise RefusedResult("result_not_json", "result.json is not the ASCII JSON the runner writes") from None


def _from_hex(text: str) -> bytes:
    """The bytes `od -An -v -tx1` printed (its own output is bounded by the read: 3 characters a byte)."""
    if len(text) > 4 * (job_schema.RESULT_MAX_BYTES + 1) or not _HEX_RE.match(text):
        raise RefusedResult("result_not_json", "the remote read of result.json did not print the hex dump expected")
    digits = "".join(text.split())
    if len(digits) % 2:
        raise RefusedResult("result_not_json", "the remote read of result.json printed an odd number of hex digits")
    raw = bytes.fromhex(digits)
    if len(raw) > job_schema.RESULT_MAX_BYTES:
        raise RefusedResult("result_too_large", "result.json holds more than %d bytes (the limit); not accepted"
                            % job_schema.RESULT_MAX_BYTES)
    try:
        raw.decode("ascii")
    except UnicodeDecodeError:
        # The runner writes ASCII only (job_schema.encode_result, ensure_ascii): anything else is not its file.
        raise RefusedResult("result_not_json", "result.json is not the ASCII JSON the runner writes (byte %d is %#04x)"
                            % (_first_non_ascii(raw), raw[_first_non_ascii(raw)])) from None
    return raw


def _first_non_ascii(raw: bytes) -> int:
    return next(index for index, byte in enumerate(raw) if byte > 0x7F)


def verify_and_publish(results_dir: str, job_id: str, raw: bytes, runner_stdout: str) -> dict:
    """Validate the bytes of a result and write them to <results_dir>/<job_id>.json (0600, atomically: a
    temp file opened O_CREAT|O_EXCL|O_NOFOLLOW, then renamed). Raises RefusedResult; nothing is written then."""
    try:
        parsed = job_schema.validate_result(raw, expected_job_id=job_id)
    except job_schema.ResultError as exc:
        raise RefusedResult(exc.reason, str(exc)) from None
    expected = job_schema.parse_sha256_line(runner_stdout)
    actual = hashlib.sha256(raw).hexdigest()
    if expected is not None and expected != actual:
        raise RefusedResult("result_checksum_mismatch", "the sha256 of the result read, %s, differs from the %s "
                            "the runner printed" % (actual, expected))
    problem = private_files.private_dir_problem(results_dir, "results_dir")
    if problem is not None:
        raise RefusedResult("results_dir_unsafe", "results_dir is not safe for job results: %s" % problem)
    final = str(job_schema.result_path(results_dir, job_id))
    try:
        private_files.write_atomically(final, raw)
    except private_files.PrivatePathError as exc:
        raise RefusedResult("results_dir_unsafe", "cannot publish the result: %s" % exc) from None
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
            job_id = job_schema.validate_job_id(args["job_id"])
        except job_schema.JobSpecError as exc:
            result.update(failed=True, reason="invalid_job", msg=str(exc))
            return result
        try:
            raw = result_bytes(args["read"], args["encoding"])
            published = verify_and_publish(results_dir, job_id, raw, args["sha256"])
        except RefusedResult as exc:
            result.update(failed=True, reason=exc.reason, msg="result of job %s refused (%s): %s"
                          % (job_id, exc.reason, exc))
            return wrap_var(result)
        result.update(changed=True, **published)
        # The result came from the remote host: it is data and must never be templated.
        return wrap_var(result)
