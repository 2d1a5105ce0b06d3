"""Fixtures of the plugin_utils unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    """An empty HOME: `~` in the sample agents files expands into it, and no key file exists there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home
