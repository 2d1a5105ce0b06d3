"""`hwledger fleet` commands that need no network: argument checks, status, list, remove."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome
from hwledger import agents_file, hostkeys
from hwledger.cli import main
from hwledger.fleet import Fleet, agent_record
from hwledger.heartbeat import record_outcomes
from hwledger.store import Store


@pytest.fixture
def env(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg"
    cfg.mkdir(mode=0o700)
    monkeypatch.setenv("HWLEDGER_CONFIG", str(cfg / "ssh-agents.toml"))
    monkeypatch.setenv("HWLEDGER_KNOWN_HOSTS", str(cfg / "known_hosts"))
    monkeypatch.setenv("HWLEDGER_DB", str(tmp_path / "data" / "fleet.db"))
    fleet = Fleet.from_options()
    yield fleet
    _remove_fallback_control_dir(fleet.db)


def _remove_fallback_control_dir(db) -> None:
    directory = Fleet(Path("c"), Path("k"), Path(db)).control_dir
    if directory.parent == Path("/tmp") / f"hwledger-{os.getuid()}":
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def _register_offline(fleet: Fleet, name: str, gpus: list[dict] | None, **kw) -> agents_schema.Agent:
    agent = agents_schema.Agent(name=name, hostname="192.0.2.7", ssh_user="root", ssh_key_path="/keys/k", **kw)
    agents_file.append_agent(fleet.config, agent)
    hostkeys.pin(fleet.known_hosts, ssh.known_hosts_alias(agent), [hostkeys.HostKey("ssh-ed25519", "AAAA")])
    with Store.open(fleet.db) as store:
        store.upsert_agent(agent_record(agent))
        if gpus is not None:
            record_outcomes(store, {name: ProbeOutcome(True, snapshot={"gpus": gpus, "backend": "nvidia"})})
    return agent


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "gpu.example.com"], "no user"),
        (["--host", "root@-oProxyCommand=x"], "starts with '-'"),
        (["--host", "root@gpu.example.com:22", "--port", "2222"], "give one of them"),
        (["--host", "root@gpu.example.com", "--name", "bad name"], "agent name"),
        (["--host", "root@gpu.example.com", "--bastion-key", "/k"], "need --bastion"),
        (["--host", "root@gpu.example.com", "--bastion", "b@"], "--bastion"),
    ],
)
def test_register_rejects_bad_arguments_before_touching_anything(env, key, capsys, argv, message):
    rc = main(["fleet", "register-ssh", "--key", str(key), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
    assert not env.config.exists() and not env.known_hosts.exists()


def test_register_rejects_an_open_key_file(env, key, capsys):
    key.chmod(0o644)
    assert main(["fleet", "register-ssh", "--host", "root@192.0.2.1", "--key", str(key)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_register_refuses_a_name_already_in_the_file(env, key, capsys):
    _register_offline(env, "gpu1", None)
    rc = main(["fleet", "register-ssh", "--host", "root@192.0.2.1", "--key", str(key), "--name", "gpu1"])
    assert rc == 2
    assert "already registered" in capsys.readouterr().err


def test_fingerprint_options_are_mutually_exclusive(env, key, capsys):
    with pytest.raises(SystemExit):
        main(["fleet", "register-ssh", "--host", "root@h", "--key", str(key), "--accept-new-host-key",
              "--host-key-fingerprint", "SHA256:" + "a" * 43])


def test_status_escapes_remote_control_characters(env, capsys):
    evil = "A100\x1b[2K\rALL OK\x9b"
    _register_offline(env, "gpu1", [{"index": 0, "name": evil, "memory_total_bytes": 8 << 30,
                                     "memory_free_bytes": 2 << 30}])
    assert main(["fleet", "status"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x9b" not in out
    assert "A100\\x1b[2K\\x0dALL OK\\x9b" in out
    assert "online" in out and "2.0 GiB / 8.0 GiB" in out
    assert main(["fleet", "status", "--json"]) == 0
    raw = capsys.readouterr().out
    assert "\x1b" not in raw and "\x9b" not in raw
    (item,) = json.loads(raw)
    assert item["gpus"][0]["name"] == evil  # the data itself is kept literally
    assert (item["memory_total_bytes"], item["memory_free_bytes"]) == (8 << 30, 2 << 30)


def test_status_shows_old_data_as_stale(env, capsys):
    _register_offline(env, "gpu1", [{"index": 0, "name": "H100"}])
    assert main(["fleet", "status", "--json", "--stale-after", "0"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert (item["state"], item["recorded_state"]) == ("stale", "online")
    assert item["last_seen_age_s"] is not None


def test_list_shows_configured_agents(env, capsys):
    _register_offline(env, "gpu1", None)
    assert main(["fleet", "list", "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["name"] == "gpu1" and item["destination"] == "root@192.0.2.7:22" and item["state"] == "pending"


def test_list_and_status_show_the_same_effective_state(env, capsys):
    """A host that answered once and then nobody refreshed (no server): both say stale, neither online."""
    _register_offline(env, "gpu1", [{"index": 0, "name": "H100"}])
    for command in ("list", "status"):
        assert main(["fleet", command, "--json", "--stale-after", "0"]) == 0
        (item,) = json.loads(capsys.readouterr().out)
        assert (item["state"], item["recorded_state"]) == ("stale", "online"), command
        assert main(["fleet", command, "--stale-after", "0"]) == 0
        out = capsys.readouterr().out
        assert "stale" in out and "online" not in out, command
    assert main(["fleet", "list", "--json"]) == 0  # fresh enough under the default --stale-after
    assert json.loads(capsys.readouterr().out)[0]["state"] == "online"


@pytest.mark.parametrize("argv", [["fleet", "status"], ["fleet", "status", "--json"], ["fleet", "list"],
                                  ["fleet", "list", "--json"]])
def test_read_only_commands_create_no_store(env, capsys, argv):
    _register_offline(env, "gpu1", None)
    shutil.rmtree(env.db.parent)  # an agents file, but no store (e.g. a wrong HWLEDGER_DB)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert not env.db.parent.exists()
    assert f"there is no store at {env.db}" in captured.err
    if "--json" in argv:
        assert isinstance(json.loads(captured.out), list)


def test_remove_edits_file_known_hosts_store_and_cancels_queued_jobs(env, capsys):
    _register_offline(env, "gpu1", None)
    _register_offline(env, "gpu2", None)
    env.config.write_text("# keep me\n" + env.config.read_text())
    with Store.open(env.db) as store:
        job = store.submit_job("gpu1", {"command": ["true"]})
    assert main(["fleet", "remove", "gpu1"]) == 0
    assert "1 job(s) cancelled" in capsys.readouterr().out
    assert [a.name for a in agents_file.read_agents(env.config)] == ["gpu2"]
    assert env.config.read_text().startswith("# keep me\n")
    assert hostkeys.pinned_keys(env.known_hosts, "hwledger-agent-gpu1") == []
    assert hostkeys.pinned_keys(env.known_hosts, "hwledger-agent-gpu2") != []
    with Store.open(env.db) as store:
        assert store.get_agent("gpu1").state == "removed"
        assert store.get_job(job.id).state == "cancelled"
    assert main(["fleet", "remove", "gpu1"]) == 2
    assert "no agent named" in capsys.readouterr().err


def test_remove_keeps_a_bastion_pinned_while_another_agent_goes_through_it(env, capsys):
    # Same bastion host and port (one known_hosts entry), reached with another login and key.
    via_root = agents_schema.Bastion(hostname="bastion.example.com", ssh_user="root", ssh_key_path="/keys/a")
    via_ops = agents_schema.Bastion(hostname="bastion.example.com", ssh_user="ops", ssh_key_path="/keys/b")
    first = _register_offline(env, "gpu1", None, bastion=via_root)
    _register_offline(env, "gpu2", None, bastion=via_ops)
    alias = ssh.bastion_known_hosts_alias(first.bastion)
    hostkeys.pin(env.known_hosts, alias, [hostkeys.HostKey("ssh-ed25519", "BBBB")])
    assert main(["fleet", "remove", "gpu1"]) == 0
    assert hostkeys.pinned_keys(env.known_hosts, alias) != []  # gpu2 still needs it
    assert main(["fleet", "remove", "gpu2"]) == 0
    assert hostkeys.pinned_keys(env.known_hosts, alias) == []  # the last user is gone
    capsys.readouterr()


def test_remove_is_refused_while_a_job_runs_unless_forced(env, capsys):
    _register_offline(env, "gpu1", None)
    with Store.open(env.db) as store:
        running = store.submit_job("gpu1", {"command": ["sleep", "60"]})
        store.transition_job(running.id, ["queued"], "dispatched")
        store.transition_job(running.id, ["dispatched"], "running")
        dispatched = store.submit_job("gpu1", {"command": ["true"]})
        store.transition_job(dispatched.id, ["queued"], "dispatched")
    assert main(["fleet", "remove", "gpu1"]) == 2
    err = capsys.readouterr().err
    assert running.id in err and dispatched.id in err and "--force" in err
    # Refused before anything changed.
    assert [a.name for a in agents_file.read_agents(env.config)] == ["gpu1"]
    assert hostkeys.pinned_keys(env.known_hosts, "hwledger-agent-gpu1") != []
    with Store.open(env.db) as store:
        assert store.get_agent("gpu1").state == "pending"

    assert main(["fleet", "remove", "gpu1", "--force"]) == 0
    out = capsys.readouterr().out
    assert "1 job(s) cancelled" in out and "1 running job(s) asked to stop" in out
    with Store.open(env.db) as store:
        assert store.get_agent("gpu1").state == "removed"
        assert store.get_job(dispatched.id).state == "cancelled"  # nothing of it had started
        assert store.get_job(running.id).state == "running" and store.cancel_requested(running.id)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--interval", "0"], "--interval"),
        (["--interval", "inf"], "--interval must be a finite number"),
        (["--interval", "nan"], "--interval must be a finite number"),
        (["--interval=-inf"], "--interval"),
        (["--interval", "1e300"], "--interval must be a finite number"),
        (["--max-ticks", "0"], "--max-ticks"),
        (["--max-parallel-jobs", "0"], "--max-parallel-jobs"),
        (["--query-timeout", "0"], "--query-timeout"),
        (["--query-timeout", "0", "--transport", "ansible"], "--query-timeout"),
        (["--query-timeout", "99999", "--transport", "ansible"], "--query-timeout"),
        (["--query-timeout", "-5", "--transport", "fanout"], "--query-timeout"),
    ],
)
def test_serve_rejects_bad_numbers(env, capsys, argv, message):
    assert main(["fleet", "serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "five", ""])
def test_stale_after_refuses_values_that_are_not_a_finite_duration(env, capsys, value):
    _register_offline(env, "gpu1", [{"index": 0, "name": "H100"}])
    with pytest.raises(SystemExit) as exc:
        main(["fleet", "status", "--stale-after", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--stale-after" in err and "Traceback" not in err, err


def test_serve_help_lists_its_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fleet", "serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out
    for code in ("0 ", "1 ", "2 ", "4 ", "130 "):
        assert f"\n  {code}" in out, code
