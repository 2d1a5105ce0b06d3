# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
# Documentation only: the work is done by the action plugin of the same name, with short execs of the
# host's connection (no module, no Python transferred to the host).

from __future__ import annotations

DOCUMENTATION = r"""
module: job_reconcile_find
short_description: Find out on the host what became of an hwledger job whose run was cut off
version_added: 0.2.0
description:
  - The remote half of the reconcile of a job (the P(hwledger.fleet.job#role) role's C(reconcile) tasks), for a
    job whose controller was killed or lost the host while it ran, with short execs over the host's (reused)
    connection and no module, like M(hwledger.fleet.job_start) and M(hwledger.fleet.job_wait).
  - Finds the job's private directories by its id (C(hwledger-job-<job_id>-*), directories of the connection's
    user only, no symlink) where M(hwledger.fleet.job_start) made them (the parent of O(dir), else O(tmp_base),
    else C(TMPDIR) or C(/tmp)), and the job's runner still running (a process of that user whose argument is a
    C(job.json) in one of them). Several directories of one job fail the task (V(job_dirs_ambiguous)); nothing
    is read or removed then.
  - Follows a runner still running until it ends, polling every O(poll_s) seconds for at most O(wait_s)
    seconds.
  - Once no runner of the job runs, checks C(result.json) as M(hwledger.fleet.job_wait) does (an lstat, a
    regular file of the user, at most O(result_max_bytes)), reads it bounded and removes the directory in the
    same exec; a directory without a result, or whose result fails a check, is removed too. The bytes read are
    for M(hwledger.fleet.job_result).
  - The result is hidden from every callback (C(no_log)) when it holds the bytes read.
author:
  - hwledger-fleet developers (!UNKNOWN)
options:
  job_id:
    description: The job's id (a UUID, lowercase).
    type: str
    required: true
  dir:
    description: The job's private directory, when it is known (RV(hwledger.fleet.job_start#module:path)). Only
      its parent is used, to find the job's directories there by the job id.
    type: str
    default: ""
  tmp_base:
    description: Remote directory in which M(hwledger.fleet.job_start) made the private directory, when O(dir) is
      not given. Empty uses C(TMPDIR), else C(/tmp).
    type: str
    default: ""
  wait_s:
    description: How long to follow a runner of the job that still runs, in seconds. V(0) looks once.
    type: int
    default: 0
  poll_s:
    description: Seconds between two looks at a runner that still runs.
    type: float
    default: 2
  result_max_bytes:
    description: The largest result file accepted.
    type: int
    default: 1048576
attributes:
  check_mode:
    support: none
    description: Reads and removes the job's directory; not in check mode.
  diff_mode:
    support: none
    description: Nothing to compare.
  platform:
    support: full
    platforms: posix
    description: The host needs a POSIX C(sh) with C(ls), C(head), C(tail), C(tr), C(grep) and
      C(id), and C(/proc) to see a runner still running.
seealso:
  - module: hwledger.fleet.job_start
  - module: hwledger.fleet.job_wait
  - module: hwledger.fleet.job_result
"""

EXAMPLES = r"""
- name: Find the job's directory, follow its runner, read its result, remove the directory
  hwledger.fleet.job_reconcile_find:
    job_id: 0f8fad5b-d9cb-469f-a165-70867728950e
    wait_s: 600
  register: found

- name: Validate the result and publish it as <job_id>.json
  hwledger.fleet.job_result:
    results_dir: /var/lib/hwledger/results
    job_id: 0f8fad5b-d9cb-469f-a165-70867728950e
    read: "{{ found.read }}"
    encoding: hex
    sha256: "{{ found.runner_stdout }}"
  when: found.read is defined
"""

RETURN = r"""
reconciled:
  description: What was found.
  returned: success
  type: dict
  contains:
    found:
      description: Whether one private directory of the job was there.
      type: bool
    dir:
      description: That directory, or null.
      type: str
    launched:
      description: Whether the job's runner had been started (it still runs, or the directory holds what it
        writes as it starts and ends, C(runner.out), C(runner.err), C(runner.rc) or C(result.json)).
      type: bool
    running:
      description: Whether a runner of the job still ran when the wait ended (its directory is then left).
      type: bool
    result:
      description: Whether a C(result.json) was there.
      type: bool
  sample: {"found": true, "dir": "/tmp/hwledger-job-0f8fad5b-d9cb-469f-a165-70867728950e-Xa81bQz2",
           "launched": true, "running": false, "result": true}
read:
  description: The bounded read of C(result.json) (C(rc), C(stdout) as hex, C(encoding), C(stderr)), for
    M(hwledger.fleet.job_result) with O(hwledger.fleet.job_result#module:encoding=hex).
  returned: when a result was read
  type: dict
runner_stdout:
  description: What the runner printed, the sha256 of the result, or empty.
  returned: when a result was read
  type: str
removed:
  description: Whether the job's private directory was removed.
  returned: success
  type: bool
reason:
  description: On failure, V(job_dirs_ambiguous), V(invalid_job), V(find_failed), V(result_not_regular_file) or
    V(result_too_large) (the directory is removed then).
  returned: failure
  type: str
  sample: job_dirs_ambiguous
"""
