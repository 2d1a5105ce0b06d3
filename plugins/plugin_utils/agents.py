# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The ``ssh-agents.toml`` schema and the ssh options built from it.

This module is the one place that knows the schema (parsing, validation, defaults) and the one place
that builds ssh options, so the inventory plugin, the app's ``register-ssh``, its fast heartbeat path
and the tests all agree. Plain Python, standard library only.

Every TOML value is untrusted: hostnames, users and key paths end up in an ssh command line and, for a
bastion, in a ``ProxyCommand`` that a local shell runs. Each is therefore checked against a strict
character set here, and quoted by construction where it is emitted.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import shlex
import stat
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_GPU_QUERY_CMD = "nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader"
DEFAULT_SSH_PORT = 22
HOST_KEY_POLICIES = ("yes", "accept-new", "off")

AGENT_FIELDS = ("name", "hostname", "ssh_user", "ssh_key_path", "ssh_port", "gpu_query_cmd",
                "host_key_fingerprint", "bastion")
REQUIRED_AGENT_FIELDS = ("name", "hostname", "ssh_user", "ssh_key_path")
BASTION_FIELDS = ("hostname", "ssh_user", "ssh_key_path", "ssh_port")
REQUIRED_BASTION_FIELDS = ("hostname", "ssh_user", "ssh_key_path")
TOP_LEVEL_KEYS = ("agents",)

# Inventory groups (public names, see DESIGN.md).
GROUP_ALL = "hwledger_agents"
GROUP_NVIDIA = "hwledger_nvidia"
GROUP_ROCM = "hwledger_rocm"
GROUP_VIA_BASTION = "hwledger_via_bastion"
GROUPS = (GROUP_ALL, GROUP_NVIDIA, GROUP_ROCM, GROUP_VIA_BASTION)
_TOOL_GROUPS = {"nvidia-smi": GROUP_NVIDIA, "rocm-smi": GROUP_ROCM, "amd-smi": GROUP_ROCM}

MAX_AGENTS_FILE_BYTES = 1 << 20
MAX_NAME_LENGTH = 64
MAX_USER_LENGTH = 64
MAX_COMMAND_LENGTH = 4096
MAX_PATH_LENGTH = 1024

# ssh creates the master socket as "<ControlPath>.<16 random chars>" and renames it afterwards, and
# ControlPath is "<control_dir>/%C" where %C is a 40-hex-digit hash: control_dir + 58 bytes, plus the
# terminating NUL, must fit in sun_path (108 bytes on Linux, 104 on macOS and the BSDs). Measured with
# OpenSSH 9.2: a 49-byte control_dir works on Linux, a 50-byte one fails "too long for Unix domain socket".
SUN_PATH_SIZE = 108 if sys.platform.startswith("linux") else 104
CONTROL_PATH_OVERHEAD = len("/") + 40 + len(".") + 16
MAX_CONTROL_DIR_BYTES = SUN_PATH_SIZE - 1 - CONTROL_PATH_OVERHEAD

DEFAULT_CONTROL_PERSIST_S = 300
DEFAULT_SERVER_ALIVE_INTERVAL_S = 15
DEFAULT_SERVER_ALIVE_COUNT_MAX = 3

# Matched against the key with everything but letters removed; "pasw" and "pswd" catch common typos.
_PASSWORD_HINTS = ("pass", "pasw", "pwd", "pswd", "secret")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")
# Characters allowed in a path that ssh reads (IdentityFile, UserKnownHostsFile, ControlPath) besides
# letters and digits. ssh splits option values on whitespace and quotes, expands %tokens and ${VAR},
# and the ProxyCommand shell interprets everything else, so nothing else is let through.
_PATH_PUNCTUATION = frozenset("._/+@,:~-")
_PATH_CHARS_HINT = "letters, digits and . _ / + @ , : ~ -"


