"""`hwledger job` submit/list/show/cancel against a real store file (no server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from hwledger.cli import main
from hwledger.commands import job as job_commands
from hwledger.errors import UserError
from hwledger.store import AgentRecord, Store


@pytest.fixture
def db(tmp_path, monkeypatch):
    path = tmp_path / "data" / "fleet.db"
    monkeypatch.setenv("HWLEDGER_DB", str(path))
    with Store.open(path) as store:
        store.upsert_agent(AgentRecord(name="gpu1", hostname="192.0.2.1", port=22, ssh_user="root", key_path="/k"))
    return path


def _submit(capsys, *argv) -> dict:
    assert main(["job", "submit", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_submit_a_command_after_double_dash(db, capsys):
    job = _submit(capsys, "--agent", "gpu1", "--timeout", "30", "--env", "A=1", "--", "echo", "--not-an-option")
    assert job["state"] == "queued" and job["agent"] == "gpu1"
    assert job["spec"]["command"] == ["echo", "--not-an-option"]
    assert job["spec"]["timeout_s"] == 30 and job["spec"]["env"] == {"A": "***"}  # values are never printed
    assert (job["attempts"], job["max_attempts"]) == (0, 1)
    uuid.UUID(job["job_id"])
    assert job["spec"]["job_id"] == job["job_id"]
    with Store.open(db) as store:
        stored = store.get_job(job["job_id"])
        assert stored.state == "queued" and stored.spec["env"] == {"A": "1"}  # kept until an attempt needs it


def test_submit_a_job_file_keeps_its_values_literally(db, tmp_path, capsys):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"command": ["sh", "-c", "echo {{ lookup('pipe','id') }}"], "timeout_s": 5}))
    job = _submit(capsys, "--agent", "gpu1", "--file", str(spec))
    assert job["spec"]["command"][2] == "echo {{ lookup('pipe','id') }}"
    assert job["spec"]["timeout_s"] == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--agent", "gpu1"], "nothing to run"),
        (["--agent", "gpu1", "--file", "x.json", "--", "true"], "not both"),
        (["--agent", "nope", "--", "true"], "no registered agent"),
        (["--agent", "gpu1", "--timeout", "-1", "--", "true"], "timeout_s"),
        (["--agent", "gpu1", "--env", "NOEQUALS", "--", "true"], "KEY=VALUE"),
        (["--agent", "gpu1", "--file", "/nonexistent/job.json"], "cannot read"),
    ],
)
def test_submit_errors_are_clear(db, capsys, argv, message):
    assert main(["job", "submit", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_submit_refuses_an_invalid_spec_naming_the_field(db, tmp_path, capsys):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"command": "echo hi"}))
    assert main(["job", "submit", "--agent", "gpu1", "--file", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "command" in err and "list" in err


def test_list_show_and_cancel(db, capsys):
    first = _submit(capsys, "--agent", "gpu1", "--", "true")
    second = _submit(capsys, "--agent", "gpu1", "--", "printf", "\x1b[31mred")
    with Store.open(db) as store:
        store.transition_job(second["job_id"], ["queued"], "dispatched")
        store.transition_job(second["job_id"], ["dispatched"], "running")
    assert main(["job", "list", "--json"]) == 0
    assert [j["job_id"] for j in json.loads(capsys.readouterr().out)] == [first["job_id"], second["job_id"]]
    assert main(["job", "list", "--state", "running"]) == 0
    out = capsys.readouterr().out
    assert second["job_id"] in out and first["job_id"] not in out and "\x1b" not in out

    assert main(["job", "cancel", first["job_id"][:8]]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert main(["job", "cancel", second["job_id"]]) == 0
    assert "the server stops it" in capsys.readouterr().out
    assert main(["job", "cancel", first["job_id"]]) == 1  # already over
    assert "already ended" in capsys.readouterr().out

    assert main(["job", "show", first["job_id"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "cancelled"
    assert [e["new"] for e in shown["events"] if e["kind"] == "job_state"] == ["queued", "cancelled"]
    assert main(["job", "show", second["job_id"]]) == 0
    out = capsys.readouterr().out
    assert "cancel requested" in out and "\x1b" not in out
    assert main(["job", "show", str(uuid.uuid4())]) == 2


def test_list_newest_limit(db, capsys):
    ids = [_submit(capsys, "--agent", "gpu1", "--", "echo", str(n))["job_id"] for n in range(3)]
    assert main(["job", "list", "--json", "--limit", "2"]) == 0
    assert [j["job_id"] for j in json.loads(capsys.readouterr().out)] == ids[1:]


def test_a_reader_that_goes_away_ends_the_listing_quietly(db):
    with Store.open(db) as store:
        for _job in range(3):
            store.submit_job("gpu1", {"command": ["true"]})
    env = dict(os.environ, HWLEDGER_DB=str(db))
    proc = subprocess.Popen([sys.executable, "-m", "hwledger", "job", "list"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.close()  # like `| head` having exited: the first write gets EPIPE
    _out, err = proc.communicate(timeout=60)
    assert err == b"", err.decode(errors="replace")
    assert proc.returncode == 141


def test_error_messages_escape_control_characters_and_keep_lines(db, capsys, monkeypatch):
    def fails(_args):
        raise UserError("host said \x1b[2Jcleared\nsecond line")

    monkeypatch.setattr(job_commands, "cmd_list", fails)
    assert main(["job", "list"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "host said \\x1b[2Jcleared\nsecond line" in err


def test_a_file_error_is_a_message_not_a_traceback(db, capsys, monkeypatch):
    def fails(_args):
        raise PermissionError(13, "Permission denied", "/srv/hwledger/results")

    monkeypatch.setattr(job_commands, "cmd_list", fails)
    assert main(["job", "list"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "hwledger: error: Permission denied (/srv/hwledger/results)"


def test_no_command_prints_an_env_value(db, capsys, monkeypatch):
    monkeypatch.setenv("HWL_TEST_TOKEN", "from-the-environment-value")
    job = _submit(capsys, "--agent", "gpu1", "--max-attempts", "2", "--env", "PLAIN=typed-value",
                  "--env", "HWL_TEST_TOKEN", "--", "true")
    with Store.open(db) as store:  # kept while an attempt may need them; --env NAME took the environment's value
        assert store.get_job(job["job_id"]).spec["env"] == {"PLAIN": "typed-value", "HWL_TEST_TOKEN": "from-the-environment-value"}
    outputs = [json.dumps(job)]
    for argv in (["job", "show", job["job_id"], "--json"], ["job", "show", job["job_id"]], ["job", "list", "--json"],
                 ["job", "list"]):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert not any("typed-value" in out or "from-the-environment-value" in out for out in outputs)
    shown = json.loads(outputs[1])
    assert shown["spec"]["env"] == {"PLAIN": "***", "HWL_TEST_TOKEN": "***"}
    assert (shown["attempts"], shown["max_attempts"]) == (0, 2)
    assert "env      HWL_TEST_TOKEN=*** PLAIN=***" in outputs[2] and "attempts 0 of 2" in outputs[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-attempts", "0"], "must be from 1 to 100"),
        (["--max-attempts", "many"], "is not a whole number"),
        (["--env", "HWL_TEST_SURELY_UNSET_VARIABLE"], "KEY alone with KEY set in the environment"),
    ],
)
def test_attempts_and_env_names_are_checked(db, capsys, argv, message):
    try:
        code = main(["job", "submit", "--agent", "gpu1", *argv, "--", "true"])
    except SystemExit as exc:  # argparse's own usage error
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_json_calls_the_id_job_id_everywhere(db, capsys):
    """submit, list and show --json name the id as the spec, the result and the server logs do: job_id."""
    job = _submit(capsys, "--agent", "gpu1", "--", "true")
    assert "id" not in job and job["job_id"] == job["spec"]["job_id"]
    assert main(["job", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert "id" not in listed and listed["job_id"] == job["job_id"]
    assert main(["job", "show", job["job_id"], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "id" not in shown and shown["job_id"] == job["job_id"]


@pytest.mark.parametrize("argv", [["job", "list"], ["job", "list", "--json"], ["job", "show", "0f8fad5b"],
                                  ["job", "cancel", "0f8fad5b"]])
def test_read_only_commands_create_no_store(tmp_path, monkeypatch, capsys, argv):
    db = tmp_path / "nowhere" / "fleet.db"
    monkeypatch.setenv("HWLEDGER_DB", str(db))
    rc = main(argv)
    captured = capsys.readouterr()
    assert not db.parent.exists()
    assert f"there is no store at {db}" in captured.err and "Traceback" not in captured.err
    if argv[1] == "list":
        assert rc == 0 and captured.out.strip() in ("no jobs", "[]")
    else:
        assert rc == 2 and "no job '0f8fad5b'" in captured.err


# --- logs --------------------------------------------------------------------------------------------


def test_logs_prints_a_finished_job_s_output_and_bad_input_is_a_clear_message(db, capsys):
    from hwledger.store import LogCursor

    job = _submit(capsys, "--agent", "gpu1", "--", "echo", "hi")
    assert main(["job", "logs", job["job_id"]]) == UserError.exit_code
    assert "has not started" in capsys.readouterr().err
    with Store.open(db) as store:
        store.transition_job(job["job_id"], ["queued"], "running", remote_dir="/tmp/hwledger-job-x")
        store.append_job_log(job["job_id"], None, LogCursor("/tmp/hwledger-job-x"),
                             [("stdout", b"hi \x1b[31mred\n"), ("stderr", b"warn\n")])
        store.transition_job(job["job_id"], ["running"], "failed", exit_code=4)
    assert main(["job", "logs", job["job_id"][:8]]) == 0
    printed = capsys.readouterr()
    assert printed.out == "hi \\x1b[31mred\n" and printed.err.startswith("warn\n")
    assert main(["job", "logs", "--stderr", "-f", job["job_id"]]) == 4
    printed = capsys.readouterr()
    assert printed.out == "" and "failed (exit code 4)" in printed.err
    assert main(["job", "logs", str(uuid.uuid4())]) == UserError.exit_code
    assert "no job" in capsys.readouterr().err


def test_logs_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["job", "logs", "--help"])
    text = capsys.readouterr().out
    assert "hwledger job logs -f" in text and "--stderr" in text
