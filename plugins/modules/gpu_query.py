# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# This is a documentation-only module: the work is done on the controller by the action plugin of the
# same name (plugins/action/gpu_query.py), which runs one shell command over the host's connection.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_query
short_description: Read GPU telemetry (and host CPU/memory) over SSH, without Python on the host
version_added: 0.1.0
author:
  - hwledger-fleet developers (!UNKNOWN)
description:
  - Runs the host's GPU query command (C(nvidia-smi --query-gpu=...), C(rocm-smi ... --csv|--json),
    C(amd-smi ...)) as B(one) shell command over the host's own connection, parses its output on the
    controller and returns it as the fact C(hwledger_snapshot).
  - The remote host needs only a POSIX C(sh) with C(mktemp), C(head -c), C(rm) and C(sleep) (coreutils or
    busybox) and the GPU tool itself; C(setsid) and C(nproc) (or C(getconf)) are used when present. No Python,
    no module transfer, no temporary files left behind; with SSH multiplexing (ControlMaster/ControlPersist) a
    query costs one channel, not a handshake.
  - The command runs under a watchdog on the host. After O(timeout) seconds it is sent SIGTERM (its whole
    process group when C(setsid) exists), one second later SIGKILL, and the answer comes back at once with
    RV(reason=timeout). Independently, the controller stops waiting O(timeout) + 3 seconds after the
    command started (a hung host, a stalled network, a tool stuck in the kernel) and ends the task with
    RV(reason=timeout); the local C(ssh) process it was waiting on is terminated. This bound is kept with a
    helper thread around the connection's exec, because the connection's own C(timeout) only limits
    connection set-up.
  - The tool's standard output, standard error and exit status are captured separately and exactly (a
    private C(mktemp -d) directory on the host, mode 0700, removed by a trap) and sent back in frames
    that start with a random token chosen by the controller for each run. Output over 1 MiB is cut on
    the host and reported as RV(reason=output_too_large); the tool cannot write more than a few MiB
    there.
  - "B(Single flight.) The tool runs only when no earlier run of it by the same user is still alive on the
    host; a lock in C($XDG_RUNTIME_DIR/hwledger-probe) (or C(hwledger-probe-<uid>) in the temp dir) says who
    runs it. A tool stuck in the kernel survives its SIGKILL, and a new one every heartbeat would pile up
    beside it: while it lives, the query answers RV(reason=tool_still_running) at once. A query that finds
    another one running the tool waits up to 2 seconds for it, then answers RV(reason=probe_busy). This uses
    C(id), C(ln), C(readlink) and C(mv) where present (without them there is no lock)."
  - With O(host_metrics), the same command also reads C(/proc/loadavg), the C(MemTotal) and
    C(MemAvailable) lines of C(/proc/meminfo) and the number of online CPUs. Those values come back even
    when the GPU tool fails (as RV(host) of the failure), and a host where they cannot be read still gets
    its GPU snapshot (with V(null) host values).
  - Every value in the result comes from the host and is returned as data. Ansible never treats it as
    a template, so a GPU name such as C({{ lookup('pipe', 'id') }}) stays that literal text in the facts,
    in later templating of the facts and in the heartbeat playbook's summary.
  - A failure is reported as C(failed) with a RV(msg) a person can act on and a machine-readable
    RV(reason). It affects only that host; other hosts of the play carry on. When the SSH connection
    itself fails the host is reported as UNREACHABLE by Ansible, as with any task.