class AgentsFileError(ValueError):
    """An ssh-agents.toml problem. The message names the file, line, agent, field and the fix."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class SshPolicyError(ValueError):
    """A bad host-key policy, known_hosts file or control directory setting."""


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
    bastion: Bastion | None = None

    def __post_init__(self) -> None:
        # Every Agent is valid by construction, whoever builds it (TOML loader, register-ssh, cache).
        _check_fields(self, {"name": validate_name, "hostname": validate_hostname, "ssh_user": validate_user,
                             "ssh_key_path": validate_key_path, "ssh_port": validate_port,
                             "gpu_query_cmd": validate_gpu_query_cmd}, "")
        if self.host_key_fingerprint is not None:
            _check_fields(self, {"host_key_fingerprint": validate_host_key_fingerprint}, "")
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
# Field validators: each returns the normalised value or raises ValueError("what is wrong; how to fix").
# --------------------------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def show(value: Any, limit: int = 80) -> str:
    """A value quoted for an error message: control characters escaped, long values shortened."""
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 4] + '..."'


def _control_char(value: str) -> str | None:
    for char in value:
        if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
            return char
    return None


def _describe_char(char: str) -> str:
    names = {" ": "a space", "\t": "a tab", "\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte",
             "'": "a single quote", '"': "a double quote", "`": "a backtick", "$": "'$'", ";": "';'",
             "\\": "a backslash"}
    if char in names:
        return names[char]
    if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
        return f"the control character U+{ord(char):04X}"
    return repr(char)


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string ({what}), got {_type_name(value)} {show(value)}; "
                         f"write it in double quotes")
    if not value:
        raise ValueError(f"is empty; give {what}")
    char = _control_char(value)
    if char is not None:
        raise ValueError(f"contains {_describe_char(char)}, which is never valid here; remove it")
    return value


def validate_hostname(value: Any) -> str:
    """A DNS name or an IPv4/IPv6 literal (without brackets), safe in an ssh command line."""
    host = _require_str(value, "a DNS name or an IP address")
    if host.startswith("-"):
        raise ValueError(f"{show(host)} starts with '-', which ssh would read as an option; "
                         "give the host's DNS name or IP address")
    if host.startswith("[") and host.endswith("]"):
        raise ValueError(f"{show(host)}: write an IPv6 address without brackets, e.g. {show(host[1:-1])}")
    if "%" in host:
        raise ValueError(f"{show(host)}: IPv6 zone indexes ('%') are not supported; use a global address "
                         "or a DNS name")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{show(host)} is not a valid IPv6 address (and ':' is not allowed in a DNS name;"
                             " put the port in ssh_port)") from None
        return host
    for char in host:
        if not (char.isascii() and (char.isalnum() or char in ".-_")):
            raise ValueError(f"{show(host)} contains {_describe_char(char)}; a hostname may only contain "
                             "letters, digits, '-', '_' and '.', or be an IPv4/IPv6 address")
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{show(host)} is not a valid IPv4 address; write four numbers 0-255 without "
                             "leading zeros, e.g. 203.0.113.7") from None
        return host
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"{show(host)} is not a valid DNS name: each dot-separated label must be 1-63 "
                         "letters, digits, '-' or '_', not starting or ending with '-', 253 characters in all")
    return host


def validate_user(value: Any) -> str:
    user = _require_str(value, "the remote login name")
    if user.startswith("-"):
        raise ValueError(f"{show(user)} starts with '-', which ssh would read as an option; give the login name")
    if len(user) > MAX_USER_LENGTH or not _USER.match(user):
        bad = next((c for c in user if not (c.isascii() and (c.isalnum() or c in "._-"))), None)
        detail = f" contains {_describe_char(bad)}" if bad else f" is longer than {MAX_USER_LENGTH} characters"
        raise ValueError(f"{show(user)}{detail}; a login name may only contain letters, digits, '.', '_' "
                         "and '-' (not first)")
    return user


def validate_port(value: Any) -> int:
    if isinstance(value, str):
        raise ValueError(f"is a string ({show(value)}); write the number without quotes, e.g. ssh_port = 22")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer from 1 to 65535, got {_type_name(value)} {show(value)}; "
                         "e.g. ssh_port = 22")
    if not 1 <= value <= 65535:
        raise ValueError(f"must be from 1 to 65535, got {value}; use the port sshd listens on (usually 22)")
    return value


def _check_path_chars(path: str, what: str) -> None:
    if path.startswith("-"):
        raise ValueError(f"{show(path)} starts with '-', which ssh would read as an option; "
                         f"give an absolute path to {what}")
    for char in path:
        if not (char.isalnum() or char in _PATH_PUNCTUATION):
            raise ValueError(f"{show(path)} contains {_describe_char(char)}, which ssh or the ProxyCommand "
                             f"shell would split or interpret; move or link {what} to a path made only of "
                             f"{_PATH_CHARS_HINT}")


def validate_path(value: Any, what: str = "the file") -> str:
    """An absolute local path (``~`` expanded) that is safe inside ssh options and a ProxyCommand."""
    path = _require_str(value, f"the path to {what}")
    if len(path) > MAX_PATH_LENGTH:
        raise ValueError(f"is longer than {MAX_PATH_LENGTH} characters; use a shorter path to {what}")
    _check_path_chars(path, what)
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        raise ValueError(f"{show(path)} is not an absolute path; write it from / or from ~/ "
                         f"(e.g. ~/.ssh/id_ed25519), since ssh may run from any directory")
    _check_path_chars(expanded, what)
    return os.path.normpath(expanded)


def validate_key_path(value: Any) -> str:
    return validate_path(value, "the private key")


def validate_name(value: Any) -> str:
    """An agent name: it becomes an Ansible inventory hostname and a file name elsewhere."""
    name = _require_str(value, "a unique agent name such as \"gpu-box-1\"")
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name) or ".." in name:
        raise ValueError(f"{show(name)} is not a valid agent name: use 1-{MAX_NAME_LENGTH} letters, digits, "
                         "'.', '_' and '-', starting with a letter or digit, without '..' (no spaces or '/')")
    return name


def validate_gpu_query_cmd(value: Any) -> str:
    cmd = _require_str(value, "the command that prints GPU state, e.g. " + show(DEFAULT_GPU_QUERY_CMD))
    if not cmd.strip():
        raise ValueError("is blank; give the GPU query command or remove the line to use the default")
    if len(cmd) > MAX_COMMAND_LENGTH:
        raise ValueError(f"is longer than {MAX_COMMAND_LENGTH} characters; put a long command in a script on "
                         "the host and call that")
    return cmd


def validate_host_key_fingerprint(value: Any) -> str:
    fingerprint = _require_str(value, "the host key's SHA256 fingerprint")
    if not _FINGERPRINT.match(fingerprint):
        raise ValueError(f"{show(fingerprint)} is not a SHA256 fingerprint; write it as ssh-keygen prints it, "
                         "\"SHA256:\" followed by 43 base64 characters (ssh-keyscan HOST | ssh-keygen -lf -)")
    return fingerprint


# --------------------------------------------------------------------------------------------------
# Destinations typed on the command line ("user@host[:port]").
# --------------------------------------------------------------------------------------------------

def parse_destination(text: str) -> tuple[str, str, int | None]:
    """Split ``user@host``, ``user@host:port``, ``user@[v6]:port`` or ``user@v6``; validate each part."""
    raw = _require_str(text, "a destination such as root@gpu.example.com:22")
    if raw.startswith("ssh://"):
        raw = raw[len("ssh://"):].rstrip("/")
    user, sep, hostport = raw.rpartition("@")  # the last '@': a user part with '@' is then rejected below
    if not sep or not user:
        raise ValueError(f"{show(text)} has no user; write it as user@host or user@host:port")
    port: int | None = None
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{show(text)}: write a bracketed IPv6 address as user@[2001:db8::1]:22")
        port_text = rest[1:] if rest else None
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    else:
        host, port_text = hostport, None  # no port, or a bare IPv6 address
    if port_text is not None:
        if not port_text.isdigit():
            raise ValueError(f"{show(text)}: the port must be a number from 1 to 65535")
        port = validate_port(int(port_text))
    try:
        user = validate_user(user)
    except ValueError as exc:
        raise ValueError(f"user {exc}") from None
    try:
        host = validate_hostname(host)
    except ValueError as exc:
        raise ValueError(f"host {exc}") from None
    return user, host, port


# --------------------------------------------------------------------------------------------------
# Loading ssh-agents.toml
# --------------------------------------------------------------------------------------------------

class _Locator:
    """Finds the line of an agent's ``[[agents]]`` header or of one of its fields in the TOML text.

    tomllib reports no positions, so this scans the text. It is used only for messages: when the
    headers it finds do not match the agents tomllib found (inline tables, odd formatting), it gives
    no line rather than a wrong one.
    """

    _HEADER = re.compile(r"""^\s*\[\[\s*(?:agents|"agents"|'agents')\s*\]\]""")
    _BASTION_HEADER = re.compile(r"""^\s*\[\s*(?:agents|"agents"|'agents')\s*\.\s*(?:bastion|"bastion"|'bastion')\s*\]""")

    def __init__(self, text: str, agent_count: int) -> None:
        self.lines = text.splitlines()
        headers = [i for i, line in enumerate(self.lines) if self._HEADER.match(line)]
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
        bastion_at = next((i for i in range(start, end) if self._BASTION_HEADER.match(self.lines[i])), None)
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
                     "host_key_fingerprint": validate_host_key_fingerprint}
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
                              f"got {_type_name(table)}")
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
        report("bastion", f"must be a table, got {_type_name(table)}; write it as an [agents.bastion] section "
               "with hostname, ssh_user, ssh_key_path and optionally ssh_port")
        return None
    _check_keys(table, BASTION_FIELDS, report, "bastion.")
    values = _validate_fields(table, _BASTION_VALIDATORS, REQUIRED_BASTION_FIELDS, report, "bastion.")
    if not all(field_name in values for field_name in REQUIRED_BASTION_FIELDS):
        return None
    if set(values) != set(table) & set(BASTION_FIELDS):
        return None  # a field was present but invalid; already reported
    return Bastion(**values)


def _key_file_warnings(index: int, agent: Agent, problems: _Problems) -> None:
    keys = [("ssh_key_path", agent.ssh_key_path)]
    if agent.bastion is not None:
        keys.append(("bastion.ssh_key_path", agent.bastion.ssh_key_path))
    for field_name, path in keys:
        whose = "the bastion" if field_name.startswith("bastion.") else "this agent"
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            problems.agent_problem(index, agent.name, field_name,
                                   f"key file {path} does not exist, so ssh cannot log in to {whose}; create "
                                   f"it (ssh-keygen -t ed25519 -f {path}) or point {field_name} at your private key",
                                   warning=True)
            continue
        except OSError as exc:
            problems.agent_problem(index, agent.name, field_name, f"cannot read key file {path}: {exc.strerror}",
                                   warning=True)
            continue
        if stat.S_ISREG(mode) and mode & 0o077:
            problems.agent_problem(index, agent.name, field_name,
                                   f"key file {path} has mode {stat.S_IMODE(mode):04o}; ssh ignores private keys "
                                   f"that others can read: run chmod 600 {path}", warning=True)


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
                              f"'agents' must be an array of tables, got {_type_name(raw_agents)}; start each "
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
        if table.get("host_key_fingerprint", "") is None:
            table.pop("host_key_fingerprint")
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
    if agent.bastion is not None:
        lines += ["",
                  "[agents.bastion]",
                  f"hostname = {_toml_string(agent.bastion.hostname)}",
                  f"ssh_user = {_toml_string(agent.bastion.ssh_user)}",
                  f"ssh_key_path = {_toml_string(agent.bastion.ssh_key_path)}",
                  f"ssh_port = {agent.bastion.ssh_port}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# SSH options
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SshPolicy:
    """How hwledger talks ssh: host-key policy, its own known_hosts file, connection reuse, timeouts.

    host_key_checking: "yes" (default: only keys already in known_hosts), "accept-new" (learn a missing
    key, refuse a changed one; trust on first use) or "off" (no checking at all: anyone on the network
    path can impersonate a host; for throwaway labs only). control_dir None disables connection reuse.
    """

    known_hosts: str
    host_key_checking: str = "yes"
    control_dir: str | None = None
    connect_timeout: int = 10
    control_persist_s: int = DEFAULT_CONTROL_PERSIST_S
    server_alive_interval_s: int = DEFAULT_SERVER_ALIVE_INTERVAL_S
    server_alive_count_max: int = DEFAULT_SERVER_ALIVE_COUNT_MAX

    def __post_init__(self) -> None:
        if self.host_key_checking not in HOST_KEY_POLICIES:
            raise SshPolicyError(f"host_key_checking must be one of {', '.join(HOST_KEY_POLICIES)}, got "
                                 f"{show(self.host_key_checking)}; quote it in YAML (host_key_checking: 'yes')")
        try:
            object.__setattr__(self, "known_hosts", validate_path(self.known_hosts, "the known_hosts file"))
        except ValueError as exc:
            raise SshPolicyError(f"known_hosts file {exc}") from None
        if self.control_dir is not None:
            object.__setattr__(self, "control_dir", validate_control_dir(self.control_dir))
        for field_name in ("connect_timeout", "control_persist_s", "server_alive_interval_s",
                           "server_alive_count_max"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SshPolicyError(f"{field_name} must be a positive whole number of seconds, got {show(value)}")


def validate_control_dir(value: Any) -> str:
    """The directory for ControlMaster sockets: a safe path short enough for ``<dir>/%C`` sockets."""
    try:
        path = validate_path(value, "the control socket directory")
    except ValueError as exc:
        raise SshPolicyError(f"control_dir {exc}") from None
    size = len(path.encode("utf-8"))
    if size > MAX_CONTROL_DIR_BYTES:
        raise SshPolicyError(
            f"control_dir {show(path)} is {size} bytes long, but ssh's control socket <dir>/<40-character hash> "
            f"plus its 17-character temporary suffix must fit the {SUN_PATH_SIZE}-byte unix socket path limit, "
            f"so control_dir may have at most {MAX_CONTROL_DIR_BYTES} bytes. Fix: choose a shorter directory, "
            "e.g. ~/.cache/hwledger/cp or /tmp/hwledger-cp")
    return path


def default_control_dir() -> str:
    """Where control sockets go unless configured: the first candidate short enough for the socket limit.

    ~/.cache/hwledger/cp fits for most home directories; a long home falls back to $XDG_RUNTIME_DIR (a
    private per-user directory) and then /tmp/hwledger-cp-<uid>, which prepare_control_dir() refuses
    if another user created it first.
    """
    candidates = [os.path.expanduser("~/.cache/hwledger/cp")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "hwledger-cp"))
    candidates.append(f"/tmp/hwledger-cp-{os.getuid()}")
    for candidate in candidates:
        try:
            return validate_control_dir(candidate)
        except SshPolicyError:
            continue
    return candidates[-1]


def prepare_control_dir(policy: SshPolicy) -> None:
    """Create the control socket directory (0700) and refuse one that others could write to.

    ssh exits if the directory is missing. A directory other users can write to would let them plant a
    socket at our ControlPath and receive every command we send to a host.
    """
    if policy.control_dir is None:
        return
    try:
        os.makedirs(policy.control_dir, mode=0o700, exist_ok=True)
        info = os.stat(policy.control_dir)
    except OSError as exc:
        raise SshPolicyError(f"control_dir {policy.control_dir}: cannot create it: {exc.strerror}. Fix: choose "
                             "a directory you can write to") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SshPolicyError(f"control_dir {policy.control_dir} is not a directory. Fix: choose another path")
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise SshPolicyError(f"control_dir {policy.control_dir} (owner uid {info.st_uid}, mode "
                             f"{stat.S_IMODE(info.st_mode):04o}) must belong to you and not be writable by others, "
                             "or another user could intercept ssh sessions. Fix: chmod 700 the directory, or "
                             "choose one you own")


def check_known_hosts(policy: SshPolicy) -> list[str]:
    """Check hwledger's known_hosts file; return warnings. Creates its directory for accept-new."""
    if policy.host_key_checking == "off":
        return ["host key checking is off: ssh accepts any host key, so anyone on the network path can "
                "impersonate a GPU host and receive its commands and files. Use 'yes' (the default) or "
                "'accept-new'."]
    path = policy.known_hosts
    if not os.path.exists(path):
        if policy.host_key_checking == "accept-new":
            try:
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            except OSError as exc:
                raise SshPolicyError(f"known_hosts file {path}: cannot create its directory: {exc.strerror}") from None
            return []
        return [f"known_hosts file {path} does not exist, so every host will fail host key verification; pin "
                f"each host's key with hwledger fleet register-ssh, or use host_key_checking accept-new once"]
    try:
        check_file_permissions(path, "known_hosts file")
    except AgentsFileError as exc:
        raise SshPolicyError(str(exc)) from None
    return []


