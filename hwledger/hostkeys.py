"""Host keys and client keys: learning a host's key, pinning it in hwledger's known_hosts, checking keys.

Registering a host is the one moment hwledger learns a host key, so it is done carefully:
- the key is learned by an ssh connection that authenticates with *nothing* (every auth method off)
  against an empty temporary known_hosts with `StrictHostKeyChecking=accept-new`: ssh records the key
  the server proved it holds during key exchange, and no credential is offered to a host not yet
  trusted. Through a bastion the same connection runs over the agent's ProxyCommand, whose bastion
  hop is verified against the bastion's already-pinned key (ssh-keyscan cannot go through a jump);
- the key is pinned only when the person confirmed its fingerprint, under the agent's HostKeyAlias
  (its name, not its recyclable address);
- known_hosts is rewritten atomically (temp file + rename), 0600, under a lock.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import private_files, probe_outcome, ssh

from hwledger.errors import UserError

KEYGEN_TIMEOUT_S = 10
LEARN_TIMEOUT_S = 30
_FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")


@dataclass(frozen=True)
class HostKey:
    keytype: str  # e.g. "ssh-ed25519"
    blob: str     # base64 public key

    @property
    def fingerprint(self) -> str:
        return fingerprint_of_blob(self.blob)

    def line(self, alias: str) -> str:
        return f"{alias} {self.keytype} {self.blob}"

    def describe(self) -> str:
        return f"{self.keytype} {self.fingerprint}"


def fingerprint_of_blob(blob: str) -> str:
    """OpenSSH's SHA256 fingerprint of a base64 public key blob (as `ssh-keygen -l` prints it)."""
    raw = base64.b64decode(blob, validate=True)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def normalize_fingerprint(text: str, *, option: str = "--host-key-fingerprint") -> str:
    value = text.strip()
    if value.lower().startswith("md5:") or re.fullmatch(r"([0-9a-fA-F]{2}:){15}[0-9a-fA-F]{2}", value):
        raise UserError(f"{option}: {value!r} is an MD5 fingerprint; give the SHA256 one "
                        "(on the host: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)")
    if not value.startswith("SHA256:"):
        value = "SHA256:" + value
    if not _FINGERPRINT_RE.match(value):
        raise UserError(f"{option}: {text!r} is not a SHA256 fingerprint; write it as ssh-keygen prints it, "
                        "SHA256: followed by 43 base64 characters")
    return value.rstrip("=")


# ---------------------------------------------------------------------------------------------
# Client (private) keys


@dataclass(frozen=True)
class ClientKey:
    path: Path
    keytype: str
    fingerprint: str


def check_private_key(path: str | os.PathLike, *, option: str = "--key") -> ClientKey:
    """Check a private key the way ssh will use it; return its public fingerprint (never its content).

    Exists, is a regular file of ours, is not readable by group or others (ssh refuses such a key),
    is a private key ssh can load without a passphrase prompt (or one whose public half an ssh-agent
    holds: the daemon runs ssh in BatchMode and can never type a passphrase).
    """
    key = Path(os.path.expanduser(str(path))).absolute()
    try:
        info = key.stat()
    except FileNotFoundError:
        raise UserError(f"{option} {key}: no such file; give the path of the private key "
                        "(e.g. ~/.ssh/id_ed25519, not the .pub file)") from None
    except OSError as exc:
        raise UserError(f"{option} {key}: cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{option} {key}: not a regular file; give the path of the private key file")
    if info.st_uid not in (os.getuid(), 0):
        raise UserError(f"{option} {key}: owned by uid {info.st_uid}, not by you; ssh refuses such a key. "
                        f"Fix: chown {os.getuid()} {key}")
    if info.st_mode & 0o077:
        raise UserError(f"{option} {key}: permissions {stat.S_IMODE(info.st_mode):04o} are too open: the key "
                        f"is readable by group or others and ssh will refuse to use it. Fix: chmod 600 {key}")
    if key.suffix == ".pub":
        raise UserError(f"{option} {key}: this is a public key; give the private key next to it "
                        f"({key.with_suffix('')})")
    public = _public_half(key, option)
    keytype, blob = public
    return ClientKey(path=key, keytype=keytype, fingerprint=fingerprint_of_blob(blob))


