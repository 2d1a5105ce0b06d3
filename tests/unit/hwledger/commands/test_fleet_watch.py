"""`hwledger fleet prune` and the watching options of `hwledger fleet serve`: clear errors, no tracebacks."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timedelta, timezone

import pytest

from hwledger.cli import main
from hwledger.fleet import Fleet
from hwledger.store import AgentRecord, Store
from hwledger.store.retention import iso


@pytest.fixture
def env(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg"
    cfg.mkdir(mode=0o700)
    monkeypatch.setenv("HWLEDGER_CONFIG", str(cfg / "ssh-agents.toml"))
    monkeypatch.setenv("HWLEDGER_KNOWN_HOSTS", str(cfg / "known_hosts"))
    monkeypatch.setenv("HWLEDGER_DB", str(tmp_path / "data" / "fleet.db"))
    return Fleet.from_options()


def _old_job(fleet: Fleet, days: int) -> str:
    with Store.open(fleet.db) as store:
        if store.get_agent("gpu1") is None:
            store.upsert_agent(AgentRecord(name="gpu1", hostname="h", port=22, ssh_user="u", key_path="/k"))
        job = store.submit_job("gpu1", {"command": ["true"]})
        store.request_cancel(job.id)
        with store._write() as conn:  # pylint: disable=protected-access  # a job that finished long ago
            conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?",
                         (iso(datetime.now(timezone.utc) - timedelta(days=days)), job.id))
        return job.id


def test_prune_dry_run_then_prune(env, capsys):
    old, young = _old_job(env, 45), _old_job(env, 2)
    assert main(["fleet", "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 1 finished job(s)" in out and "nothing changed" in out
    assert main(["fleet", "prune", "--json", "--events-older-than", "never"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["jobs"] == 1 and report["events_before"] is None and report["size_after"] > 0
    with Store.open(env.db) as store:
        assert store.get_job(old) is None and store.get_job(young) is not None


@pytest.mark.parametrize(("argv", "message"), [
    (["--jobs-older-than", "30"], "write an age"), (["--jobs-older-than", "2h"], "at least 1d"),
    (["--events-older-than=-3d"], "write an age"), (["--events-older-than", "12h"], "at least 1d"),
])
def test_prune_rejects_bad_ages(env, capsys, argv, message):
    assert main(["fleet", "prune", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--http", "0.0.0.0:9835"], "--http-token-file"),
    (["--http", "gpu.example.com:9835"], "not an IP address"),
    (["--http", "127.0.0.1:70000"], "port must"),
    (["--http-token-file", "/nonexistent"], "needs --http"),
    (["--http", "127.0.0.1:0", "--http-token-file", "/nonexistent/token"], "cannot read it"),
    (["--jobs-older-than", "soon"], "write an age"),
])
def test_serve_rejects_bad_watch_options(env, capsys, argv, message):
    assert main(["fleet", "serve", "--once", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_refuses_a_token_file_others_can_read(env, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    os.chmod(token, 0o640)
    assert main(["fleet", "serve", "--once", "--http", "127.0.0.1:0", "--http-token-file", str(token)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_serve_says_when_the_port_is_taken(env, capsys):
    env.config.write_text("")
    os.chmod(env.config, 0o600)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["fleet", "serve", "--once", "--http", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "the address is in use" in err and "Traceback" not in err
