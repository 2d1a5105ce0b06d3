# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
# Documentation only: the work is done by the action plugin of the same name, with short execs of the
# host's connection (no module, no Python transferred to the host).

from __future__ import annotations

DOCUMENTATION = r"""
module: job_wait
short_description: Follow a started hwledger job to its end and read its result file, bounded
version_added: 0.2.0
description:
  - Polls the job that M(hwledger.fleet.job_start) started, each poll one short exec over the host's
    (reused) connection, so no SSH session is held while the job runs. Polls come fast at first and back
    off to O(poll_s), so a short job is seen to end within a fraction of a second and a long one costs a
    poll every O(poll_s) seconds. A poll that fails to connect is retried (the job runs on, detached).
  - When the runner has ended, checks C(result.json) without opening it (C(ls -lnd), an lstat). It must be a
    regular file, not a symlink, owned by the connection's user and at most O(result_max_bytes). Then reads
    it with C(head -c <result_max_bytes + 1> --), so a file swapped or grown after the check costs the
    controller at most one byte more than the limit, and removes the job's private directory in the same
    exec; M(hwledger.fleet.job_result) validates the bytes.
  - The result of a successful wait holds the raw bytes read; it is hidden from every callback (C(no_log)),
    failures are not (they hold no bytes of the result).
author:
  - hwledger-fleet developers (!UNKNOWN)
options:
  path:
    description: The job's private directory (RV(hwledger.fleet.job_start#module:path)).
    type: str
    required: true
  pid:
    description: The pid of the runner's wrapper (RV(hwledger.fleet.job_start#module:pid)).
    type: int
    required: true
  timeout:
    description: Seconds after which the wait gives up (longer than the job's own timeout; the runner kills the
      job at its timeout and writes a result).
    type: int
    required: true
  poll_s:
    description: The longest interval between two polls, in seconds.
    type: float
    default: 2
  result_max_bytes:
    description: The largest result file accepted.
    type: int
    default: 1048576
attributes:
  check_mode:
    support: none
    description: Follows a running job; not in check mode.
  diff_mode:
    support: none
    description: Nothing to compare.
  platform:
    support: full
    platforms: posix
    description: The host needs a POSIX C(sh) with C(ls), C(head), C(tail), C(cat) and C(id).
seealso:
  - module: hwledger.fleet.job_start
  - module: hwledger.fleet.job_result
"""

EXAMPLES = r"""
- name: Wait for the job and read its result
  hwledger.fleet.job_wait:
    path: "{{ started.path }}"
    pid: "{{ started.pid }}"
    timeout: "{{ job.async_s }}"
  register: waited

- name: Validate the result and publish it
  hwledger.fleet.job_result:
    results_dir: "{{ job.results_dir }}"
    job_id: "{{ job.job_id }}"
    read: "{{ waited.read }}"
    sha256: "{{ waited.runner_stdout }}"
"""

RETURN = r"""
runner_rc:
  description: The runner's exit code (see docs/jobs.md).
  returned: success
  type: int
  sample: 0
runner_stdout:
  description: What the runner printed, the sha256 of the result (C(<hex>  <path>)).
  returned: success
  type: str
  sample: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  /tmp/hwledger-job-.../result.json"
removed:
  description: Whether the read also removed the job's private directory (the same exec, after the read).
  returned: success
  type: bool
  sample: true
read:
  description: The bounded read of C(result.json) (C(rc), C(stdout), C(stderr)), for
    M(hwledger.fleet.job_result).
  returned: success
  type: dict
reason:
  description: On failure, V(result_missing), V(result_not_regular_file) or V(result_too_large).
  returned: failure
  type: str
  sample: result_missing
"""
