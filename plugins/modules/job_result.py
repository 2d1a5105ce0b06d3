# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
# Documentation only: the work is done on the controller by the action plugin of the same name.

from __future__ import annotations

DOCUMENTATION = r"""
module: job_result
short_description: Validate a fetched hwledger job result and publish it on the controller
version_added: 0.1.0
description:
  - Reads C(<results_dir>/.<job_id>.json.unverified), the file the P(hwledger.fleet.job#role) role fetched
    from the remote, and checks it before anything trusts it. It must be a regular file (not a symlink)
    of at most 1 MiB, strict JSON, a valid hwledger result whose C(job_id) is O(job_id), and, when the
    runner printed one, have the sha256 in O(sha256).
  - A valid result is renamed to C(<results_dir>/<job_id>.json) (mode V(0600)); a refused one is deleted,
    so C(<job_id>.json) only ever holds a validated result.
  - Both paths are derived only from the validated O(job_id).
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
  sha256:
    description:
      - What the runner printed on stdout (C(<hex>  <path>)) or a bare hex digest. When it holds a
        digest, the fetched bytes must match it. Empty skips this check.
    type: str
    default: ""
  discard:
    description:
      - Only remove an unverified result left behind (the role does this in its C(always) section).
    type: bool
    default: false
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
- name: Validate the fetched result and publish it as <job_id>.json
  hwledger.fleet.job_result:
    results_dir: /var/lib/hwledger/results
    job_id: 0f8fad5b-d9cb-469f-a165-70867728950e
    sha256: "{{ run.stdout }}"
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
    - Why a result was refused, V(result_missing), V(result_not_regular_file), V(result_too_large),
      V(result_not_json), V(result_invalid), V(result_wrong_job) or V(result_checksum_mismatch).
  returned: failure
  type: str
"""
