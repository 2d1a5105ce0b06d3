# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The ``ssh-agents.toml`` schema: the Agent and Bastion records, loading and validating the file with
errors that name the file, line, agent, field and the fix, and writing an agent back as TOML.

The one place that knows the schema, so the inventory plugin, the app's ``register-ssh`` and server,
and the tests all agree. What the agents become on the wire lives elsewhere: ssh options in ``ssh``,
Ansible host vars and groups in ``hostvars``; the checks of each value in ``agent_values``.
Plain Python, standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ansible_collections.hwledger.fleet.plugins.plugin_utils.agent_values import (
    DEFAULT_SSH_PORT,
    show,
    type_name,
    validate_gpu_query_cmd,
    validate_host_key_fingerprint,
    validate_hostname,
    validate_key_path,
    validate_min_query_interval,
    validate_name,
    validate_port,
    validate_query_timeout,
    validate_user,
)
from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD

AGENT_FIELDS = ("name", "hostname", "ssh_user", "ssh_key_path", "ssh_port", "gpu_query_cmd",
                "host_key_fingerprint", "query_timeout_s", "min_query_interval_s", "bastion")
REQUIRED_AGENT_FIELDS = ("name", "hostname", "ssh_user", "ssh_key_path")
BASTION_FIELDS = ("hostname", "ssh_user", "ssh_key_path", "ssh_port")
REQUIRED_BASTION_FIELDS = ("hostname", "ssh_user", "ssh_key_path")
TOP_LEVEL_KEYS = ("agents",)

MAX_AGENTS_FILE_BYTES = 1 << 20

# Matched against the key with everything but letters removed; "pasw" and "pswd" catch common typos.
_PASSWORD_HINTS = ("pass", "pasw", "pwd", "pswd", "secret")

# The header of one agent's table, `[[agents]]` (the key may be quoted). The one pattern for it: the
# line finder below, the inventory plugin's cheap "is this an agents file" test and the app's in-place
# editor all use it.
AGENTS_HEADER_RE = re.compile(r"""^\s*\[\[\s*(?:agents|"agents"|'agents')\s*\]\]""")
# `agents = [...]` at the top level: the same array written inline.
_INLINE_AGENTS_RE = re.compile(r"""^\s*(?:agents|"agents"|'agents')\s*=\s*\[""")
BASTION_HEADER_RE = re.compile(r"""^\s*\[\s*(?:agents|"agents"|'agents')\s*\.\s*(?:bastion|"bastion"|'bastion')\s*\]""")


def looks_like_agents_file(text: str) -> bool:
    """A cheap test that a TOML text is an ssh-agents.toml (it defines agents), not another TOML file."""
    return any(AGENTS_HEADER_RE.match(line) or _INLINE_AGENTS_RE.match(line) for line in text.splitlines())


