# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The checks of every value an agent is made of: names, hostnames, logins, ports, paths, commands.

Each validator returns the normalised value or raises ``ValueError("what is wrong; how to fix it")``.
Used by the ``ssh-agents.toml`` schema (``agents``), by the ssh policy (``ssh``: the known_hosts file and
the control socket directory are paths too) and by the app's ``register-ssh`` (``parse_destination``).

Every value is untrusted: hostnames, users and key paths end up in an ssh command line and, for a
bastion, in a ``ProxyCommand`` that a local shell runs. Each is therefore checked against a strict
character set here, and quoted by construction where it is emitted (``ssh``).
Plain Python, standard library only.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from typing import Any

from ansible_collections.hwledger.fleet.plugins.plugin_utils.nvidia_smi import DEFAULT_GPU_QUERY_CMD

DEFAULT_SSH_PORT = 22
MAX_NAME_LENGTH = 64
MAX_USER_LENGTH = 64
MAX_COMMAND_LENGTH = 4096
MAX_PATH_LENGTH = 1024

_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")
# Characters allowed in a path that ssh reads (IdentityFile, UserKnownHostsFile, ControlPath) besides
# letters and digits. ssh splits option values on whitespace and quotes, expands %tokens and ${VAR},
# and the ProxyCommand shell interprets everything else, so nothing else is let through.
_PATH_PUNCTUATION = frozenset("._/+@,:~-")
_PATH_CHARS_HINT = "letters, digits and . _ / + @ , : ~ -"


def type_name(value: Any) -> str:
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
        raise ValueError(f"must be a string ({what}), got {type_name(value)} {show(value)}; "
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
        raise ValueError(f"must be an integer from 1 to 65535, got {type_name(value)} {show(value)}; "
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


# `--agent auto` (hwledger job submit) asks the server to place the job: no agent may be called that.
RESERVED_AGENT_NAME = "auto"


def validate_name(value: Any) -> str:
    """An agent name: it becomes an Ansible inventory hostname and a file name elsewhere."""
    name = _require_str(value, "a unique agent name such as \"gpu-box-1\"")
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name) or ".." in name:
        raise ValueError(f"{show(name)} is not a valid agent name: use 1-{MAX_NAME_LENGTH} letters, digits, "
                         "'.', '_' and '-', starting with a letter or digit, without '..' (no spaces or '/')")
    if name == RESERVED_AGENT_NAME:
        raise ValueError(f"{show(name)} is reserved: `hwledger job submit --agent auto` places a job on whichever "
                         "agent has the GPUs it asks for; give this agent another name")
    return name


def validate_gpu_query_cmd(value: Any) -> str:
    cmd = _require_str(value, "the command that prints GPU state, e.g. " + show(DEFAULT_GPU_QUERY_CMD))
    if not cmd.strip():
        raise ValueError("is blank; give the GPU query command or remove the line to use the default")
    if len(cmd) > MAX_COMMAND_LENGTH:
        raise ValueError(f"is longer than {MAX_COMMAND_LENGTH} characters; put a long command in a script on "
                         "the host and call that")
    return cmd


# The GPU tool's time budget on the host, per agent (the probe's watchdog allows at most an hour).
MAX_QUERY_TIMEOUT_S = 3600
# The longest wait between two runs of an agent's GPU tool (liveness checks fill the ticks between).
MAX_MIN_QUERY_INTERVAL_S = 86400


def _seconds(value: Any, example: str) -> float:
    if isinstance(value, str):
        raise ValueError(f"is a string ({show(value)}); write the number of seconds without quotes, e.g. {example}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {type_name(value)} {show(value)}; e.g. {example}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number of seconds, got {value}; e.g. {example}")
    return value


def validate_query_timeout(value: Any) -> float:
    seconds = _seconds(value, "query_timeout_s = 30")
    if not 0 < seconds <= MAX_QUERY_TIMEOUT_S:
        raise ValueError(f"must be more than 0 and at most {MAX_QUERY_TIMEOUT_S} seconds, got {value}; it is how "
                         "long the GPU tool may run on the host before it is killed, e.g. query_timeout_s = 30")
    return seconds


def validate_min_query_interval(value: Any) -> float:
    seconds = _seconds(value, "min_query_interval_s = 60")
    if not 0 <= seconds <= MAX_MIN_QUERY_INTERVAL_S:
        raise ValueError(f"must be from 0 to {MAX_MIN_QUERY_INTERVAL_S} seconds, got {value}; it is the least time "
                         "between two runs of the GPU tool (a cheap liveness check answers in between), e.g. "
                         "min_query_interval_s = 60")
    return seconds


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
