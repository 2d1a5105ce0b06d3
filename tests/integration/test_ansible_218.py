"""The collection on both supported ansible-core lines (meta/runtime.yml: >=2.18.0,<2.20.0).

Each test runs the same body through ansible-core 2.18 (``.venv-2.18``) and 2.19 (the project venv),
as real ansible-inventory / ansible-playbook / ansible / ansible-doc processes from the checkout.

The point of running 2.18 at all: before 2.19's data tagging, ansible-core evaluates any inventory or
fact string containing Jinja unless it is marked unsafe. A hostile ``{{ lookup('pipe', ...) }}`` in
ssh-agents.toml or in a GPU name printed by a remote host would run a command on the controller there.
Every payload here runs ``touch <marker>``; a marker file appearing means it was evaluated. A control
task with the same lookup written in the playbook itself (trusted) proves such a touch would show.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD
from lab import Lab, SshHost, agents_toml, write_agents_toml
from tests.toolchains import TOOLCHAIN_NAMES, Toolchain, toolchain

# A GPU host's default query: the fake nvidia-smi answers it with the rows a test sets.
DEFAULT_QUERY = DEFAULT_GPU_QUERY_CMD


@pytest.fixture(params=TOOLCHAIN_NAMES, ids=lambda name: f"core-{name}")
def core(request: pytest.FixtureRequest) -> Toolchain:
    return toolchain(request.param)


# --- payloads ----------------------------------------------------------------------------------------

def expression_payload(marker: Path) -> str:
    return "{{ lookup('pipe', 'touch %s') }}" % marker


def statement_payload(marker: Path) -> str:
    return "{%% if lookup('pipe', 'touch %s') %%}evaluated{%% endif %%}" % marker


def control_task(marker: Path) -> dict[str, Any]:
    """A trusted template (part of the playbook) running the same kind of lookup: it must touch."""
    return {"name": "Control: a trusted template does run its lookup",
            "ansible.builtin.debug": {"msg": "{{ lookup('pipe', 'touch %s') }}" % marker}}


def created(markers: list[Path]) -> list[str]:
    return [str(marker) for marker in markers if marker.exists()]


# --- an inventory source for lab hosts -----------------------------------------------------------------

class CompatFleet:
    """ssh-agents.toml, hwledger's known_hosts pinning each agent's host key under the agent's alias (as
    `hwledger fleet register-ssh` does), and the fleet.hwledger.yml source, for agents on lab hosts."""

    def __init__(self, directory: Path, agents: list[dict[str, Any]], hosts: dict[str, SshHost]) -> None:
        self.dir = directory
        # Short and private: the ssh control sockets live here and must fit the unix socket path limit.
        self.control_dir = Path(tempfile.mkdtemp(prefix="hwl-c-", dir="/tmp"))
        self.agents_file = write_agents_toml(directory / "ssh-agents.toml", agents)
        self.known_hosts = directory / "known_hosts"
        loaded, _warnings = agents_schema.load_agents_file(str(self.agents_file))
        lines = [f"{ssh.known_hosts_alias(agent)} {hosts[agent.name].host_key_pub}\n" for agent in loaded]
        self.known_hosts.write_text("".join(lines))
        self.known_hosts.chmod(0o600)
        self.config = directory / "fleet.hwledger.yml"
        self.config.write_text("plugin: hwledger.fleet.ssh_agents\n"
                               f"agents_file: {self.agents_file}\n"
                               f"known_hosts_file: {self.known_hosts}\n"
                               f"control_dir: {self.control_dir}\n"
                               "host_key_checking: 'yes'\n"
                               "connect_timeout: 5\n")
        self.config.chmod(0o600)

    def close(self) -> None:
        """End the ControlPersist masters these runs left (each through its own socket), remove the dir."""
        for socket in self.control_dir.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "hwledger-compat"], check=False,
                           capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        shutil.rmtree(self.control_dir, ignore_errors=True)


@pytest.fixture
def fleets() -> Iterator[list[CompatFleet]]:
    made: list[CompatFleet] = []
    yield made
    for fleet in made:
        fleet.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory (control_dir must fit the unix socket path limit)."""
    path = Path(tempfile.mkdtemp(prefix="hwl-c-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def gpu_host(lab: Lab) -> Iterator[SshHost]:
    """One loopback host (no python3 on its PATH) shared by this module's tests; each sets its tool."""
    host = lab.add_loopback_host(lab.unique_name("compat"))
    yield host
    host.stop()


# --- running ansible ---------------------------------------------------------------------------------

def ansible_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"ANSIBLE_HOME": str(tmp_path / "ansible-home"), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
            **extra}


def run_playbooks(core: Toolchain, inventory: Path, tmp_path: Path, *playbooks: str) -> dict[str, dict[str, Any]]:
    """ansible-playbook -v (rc 0 asserted); returns task name -> host -> result as the run printed it."""
    # Neither core line ships a JSON stdout callback, so read the default one's results, printed as JSON.
    proc = core.run("ansible-playbook", "-v", "-i", str(inventory), *playbooks,
                    extra_env=ansible_env(tmp_path, ANSIBLE_CALLBACK_RESULT_FORMAT="json"))
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    return parse_results(proc.stdout)


_TASK_BANNER = re.compile(r"^TASK \[(?P<task>.*)\] \**$")
_HOST_RESULT = re.compile(r"^(?:ok|changed): \[(?P<host>[^\]]+)\] => (?=\{)")


def parse_results(stdout: str) -> dict[str, dict[str, Any]]:
    """Each "ok|changed: [host] => {json}" under the latest "TASK [name]" banner."""
    results: dict[str, dict[str, Any]] = {}
    decoder = json.JSONDecoder()
    task = None
    offset = 0
    for line in stdout.splitlines(keepends=True):
        banner = _TASK_BANNER.match(line)
        if banner:
            task = banner.group("task")
        result = _HOST_RESULT.match(line)
        if result and task is not None:
            value, _end = decoder.raw_decode(stdout, offset + result.end())
            assert result.group("host") not in results.setdefault(task, {}), (task, result.group("host"))
            results[task][result.group("host")] = value
        offset += len(line)
    return results


def task_results(report: dict[str, dict[str, Any]], task_name: str) -> dict[str, dict[str, Any]]:
    assert task_name in report, (task_name, sorted(report))
    return report[task_name]


def write_playbook(path: Path, plays: list[dict[str, Any]]) -> Path:
    # JSON is YAML: no YAML writer needed, and no quoting surprises around the Jinja text.
    path.write_text(json.dumps(plays, indent=2))
    return path


def strip_unsafe_markers(value: Any) -> Any:
    """ansible-inventory on 2.18 prints an unsafe string as {"__ansible_unsafe": "..."}; 2.19 as is."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: strip_unsafe_markers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strip_unsafe_markers(item) for item in value]
    return value


# --- 0. the toolchains are what they claim ----------------------------------------------------------

def test_each_toolchain_runs_its_ansible_core_line(core: Toolchain):
    version = core.core_version()
    assert version.startswith(core.name + "."), f"{core.bin_dir} has ansible-core {version}, expected {core.name}.x"


# --- 1. Jinja in ssh-agents.toml stays data -----------------------------------------------------------

def test_inventory_prints_jinja_from_the_agents_file_literally(core: Toolchain, tmp_path: Path, short_dir: Path):
    """ansible-inventory --list/--host template nothing: the gpu_query_cmd payloads come out verbatim
    in hwledger_gpu_query_cmd and in hwledger_agent; on 2.18 they are marked unsafe."""
    key = tmp_path / "id_ed25519"
    key.write_text("not a real key: the inventory never reads it\n")
    key.chmod(0o600)
    markers = [tmp_path / "PWNED-expression", tmp_path / "PWNED-statement"]
    payloads = {"jinja-expr": f"nvidia-smi {expression_payload(markers[0])}",
                "jinja-stmt": f"nvidia-smi {statement_payload(markers[1])}"}
    agents = [{"name": name, "hostname": "192.0.2.%d" % (10 + n), "ssh_user": "gpu", "ssh_key_path": str(key),
               "gpu_query_cmd": cmd} for n, (name, cmd) in enumerate(payloads.items())]
    write_agents_toml(tmp_path / "ssh-agents.toml", agents)
    source = tmp_path / "fleet.hwledger.yml"
    source.write_text("plugin: hwledger.fleet.ssh_agents\nagents_file: ssh-agents.toml\n"
                      f"known_hosts_file: {tmp_path / 'known_hosts'}\ncontrol_dir: {short_dir}\n")
    env = ansible_env(tmp_path)

    listed = core.run("ansible-inventory", "-i", str(source), "--list", extra_env=env)
    assert listed.returncode == 0, listed.stderr
    hostvars = json.loads(listed.stdout)["_meta"]["hostvars"]
    for name, cmd in payloads.items():
        host = hostvars[name]
        if core.name == "2.18":  # the plugin's wrap_var is what keeps 2.18 from evaluating it
            assert host["hwledger_gpu_query_cmd"] == {"__ansible_unsafe": cmd}
            assert host["hwledger_agent"]["gpu_query_cmd"] == {"__ansible_unsafe": cmd}
        plain = strip_unsafe_markers(host)
        assert plain["hwledger_gpu_query_cmd"] == cmd
        assert plain["hwledger_agent"]["gpu_query_cmd"] == cmd
        assert plain["ansible_host"] == "192.0.2.%d" % (10 + list(payloads).index(name))

    for name, cmd in payloads.items():
        shown = core.run("ansible-inventory", "-i", str(source), "--host", name, extra_env=env)
        assert shown.returncode == 0, shown.stderr
        plain = strip_unsafe_markers(json.loads(shown.stdout))
        assert plain["hwledger_gpu_query_cmd"] == cmd
        assert plain["hwledger_agent"]["gpu_query_cmd"] == cmd
    assert created(markers) == []


def test_gpu_query_cmd_is_the_only_agents_field_that_admits_template_text():
    """Why the tests above put their payloads in gpu_query_cmd: every other string field refuses braces."""
    base = {"name": "gpu-1", "hostname": "gpu-1.example", "ssh_user": "gpu", "ssh_key_path": "/keys/id",
            "bastion": {"hostname": "bastion.example", "ssh_user": "jump", "ssh_key_path": "/keys/jump"}}
    fields = [("name",), ("hostname",), ("ssh_user",), ("ssh_key_path",), ("host_key_fingerprint",),
              ("gpu_query_cmd",), ("bastion", "hostname"), ("bastion", "ssh_user"), ("bastion", "ssh_key_path")]
    admitted = []
    for path in fields:
        entry = json.loads(json.dumps(base))
        (entry if len(path) == 1 else entry[path[0]])[path[-1]] = "nvidia-smi {{ 7 * 7 }}"
        try:
            agents_schema.parse_agents_toml(agents_toml([entry]), "ssh-agents.toml")
        except agents_schema.AgentsFileError:
            continue
        admitted.append(".".join(path))
    assert admitted == ["gpu_query_cmd"]


@pytest.mark.root
def test_playbook_templating_the_host_vars_leaves_the_jinja_literal(core, gpu_host, fleets, tmp_path):
    """A real play over SSH to the lab host, templating the hostile host vars every usual way."""
    gpu_host.set_tool()
    markers = [tmp_path / "PWNED-expression", tmp_path / "PWNED-statement"]
    payloads = {"cmd-expr": f"nvidia-smi {expression_payload(markers[0])}",
                "cmd-stmt": f"nvidia-smi {statement_payload(markers[1])}"}
    agents = [gpu_host.agent_entry(name=name, gpu_query_cmd=cmd) for name, cmd in payloads.items()]
    fleet = CompatFleet(tmp_path, agents, {name: gpu_host for name in payloads})
    fleets.append(fleet)
    control = tmp_path / "CONTROL"
    playbook = write_playbook(tmp_path / "hostvars.yml", [{
        "name": "Template hostile host vars", "hosts": "hwledger_agents", "gather_facts": False,
        "tasks": [
            {"name": "Reach the host with the plugin's connection vars",
             "ansible.builtin.raw": "echo reached", "register": "reached", "changed_when": False},
            {"name": "Whole-string template", "ansible.builtin.debug": {"msg": "{{ hwledger_gpu_query_cmd }}"}},
            {"name": "Embedded template", "ansible.builtin.debug": {"msg": "cmd=[{{ hwledger_gpu_query_cmd }}]"}},
            {"name": "Through hostvars",
             "ansible.builtin.debug": {"msg": "{{ hostvars[inventory_hostname].hwledger_agent.gpu_query_cmd }}"}},
            {"name": "The whole agent dict", "ansible.builtin.debug": {"var": "hwledger_agent"}},
            {"name": "Copy with set_fact",
             "ansible.builtin.set_fact": {"copied_cmd": "copy: {{ hwledger_agent['gpu_query_cmd'] }}"}},
            {"name": "Template the copy", "ansible.builtin.debug": {"msg": "{{ copied_cmd }}"}},
            control_task(control),
        ],
    }])

    report = run_playbooks(core, fleet.config, tmp_path, str(playbook))

    assert set(task_results(report, "Reach the host with the plugin's connection vars")) == set(payloads)
    for name, cmd in payloads.items():
        assert task_results(report, "Reach the host with the plugin's connection vars")[name]["stdout"].strip() == "reached"
        assert task_results(report, "Whole-string template")[name]["msg"] == cmd
        assert task_results(report, "Embedded template")[name]["msg"] == f"cmd=[{cmd}]"
        assert task_results(report, "Through hostvars")[name]["msg"] == cmd
        assert task_results(report, "The whole agent dict")[name]["hwledger_agent"]["gpu_query_cmd"] == cmd
        assert task_results(report, "Template the copy")[name]["msg"] == f"copy: {cmd}"
    assert control.exists(), "the control lookup did not run: this test could not see an evaluation"
    assert created(markers) == []


# --- 2. hostile GPU names from a remote host stay data ------------------------------------------------

@pytest.mark.root
def test_heartbeat_and_later_templating_keep_hostile_gpu_names_literal(core, gpu_host, fleets, tmp_path):
    markers = [tmp_path / "PWNED-GPU", tmp_path / "PWNED-GPU-statement"]
    names = [expression_payload(markers[0]), statement_payload(markers[1])]
    # The default 4-field noheader query's rows, as a host under someone else's control may print them.
    gpu_host.set_tool(stdout=f"0, {names[0]}, 2048 MiB, 1024 MiB\n1, {names[1]}, 4096 MiB, 3072 MiB\n")
    fleet = CompatFleet(tmp_path, [gpu_host.agent_entry(gpu_query_cmd=DEFAULT_QUERY)], {gpu_host.name: gpu_host})
    fleets.append(fleet)
    control = tmp_path / "CONTROL"
    follow_up = write_playbook(tmp_path / "follow-up.yml", [{
        "name": "Template the snapshot facts the heartbeat left", "hosts": "hwledger_agents", "gather_facts": False,
        "tasks": [
            {"name": "Fact as a whole template",
             "ansible.builtin.debug": {"msg": "{{ ansible_facts.hwledger_snapshot.gpus[0].name }}"}},
            {"name": "Injected fact var", "ansible.builtin.debug": {"msg": "{{ hwledger_snapshot.gpus[1].name }}"}},
            {"name": "Names joined",
             "ansible.builtin.debug": {"msg": "{{ ansible_facts.hwledger_snapshot.gpus | map(attribute='name') "
                                              "| join(' / ') }}"}},
            {"name": "Copy with set_fact",
             "ansible.builtin.set_fact": {
                 "copied_name": "gpu={{ hostvars[inventory_hostname].ansible_facts.hwledger_snapshot.gpus[1].name }}"}},
            {"name": "Template the copy", "ansible.builtin.debug": {"msg": "{{ copied_name }}"}},
            control_task(control),
        ],
    }])

    report = run_playbooks(core, fleet.config, tmp_path, "hwledger.fleet.heartbeat", str(follow_up))

    host = gpu_host.name
    query = task_results(report, "Query the GPUs and the host load in one exec")[host]
    assert not query.get("failed"), query
    assert [gpu["name"] for gpu in query["ansible_facts"]["hwledger_snapshot"]["gpus"]] == names
    summary = task_results(report, "Print the host's heartbeat summary")[host]["msg"]
    assert summary.startswith(f"{host}: 2 GPU(s) (nvidia, "), summary
    assert f"; [0] {names[0]}: 1024 of 2048 MiB free; [1] {names[1]}: 3072 of 4096 MiB free" in summary, summary
    assert task_results(report, "Fact as a whole template")[host]["msg"] == names[0]
    assert task_results(report, "Injected fact var")[host]["msg"] == names[1]
    assert task_results(report, "Names joined")[host]["msg"] == f"{names[0]} / {names[1]}"
    assert task_results(report, "Template the copy")[host]["msg"] == f"gpu={names[1]}"
    assert control.exists(), "the control lookup did not run: this test could not see an evaluation"
    assert created(markers) == []


# --- 3. the docs render ----------------------------------------------------------------------------------

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@pytest.mark.parametrize(("plugin_type", "name", "expected"), [
    ("inventory", "hwledger.fleet.ssh_agents", ["agents_file", "known_hosts_file", "host_key_checking", "compose"]),
    ("module", "hwledger.fleet.gpu_query", ["cmd", "timeout", "backend", "host_metrics", "hwledger_snapshot"]),
    ("role", "hwledger.fleet.job", ["ENTRY POINT: main", "hwledger_job", "hwledger_results_dir"]),
], ids=["ssh_agents", "gpu_query", "job-role"])
def test_ansible_doc_renders(core: Toolchain, tmp_path: Path, plugin_type: str, name: str, expected: list[str]):
    proc = core.run("ansible-doc", "-t", plugin_type, name, extra_env=ansible_env(tmp_path, ANSIBLE_NOCOLOR="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # ansible-doc emphasises names: ANSI bold on a terminal, *name* with ANSIBLE_NOCOLOR.
    text = _ANSI_ESCAPE.sub("", proc.stdout).replace("*", "")
    assert name in text.splitlines()[0], text[:500]
    missing = [word for word in expected if word not in text]
    assert not missing, f"ansible-doc {name} on {core.name} lacks {missing}"
    assert "ERROR" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr


# --- 4. a real ad-hoc command through the plugin ------------------------------------------------------

@pytest.mark.root
def test_adhoc_raw_through_the_inventory_plugin(core, gpu_host, fleets, tmp_path):
    fleet = CompatFleet(tmp_path, [gpu_host.agent_entry()], {gpu_host.name: gpu_host})
    fleets.append(fleet)
    pinned = fleet.known_hosts.read_bytes()
    mark = gpu_host.log_mark()
    proc = core.run("ansible", "all", "-i", str(fleet.config), "-m", "ansible.builtin.raw", "-a", "echo ok",
                    "-o", "-T", "10", extra_env=ansible_env(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{gpu_host.name} | CHANGED | rc=0 | (stdout) ok"), proc.stdout
    # It really logged in to this lab host with the lab's key, and learned nothing about host keys.
    assert "Accepted publickey for %s" % gpu_host.user in gpu_host.log_text(since=mark)
    assert fleet.known_hosts.read_bytes() == pinned