class AgentsFileError(ValueError):
    """An ssh-agents.toml problem. The message names the file, line, agent, field and the fix."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


@dataclass(frozen=True)
class Bastion:
    hostname: str
    ssh_user: str
    ssh_key_path: str
    ssh_port: int = DEFAULT_SSH_PORT

    def __post_init__(self) -> None:
        _check_fields(self, {"hostname": validate_hostname, "ssh_user": validate_user,
                             "ssh_key_path": validate_key_path, "ssh_port": validate_port}, "bastion.")


@dataclass(frozen=True)
class Agent:
    name: str
    hostname: str
    ssh_user: str
    ssh_key_path: str
    ssh_port: int = DEFAULT_SSH_PORT
    gpu_query_cmd: str = DEFAULT_GPU_QUERY_CMD
    host_key_fingerprint: str | None = None
    # None: the caller's default (serve --query-timeout, the playbook's hwledger_gpu_query_timeout).
    query_timeout_s: float | None = None
    # 0: the GPU tool runs at every heartbeat; more: a liveness check answers the heartbeats in between.
    min_query_interval_s: float = 0
    bastion: Bastion | None = None

    def __post_init__(self) -> None:
        # Every Agent is valid by construction, whoever builds it (TOML loader, register-ssh, cache).
        _check_fields(self, {"name": validate_name, "hostname": validate_hostname, "ssh_user": validate_user,
                             "ssh_key_path": validate_key_path, "ssh_port": validate_port,
                             "gpu_query_cmd": validate_gpu_query_cmd,
                             "min_query_interval_s": validate_min_query_interval}, "")
        if self.host_key_fingerprint is not None:
            _check_fields(self, {"host_key_fingerprint": validate_host_key_fingerprint}, "")
        if self.query_timeout_s is not None:
            _check_fields(self, {"query_timeout_s": validate_query_timeout}, "")
        if self.bastion is not None and not isinstance(self.bastion, Bastion):
            raise ValueError(f"bastion: must be a Bastion, got {type(self.bastion).__name__}")


def _check_fields(obj: Any, validators: dict, prefix: str) -> None:
    for field_name, validate in validators.items():
        try:
            normalised = validate(getattr(obj, field_name))
        except ValueError as exc:
            raise ValueError(f"{prefix}{field_name}: {exc}") from None
        object.__setattr__(obj, field_name, normalised)


# --------------------------------------------------------------------------------------------------
# Loading ssh-agents.toml
# --------------------------------------------------------------------------------------------------

class _Locator:
    """Finds the line of an agent's ``[[agents]]`` header or of one of its fields in the TOML text.

    tomllib reports no positions, so this scans the text. It is used only for messages: when the
    headers it finds do not match the agents tomllib found (inline tables, odd formatting), it gives
    no line rather than a wrong one.
    """

    def __init__(self, text: str, agent_count: int) -> None:
        self.lines = text.splitlines()
        headers = [i for i, line in enumerate(self.lines) if AGENTS_HEADER_RE.match(line)]
        self.headers = headers if len(headers) == agent_count else None

    @staticmethod
    def _key_pattern(key: str, dotted_under: str | None = None) -> re.Pattern:
        quoted = rf"""(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')"""
        if dotted_under:
            quoted = rf"{re.escape(dotted_under)}\s*\.\s*{quoted}"
        return re.compile(rf"^\s*{quoted}\s*=")

    def _find(self, pattern: re.Pattern, start: int, end: int) -> int | None:
        for i in range(start, end):
            if pattern.match(self.lines[i]):
                return i + 1
        return None

    def top_level(self, key: str) -> int | None:
        end = self.headers[0] if self.headers else len(self.lines)
        return self._find(self._key_pattern(key), 0, end)

    def agent(self, index: int) -> int | None:
        return self.headers[index] + 1 if self.headers else None

    def field(self, index: int, key: str, in_bastion: bool = False) -> int | None:
        if not self.headers:
            return None
        start = self.headers[index]
        end = self.headers[index + 1] if index + 1 < len(self.headers) else len(self.lines)
        bastion_at = next((i for i in range(start, end) if BASTION_HEADER_RE.match(self.lines[i])), None)
        if in_bastion:
            found = None
            if bastion_at is not None:
                found = self._find(self._key_pattern(key), bastion_at, end)
            found = found or self._find(self._key_pattern(key, "bastion"), start, end)
            found = found or self._find(self._key_pattern("bastion"), start, end)
            return found or (bastion_at + 1 if bastion_at is not None else start + 1)
        found = self._find(self._key_pattern(key), start, bastion_at if bastion_at is not None else end)
        return found or start + 1


class _Problems:
    """Collects every problem in a file so the user can fix them all in one pass, in line order."""

    def __init__(self, source: str, locator: _Locator | None) -> None:
        self.source = source
        self.locator = locator
        self._errors: list[tuple[int, str]] = []
        self._warnings: list[tuple[int, str]] = []

    @property
    def errors(self) -> list[str]:
        return [item[1] for item in sorted(self._errors, key=lambda item: item[0])]

    @property
    def warnings(self) -> list[str]:
        return [item[1] for item in sorted(self._warnings, key=lambda item: item[0])]

    def where(self, line: int | None) -> str:
        return f"{self.source}:{line}" if line else self.source

    def agent_label(self, index: int, name: Any) -> str:
        try:
            return f"agent {show(validate_name(name))} (agent #{index + 1})"
        except ValueError:
            return f"agent #{index + 1}"  # an invalid name is shown in its own error, escaped

    def field_line(self, index: int, field: str) -> int | None:
        if self.locator is None:
            return None
        if field.startswith("bastion."):
            return self.locator.field(index, field[len("bastion."):], in_bastion=True)
        return self.locator.field(index, field)

    def agent_problem(self, index: int, name: Any, field: str, message: str, *, warning: bool = False) -> None:
        line = self.field_line(index, field)
        text = f"{self.where(line)}: {self.agent_label(index, name)}, field {field!r}: {message}"
        (self._warnings if warning else self._errors).append((line or 0, text))

    def file_problem(self, line: int | None, message: str) -> None:
        self._errors.append((line or 0, f"{self.where(line)}: {message}"))

    def file_warning(self, message: str) -> None:
        self._warnings.append((0, f"{self.source}: {message}"))

    def raise_if_any(self) -> None:
        errors = self.errors
        if len(errors) == 1:
            raise AgentsFileError(errors[0], errors)
        if errors:
            body = "\n".join(f"  - {error}" for error in errors)
            raise AgentsFileError(f"{self.source}: {len(errors)} problems in the agents file:\n{body}", errors)


def _is_password_like(key: str) -> bool:
    folded = re.sub(r"[^a-z]", "", key.lower())
    return any(hint in folded for hint in _PASSWORD_HINTS)


def _check_keys(table: dict, valid: tuple[str, ...], report, field_prefix: str = "") -> None:
    for key in table:
        shown = show(key)
        if _is_password_like(key):
            report(f"{field_prefix}{key}", f"{shown} looks like a password or secret, and hwledger uses key-based "
                   "SSH authentication only; remove it and set ssh_key_path (for a passphrase-protected key, "
                   "load it into ssh-agent with ssh-add instead of writing the passphrase here)")
        elif key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = (f"did you mean {close[0]!r}?" if close else
                    "valid keys are " + ", ".join(valid))
            report(f"{field_prefix}{key}", f"unknown key {shown}; {hint}")


_AGENT_VALIDATORS = {"name": validate_name, "hostname": validate_hostname, "ssh_user": validate_user,
                     "ssh_key_path": validate_key_path, "ssh_port": validate_port,
                     "gpu_query_cmd": validate_gpu_query_cmd,
                     "host_key_fingerprint": validate_host_key_fingerprint,
                     "query_timeout_s": validate_query_timeout,
                     "min_query_interval_s": validate_min_query_interval}
_BASTION_VALIDATORS = {"hostname": validate_hostname, "ssh_user": validate_user,
                       "ssh_key_path": validate_key_path, "ssh_port": validate_port}
_MISSING_FIX = {
    "name": 'add name = "a-unique-name"',
    "hostname": 'add hostname = "gpu.example.com" (a DNS name or an IP address)',
    "ssh_user": 'add ssh_user = "ubuntu" (the remote login name)',
    "ssh_key_path": 'add ssh_key_path = "~/.ssh/id_ed25519" (the private key ssh uses)',
}


def _validate_fields(table: dict, validators: dict, required: tuple[str, ...], report,
                     prefix: str = "") -> dict:
    values: dict = {}
    for field_name in required:
        if field_name not in table:
            report(f"{prefix}{field_name}", f"missing required field; {_MISSING_FIX[field_name]}")
    for field_name, validate in validators.items():
        if field_name not in table:
            continue
        try:
            values[field_name] = validate(table[field_name])
        except ValueError as exc:
            report(f"{prefix}{field_name}", str(exc))
    return values


def _agent_from_table(index: int, table: Any, problems: _Problems) -> Agent | None:
    if not isinstance(table, dict):
        problems.file_problem(problems.locator.agent(index) if problems.locator else None,
                              f"agent #{index + 1} must be a table ([[agents]] with key = value lines), "
                              f"got {type_name(table)}")
        return None
    name = table.get("name")
    errors_before = len(problems.errors)

    def report(field_name: str, message: str) -> None:
        problems.agent_problem(index, name, field_name, message)

    _check_keys(table, AGENT_FIELDS, report)
    values = _validate_fields(table, _AGENT_VALIDATORS, REQUIRED_AGENT_FIELDS, report)
    bastion = None
    if "bastion" in table:
        bastion = _bastion_from_table(table["bastion"], report)
    if len(problems.errors) != errors_before:
        return None
    return Agent(bastion=bastion, **values)


def _bastion_from_table(table: Any, report) -> Bastion | None:
    if not isinstance(table, dict):
        report("bastion", f"must be a table, got {type_name(table)}; write it as an [agents.bastion] section "
               "with hostname, ssh_user, ssh_key_path and optionally ssh_port")
        return None
    _check_keys(table, BASTION_FIELDS, report, "bastion.")
    values = _validate_fields(table, _BASTION_VALIDATORS, REQUIRED_BASTION_FIELDS, report, "bastion.")
    if not all(field_name in values for field_name in REQUIRED_BASTION_FIELDS):
        return None
    if set(values) != set(table) & set(BASTION_FIELDS):
        return None  # a field was present but invalid; already reported
    return Bastion(**values)


def key_file_problem(path: str, field_name: str = "ssh_key_path", whose: str = "this agent") -> str | None:
    """What is wrong with a private key file as ssh will use it (missing, unreadable, readable by others),
    with the fix; None when nothing is. Used when the file is loaded, and by the server when a host
    refuses the key, so that "Permission denied (publickey)" names the real cause."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return (f"key file {path} does not exist, so ssh cannot log in to {whose}; create it (ssh-keygen -t "
                f"ed25519 -f {path}) or point {field_name} at your private key")
    except OSError as exc:
        return f"cannot read key file {path}: {exc.strerror}"
    if stat.S_ISREG(mode) and mode & 0o077:
        return (f"key file {path} has mode {stat.S_IMODE(mode):04o}; ssh ignores private keys that others can "
                f"read: run chmod 600 {path}")
    if not os.access(path, os.R_OK):
        return f"key file {path} cannot be read by this user (uid {os.geteuid()}); fix its owner or mode (0600)"
    return None


def agent_key_files(agent: Agent) -> list[tuple[str, str, str]]:
    """(field, path, whose) of every private key an agent's connection uses: its own, and its bastion's."""
    keys = [("ssh_key_path", agent.ssh_key_path, "this agent")]
    if agent.bastion is not None:
        keys.append(("bastion.ssh_key_path", agent.bastion.ssh_key_path, "the bastion"))
    return keys


def _key_file_warnings(index: int, agent: Agent, problems: _Problems) -> None:
    for field_name, path, whose in agent_key_files(agent):
        problem = key_file_problem(path, field_name, whose)
        if problem is not None:
            problems.agent_problem(index, agent.name, field_name, problem, warning=True)


def key_file_warnings(agents: list[Agent], source: str) -> list[str]:
    """Warnings about the agents' key files (missing, readable by others), for agents loaded earlier."""
    problems = _Problems(source, None)
    for index, agent in enumerate(agents):
        _key_file_warnings(index, agent, problems)
    return problems.warnings


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, source: str) -> AgentsFileError:
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        line, column = int(match.group(1)), int(match.group(2))
        what = message[:match.start()]
        lines = text.splitlines()
        excerpt = show(lines[line - 1], 120) if 0 < line <= len(lines) else ""
        return AgentsFileError(
            f"{source}:{line}:{column}: TOML syntax error: {what} (line {line}: {excerpt}). Fix: correct line "
            f"{line}; strings need double quotes (hostname = \"gpu-1.example.com\"), numbers none "
            f"(ssh_port = 22), and each agent starts with a [[agents]] line")
    what = re.sub(r"\s*\(at end of document\)$", "", message)
    return AgentsFileError(f"{source}: TOML syntax error at the end of the file: {what}. Fix: complete or "
                           "remove the last line (an unclosed quote or bracket is the usual cause)")