def known_hosts_alias(agent: Agent) -> str:
    """The HostKeyAlias an agent's host key is pinned under: its name, not its (recyclable) address."""
    return f"hwledger-agent-{agent.name}"


def bastion_known_hosts_alias(bastion: Bastion) -> str:
    """The HostKeyAlias of a bastion: its own entry, shared by every agent behind it."""
    return f"hwledger-bastion-{bastion.hostname}-{bastion.ssh_port}"


def _host_key_options(policy: SshPolicy, alias: str) -> list[str]:
    # CheckHostIP, UpdateHostKeys, VerifyHostKeyDNS off: the known_hosts file changes only when a person
    # registers a host (or, with accept-new, the first time), never because a server or DNS said so.
    if policy.host_key_checking == "off":
        return ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "GlobalKnownHostsFile=/dev/null",
                "CheckHostIP=no", "UpdateHostKeys=no"]
    return [f"StrictHostKeyChecking={policy.host_key_checking}",
            f"UserKnownHostsFile={policy.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            f"HostKeyAlias={alias}",
            "CheckHostIP=no",
            "UpdateHostKeys=no",
            "VerifyHostKeyDNS=no",
            "HashKnownHosts=no"]


def _session_options(policy: SshPolicy) -> list[str]:
    # Set explicitly so a user's ~/.ssh/config cannot forward an agent or X11 to a rented host, or
    # make ssh prompt and hang a 5-second poller.
    return ["BatchMode=yes",
            "IdentitiesOnly=yes",
            "ForwardAgent=no",
            "ForwardX11=no",
            f"ConnectTimeout={policy.connect_timeout}",
            f"ServerAliveInterval={policy.server_alive_interval_s}",
            f"ServerAliveCountMax={policy.server_alive_count_max}"]


