"""Fixtures shared by the fleet server's integration tests (see fleet_support.py for the helpers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fleet_support import FleetEnv


@pytest.fixture
def fleet_env(tmp_path: Path) -> Iterator[FleetEnv]:
    """A private set of hwledger files (config, known_hosts, store) and environment for one test; the
    servers it started are stopped after."""
    env = FleetEnv.create(tmp_path)
    yield env
    env.cleanup()