def _run_quiet(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE")}
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", timeout=timeout, env=env, check=False)


def _public_half(key: Path, option: str) -> tuple[str, str]:
    # -P '': never prompt; an encrypted key fails here instead of hanging.
    proc = _run_quiet(["ssh-keygen", "-y", "-P", "", "-f", str(key)], KEYGEN_TIMEOUT_S)
    if proc.returncode == 0:
        parsed = _parse_public_line(proc.stdout)
        if parsed:
            return parsed
    message = (proc.stderr or proc.stdout).strip()
    if "passphrase" in message.lower() or "incorrect" in message.lower():
        agent_key = _agent_holds(key)
        if agent_key:
            return agent_key
        raise UserError(f"{option} {key}: the key is protected by a passphrase and no running ssh-agent holds it; "
                        f"hwledger runs ssh non-interactively. Fix: ssh-add {key} (with {key}.pub next to it), "
                        "or use a key without a passphrase kept 0600")
    raise UserError(f"{option} {key}: not a private key ssh can load ({message or 'unrecognised format'}); "
                    "give the private key file (e.g. ~/.ssh/id_ed25519)")


def _parse_public_line(text: str) -> tuple[str, str] | None:
    parts = text.strip().split()
    if len(parts) >= 2:
        with contextlib.suppress(binascii.Error, ValueError):
            base64.b64decode(parts[1], validate=True)
            return parts[0], parts[1]
    return None


def _agent_holds(key: Path) -> tuple[str, str] | None:
    pub = Path(f"{key}.pub")
    if not os.environ.get("SSH_AUTH_SOCK") or not pub.is_file():
        return None
    wanted = _parse_public_line(pub.read_text(errors="replace"))
    if not wanted:
        return None
    proc = _run_quiet(["ssh-add", "-L"], KEYGEN_TIMEOUT_S)
    for line in proc.stdout.splitlines():
        if _parse_public_line(line) == wanted:
            return wanted
    return None


# ---------------------------------------------------------------------------------------------
# hwledger's known_hosts


def read_known_hosts(path: Path) -> list[tuple[str, HostKey]]:
    """(alias, key) pairs of plain `alias keytype blob` lines; other lines are ignored."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not parts[0].startswith(("#", "@", "|")):
            entries.append((parts[0], HostKey(parts[1], parts[2])))
    return entries


def pinned_keys(path: Path, alias: str) -> list[HostKey]:
    return [key for name, key in read_known_hosts(path) if alias in name.split(",")]


def _write_known_hosts(path: Path, lines: list[str]) -> None:
    try:
        private_files.write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))
    except private_files.PrivatePathError as exc:
        raise UserError(str(exc)) from None


def _without_alias(text: str, alias: str) -> list[str]:
    kept = []
    for line in text.splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#") and alias in parts[0].split(","):
            continue
        kept.append(line)
    return kept


def pin(path: Path, alias: str, keys: Sequence[HostKey]) -> None:
    """Make `keys` the only keys pinned under `alias` (other lines kept as they are)."""
    with private_files.locked_beside(path):
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = "# hwledger's pinned host keys (written by hwledger fleet register-ssh)\n"
        _write_known_hosts(path, _without_alias(text, alias) + [key.line(alias) for key in keys])


def unpin(path: Path, alias: str) -> bool:
    with private_files.locked_beside(path):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return False
        lines = _without_alias(text, alias)
        if len(lines) == len(text.splitlines()):
            return False
        _write_known_hosts(path, lines)
        return True


# ---------------------------------------------------------------------------------------------
# Learning a host's key


class HostKeyLearnError(UserError):
    pass


def learn_host_key(
    target: ssh.Target,
    *,
    seed: Sequence[tuple[str, HostKey]] = (),
    timeout_s: float = LEARN_TIMEOUT_S,
    what: str = "the host",
) -> HostKey:
    """Connect once without authenticating and return the host key ``target`` (an agent, or a bastion
    reached directly) presented.

    The connection (``ssh.learn_argv``) records the key into a private temporary known_hosts under the
    target's alias; ``seed`` pre-fills that file (the bastion's pinned key), so an agent's ProxyCommand
    hop to its bastion is verified strictly while the agent's own key is learned.
    """
    alias = ssh.host_key_alias(target)
    with tempfile.TemporaryDirectory(prefix="hwledger-hostkey-") as tmp:
        known = Path(tmp) / "known_hosts"
        known.write_text("".join(key.line(name) + "\n" for name, key in seed))
        os.chmod(known, 0o600)
        try:
            stderr = _run_quiet(ssh.learn_argv(target, str(known)), timeout_s).stderr
        except subprocess.TimeoutExpired:
            raise HostKeyLearnError(f"could not fetch the host key of {what}: no answer within {timeout_s:.0f} s; "
                                    "check the address, port and any bastion") from None
        learned = [key for name, key in read_known_hosts(known) if name == alias]
    if not learned:
        detail = _last_lines(stderr)
        raise HostKeyLearnError(f"could not fetch the host key of {what}: {detail or 'ssh gave no reason'}")
    return learned[-1]


def check_host_key(target: ssh.Target, policy: ssh.SshPolicy, *, timeout_s: float = 10) -> tuple[str | None, str]:
    """Connect to `target` without authenticating and compare its host key with the pinned one.

    Returns (classification, what ssh said): "host_key_changed" or "host_key_unknown" (probe's one
    classifier of ssh's messages), "unreachable" when it did not even get to the key, or None when the
    key matched (ssh then stopped at authentication, which is off).
    """
    try:
        proc = _run_quiet(ssh.host_key_check_argv(target, policy), timeout_s)
    except subprocess.TimeoutExpired:
        return "unreachable", f"no answer within {timeout_s:.0f} s"
    said = proc.stderr or ""
    reason = probe_outcome.classify_ssh_failure(said)
    if reason is not None:
        return reason, said
    if "Permission denied" in said or "No more authentication methods" in said:
        return None, said  # the key exchange passed: the pinned key is the one presented
    return "unreachable", said


def _last_lines(text: str, count: int = 3) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines()
             if ln.strip() and not ln.startswith("Warning: Permanently added")]
    relevant = [ln for ln in lines if "Permission denied" not in ln]
    return " / ".join((relevant or lines)[-count:])
