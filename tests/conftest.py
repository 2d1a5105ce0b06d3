"""Shared pytest fixtures: real SSH test hosts from the lab package (lab/).

- ``lab``: one session-scoped Lab (skips with the reason when not root or sshd is missing).
- ``fresh_host``: a new loopback host per test, replaying the default nvidia-smi query output.
- ``bastion_pair``: a session-scoped (bastion, internal) pair in network namespaces.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab import Lab, LabUnavailable, SshHost, lab_unavailable_reason

# Every Lab this session made; pytest_sessionfinish stops them even when a fixture teardown did not
# run (Lab also registers an atexit hook, and its sshd processes die with this process).
_LABS: list[Lab] = []


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # pytest's base temp dir is private (0700); Lab makes its own root 0700 as well.
    root = tmp_path_factory.mktemp("lab")
    try:
        the_lab = Lab(root)
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    _LABS.append(the_lab)
    try:
        yield the_lab
    finally:
        the_lab.stop()


@pytest.fixture
def fresh_host(lab: Lab) -> Iterator[SshHost]:
    host = lab.add_loopback_host(lab.unique_name("fresh"))
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="session")
def bastion_pair(lab: Lab) -> tuple[SshHost, SshHost]:
    try:
        return lab.add_bastion_pair("gpu-internal")
    except LabUnavailable as exc:
        pytest.skip(str(exc))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for the_lab in _LABS:
        the_lab.stop()
