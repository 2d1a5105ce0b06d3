"""The ssh-agents.toml schema (plugins/plugin_utils/agents.py): the spec's example, every kind of bad input
with its file, line, agent, field and fix, file permissions, and writing agents back as TOML."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agent_values as V
from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as A
from tests.unit.plugins.plugin_utils.agent_samples import (
    GOOD_AGENT,
    GOOD_BASTION,
    SOURCE,
    SPEC_EXAMPLE,
    SPEC_QUERY,
    agent_block,
    error_of,
    parse,
)


def write_agents(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "ssh-agents.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_spec_example_loads_exactly(home):
    agents, warnings = A.parse_agents_toml(SPEC_EXAMPLE.read_text(), str(SPEC_EXAMPLE))
    assert agents == [
        A.Agent(name="vast-rental-1", hostname="123.45.67.89", ssh_user="root",
                ssh_key_path=f"{home}/.ssh/id_ed25519", ssh_port=22, gpu_query_cmd=SPEC_QUERY,
                host_key_fingerprint=None, bastion=None),
        A.Agent(name="lambda-labs-2", hostname="compute-2.lambda-labs.com", ssh_user="ubuntu",
                ssh_key_path=f"{home}/.ssh/lambda_key", ssh_port=22,
                gpu_query_cmd="rocm-smi --showtemp --showmeminfo --csv", host_key_fingerprint=None, bastion=None),
        A.Agent(name="vpn-private-gpu", hostname="internal-gpu.local", ssh_user="ubuntu",
                ssh_key_path=f"{home}/.ssh/id_ed25519", ssh_port=22, gpu_query_cmd=SPEC_QUERY,
                host_key_fingerprint=None,
                bastion=A.Bastion(hostname="bastion.example.com", ssh_user="root",
                                  ssh_key_path=f"{home}/.ssh/bastion_key", ssh_port=22)),
    ]
    # No key exists under this HOME: one warning per key, naming the line, the agent and the field.
    assert warnings == [
        f"{SPEC_EXAMPLE}:5: agent \"vast-rental-1\" (agent #1), field 'ssh_key_path': key file "
        f"{home}/.ssh/id_ed25519 does not exist, so ssh cannot log in to this agent; create it "
        f"(ssh-keygen -t ed25519 -f {home}/.ssh/id_ed25519) or point ssh_key_path at your private key",
        f"{SPEC_EXAMPLE}:13: agent \"lambda-labs-2\" (agent #2), field 'ssh_key_path': key file "
        f"{home}/.ssh/lambda_key does not exist, so ssh cannot log in to this agent; create it "
        f"(ssh-keygen -t ed25519 -f {home}/.ssh/lambda_key) or point ssh_key_path at your private key",
        f"{SPEC_EXAMPLE}:20: agent \"vpn-private-gpu\" (agent #3), field 'ssh_key_path': key file "
        f"{home}/.ssh/id_ed25519 does not exist, so ssh cannot log in to this agent; create it "
        f"(ssh-keygen -t ed25519 -f {home}/.ssh/id_ed25519) or point ssh_key_path at your private key",
        f"{SPEC_EXAMPLE}:25: agent \"vpn-private-gpu\" (agent #3), field 'bastion.ssh_key_path': key file "
        f"{home}/.ssh/bastion_key does not exist, so ssh cannot log in to the bastion; create it "
        f"(ssh-keygen -t ed25519 -f {home}/.ssh/bastion_key) or point bastion.ssh_key_path at your private key",
    ]


def test_toml_syntax_error_has_line_and_column():
    message = error_of('[[agents]]\nname = "gpu-1"\nhostname = gpu-1.example.com\n')
    assert message.startswith(f"{SOURCE}:3:12: TOML syntax error: Invalid value")
    assert "hostname = gpu-1.example.com" in message
    assert 'Fix: correct line 3; strings need double quotes' in message


def test_toml_syntax_error_at_end_of_file():
    message = error_of('[[agents]]\nname = "gpu-1\n')
    assert message.startswith(f"{SOURCE}:2:") and "TOML syntax error" in message
    assert "Fix:" in message


@pytest.mark.parametrize("missing, fix", [
    ("name", 'add name = "a-unique-name"'),
    ("hostname", 'add hostname = "gpu.example.com"'),
    ("ssh_user", 'add ssh_user = "ubuntu"'),
    ("ssh_key_path", 'add ssh_key_path = "~/.ssh/id_ed25519"'),
])
def test_missing_required_field(missing, fix):
    fields = {key: value for key, value in GOOD_AGENT.items() if key != missing}
    message = error_of(agent_block(GOOD_AGENT) + "\n" + agent_block(fields))
    where = "agent #2" if missing == "name" else 'agent "gpu-1" (agent #2)'
    assert message.startswith(f"{SOURCE}:7: {where}, field '{missing}': missing required field; {fix}")


def test_missing_bastion_field_points_into_the_bastion_table():
    bastion = {key: value for key, value in GOOD_BASTION.items() if key != "ssh_user"}
    message = error_of(agent_block(GOOD_AGENT, bastion))
    assert message.startswith(f"{SOURCE}:7: agent \"gpu-1\" (agent #1), field 'bastion.ssh_user': "
                              "missing required field; add ssh_user = ")


@pytest.mark.parametrize("field, value, expected", [
    ("hostname", 5, "must be a string (a DNS name or an IP address), got an integer 5; write it in double quotes"),
    ("ssh_user", True, "must be a string (the remote login name), got a boolean True"),
    ("ssh_key_path", ["/k"], "must be a string (the path to the private key), got an array"),
    ("gpu_query_cmd", ["nvidia-smi"], "must be a string (the command that prints GPU state"),
    ("ssh_port", 22.5, "must be an integer from 1 to 65535, got a float 22.5"),
    ("ssh_port", True, "must be an integer from 1 to 65535, got a boolean True"),
    ("host_key_fingerprint", 7, "must be a string (the host key's SHA256 fingerprint), got an integer"),
])
def test_wrong_type(field, value, expected):
    message = error_of(agent_block({**GOOD_AGENT, field: value}))
    line = list(GOOD_AGENT).index(field) + 2 if field in GOOD_AGENT else len(GOOD_AGENT) + 2
    assert message.startswith(f"{SOURCE}:{line}: agent \"gpu-1\" (agent #1), field '{field}': ")
    assert expected in message


def test_bastion_of_the_wrong_type():
    message = error_of(agent_block({**GOOD_AGENT, "bastion": "bastion.example.com"}))
    assert "field 'bastion': must be a table, got a string; write it as an [agents.bastion] section" in message


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_port_out_of_range(port):
    message = error_of(agent_block({**GOOD_AGENT, "ssh_port": port}))
    assert message == (f"{SOURCE}:6: agent \"gpu-1\" (agent #1), field 'ssh_port': must be from 1 to 65535, "
                       f"got {port}; use the port sshd listens on (usually 22)")


@pytest.mark.parametrize("port", ["22", "22 -oProxyCommand=x"])
def test_port_as_a_string(port):
    message = error_of(agent_block({**GOOD_AGENT, "ssh_port": port}))
    assert message == (f"{SOURCE}:6: agent \"gpu-1\" (agent #1), field 'ssh_port': is a string "
                       f"({json.dumps(port)}); write the number without quotes, e.g. ssh_port = 22")


def test_bastion_port_out_of_range():
    message = error_of(agent_block(GOOD_AGENT, {**GOOD_BASTION, "ssh_port": 70000}))
    assert message.startswith(f"{SOURCE}:11: agent \"gpu-1\" (agent #1), field 'bastion.ssh_port': "
                              "must be from 1 to 65535, got 70000")


def test_duplicate_names_ignore_case():
    text = agent_block(GOOD_AGENT) + "\n" + agent_block({**GOOD_AGENT, "hostname": "10.0.0.2"}) + "\n" + \
        agent_block({**GOOD_AGENT, "name": "GPU-1"})
    message = error_of(text)
    assert message.startswith(f"{SOURCE}: 2 problems in the agents file:")
    assert (f"{SOURCE}:8: agent \"gpu-1\" (agent #2), field 'name': duplicate: agent #1 at line 1 is already "
            "called \"gpu-1\" (names are compared ignoring case); give each agent a unique name") in message
    assert f"{SOURCE}:14: agent \"GPU-1\" (agent #3), field 'name': duplicate: agent #1 at line 1" in message


def test_unknown_key_suggests_the_nearest_valid_key():
    message = error_of(agent_block({**GOOD_AGENT, "hostnme": "x"}))
    assert message == (f"{SOURCE}:6: agent \"gpu-1\" (agent #1), field 'hostnme': unknown key \"hostnme\"; "
                       "did you mean 'hostname'?")


def test_unknown_key_in_bastion_and_without_a_near_match():
    message = error_of(agent_block({**GOOD_AGENT, "colour": "blue"}, {**GOOD_BASTION, "ssh_prot": 22}))
    assert (f"{SOURCE}:6: agent \"gpu-1\" (agent #1), field 'colour': unknown key \"colour\"; valid keys are "
            "name, hostname, ssh_user, ssh_key_path, ssh_port, gpu_query_cmd, host_key_fingerprint, query_timeout_s, "
            "min_query_interval_s, bastion") in message
    assert (f"{SOURCE}:13: agent \"gpu-1\" (agent #1), field 'bastion.ssh_prot': unknown key \"ssh_prot\"; "
            "did you mean 'ssh_port'?") in message


def test_unknown_top_level_key_and_single_bracket_agents():
    message = error_of('agent = 1\n' + agent_block(GOOD_AGENT))
    assert f"{SOURCE}:1: unknown top-level key \"agent\"; did you mean 'agents'?" in message
    message = error_of('[agents]\nname = "gpu-1"\n')
    assert message == (f"{SOURCE}:1: 'agents' must be an array of tables, got a table; start each agent with "
                       "[[agents]] (two brackets), not [agents]")


@pytest.mark.parametrize("key", ["password", "ssh_password", "passphrase", "ssh_pass", "Password", "key_passwd",
                                 "sudo_pwd", "client_secret", "pasword", "ssh_pswd"])
def test_password_like_fields_are_refused(key):
    message = error_of(agent_block({**GOOD_AGENT, key: "hunter2"}))
    assert message.startswith(f"{SOURCE}:6: agent \"gpu-1\" (agent #1), field '{key}': ")
    assert "hwledger uses key-based SSH authentication only; remove it and set ssh_key_path" in message
    assert "hunter2" not in message  # never echo a secret


def test_password_in_bastion_is_refused():
    message = error_of(agent_block(GOOD_AGENT, {**GOOD_BASTION, "password": "x"}))
    assert f"{SOURCE}:12: agent \"gpu-1\" (agent #1), field 'bastion.password': " in message
    assert "key-based SSH authentication only" in message


INJECTIONS = {
    "space": ("a b", "contains a space"),
    "single quote": ("a'b", "contains a single quote"),
    "double quote": ('a"b', "contains a double quote"),
    "semicolon": ("a;id", "contains ';'"),
    "dollar": ("a$(id)", "contains '$'"),
    "backtick": ("a`id`b", "contains a backtick"),
    "newline": ("a\nid", "contains a newline, which is never valid here"),
    "NUL": ("a\0b", "contains a NUL byte, which is never valid here"),
    "escape": ("a\x1b[2Kb", "contains the control character U+001B"),
    "pipe": ("a|id", "contains '|'"),
    "leading dash": ("-oProxyCommand=touch${IFS}/tmp/pwn", "starts with '-', which ssh would read as an option"),
}
INJECTION_FIELDS = ["hostname", "ssh_user", "ssh_key_path", "bastion.hostname", "bastion.ssh_user",
                    "bastion.ssh_key_path"]


@pytest.mark.parametrize("field", INJECTION_FIELDS)
@pytest.mark.parametrize("case", list(INJECTIONS))
def test_injection_characters_are_refused(field, case):
    payload, expected = INJECTIONS[case]
    if field.endswith("ssh_key_path") and not payload.startswith("-"):
        payload = "/keys/" + payload
    agent, bastion = dict(GOOD_AGENT), dict(GOOD_BASTION)
    if field.startswith("bastion."):
        bastion[field[len("bastion."):]] = payload
    else:
        agent[field] = payload
    message = error_of(agent_block(agent, bastion))
    header = f"agent \"gpu-1\" (agent #1), field '{field}': "
    assert header in message
    assert message.startswith(f"{SOURCE}:"), message
    assert message.split(":", 2)[1].isdigit()  # a line number
    assert expected in message
    assert "\n" not in message and "\0" not in message and "\x1b" not in message  # shown escaped
    with pytest.raises(ValueError):  # and the CLI's validators agree
        {"hostname": V.validate_hostname, "ssh_user": V.validate_user,
         "ssh_key_path": V.validate_key_path}[field.split(".")[-1]](payload)


@pytest.mark.parametrize("name, expected", [
    ("../etc", "is not a valid agent name"), ("a/b", "is not a valid agent name"),
    ("a b", "is not a valid agent name"),
    ("-a", "is not a valid agent name"), ("auto", "is reserved"), ("a..b", "without '..'"), ("", "is empty"),
    ("a\nb", "contains a newline"), ("x" * 65, "use 1-64 letters"),
])
def test_bad_agent_names(name, expected):
    message = error_of(agent_block({**GOOD_AGENT, "name": name}))
    assert message.startswith(f"{SOURCE}:2: agent #1, field 'name': ")
    assert expected in message


@pytest.mark.parametrize("hostname, expected", [
    ("999.1.1.1", "is not a valid IPv4 address"),
    ("010.0.0.1", "is not a valid IPv4 address"),
    ("[2001:db8::1]", "write an IPv6 address without brackets, e.g. \"2001:db8::1\""),
    ("fe80::1%eth0", "IPv6 zone indexes ('%') are not supported"),
    ("2001:db8::zz", "is not a valid IPv6 address"),
    ("host:22", "put the port in ssh_port"),
    ("a" * 64 + ".example.com", "is not a valid DNS name"),
    ("-gpu.example.com", "starts with '-'"),
    ("gpu-.example.com", "is not a valid DNS name"),
    ("{{ lookup('pipe','id') }}", "contains '{'"),
])
def test_bad_hostnames(hostname, expected):
    message = error_of(agent_block({**GOOD_AGENT, "hostname": hostname}))
    assert message.startswith(f"{SOURCE}:3: agent \"gpu-1\" (agent #1), field 'hostname': ")
    assert expected in message


@pytest.mark.parametrize("hostname", ["123.45.67.89", "2001:db8::1", "::1", "gpu_1.internal", "localhost",
                                      "compute-2.lambda-labs.com", "fqdn.example.com."])
def test_good_hostnames(hostname):
    assert V.validate_hostname(hostname) == hostname


def test_relative_key_path_is_refused():
    message = error_of(agent_block({**GOOD_AGENT, "ssh_key_path": "keys/id_ed25519"}))
    assert ("field 'ssh_key_path': \"keys/id_ed25519\" is not an absolute path; write it from / or from ~/ "
            "(e.g. ~/.ssh/id_ed25519), since ssh may run from any directory") in message


def test_key_path_with_a_space_says_how_to_fix():
    message = error_of(agent_block({**GOOD_AGENT, "ssh_key_path": "/tmp/my key's/id_ed25519"}))
    assert ("contains a space, which ssh or the ProxyCommand shell would split or interpret; move or link the "
            "private key to a path made only of letters, digits and . _ / + @ , : ~ -") in message


def test_control_characters_in_the_query_command():
    message = error_of(agent_block({**GOOD_AGENT, "gpu_query_cmd": "nvidia-smi\nrm -rf /"}))
    assert "field 'gpu_query_cmd': contains a newline, which is never valid here; remove it" in message


@pytest.mark.parametrize("fingerprint, ok", [
    ("SHA256:" + "A" * 43, True), ("SHA256:" + "a+/9" * 10 + "abc", True),
    ("MD5:aa:bb", False), ("SHA256:short", False), ("SHA256:" + "A" * 43 + " x", False),
])
def test_host_key_fingerprint(fingerprint, ok):
    text = agent_block({**GOOD_AGENT, "host_key_fingerprint": fingerprint})
    if ok:
        [agent] = parse(text)[0]
        assert agent.host_key_fingerprint == fingerprint
    else:
        assert "is not a SHA256 fingerprint; write it as ssh-keygen prints it" in error_of(text)


def test_every_problem_is_reported_at_once_in_line_order():
    text = agent_block({**GOOD_AGENT, "hostname": "a b", "ssh_port": "22", "password": "x"})
    with pytest.raises(A.AgentsFileError) as caught:
        parse(text)
    assert [problem.split(":", 2)[1] for problem in caught.value.problems] == ["3", "6", "7"]


def test_an_inline_agents_array_still_names_the_agent():
    message = error_of('agents = [{name = "gpu-1", hostname = "a b", ssh_user = "u", ssh_key_path = "/k"}]\n')
    assert message.startswith(f"{SOURCE}: agent \"gpu-1\" (agent #1), field 'hostname': ")


def test_an_empty_file_is_a_warning_not_an_error():
    assert parse("") == ([], [f"{SOURCE}: defines no agents; add an [[agents]] table for each GPU host"])


def test_agent_constructor_validates_too():
    with pytest.raises(ValueError, match=r"^hostname: \"a;b\" contains ';'"):
        A.Agent(name="x", hostname="a;b", ssh_user="u", ssh_key_path="/k")
    with pytest.raises(ValueError, match=r"^bastion.ssh_port: must be from 1 to 65535"):
        A.Bastion(hostname="b", ssh_user="u", ssh_key_path="/k", ssh_port=0)


@pytest.mark.parametrize("mode, kind", [(0o620, "group"), (0o602, "world"), (0o666, "both")])
def test_writable_agents_file_is_refused(tmp_path, mode, kind):
    path = write_agents(tmp_path, agent_block(GOOD_AGENT), mode)
    with pytest.raises(A.AgentsFileError) as caught:
        A.load_agents_file(str(path))
    assert str(caught.value) == (
        f"{path}: bad permissions {mode:04o}: the agents file is group- or world-writable, so another local "
        f"user could add a host, a ProxyCommand bastion or a command that hwledger would run. "
        f"Fix: chmod go-w {path}")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_agents_file_owned_by_someone_else_is_refused(tmp_path):
    path = write_agents(tmp_path, agent_block(GOOD_AGENT))
    os.chown(path, 12345, -1)
    with pytest.raises(A.AgentsFileError, match=r"bad owner: the agents file belongs to uid 12345"):
        A.load_agents_file(str(path))


def test_missing_agents_file(tmp_path):
    with pytest.raises(A.AgentsFileError, match=r"agents file not found. Fix: create it"):
        A.load_agents_file(str(tmp_path / "nope.toml"))


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "ssh-agents.toml"
    path.write_bytes(b'[[agents]]\nname = "caf\xe9"\n')
    path.chmod(0o600)
    with pytest.raises(A.AgentsFileError, match=rf"^{path}:2: the file is not valid UTF-8"):
        A.load_agents_file(str(path))


def test_key_files_present_missing_and_too_open(tmp_path):
    good_key = tmp_path / "good_key"
    good_key.write_text("k")
    good_key.chmod(0o600)
    open_key = tmp_path / "open_key"
    open_key.write_text("k")
    open_key.chmod(0o644)
    text = (agent_block({**GOOD_AGENT, "ssh_key_path": str(good_key)}) + "\n"
            + agent_block({**GOOD_AGENT, "name": "gpu-2", "ssh_key_path": str(tmp_path / "absent")},
                          {**GOOD_BASTION, "ssh_key_path": str(open_key)}))
    agents, warnings = A.load_agents_file(str(write_agents(tmp_path, text)))
    assert len(agents) == 2
    path = tmp_path / "ssh-agents.toml"
    assert warnings == [
        f"{path}:11: agent \"gpu-2\" (agent #2), field 'ssh_key_path': key file {tmp_path}/absent does not "
        f"exist, so ssh cannot log in to this agent; create it (ssh-keygen -t ed25519 -f {tmp_path}/absent) "
        "or point ssh_key_path at your private key",
        f"{path}:16: agent \"gpu-2\" (agent #2), field 'bastion.ssh_key_path': key file {open_key} has mode "
        f"0644; ssh ignores private keys that others can read: run chmod 600 {open_key}",
    ]


def test_render_agent_toml_round_trips(home):
    agents = A.parse_agents_toml(SPEC_EXAMPLE.read_text(), str(SPEC_EXAMPLE))[0]
    tricky = A.Agent(name="t", hostname="::1", ssh_user="u", ssh_key_path="/k",
                     gpu_query_cmd='sh -c "nvidia-smi -q" \\ {{ lookup(\'pipe\', \'id\') }} é',
                     host_key_fingerprint="SHA256:" + "B" * 43)
    for agent in [*agents, tricky]:
        rendered = A.render_agent_toml(agent)
        assert rendered.startswith("[[agents]]\n")
        assert parse(rendered)[0] == [agent]
    combined = "\n".join(A.render_agent_toml(agent) for agent in agents)
    assert parse(combined)[0] == agents
    assert A.render_agent_toml(agents[2]).endswith(
        f'[agents.bastion]\nhostname = "bastion.example.com"\nssh_user = "root"\n'
        f'ssh_key_path = "{home}/.ssh/bastion_key"\nssh_port = 22\n')


def test_agent_dict_round_trip_revalidates():
    agent = A.Agent(**GOOD_AGENT, bastion=A.Bastion(**GOOD_BASTION))
    assert A.agent_from_dict(A.agent_to_dict(agent)) == agent
    tampered = {**A.agent_to_dict(agent), "hostname": "x;touch /tmp/p"}
    with pytest.raises(A.AgentsFileError, match="field 'hostname'"):
        A.agent_from_dict(tampered)


def test_command_check_warnings_carry_the_location():
    text = agent_block(GOOD_AGENT) + "\n" + agent_block(
        {**GOOD_AGENT, "name": "amd", "gpu_query_cmd": "rocm-smi --showmeminfo --csv"})

    def check(cmd):
        return ["needs a memory type"] if "rocm" in cmd else []

    warnings = A.parse_agents_toml(text, SOURCE, command_check=check)[1]
    assert [w for w in warnings if "gpu_query_cmd" in w] == [
        f"{SOURCE}:12: agent \"amd\" (agent #2), field 'gpu_query_cmd': needs a memory type"]


def test_key_file_warnings_for_agents_loaded_earlier(tmp_path):
    agent = A.Agent(**{**GOOD_AGENT, "ssh_key_path": str(tmp_path / "gone")})
    assert A.key_file_warnings([agent], SOURCE) == [
        f"{SOURCE}: agent \"gpu-1\" (agent #1), field 'ssh_key_path': key file {tmp_path}/gone does not exist, so "
        f"ssh cannot log in to this agent; create it (ssh-keygen -t ed25519 -f {tmp_path}/gone) or point "
        "ssh_key_path at your private key"]
    (tmp_path / "gone").write_text("k")
    (tmp_path / "gone").chmod(0o600)
    assert A.key_file_warnings([agent], SOURCE) == []


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("query_timeout_s", '"30"', "is a string (\"30\"); write the number of seconds without quotes"),
    ("query_timeout_s", "0", "must be more than 0 and at most 3600 seconds, got 0"),
    ("query_timeout_s", "7200", "must be more than 0 and at most 3600 seconds, got 7200"),
    ("query_timeout_s", "nan", "must be a finite number of seconds, got nan"),
    ("query_timeout_s", "inf", "must be a finite number of seconds, got inf"),
    ("query_timeout_s", "true", "must be a number of seconds, got a boolean True"),
    ("min_query_interval_s", "-1", "must be from 0 to 86400 seconds, got -1"),
    ("min_query_interval_s", "1e9", "must be from 0 to 86400 seconds"),
    ("min_query_interval_s", "[60]", "must be a number of seconds, got an array"),
])
def test_query_pacing_values_are_checked_with_the_fix(field, value, expected):
    text = agent_block(GOOD_AGENT) + f"{field} = {value}\n"
    message = error_of(text)
    assert f"field '{field}'" in message and expected in message, message


def test_query_pacing_values_load_and_round_trip():
    text = agent_block(GOOD_AGENT) + "query_timeout_s = 45\nmin_query_interval_s = 30.5\n"
    (agent,) = A.parse_agents_toml(text, SOURCE)[0]
    assert (agent.query_timeout_s, agent.min_query_interval_s) == (45, 30.5)
    (again,) = A.parse_agents_toml(A.render_agent_toml(agent), SOURCE)[0]
    assert again == agent
    assert A.agent_from_dict(A.agent_to_dict(agent)) == agent
    (default,) = A.parse_agents_toml(agent_block(GOOD_AGENT), SOURCE)[0]
    assert (default.query_timeout_s, default.min_query_interval_s) == (None, 0)
    assert "query_timeout_s" not in A.render_agent_toml(default)
