# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Follow a started job and read its result, bounded (hwledger.fleet.job_wait); the scripts are in
plugin_utils/job_remote.py.

Why polls start fast: a trivial job ends a few tenths of a second after it starts, and each poll is one
multiplexed exec (milliseconds); a fixed 2 s poll made every job last up to 2 s more than it ran. The first
poll (0.1 s after the start) watches the job on the remote every 50 ms for up to a second, so a short job is
seen to end at once; later polls are instant and back off to poll_s, so a long job costs an exec every
poll_s seconds and holds no connection in between.
"""

from __future__ import annotations

import time

from ansible.errors import AnsibleConnectionFailure
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.action import ActionBase
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.hwledger.fleet.plugins.modules import job_wait as job_wait_doc
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_remote, module_doc, processes

ARGUMENT_SPEC = module_doc.argument_spec(job_wait_doc.DOCUMENTATION)

FIRST_POLL_S = 0.1
FIRST_WAIT_S = 1.0  # the first poll watches the job on the remote for up to this long (every 50 ms)
BACKOFF = 1.5
EXEC_DEADLINE_S = 60  # one poll or check (a hung connection is cut, and the next poll tries again)
READ_DEADLINE_S = 300  # the read of result.json: a FIFO swapped in would block head forever
CONNECTION_RETRIES = 5  # consecutive polls that cannot connect before the host counts as unreachable


class ActionModule(ActionBase):
    """Short execs over the host's connection; no module."""

    TRANSFERS_FILES = False
    _requires_connection = True
    _supports_check_mode = False
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        host = str((task_vars or {}).get("inventory_hostname", "the host"))
        path = args["path"]
        if not job_remote.is_job_dir(path):
            result.update(failed=True, reason="invalid_job", msg="%r is not an hwledger job directory" % path[:200])
            return result
        try:
            state, runner_rc = self._wait(path, args["pid"], args["timeout"], max(args["poll_s"], FIRST_POLL_S))
            token = job_remote.new_token()
            found = job_remote.parse_inspect(self._exec(job_remote.inspect_script(path, token))["stdout"], token)
            self._check(found, args["result_max_bytes"], host, runner_rc, state)
            read = self.read_result(path, args["result_max_bytes"])
        except job_remote.RemoteStepError as exc:
            result.update(failed=True, reason=exc.reason, msg=wrap_var(str(exc)))
            return result
        result.update(
            changed=True,
            runner_rc=runner_rc,
            runner_stdout=found["out"],
            removed=read["rc"] == 0,  # the read also removed the private directory
            read=read,
            # Up to result_max_bytes + 1 raw bytes of the remote (as hex), validated by job_result next: no
            # callback (screen, ansible-runner/AWX events) gets them. The registered variable keeps them.
            _ansible_no_log=True,
        )
        return wrap_var(result)

    def read_result(self, path: str, max_bytes: int) -> dict:
        """The bounded read of result.json, then the removal of its dir (one exec), for job_result with
        ``encoding: hex``: ``stdout`` holds the bytes read as hex. The exec's output is decoded with
        surrogateescape and encoded back here, so whatever the file holds (invalid UTF-8, NUL bytes) comes
        back exactly, as ASCII, and job_result says what is wrong with it (result_not_json), never a reason
        hidden by a failed decode."""
        read = self._exec(job_remote.read_command(path, max_bytes, then_remove=True), READ_DEADLINE_S,
                          encoding_errors="surrogateescape")
        raw = to_bytes(read.get("stdout", ""), errors="surrogateescape")
        return {"rc": read.get("rc"), "stdout": raw.hex(), "encoding": "hex",
                "stderr": to_text(to_bytes(read.get("stderr", ""), errors="surrogateescape"), errors="replace"),
                "failed": False}

    def _exec(self, script: str, deadline_s: float = EXEC_DEADLINE_S, **kwargs) -> dict:
        done, value = processes.call_with_deadline(
            lambda: self._low_level_execute_command(script, sudoable=False, **kwargs), deadline_s)
        if not done:
            raise AnsibleConnectionFailure("no answer from the host within %d s" % deadline_s)
        return value

    def _wait(self, path: str, pid: int, timeout_s: int, poll_s: float) -> tuple[str, int | None]:
        """Poll until the runner has ended ("done", its exit code) or vanished ("gone", None)."""
        deadline = time.monotonic() + timeout_s
        delay = FIRST_POLL_S
        failures = 0
        first = job_remote.poll_script(path, pid, wait_s=min(FIRST_WAIT_S, timeout_s))
        script = job_remote.poll_script(path, pid)
        polls = 0
        while True:
            time.sleep(delay)
            delay = min(delay * BACKOFF, poll_s)
            try:
                state, runner_rc = job_remote.parse_poll(self._exec(first if polls == 0 else script)["stdout"])
                polls += 1
                failures = 0
            except AnsibleConnectionFailure:
                # The job runs on, detached: a dropped connection is retried with a new one.
                failures += 1
                if failures >= CONNECTION_RETRIES:
                    raise
                continue
            if state != "running":
                return state, runner_rc
            if time.monotonic() > deadline:
                raise job_remote.RemoteStepError(
                    "result_missing", "result_missing: the job in %s did not end within %d s" % (path, timeout_s))

    @staticmethod
    def _check(found: dict, max_bytes: int, host: str, runner_rc: int | None, state: str) -> None:
        """The checks on the lstat of result.json, before anything reads it."""
        stat = found["stat"]
        if stat is None:
            how = "exit code %s" % runner_rc if state == "done" else "the runner vanished without an exit status"
            raise job_remote.RemoteStepError(
                "result_missing", "result_missing: the runner on %s wrote no result (%s): %s"
                % (host, how, found["err"][-2000:]))
        if stat["kind"] != "file":
            raise job_remote.RemoteStepError(
                "result_not_regular_file", "result_not_regular_file - result.json on %s is not a regular file "
                "(a %s); not read" % (host, stat["kind"]))
        if found["uid"] is not None and stat["uid"] != found["uid"]:
            raise job_remote.RemoteStepError(
                "result_not_regular_file", "result_not_regular_file - result.json on %s belongs to uid %d, not to "
                "the job's user (%d); not read" % (host, stat["uid"], found["uid"]))
        if stat["size"] > max_bytes:
            raise job_remote.RemoteStepError(
                "result_too_large", "result_too_large - result.json on %s is %d bytes, over the limit of %d; not "
                "read" % (host, stat["size"], max_bytes))
