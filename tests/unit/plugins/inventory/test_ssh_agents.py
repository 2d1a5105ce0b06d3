"""The hwledger.fleet.ssh_agents inventory plugin, through the real ansible-inventory / ansible-playbook.

Each test runs the installed ansible-core from the repository root (so the repo's ansible.cfg applies:
the collection path, and hwledger.fleet.ssh_agents enabled ahead of core's toml plugin). No sshd.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents, hostvars, ssh
from tests.toolchains import REPO

# The ansible-core under test: this venv's, or another install's bin directory (e.g. to check 2.18).
BIN = Path(os.environ.get("HWLEDGER_TEST_ANSIBLE_BIN") or Path(sys.executable).parent)
EXAMPLES = REPO / "examples"
GOLDEN = REPO / "tests" / "golden" / "spec-example.json"
# The golden file was written for this HOME (its paths are ~ expanded), so the test sets exactly it.
GOLDEN_ROOT = Path("/tmp/hwledger-golden")
GOLDEN_HOME = GOLDEN_ROOT / "home"
PLUGIN = "hwledger.fleet.ssh_agents"


def run_ansible(tool: str, *args: str, home: Path, env: dict | None = None, check: bool = True,
                cwd: Path = REPO) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("ANSIBLE_", "HWLEDGER_"))}
    environment.update({"HOME": str(home), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
                        "ANSIBLE_LOCAL_TEMP": str(home / ".ansible-tmp"),
                        # The default control dir is <store's dir>/cm: keep it next to HOME, short and
                        # independent of the user running the tests (the golden file names it).
                        "XDG_DATA_HOME": str(home.parent / "data")})
    environment.update(env or {})
    proc = subprocess.run([str(BIN / tool), *args], cwd=cwd, env=environment, check=False, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, f"{tool} {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def squeezed(text: str) -> str:
    """Text without whitespace: ansible-core 2.18 word-wraps warnings at 80 columns (also after hyphens)."""
    return re.sub(r"\s+", "", text)


def shows(expected: str, proc: subprocess.CompletedProcess) -> bool:
    """Whether ansible printed ``expected`` on stderr, however it wrapped the lines."""
    return squeezed(expected) in squeezed(proc.stderr)


def listing_of(proc: subprocess.CompletedProcess) -> dict:
    listing = json.loads(proc.stdout)
    listing["_meta"].pop("profile", None)  # ansible-core >= 2.19 names its serialisation profile here
    return listing


def inventory_json(*args: str, home: Path, env: dict | None = None) -> dict:
    return listing_of(run_ansible("ansible-inventory", *args, "--list", home=home, env=env))


def plain(value):
    """An inventory listing with the {"__ansible_unsafe": ...} markers taken off."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def minimal_results(stdout: str) -> dict[str, dict]:
    """{host: result} from the output of the ansible.builtin.minimal callback ("host | OK => {json}")."""
    decoder = json.JSONDecoder()
    results = {}
    for match in re.finditer(r"^(\S+) \| (?:SUCCESS|OK|CHANGED|FAILED!|UNREACHABLE!) => ", stdout, re.MULTILINE):
        results[match.group(1)] = decoder.raw_decode(stdout, match.end())[0]
    return results


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def write_config(directory: Path, name: str = "fleet.hwledger.yml", **options) -> Path:
    lines = [f"plugin: {PLUGIN}"] + [f"{key}: {json.dumps(value)}" for key, value in options.items()]
    return write_private(directory / name, "\n".join(lines) + "\n")


