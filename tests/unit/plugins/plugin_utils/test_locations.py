"""Where hwledger keeps its files: flag > environment > XDG default, the same for the app and the plugin."""

from __future__ import annotations

from ansible_collections.hwledger.fleet.plugins.plugin_utils import locations

from hwledger.fleet import Fleet


def test_precedence_flag_then_environment_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "HWLEDGER_CONFIG", "HWLEDGER_KNOWN_HOSTS", "HWLEDGER_DB"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    assert locations.config_path() == home / ".config/hwledger/ssh-agents.toml"
    assert locations.known_hosts_path() == home / ".config/hwledger/known_hosts"
    assert locations.db_path() == home / ".local/share/hwledger/fleet.db"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    assert locations.config_path() == tmp_path / "xdg/hwledger/ssh-agents.toml"
    assert locations.db_path() == home / ".local/share/hwledger/fleet.db"
    monkeypatch.setenv("HWLEDGER_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("HWLEDGER_CONFIG", str(tmp_path / "env.toml"))
    assert locations.db_path() == tmp_path / "env.db"
    assert locations.config_path() == tmp_path / "env.toml"
    assert locations.db_path(str(tmp_path / "flag.db")) == tmp_path / "flag.db"
    assert Fleet(tmp_path / "c", tmp_path / "k", tmp_path / "d" / "fleet.db").results_dir == tmp_path / "d" / "results"
