# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
# Documentation only: the work is done on the controller by the action plugin of the same name.

from __future__ import annotations

DOCUMENTATION = r"""
module: job_spec
short_description: Validate an hwledger job spec on the controller
version_added: 0.1.0
description:
  - Validates an hwledger job spec (a dict, or a JSON file on the controller) and returns it normalised,
    with defaults filled and the job_id in canonical form, together with everything the
    P(hwledger.fleet.job#role) role needs to run it.
  - Runs on the controller only and never connects to the host, so an invalid job is rejected before
    anything touches the remote.
  - Creates O(results_dir) with mode V(0700) when it does not exist (not in check mode). An existing
    O(results_dir) must be a directory (not a symlink) owned by the user and not writable by group or
    others; anything else is refused, since results are published there.
  - On success the whole result is hidden from the output and callbacks, as with C(no_log), because
    RV(job_json) holds the exact env values, which are often tokens; the registered variable keeps it.
    RV(spec) shows env names with masked values. Failures (invalid job) are shown.
  - "The job spec: C(schema_version) (1), C(job_id) (a UUID; nothing path-like is accepted),
    C(command) (argv list of strings, never a shell string), C(env) (string to string),
    C(workdir) (absolute path on the remote), C(timeout_s) (positive number, default 3600, at most a week),
    C(model_ref) (string), C(metadata) (JSON object of at most 16 KiB), C(resources) (optional GPU request for
    C(hwledger fleet serve): C(gpus) 1-64, C(min_free_vram) such as V(40GiB) or bytes, C(gpu_name) glob; the
    runner ignores it, and a spec with it may not set C(CUDA_VISIBLE_DEVICES), C(HIP_VISIBLE_DEVICES) or
    C(ROCR_VISIBLE_DEVICES) in C(env)). Unknown keys are errors that name the nearest valid key."
author:
  - hwledger-fleet developers (!UNKNOWN)
options:
  job:
    description:
      - The job spec as a dict. Like every Ansible variable it is templated once; use O(job_file) for a
        spec whose strings must stay literal.
      - Mutually exclusive with O(job_file).
    type: dict
  job_file:
    description:
      - Path on the controller of a job spec in JSON (at most 1 MiB). Its content is read as data and never
        templated.
      - Mutually exclusive with O(job).
    type: path
  results_dir:
    description:
      - Controller directory where the job's result will land as C(<job_id>.json).
    type: path
    required: true
attributes:
  check_mode:
    support: full
    description: Validates as usual; does not create O(results_dir).
  diff_mode:
    support: none
    description: Nothing to compare.
  platform:
    support: full
    platforms: posix
    description: Runs on the controller.
notes:
  - The schema lives in C(plugins/plugin_utils/job_schema.py) and the runner in C(job_runner.py); for a remote
    that has python3 but no C(hwledger), the role stages the runner as one file (C(runner.pyz), a zip
    application of those standard-library-only modules).
seealso:
  - module: hwledger.fleet.job_result
"""

EXAMPLES = r"""
- name: Validate a job given as a dict
  hwledger.fleet.job_spec:
    job:
      job_id: 0f8fad5b-d9cb-469f-a165-70867728950e
      command: [nvidia-smi, -L]
      timeout_s: 60
    results_dir: /var/lib/hwledger/results
  register: job

- name: Validate a job file written by someone else (read as data)
  hwledger.fleet.job_spec:
    job_file: /srv/queue/job.json
    results_dir: /var/lib/hwledger/results
"""

RETURN = r"""
job_id:
  description: The job id in canonical (lowercase) form.
  returned: success
  type: str
  sample: 0f8fad5b-d9cb-469f-a165-70867728950e
spec:
  description:
    - The normalised job spec (every key present, defaults filled), with each env value replaced by
      C(********) (the names stay).
  returned: success
  type: dict
  sample:
    schema_version: 1
    job_id: 0f8fad5b-d9cb-469f-a165-70867728950e
    command: [nvidia-smi, -L]
    env: {HF_TOKEN: "********"}
    workdir: null
    timeout_s: 60
    model_ref: null
    metadata: null
job_json:
  description:
    - The normalised spec as the JSON text the runner reads, env values included. Write it with a task that
      has C(no_log) set.
  returned: success
  type: str
async_s:
  description: The Ansible C(async) limit for this job, C(timeout_s) plus the runner's own margin.
  returned: success
  type: int
  sample: 180
results_dir:
  description: O(results_dir) as an absolute path.
  returned: success
  type: str
result_path:
  description: Where the validated result will be published, C(<results_dir>/<job_id>.json).
  returned: success
  type: str
result_max_bytes:
  description: The largest result file accepted, in bytes (read it with C(head -c) this plus one).
  returned: success
  type: int
  sample: 1048576
runner_source:
  description: Controller path of C(runner.pyz), the runner as one file, staged on remotes without
    C(hwledger) (in Ansible's local temporary directory, removed when Ansible exits).
  returned: success
  type: str
reason:
  description:
    - V(invalid_job) when the spec does not validate; V(results_dir_unsafe) when O(results_dir) cannot be
      created or is not a private directory of the user.
  returned: failure
  type: str
errors:
  description: One entry per problem, with the C(field) and a C(message) saying how to fix it.
  returned: when the spec does not validate
  type: list
  elements: dict
"""
