"""sshd_config lines shared by the lab's hosts and the benchmark's bulk sshd: one listener, one host key,
one login account, public-key authentication only, no forwarding but what the caller allows."""

from __future__ import annotations

from pathlib import Path


def sshd_base_config(
    *,
    listen: str,
    host_key: Path,
    pid_file: Path,
    authorized_keys: str | Path,
    user: str,
    max_startups: str,
    max_sessions: int,
    tcp_forwarding: bool = False,
) -> list[str]:
    """The lines every sshd we start has; the caller adds its own logging, environment and extras.

    ``max_startups`` is sshd's "start:rate:full" triple: the lab and the benchmark open many
    connections at once and size it (and ``max_sessions``, sessions per connection) differently."""
    return [
        f"ListenAddress {listen}",
        "AddressFamily inet",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {user}",
        "PubkeyAuthentication yes",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes yes",
        f"MaxStartups {max_startups}",
        f"MaxSessions {max_sessions}",
        f"AllowTcpForwarding {'yes' if tcp_forwarding else 'no'}",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
    ]


def sshd_version_options(version: tuple[int, int]) -> list[str]:
    """Lines for this sshd version, to add last (older versions reject options they do not know)."""
    if version >= (9, 8):
        # Newer sshd penalises sources with failed logins; every lab or bench client is 127.0.0.1.
        return ["PerSourcePenalties no"]
    return []