def parse_agents_toml(text: str, source: str = "<ssh-agents.toml>", *,
                      command_check: Callable[[str], list[str]] | None = None) -> tuple[list[Agent], list[str]]:
    """Parse and validate the text of an ssh-agents.toml; return (agents, warnings).

    Raises AgentsFileError listing every problem (file, line, agent, field, fix). command_check, when
    given, returns warnings about a gpu_query_cmd (telemetry.command_warnings: the parsers know which
    query forms the real tools reject); they are reported with the agent's location like the others.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text, source) from None
    raw_agents = document.get("agents", [])
    locator = _Locator(text, len(raw_agents) if isinstance(raw_agents, list) else 0)
    problems = _Problems(source, locator)
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1, cutoff=0.6)
            hint = "did you mean 'agents'? " if close else ""
            problems.file_problem(locator.top_level(key) or _table_header_line(text, key),
                                  f"unknown top-level key {show(key)}; {hint}each agent is an [[agents]] table")
    if not isinstance(raw_agents, list):
        problems.file_problem(_table_header_line(text, "agents"),
                              f"'agents' must be an array of tables, got {type_name(raw_agents)}; start each "
                              "agent with [[agents]] (two brackets), not [agents]")
        problems.raise_if_any()
    agents = _agents_from_tables(raw_agents, problems)
    problems.raise_if_any()
    if not agents:
        problems.file_warning("defines no agents; add an [[agents]] table for each GPU host")
    for index, agent in enumerate(agents):
        _key_file_warnings(index, agent, problems)
        for warning in (command_check(agent.gpu_query_cmd) if command_check else []):
            problems.agent_problem(index, agent.name, "gpu_query_cmd", warning, warning=True)
    return agents, problems.warnings


def _table_header_line(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*\[+\s*{re.escape(key)}\s*[\].]")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def _agents_from_tables(tables: list, problems: _Problems) -> list[Agent]:
    agents: list[Agent] = []
    first_seen: dict[str, int] = {}
    for index, table in enumerate(tables):
        agent = _agent_from_table(index, table, problems)
        if agent is None:
            continue
        folded = agent.name.lower()
        if folded in first_seen:
            other = first_seen[folded]
            line = problems.locator.agent(other) if problems.locator else None
            at = f" at line {line}" if line else ""
            problems.agent_problem(index, agent.name, "name",
                                   f"duplicate: agent #{other + 1}{at} is already called "
                                   f"{show(tables[other]['name'])} (names are compared ignoring case); "
                                   "give each agent a unique name")
            continue
        first_seen[folded] = index
        agents.append(agent)
    return agents


def check_file_permissions(path: str, what: str = "agents file") -> os.stat_result:
    """Refuse a file others could change, as OpenSSH refuses such a ~/.ssh/config (readconf.c).

    A writable ssh-agents.toml lets another local user add a ProxyCommand host or a gpu_query_cmd,
    which is code execution on this machine and on every GPU host.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AgentsFileError(f"{path}: {what} not found. Fix: create it (hwledger fleet register-ssh adds "
                              "agents to it) or point to an existing file") from None
    except OSError as exc:
        raise AgentsFileError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise AgentsFileError(f"{path}: the {what} is not a regular file. Fix: point to the TOML file itself")
    if info.st_uid not in (0, os.getuid()):
        raise AgentsFileError(f"{path}: bad owner: the {what} belongs to uid {info.st_uid}, not to you "
                              f"(uid {os.getuid()}) or root, so someone else controls which commands run. "
                              f"Fix: chown {os.getuid()} {path}")
    if info.st_mode & 0o022:
        raise AgentsFileError(f"{path}: bad permissions {stat.S_IMODE(info.st_mode):04o}: the {what} is group- "
                              "or world-writable, so another local user could add a host, a ProxyCommand bastion "
                              f"or a command that hwledger would run. Fix: chmod go-w {path}")
    return info


