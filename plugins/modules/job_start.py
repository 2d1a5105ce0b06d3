# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
# Documentation only: the work is done by the action plugin of the same name, with one exec of the
# host's connection (no module, no Python transferred to the host).

from __future__ import annotations

DOCUMENTATION = r"""
module: job_start
short_description: Start an hwledger job on the remote, detached, with one exec over its connection
version_added: 0.2.0
description:
  - The remote half of the start of a job, as the P(hwledger.fleet.job#role) role runs it, in B(one) shell
    command over the host's own (reused) connection. No Ansible module runs on the host, so Ansible's
    interpreter discovery never runs there either.
  - Chooses the runner (C(hwledger run) when it is on the remote PATH and O(runner) allows it; else the
    C(python3) of the remote PATH, checked to run and to be 3.8 or newer, with the staged one-file runner).
  - Creates the job's private directory with C(mktemp -d) (C(hwledger-job-<job_id>-<random>), mode 0700, checked
    to be a directory of the connection's user and not a symlink), removes this user's C(hwledger-job-*)
    directories older than O(stale_age) in the same base directory, writes the job JSON (0600) and, for the
    staged runner, C(runner.pyz) (0600) into it from the command's B(standard input) (so no value of the job is
    on any command line), and starts the runner detached (C(setsid) when present; its output goes to files),
    so that a dropped SSH connection does not stop it. The runner is told (C(HWLEDGER_JOB_LOG_DIR), not passed
    on to the job) to log the job's output as it comes in the private directory, bounded at 2 MiB, where
    C(hwledger fleet serve) reads it for C(hwledger job logs -f).
  - Starts a job B(at most once) - before anything of the job is written, another private directory of the same
    job id in that base directory (the connection's user's, not a symlink) or a live process of that user whose
    argument is a C(job.json) of that job (a runner of an earlier start, still running) fails the task with
    reason V(job_already_started); what is there is left untouched and the new directory is removed again.
    That check reads C(/proc) (where there is none, only the directories count).
  - Returns at once with the directory and the pid of the runner's wrapper; M(hwledger.fleet.job_wait)
    follows the job to its end.
author:
  - hwledger-fleet developers (!UNKNOWN)
options:
  job:
    description:
      - The registered result of M(hwledger.fleet.job_spec), whole, not its fields one by one (ansible-core 2.18
        would parse a templated C(job_json) string back into a dict).
      - Its RV(hwledger.fleet.job_spec#module:job_id), RV(hwledger.fleet.job_spec#module:job_json) (the job's env
        values included; it goes to the host on standard input and is returned by nothing) and
        RV(hwledger.fleet.job_spec#module:runner_source) (the one-file runner, sent with the job unless
        O(runner=hwledger)) are used.
    type: dict
    required: true
  runner:
    description:
      - V(auto) runs C(hwledger run) when it is on the remote PATH, else the staged runner with C(python3).
      - V(hwledger) requires C(hwledger) there; V(staged) always stages the runner.
    type: str
    choices: [auto, hwledger, staged]
    default: auto
  tmp_base:
    description: Remote directory in which the private directory is created. Empty uses C(TMPDIR), else C(/tmp).
    type: str
    default: ""
  stale_age:
    description:
      - Age (modification time) after which another C(hwledger-job-*) directory of this user in O(tmp_base) is
        removed, in M(ansible.builtin.find)'s format (C(8d), C(36h), C(90m)). Empty removes none.
    type: str
    default: ""
attributes:
  check_mode:
    support: none
    description: Starts a job; not in check mode.
  diff_mode:
    support: none
    description: Nothing to compare.
  platform:
    support: full
    platforms: posix
    description: The host needs a POSIX C(sh) with C(mktemp), C(find), C(ls), C(cat), C(mv), C(tr) and C(grep), and
      C(python3) 3.8 or newer unless C(hwledger) is installed there.
seealso:
  - module: hwledger.fleet.job_spec
  - module: hwledger.fleet.job_wait
  - module: hwledger.fleet.job_result
"""

EXAMPLES = r"""
- name: Validate the job on the controller
  hwledger.fleet.job_spec:
    job_file: job.json
    results_dir: results
  register: job

- name: Start it on the host
  hwledger.fleet.job_start:
    job: "{{ job }}"
    stale_age: 8d
  register: started
"""

RETURN = r"""
path:
  description: The job's private directory on the host.
  returned: success
  type: str
  sample: /tmp/hwledger-job-0f8fad5b-d9cb-469f-a165-70867728950e-Xa81bQz2
pid:
  description: The pid of the runner's wrapper on the host (M(hwledger.fleet.job_wait) watches it).
  returned: success
  type: int
  sample: 41873
runner:
  description: Which runner was started, V(hwledger) or V(staged).
  returned: success
  type: str
  sample: staged
reason:
  description: On failure, V(no_runner) (no usable C(hwledger) or C(python3)), V(job_already_started) (an earlier
    start of the job is on the host), V(private_dir), V(input) or V(start_failed).
  returned: failure
  type: str
  sample: no_runner
"""