def _control_options(policy: SshPolicy) -> list[str]:
    if policy.control_dir is None:
        return ["ControlMaster=no", "ControlPath=none"]
    # %C is a 40-hex-digit hash of (local host, host, port, user): the socket path has the same length
    # whatever the hostname, and the Ansible path and ssh_argv() share one master per agent.
    return ["ControlMaster=auto",
            f"ControlPersist={policy.control_persist_s}s",
            f"ControlPath={policy.control_dir}/%C"]


def proxy_command(bastion: Bastion, policy: SshPolicy) -> str:
    """The ProxyCommand that reaches an agent through its bastion, with the bastion's own key, user, port.

    ssh runs it with /bin/sh after expanding %h/%p (the agent's validated host and port), so every word
    is shell-quoted. ``[%h]:%p`` keeps an IPv6 target intact for -W. The bastion hop does not multiplex:
    the agent's own master connection (ControlPersist) already keeps it open.
    """
    options = (_host_key_options(policy, bastion_known_hosts_alias(bastion)) + _session_options(policy)
               + ["ControlMaster=no", "ControlPath=none"])
    argv = ["ssh"]
    for option in options:
        argv += ["-o", option]
    argv += ["-i", bastion.ssh_key_path, "-p", str(bastion.ssh_port), "-l", bastion.ssh_user,
             "-W", "[%h]:%p", "--", bastion.hostname]
    return shlex.join(argv)