GPU_AGENT = """\
[[agents]]
name = "{name}"
hostname = "{hostname}"
ssh_user = "ubuntu"
ssh_key_path = "/keys/id_ed25519"
"""


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def short_dir():
    """A short private directory (control sockets must fit the unix socket path limit)."""
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="hwl-inv-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------
# The spec's example against the hand-written golden listing
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden_home():
    """HOME=/tmp/hwledger-golden/home, fresh, held under a lock (the path is fixed, test runs may overlap)."""
    GOLDEN_ROOT.mkdir(mode=0o700, exist_ok=True)
    with open(GOLDEN_ROOT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for directory in (GOLDEN_HOME, GOLDEN_ROOT / "data"):
            shutil.rmtree(directory, ignore_errors=True)
        GOLDEN_HOME.mkdir(mode=0o700)
        yield GOLDEN_HOME
        for directory in (GOLDEN_HOME, GOLDEN_ROOT / "data"):
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def spec_copy(tmp_path_factory) -> Path:
    """examples/ copied with private modes: a checkout under umask 002 would leave the TOML group-writable,
    which the plugin rightly refuses."""
    directory = tmp_path_factory.mktemp("examples")
    for name in ("ssh-agents.toml", "fleet.hwledger.yml"):
        write_private(directory / name, (EXAMPLES / name).read_text())
    return directory


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_spec_example_through_the_yaml_config_matches_the_golden_listing(golden_home, spec_copy, golden):
    assert inventory_json("-i", str(spec_copy / "fleet.hwledger.yml"), home=golden_home) == golden
    # The control dir `hwledger fleet serve` would use with this environment: <store's dir>/cm, made 0700.
    assert (GOLDEN_ROOT / "data" / "hwledger" / "cm").stat().st_mode & 0o777 == 0o700


def test_the_server_writes_the_plugins_hosts_vars_and_groups(golden_home, spec_copy, monkeypatch):
    """`hwledger fleet serve` does not run the plugin: it writes its runs' inventory from the same
    host vars and groups (hostvars.inventory). What the plugin lists and what the server writes agree."""
    listing = plain(inventory_json("-i", str(spec_copy / "fleet.hwledger.yml"), home=golden_home))
    monkeypatch.setenv("HOME", str(golden_home))  # the key paths start with ~/
    found, _warnings = agents.parse_agents_toml((spec_copy / "ssh-agents.toml").read_text(), "spec")
    policy = ssh.SshPolicy(known_hosts=str(golden_home / ".config" / "hwledger" / "known_hosts"),
                           control_dir=str(GOLDEN_ROOT / "data" / "hwledger" / "cm"))
    written = hostvars.inventory(found, policy)["all"]["children"]
    for group in hostvars.GROUPS:
        assert sorted(written[group]["hosts"]) == sorted(listing.get(group, {}).get("hosts", [])), group
    for name, variables in written["hwledger_agents"]["hosts"].items():
        assert listing["_meta"]["hostvars"][name] == variables


def test_spec_example_toml_given_directly_matches_the_golden_listing(golden_home, spec_copy, golden):
    assert inventory_json("-i", str(spec_copy / "ssh-agents.toml"), home=golden_home) == golden


def test_export_listing_has_the_same_hosts_and_vars(golden_home, spec_copy, golden):
    # AWX imports `ansible-inventory --list --export`.
    exported = inventory_json("-i", str(spec_copy / "fleet.hwledger.yml"), "--export", home=golden_home)
    assert exported == golden


def test_spec_example_warns_about_missing_keys_and_the_rocm_query(golden_home, spec_copy):
    proc = run_ansible("ansible-inventory", "-i", str(spec_copy / "fleet.hwledger.yml"), "--graph",
                       home=golden_home)
    toml = spec_copy / "ssh-agents.toml"
    assert shows(f"{toml}:13: agent \"lambda-labs-2\" (agent #2), field 'ssh_key_path': key file "
                 f"{golden_home}/.ssh/lambda_key does not exist", proc)
    assert shows(f"{toml}:14: agent \"lambda-labs-2\" (agent #2), field 'gpu_query_cmd': ", proc)
    assert shows("rocm-smi --showtemp --showmeminfo vram --csv", proc)  # the corrected command
    assert shows(f"known_hosts file {golden_home}/.config/hwledger/known_hosts does not exist", proc)


# ------------------------------------------------------------------------------------------------
# Errors reach the user, without a traceback
# ------------------------------------------------------------------------------------------------

BAD_TOML = GPU_AGENT.format(name="gpu-1", hostname="gpu-1;touch /tmp/x") + 'ssh_port = "22"\npasword = "x"\n'


def test_errors_in_the_agents_file_are_shown_with_file_line_agent_and_field(tmp_path, home):
    agents = write_private(tmp_path / "ssh-agents.toml", BAD_TOML)
    config = write_config(tmp_path, agents_file="ssh-agents.toml")
    proc = run_ansible("ansible-inventory", "-i", str(config), "--list", home=home, check=False)
    assert shows(f"{agents}:3: agent \"gpu-1\" (agent #1), field 'hostname': \"gpu-1;touch /tmp/x\" contains ';'",
                 proc)
    assert shows(f"{agents}:6: agent \"gpu-1\" (agent #1), field 'ssh_port': is a string (\"22\"); write the number "
                 "without quotes", proc)
    assert shows(f"{agents}:7: agent \"gpu-1\" (agent #1), field 'pasword': ", proc)
    assert shows("key-based SSH authentication only", proc)
    assert "Traceback" not in proc.stderr + proc.stdout
    # The repo's ansible.cfg sets unparsed_is_failed (as AWX does): the run stops, printing no hosts.
    assert proc.returncode != 0 and proc.stdout.strip() == ""
    # With Ansible's default (unparsed sources only warn) the inventory is empty, never half-read.
    lenient = run_ansible("ansible-inventory", "-i", str(config), "--list", home=home, check=False,
                          env={"ANSIBLE_INVENTORY_UNPARSED_FAILED": "false"})
    assert json.loads(lenient.stdout)["_meta"]["hostvars"] == {}
    assert "Traceback" not in lenient.stderr


def test_errors_in_a_toml_source_are_not_hidden_by_core_toml(tmp_path, home):
    agents = write_private(tmp_path / "ssh-agents.toml", BAD_TOML)
    proc = run_ansible("ansible-inventory", "-i", str(agents), "--list", home=home, check=False)
    assert shows(f"{agents}:3: agent \"gpu-1\" (agent #1), field 'hostname'", proc)
    assert shows("core's toml inventory plugin will now read", proc)
    assert "Traceback" not in proc.stderr


def test_group_writable_agents_file_is_refused(tmp_path, home):
    agents = write_private(tmp_path / "ssh-agents.toml", GPU_AGENT.format(name="gpu-1", hostname="gpu-1"))
    agents.chmod(0o664)
    config = write_config(tmp_path, agents_file=str(agents))
    proc = run_ansible("ansible-inventory", "-i", str(config), "--list", home=home, check=False)
    assert shows(f"{agents}: bad permissions 0664: the agents file is group- or world-writable", proc)
    assert shows(f"Fix: chmod go-w {agents}", proc)


def test_without_our_ansible_cfg_core_toml_swallows_the_agents_file(tmp_path, home):
    """Why the *.hwledger.yml source is the recommended one: with Ansible's default plugin list, core's
    toml plugin claims an ssh-agents.toml and returns an empty inventory, successfully."""
    agents = write_private(tmp_path / "ssh-agents.toml", GPU_AGENT.format(name="gpu-1", hostname="gpu-1"))
    empty_cfg = write_private(tmp_path / "empty.cfg", "")
    proc = run_ansible("ansible-inventory", "-i", str(agents), "--list", home=home,
                       env={"ANSIBLE_CONFIG": str(empty_cfg)})
    assert json.loads(proc.stdout)["_meta"]["hostvars"] == {}
    assert shows("Skipping 'agents' as this is not a valid group definition", proc)


def test_other_toml_inventories_are_left_to_core_toml(tmp_path, home):
    other = write_private(tmp_path / "hosts.toml", '[web.hosts]\n"web-1" = { ansible_host = "10.0.0.1" }\n')
    listing = inventory_json("-i", str(other), home=home)
    assert listing["web"] == {"hosts": ["web-1"]}
    assert listing["_meta"]["hostvars"]["web-1"]["ansible_host"] == "10.0.0.1"


# ------------------------------------------------------------------------------------------------
# Options, constructed features, cache
# ------------------------------------------------------------------------------------------------

def test_options_and_constructed_features(tmp_path, home, short_dir):
    write_private(tmp_path / "ssh-agents.toml",
                  GPU_AGENT.format(name="vast-1", hostname="10.1.2.3")
                  + 'gpu_query_cmd = "amd-smi metric --json"\n\n'
                  + GPU_AGENT.format(name="lab-2", hostname="2001:db8::7")
                  + '\n[agents.bastion]\nhostname = "2001:db8::1"\nssh_user = "jump"\nssh_key_path = "/keys/j"\n'
                  + "ssh_port = 2222\n")
    config = write_config(
        tmp_path, agents_file="ssh-agents.toml", host_key_checking="accept-new",
        known_hosts_file=str(short_dir / "kh"), control_dir=str(short_dir / "cp"), connect_timeout=3,
        compose={"hwledger_user_upper": "ansible_user | upper"},
        groups={"rented": "'vast' in inventory_hostname"},
        keyed_groups=[{"key": "hwledger_agent.bastion.ssh_user | default('direct')", "prefix": "via"}])
    listing = plain(inventory_json("-i", str(config), home=home))
    vast = listing["_meta"]["hostvars"]["vast-1"]
    lab = listing["_meta"]["hostvars"]["lab-2"]
    assert vast["hwledger_user_upper"] == "UBUNTU"
    assert listing["rented"] == {"hosts": ["vast-1"]}
    assert listing["via_direct"] == {"hosts": ["vast-1"]}
    assert listing["via_jump"] == {"hosts": ["lab-2"]}
    assert listing["hwledger_rocm"] == {"hosts": ["vast-1"]}  # amd-smi is the ROCm family
    assert listing["hwledger_via_bastion"] == {"hosts": ["lab-2"]}
    assert listing["hwledger_nvidia"] == {"hosts": ["lab-2"]}  # the default query
    assert (f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={short_dir}/kh "
            "-o GlobalKnownHostsFile=/dev/null -o HostKeyAlias=hwledger-agent-vast-1") in vast["ansible_ssh_common_args"]
    assert "-o ConnectTimeout=3 " in vast["ansible_ssh_common_args"]
    assert f"-o ControlPath={short_dir}/cp/%C" in vast["ansible_ssh_common_args"]
    assert lab["ansible_host"] == "2001:db8::7"
    assert "-p 2222 -l jump -W '\"'\"'[%h]:%p'\"'\"' -- 2001:db8::1'" in lab["ansible_ssh_common_args"]
    assert "HostKeyAlias=hwledger-bastion-2001:db8::1-2222" in lab["ansible_ssh_common_args"]
    assert (short_dir / "cp").is_dir()


def test_host_key_checking_off_and_no_connection_sharing(tmp_path, home):
    write_private(tmp_path / "ssh-agents.toml", GPU_AGENT.format(name="gpu-1", hostname="gpu-1"))
    config = write_private(tmp_path / "fleet.hwledger.yml",
                           f"plugin: {PLUGIN}\nagents_file: ssh-agents.toml\nhost_key_checking: 'off'\n"
                           "control_dir: ''\n")
    proc = run_ansible("ansible-inventory", "-i", str(config), "--list", home=home)
    args = plain(json.loads(proc.stdout))["_meta"]["hostvars"]["gpu-1"]["ansible_ssh_common_args"]
    assert args.startswith("-F none -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null ")
    assert "-o ControlMaster=no -o ControlPath=none" in args
    assert shows("host key checking is off", proc)


def test_unquoted_yaml_boolean_is_refused_with_the_valid_values(tmp_path, home):
    write_private(tmp_path / "ssh-agents.toml", GPU_AGENT.format(name="gpu-1", hostname="gpu-1"))
    config = write_private(tmp_path / "fleet.hwledger.yml",
                           f"plugin: {PLUGIN}\nagents_file: ssh-agents.toml\nhost_key_checking: no\n")
    proc = run_ansible("ansible-inventory", "-i", str(config), "--list", home=home, check=False)
    message = squeezed(proc.stderr).lower()  # Ansible's own wording, which differs between 2.18 and 2.19
    assert "invalidvalue" in message and "false" in message and "host_key_checking" in message
    assert "validvaluesare:yes,accept-new,off" in message
    assert proc.returncode != 0 and proc.stdout.strip() == ""  # unparsed_is_failed in ansible.cfg


def test_too_long_control_dir_is_a_clear_error(tmp_path, home):
    write_private(tmp_path / "ssh-agents.toml", GPU_AGENT.format(name="gpu-1", hostname="gpu-1"))
    config = write_config(tmp_path, agents_file="ssh-agents.toml", control_dir="/tmp/" + "c" * 60)
    proc = run_ansible("ansible-inventory", "-i", str(config), "--list", home=home, check=False)
    assert shows(f"control_dir \"/tmp/{'c' * 60}\" is 65 bytes long", proc)
    assert shows("Fix: choose a shorter directory", proc) and "Traceback" not in proc.stderr
    assert proc.returncode != 0 and proc.stdout.strip() == ""  # unparsed_is_failed in ansible.cfg


def test_inventory_cache_is_used_only_while_the_file_is_unchanged(tmp_path, home):
    agents = write_private(tmp_path / "ssh-agents.toml", GPU_AGENT.format(name="gpu-1", hostname="10.0.0.1"))
    cache_dir = tmp_path / "cache"
    config = write_config(tmp_path, agents_file="ssh-agents.toml", cache=True, cache_plugin="jsonfile",
                          cache_connection=str(cache_dir))
    first = plain(inventory_json("-i", str(config), home=home))
    [cache_file] = list(cache_dir.iterdir())
    cached = json.loads(cache_file.read_text())
    if "__payload__" in cached:  # ansible-core 2.19 wraps what a cache plugin stores
        cached = json.loads(cached["__payload__"])
    assert [agent["name"] for agent in plain(cached)["agents"]] == ["gpu-1"]
    proc = run_ansible("ansible-inventory", "-i", str(config), "--list", home=home)
    assert plain(listing_of(proc)) == first
    # Answered from the cache (a fresh parse would name the line, "ssh-agents.toml:5:"), with the key
    # files checked again rather than replayed.
    assert shows(f"{agents}: agent \"gpu-1\" (agent #1), field 'ssh_key_path': key file /keys/id_ed25519 "
                 "does not exist", proc)
    # A changed file is read again, whatever the cache holds.
    write_private(agents, GPU_AGENT.format(name="gpu-2", hostname="10.0.0.2"))
    os.utime(agents, ns=(1, 1))  # a different mtime even within the filesystem's timestamp granularity
    assert list(plain(inventory_json("-i", str(config), home=home))["_meta"]["hostvars"]) == ["gpu-2"]


# ------------------------------------------------------------------------------------------------
# Untrusted values stay inert
# ------------------------------------------------------------------------------------------------

def test_jinja_in_the_agents_file_is_never_evaluated(tmp_path, home):
    pwned = tmp_path / "PWNED"
    pwned_block = tmp_path / "PWNED-block"
    expression = "{{ lookup('pipe', 'touch %s') }}" % pwned
    statement = "{%% for x in [1] %%}{{ lookup('pipe', 'touch %s') }}{%% endfor %%}" % pwned_block
    write_private(tmp_path / "ssh-agents.toml",
                  GPU_AGENT.format(name="gpu-1", hostname="10.0.0.1") + f"gpu_query_cmd = {json.dumps(expression)}\n\n"
                  + GPU_AGENT.format(name="gpu-2", hostname="10.0.0.2") + f"gpu_query_cmd = {json.dumps(statement)}\n")
    config = write_config(tmp_path, agents_file="ssh-agents.toml",
                          compose={"hwledger_cmd_copy": "hwledger_gpu_query_cmd"})
    playbook = write_private(tmp_path / "show.yml", """\
- name: Show what the inventory says
  hosts: all
  gather_facts: false
  connection: local
  tasks:
    - name: Print the query command through every path a playbook might use
      ansible.builtin.debug:
        msg:
          - "{{ hwledger_gpu_query_cmd }}"
          - "{{ hwledger_agent.gpu_query_cmd }}"
          - "{{ hostvars[inventory_hostname].hwledger_gpu_query_cmd }}"
          - "{{ hwledger_cmd_copy }}"
          - "{{ hwledger_gpu_query_cmd | string }}"
""")
    listing = plain(inventory_json("-i", str(config), home=home))
    assert listing["_meta"]["hostvars"]["gpu-1"]["hwledger_gpu_query_cmd"] == expression
    assert listing["_meta"]["hostvars"]["gpu-1"]["hwledger_cmd_copy"] == expression
    proc = run_ansible("ansible-playbook", "-i", str(config), str(playbook), home=home,
                       env={"ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal"})
    results = minimal_results(proc.stdout)
    assert results["gpu-1"]["msg"] == [expression] * 5
    assert results["gpu-2"]["msg"] == [statement] * 5
    assert not pwned.exists() and not pwned_block.exists()
