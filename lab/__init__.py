"""The real-SSH lab: sshd test hosts for the integration tests, the benchmark and the demo.

    from lab import Lab, SshHost, write_agents_toml

Each host is its own ``sshd -D`` (own config, ed25519 host key, key-only auth, VERBOSE log) on a
distinct 127.0.x.y address, or, for a bastion pair, inside network namespaces where the internal host
is reachable only through the bastion.  The remote PATH holds POSIX tools and fake ``nvidia-smi`` /
``rocm-smi`` / ``amd-smi`` scripts replaying real captures from tests/fixtures/gpu; python3 only when
asked for.  The pytest fixtures (``lab``, ``fresh_host``, ``bastion_pair``) are in tests/conftest.py; ``pinning``
pins lab hosts under their agents' host key aliases, as ``hwledger fleet register-ssh`` does.
"""

from __future__ import annotations

from .agents_toml import agents_toml, write_agents_toml
from .lab import Lab, SshHost, known_hosts_line, lab_unavailable_reason, reap_stale_labs
from .system import LabError, LabUnavailable
from .tools import DEFAULT_GPU_QUERY_CMD, DEFAULT_NVIDIA_STDOUT, FIXTURES_DIR

__all__ = [
    "DEFAULT_GPU_QUERY_CMD",
    "DEFAULT_NVIDIA_STDOUT",
    "FIXTURES_DIR",
    "Lab",
    "LabError",
    "LabUnavailable",
    "SshHost",
    "agents_toml",
    "known_hosts_line",
    "lab_unavailable_reason",
    "reap_stale_labs",
    "write_agents_toml",
]