def ssh_options(agent: Agent, policy: SshPolicy) -> list[str]:
    """``["-o", "Key=Value", ...]``: host-key policy, session hardening, connection reuse, bastion."""
    options = _host_key_options(policy, known_hosts_alias(agent)) + _session_options(policy)
    options += _control_options(policy)
    if agent.bastion is not None:
        options.append(f"ProxyCommand={proxy_command(agent.bastion, policy)}")
    argv: list[str] = []
    for option in options:
        argv += ["-o", option]
    return argv


def ssh_common_args(agent: Agent, policy: SshPolicy) -> str:
    """ssh_options() as one string for ``ansible_ssh_common_args`` (Ansible splits it with shlex)."""
    return shlex.join(ssh_options(agent, policy))


def ssh_argv(agent: Agent, policy: SshPolicy, remote_command: str, *, ssh_binary: str = "ssh") -> list[str]:
    """The full argv to run ``remote_command`` on the agent with ssh directly (no shell involved)."""
    return [ssh_binary, *ssh_options(agent, policy), "-p", str(agent.ssh_port), "-l", agent.ssh_user,
            "-i", agent.ssh_key_path, "--", agent.hostname, remote_command]


def agent_groups(agent: Agent, gpu_tool: str | None) -> list[str]:
    """The inventory groups of an agent, ``hwledger_agents`` first.

    gpu_tool is the tool its gpu_query_cmd runs ("nvidia-smi", "rocm-smi", "amd-smi" or None), as the
    telemetry parsers see it (telemetry.tool_in_command): one place decides which tool a command runs.
    """
    groups = [GROUP_ALL]
    if gpu_tool in _TOOL_GROUPS:
        groups.append(_TOOL_GROUPS[gpu_tool])
    if agent.bastion is not None:
        groups.append(GROUP_VIA_BASTION)
    return groups


