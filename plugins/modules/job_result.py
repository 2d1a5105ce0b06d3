# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
# Documentation only: the work is done on the controller by the action plugin of the same name.

from __future__ import annotations

DOCUMENTATION = r"""
module: job_result
short_description: Validate an hwledger job result read from the remote and publish it on the controller
version_added: 0.1.0
description:
  - Takes the bounded read of C(result.json) on the remote (O(read)) - the C(read) result of
    M(hwledger.fleet.job_wait) or M(hwledger.fleet.job_reconcile_find) (the bytes as hex, O(encoding=hex)), as the
    P(hwledger.fleet.job#role) role passes it, or the registered result of a task that printed the file with
    C(head -c <limit + 1>), and checks the bytes before anything trusts them. They must be at most 1 MiB (the
    reader stops one byte past the limit, so a file that grew, or was swapped for a symlink to C(/dev/zero) after
    it was checked, costs the controller at most 1 MiB + 1 byte), ASCII (the runner writes nothing else), strict
    JSON, a valid hwledger result whose C(job_id) is O(job_id) and, when the runner printed one, have the sha256
    in O(sha256).
  - A valid result is written to C(<results_dir>/<job_id>.json), mode V(0600), atomically (a temp file created
    with C(O_CREAT|O_EXCL|O_NOFOLLOW) and C(fchmod), then renamed over the target). A target that is a symlink
    or not a regular file, and a O(results_dir) that is not a real directory of the user writable by nobody
    else, are refused. A refused result is never written, so C(<job_id>.json) only ever holds a validated
    result.
  - The path is derived only from the validated O(job_id).
  - Runs on the controller only and never connects to the host.
author:
  - hwledger-fleet developers (!UNKNOWN)
options:
  results_dir:
    description: Controller directory of the results.
    type: path
    required: true
  job_id:
    description: The job's id (a UUID).
    type: str
    required: true
  read:
    description:
      - The RV(hwledger.fleet.job_wait#module:read) result of M(hwledger.fleet.job_wait) (or
        RV(hwledger.fleet.job_reconcile_find#module:read)), with O(encoding=hex); or the registered result of an
        M(ansible.builtin.command) task that printed C(result.json) with
        C(argv=[head, -c, <result_max_bytes + 1>, --, <path>]) and C(strip_empty_ends=false). Its C(rc) must be 0;
        its C(stdout) is the result.
      - Pass the whole registered variable (C("{{ read }}")), not C("{{ read.stdout }}"), which ansible-core
        2.18 would parse as a dict.
    type: dict
    required: true
  encoding:
    description:
      - How C(stdout) of O(read) holds the bytes.
      - V(text) is the file itself, as C(head) printed it. A file that is not valid UTF-8 cannot come back this
        way from ansible-core 2.19, which refuses such a module answer (the read task then fails).
      - V(hex) is two hex digits per byte (whitespace ignored), as M(hwledger.fleet.job_wait) returns it (or
        C(od -An -v -tx1) prints it), so any bytes come back exactly, and a file that is not the runner's ASCII
        JSON is refused with V(result_not_json).
    type: str
    choices: [text, hex]
    default: text
  sha256:
    description:
      - What the runner printed on stdout (C(<hex>  <path>)) or a bare hex digest. When it holds a
        digest, the bytes read must match it. Empty skips this check.
    type: str
    default: ""
attributes:
  check_mode:
    support: none
    description: Not supported.
  diff_mode:
    support: none
    description: Nothing to compare.
  platform:
    support: full
    platforms: posix
    description: Runs on the controller.
seealso:
  - module: hwledger.fleet.job_spec
"""

EXAMPLES = r"""
- name: Wait for the job and read its result, bounded (the result of job_wait is no_log)
  hwledger.fleet.job_wait:
    path: "{{ started.path }}"
    pid: "{{ started.pid }}"
    timeout: "{{ job.async_s }}"
  register: waited

- name: Validate the result and publish it as <job_id>.json
  hwledger.fleet.job_result:
    results_dir: /var/lib/hwledger/results
    job_id: 0f8fad5b-d9cb-469f-a165-70867728950e
    read: "{{ waited.read }}"
    encoding: hex
    sha256: "{{ waited.runner_stdout }}"
  register: outcome
"""

RETURN = r"""
result:
  description:
    - The validated result. Its strings come from the remote host; they are data, never templates.
  returned: success
  type: dict
  contains:
    schema_version:
      description: Result schema version (1).
      type: int
    job_id:
      description: The job id.
      type: str
    state:
      description: V(succeeded), V(failed), V(timed_out) or V(error).
      type: str
    exit_code:
      description: The command's exit code, null when it was killed by a signal or never started.
      type: int
    signal:
      description: The signal that ended the command, or null.
      type: int
    started_at:
      description: ISO 8601 UTC time the command started.
      type: str
    finished_at:
      description: ISO 8601 UTC time the command ended.
      type: str
    duration_s:
      description: Seconds the command ran.
      type: float
    stdout_tail:
      description: The last 64 KiB of stdout, as UTF-8 text (invalid bytes replaced).
      type: str
    stderr_tail:
      description: The last 64 KiB of stderr, as UTF-8 text (invalid bytes replaced).
      type: str
    stdout_bytes:
      description: How many bytes the command wrote to stdout in all.
      type: int
    stderr_bytes:
      description: How many bytes the command wrote to stderr in all.
      type: int
    host:
      description: The remote's host name.
      type: str
    error:
      description: For state V(error), C(reason) (for example V(command_not_found)) and C(message); else null.
      type: dict
  sample:
    schema_version: 1
    job_id: 0f8fad5b-d9cb-469f-a165-70867728950e
    state: succeeded
    exit_code: 0
    signal: null
    started_at: "2025-01-01T12:00:00.000000Z"
    finished_at: "2025-01-01T12:00:01.250000Z"
    duration_s: 1.25
    stdout_tail: "GPU 0: NVIDIA H100 80GB HBM3\n"
    stderr_tail: ""
    stdout_bytes: 29
    stderr_bytes: 0
    host: gpu-box-1
    error: null
path:
  description: Where the validated result now is, C(<results_dir>/<job_id>.json).
  returned: success
  type: str
sha256:
  description: The sha256 of the result file.
  returned: success
  type: str
reason:
  description:
    - Why a result was refused, V(result_missing) (it could not be read), V(result_too_large),
      V(result_not_json), V(result_invalid), V(result_wrong_job), V(result_checksum_mismatch) or
      V(results_dir_unsafe) (the result could not be published safely).
  returned: failure
  type: str
"""