options:
  cmd:
    description:
      - The GPU query command, run with C(/bin/sh -c) on the host exactly as given.
      - Defaults to the host variable C(hwledger_gpu_query_cmd), which the inventory plugin
        P(hwledger.fleet.ssh_agents#inventory) sets from C(gpu_query_cmd) in C(ssh-agents.toml), and
        when that is unset to
        C(nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader).
      - The host variable is used verbatim (it is not templated).
      - Supported outputs are C(nvidia-smi --query-gpu=... --format=csv) with or without C(noheader) and
        C(nounits); C(rocm-smi) C(--csv) and C(--json) and its plain tables; C(amd-smi monitor) tables and
        C(amd-smi ... --json).
    type: str
  timeout:
    description:
      - Seconds the GPU tool may run on the host before it is killed and the task fails with
        RV(reason=timeout).
      - The task itself ends at most O(timeout) + 3 seconds after the command was started, whatever the
        host or the network does.
      - Between 1 and 3600.
      - When not given, the host variable C(hwledger_gpu_query_timeout), else V(10). The playbooks pass
        nothing, so that no task argument is templated per host (the cost of a heartbeat stays that of one
        exec).
    type: int
  backend:
    description:
      - Which tool's output to expect.
      - V(auto) picks it from the command and the output.
    type: str
    choices: [auto, nvidia, rocm, amdsmi]
    default: auto
  host_metrics:
    description:
      - Also read the host's load averages, memory and CPU count in the same command (Linux C(/proc)).
      - On hosts without C(/proc) the RV(ansible_facts.hwledger_snapshot.host) values are V(null). With
        V(false) the snapshot has no RV(ansible_facts.hwledger_snapshot.host) key.
      - When not given, the host variable C(hwledger_host_metrics), else V(true).
    type: bool
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.conn
  - ansible.builtin.action_common_attributes.facts
  - ansible.builtin.action_common_attributes.flow
  - ansible.builtin.action_common_attributes.raw
attributes:
  action:
    support: full
  async:
    support: none
  become:
    support: none
    details: The query runs as the connection user, without privilege escalation and without a
      pseudo-terminal (a terminal would merge the tool's output streams). GPU query tools need no root.
  bypass_host_loop:
    support: none
  check_mode:
    support: full
    details: The query only reads, so it runs in check mode too.
  connection:
    support: full
  delegation:
    support: full
    details: With C(delegate_to) the command runs on the delegated host and the facts go to the task's host
      unless C(delegate_facts) is set.
  diff_mode:
    support: none
  facts:
    support: full
  platform:
    details: Requires no Python on the host, only a POSIX C(sh); the output is parsed on the controller.
    platforms: posix
  raw:
    support: full
notes:
  - The failure reasons are C(tool_not_found) (exit status 127, the tool is not on the host's PATH),
    C(driver_unavailable) (nvidia-smi exit status 9, the NVIDIA driver is not loaded),
    C(nvml_error) (C(Failed to initialize NVML), including a driver/library version mismatch),
    C(no_devices) (C(No devices were found)),
    C(invalid_query) (nvidia-smi exit status 2, a field that is not valid to query; the message names it),
    C(invalid_arguments) (rocm-smi or amd-smi rejected the command line, for example
    C(--showmeminfo) without a type; the message gives the fixed command),
    C(timeout) (the tool or the connection did not finish within O(timeout)),
    C(tool_still_running) (the tool started by an earlier query outlived its timeout and its KILL, as one stuck
    in the driver does; no second run is started beside it), C(probe_busy) (another query of the same host by
    the same user, such as a hand-run heartbeat beside C(hwledger fleet serve), has been running the tool for
    over 2 seconds; this one did not start a second run),
    C(unparseable) (output that is not a GPU list, binary output, or a host where the query could not be
    set up), C(output_too_large) (more than 1 MiB of output), and, on hwledger's direct SSH path only
    (Ansible reports these hosts as UNREACHABLE instead), C(host_key_changed) (the host presented a key
    other than the pinned one), C(host_key_unknown) (no key is pinned for the host; register it with
    C(hwledger fleet register-ssh)) and C(unreachable) (any other SSH failure).
  - A GPU whose values read C([GPU requires reset]) (or another marker of a broken device) gets that
    text as its RV(ansible_facts.hwledger_snapshot.gpus[].health); the other GPUs of the host stay usable.
  - Facts land in the fact cache (and in AWX's per-host facts with C(use_fact_cache)). A failed query
    sets no facts, so a cached snapshot keeps its old RV(ansible_facts.hwledger_snapshot.captured_at).
seealso:
  - plugin: hwledger.fleet.ssh_agents
    plugin_type: inventory
  - module: ansible.builtin.raw
"""

EXAMPLES = r"""
- name: Query the GPUs with the host's own command (hwledger_gpu_query_cmd)
  hwledger.fleet.gpu_query:

- name: Query a ROCm host, giving the tool 5 seconds, without host metrics
  hwledger.fleet.gpu_query:
    cmd: rocm-smi --showproductname --showmeminfo vram --showuse --showtemp --csv
    backend: rocm
    timeout: 5
    host_metrics: false

- name: Query and keep going when a host fails
  hwledger.fleet.gpu_query:
  register: gpu
  ignore_errors: true

- name: Show free memory per GPU (the names are data and are printed as they are)
  ansible.builtin.debug:
    msg: "{{ ansible_facts.hwledger_snapshot.gpus | map(attribute='memory_free_bytes') | list }}"
  when: gpu is succeeded
"""

RETURN = r"""
ansible_facts:
  description: The facts set on the host.
  returned: success
  type: complex
  contains:
    hwledger_snapshot:
      description: One GPU telemetry snapshot of the host. Values the tool did not report, or reported as
        unavailable (C([N/A]), C(N/A), C([Not Supported]), C([Unknown Error]), ...), are V(null).
      returned: success
      type: complex
      contains:
        schema_version:
          description: Version of this structure.
          type: int
          returned: success
          sample: 1
        agent:
          description: The agent (host) name, from C(hwledger_agent.name) or else C(inventory_hostname).
          type: str
          returned: success
          sample: gpu-box-1
        backend:
          description: The tool whose output was parsed.
          type: str
          returned: success
          sample: nvidia
        captured_at:
          description: When the query was started, measured on the controller (ISO 8601, UTC, C(Z)).
          type: str
          returned: success
          sample: "2026-11-27T09:00:00.123Z"
        query_ms:
          description: How long the whole command took, connection included, measured on the controller.
          type: float
          returned: success
          sample: 48.2
        gpus:
          description: One entry per GPU, in the tool's order.
          type: list
          elements: dict
          returned: success
          contains:
            index:
              description: The tool's GPU index.
              type: int
              sample: 0
            name:
              description: The product name as the tool printed it (untrusted text, returned as data).
              type: str
              sample: NVIDIA H100 80GB HBM3
            uuid:
              description: The GPU's UUID or unique id, when queried.
              type: str
              sample: GPU-00000000-0000-0000-0000-000000000000
            memory_total_bytes:
              description: Total memory in bytes (exact; nvidia-smi MiB x 1048576).
              type: int
              sample: 85520809984
            memory_used_bytes:
              description: Used memory in bytes (derived as total - free when only those were queried).
              type: int
              sample: 0
            memory_free_bytes:
              description: Free memory in bytes (derived as total - used when only those were queried).
              type: int
              sample: 85520809984
            utilization_gpu_percent:
              description: GPU utilisation in percent. A number as the tool printed it, an integer for a
                whole value (as nvidia-smi, rocm-smi and amd-smi print it) and a float for a decimal one.
              type: float
              sample: 0
            temperature_c:
              description: GPU (edge) temperature in degrees Celsius. An integer when the tool printed a whole
                number (nvidia-smi C(31)), a float when it printed a decimal (rocm-smi C(31.0)).
              type: float
              sample: 31
            power_draw_w:
              description: Power draw in watts. A float when the tool printed a decimal (nvidia-smi C(69.90 W)),
                an integer when it printed a whole number.
              type: float
              sample: 69.9
            health:
              description: V(ok), or the marker the tool printed for a broken GPU, such as
                C(GPU requires reset).
              type: str
              sample: ok
            fields:
              description: Every queried field by the tool's own name for it (for nvidia-smi the header name
                without its unit, such as C(memory.total)), with the tool's text as the value and V(null) for
                unavailable values.
              type: dict
              sample: {"index": "0", "name": "NVIDIA H100 80GB HBM3", "memory.total": "81559 MiB"}
        host:
          description: Host CPU and memory from the same command. The key is absent when
            O(host_metrics=false).
          type: dict
          returned: success, when O(host_metrics=true)
          contains:
            cpu_count:
              description: Online CPUs (C(nproc), else C(getconf _NPROCESSORS_ONLN); V(null) when neither
                exists).
              type: int
              sample: 64
            load1:
              description: 1-minute load average.
              type: float
              sample: 0.52
            load5:
              description: 5-minute load average.
              type: float
              sample: 0.58
            load15:
              description: 15-minute load average.
              type: float
              sample: 0.59
            mem_total_bytes:
              description: C(MemTotal) in bytes.
              type: int
              sample: 540782735360
            mem_available_bytes:
              description: C(MemAvailable) in bytes (V(null) on kernels older than 3.14).
              type: int
              sample: 498216415232
summary:
  description:
    - One line for people, as the C(hwledger.fleet.heartbeat) playbook prints it per host. It gives the GPUs with
      their free and total memory and the host load and memory, or C(FAILED) with the reason and the message.
    - Built in Python from the values above (GPU names are the host's text, kept as data).
  returned: always
  type: str
  sample: "gpu-box-1: 1 GPU(s) (nvidia, 48.2 ms); [0] NVIDIA H100 80GB HBM3: 81559 of 81559 MiB free; load 0.52
    on 64 CPUs, 464.0 of 503.6 GiB memory available"
changed:
  description: Always V(false); the query changes nothing.
  returned: always
  type: bool
  sample: false
msg:
  description: On failure, what went wrong and what to do about it.
  returned: failure
  type: str
  sample: "gpu-box-1: 'nvidia-smi' was not found on the host (exit status 127): it must be on the PATH of the
    SSH user's non-interactive shell, which is often shorter than a login shell's (e.g. without /usr/local/bin
    or /opt/rocm/bin). Install the vendor's tools there, or give gpu_query_cmd the tool's full path."
reason:
  description:
    - On failure, the machine-readable cause, one of V(tool_not_found), V(driver_unavailable),
      V(nvml_error), V(no_devices), V(invalid_query), V(invalid_arguments), V(timeout), V(tool_still_running),
      V(probe_busy), V(unparseable), V(output_too_large), V(host_key_changed), V(host_key_unknown),
      V(unreachable).
  returned: failure
  type: str
  sample: tool_not_found
rc:
  description: On failure, the GPU tool's exit status when it finished (V(null) when it did not).
  returned: failure
  type: int
  sample: 127
output_head:
  description: On failure, the first lines of the tool's output (bounded), as data.
  returned: failure
  type: str
  sample: "sh: 1: nvidia-smi: not found"
answered:
  description:
    - On failure, whether the host ran the query at all. V(false) when it could not be reached (or its host
      key was refused) or when nothing came back before the deadline (RV(reason=timeout) then means the host
      itself did not answer, not the GPU tool); V(true) when the host answered and the GPU tool failed.
  returned: failure
  type: bool
  sample: true
host:
  description: On a failure of the GPU tool, the host metrics that were still read (same keys as
    RV(ansible_facts.hwledger_snapshot.host)).
  returned: failure, when O(host_metrics=true) and the host answered
  type: dict
  sample: {"cpu_count": 8, "load1": 0.1, "load5": 0.2, "load15": 0.2, "mem_total_bytes": 16710107136,
           "mem_available_bytes": 12011405312}
"""