def load_agents_file(path: str, *, command_check: Callable[[str], list[str]] | None = None
                     ) -> tuple[list[Agent], list[str]]:
    """Read, permission-check and validate an ssh-agents.toml file; return (agents, warnings)."""
    path = os.path.expanduser(str(path))
    info = check_file_permissions(path)
    if info.st_size > MAX_AGENTS_FILE_BYTES:
        raise AgentsFileError(f"{path}: the agents file is {info.st_size} bytes, more than the "
                              f"{MAX_AGENTS_FILE_BYTES} bytes hwledger reads. Fix: point to the right file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_AGENTS_FILE_BYTES + 1)
    except OSError as exc:
        raise AgentsFileError(f"{path}: cannot read the agents file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise AgentsFileError(f"{path}:{line}: the file is not valid UTF-8 (byte {exc.start}). Fix: save it as "
                              "UTF-8") from None
    return parse_agents_toml(text, path, command_check=command_check)


def agent_to_dict(agent: Agent) -> dict:
    """The agent's configuration as plain data (the ``hwledger_agent`` host var, caches, JSON output)."""
    return dataclasses.asdict(agent)


def agent_from_dict(data: Any, source: str = "<agent data>") -> Agent:
    """Rebuild and re-validate an Agent from agent_to_dict() output (a cache, the app's store)."""
    problems = _Problems(source, None)
    table = dict(data) if isinstance(data, dict) else data
    if isinstance(table, dict):
        for optional in ("host_key_fingerprint", "query_timeout_s"):
            if table.get(optional, "") is None:
                table.pop(optional)
        if "bastion" in table and table["bastion"] is None:
            table.pop("bastion")
    agent = _agent_from_table(0, table, problems)
    problems.raise_if_any()
    if agent is None:  # no problem reported must mean an agent was built
        raise RuntimeError(f"internal error (a bug in hwledger): {source}: no agent built and no problem reported")
    return agent


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if ord(c) >= 0x20 and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def render_agent_toml(agent: Agent) -> str:
    """A well-formed ``[[agents]]`` block for the agent, every field written out (used by register-ssh)."""
    lines = ["[[agents]]",
             f"name = {_toml_string(agent.name)}",
             f"hostname = {_toml_string(agent.hostname)}",
             f"ssh_user = {_toml_string(agent.ssh_user)}",
             f"ssh_key_path = {_toml_string(agent.ssh_key_path)}",
             f"ssh_port = {agent.ssh_port}",
             f"gpu_query_cmd = {_toml_string(agent.gpu_query_cmd)}"]
    if agent.host_key_fingerprint is not None:
        lines.append(f"host_key_fingerprint = {_toml_string(agent.host_key_fingerprint)}")
    if agent.query_timeout_s is not None:
        lines.append(f"query_timeout_s = {agent.query_timeout_s!r}")
    if agent.min_query_interval_s:
        lines.append(f"min_query_interval_s = {agent.min_query_interval_s!r}")
    if agent.bastion is not None:
        lines += ["",
                  "[agents.bastion]",
                  f"hostname = {_toml_string(agent.bastion.hostname)}",
                  f"ssh_user = {_toml_string(agent.bastion.ssh_user)}",
                  f"ssh_key_path = {_toml_string(agent.bastion.ssh_key_path)}",
                  f"ssh_port = {agent.bastion.ssh_port}"]
    return "\n".join(lines) + "\n"