def host_vars(agent: Agent, policy: SshPolicy) -> dict:
    """The inventory variables of an agent (plain data; the inventory plugin marks strings unsafe).

    The host key policy lives in ``ansible_ssh_common_args``, which the ssh connection plugin puts after
    its own options; ssh keeps the first value of an option, so Ansible's ``host_key_checking`` set to
    false (ansible-runner and AWX set ANSIBLE_HOST_KEY_CHECKING=False by default) would put
    ``StrictHostKeyChecking=no`` first and win. A host variable beats the environment and ansible.cfg
    for that plugin option, so it is pinned here, and the connection is pinned to ``ssh`` because
    paramiko would ignore the common args altogether.
    """
    variables: dict[str, Any] = {
        "ansible_connection": "ssh",
        "ansible_host": agent.hostname,
        "ansible_port": agent.ssh_port,
        "ansible_user": agent.ssh_user,
        "ansible_ssh_private_key_file": agent.ssh_key_path,
        "ansible_ssh_common_args": ssh_common_args(agent, policy),
        "hwledger_gpu_query_cmd": agent.gpu_query_cmd,
        "hwledger_agent": agent_to_dict(agent),
    }
    if policy.host_key_checking != "off":
        variables["ansible_ssh_host_key_checking"] = True
    return variables
