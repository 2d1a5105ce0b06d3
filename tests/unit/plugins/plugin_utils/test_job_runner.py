"""The job runner (job_runner.run_job, the staged one-file bundle `python3 runner.pyz run`, `hwledger run`),
run locally on real processes."""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_bundle, job_runner, job_schema, private_files
from ansible_collections.hwledger.fleet.plugins.plugin_utils.processes import mentioning as _mentioning


@pytest.fixture(scope="module")
def runner_pyz(tmp_path_factory) -> Path:
    """The runner exactly as the job role stages it on a host without hwledger: one zip application."""
    path = tmp_path_factory.mktemp("bundle") / "runner.pyz"
    path.write_bytes(job_bundle.bundle())
    return path


def find_python38() -> str | None:
    """A working Python 3.8 (pyenv's real binary first: its shim may not be enabled)."""
    candidates = [*sorted((Path.home() / ".pyenv" / "versions").glob("3.8*/bin/python3.8")), shutil.which("python3.8")]
    for candidate in candidates:
        if candidate and subprocess.run([str(candidate), "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return str(candidate)
    return None


def marker() -> str:
    """A unique sleep duration: the job's processes are found by it in /proc."""
    return "300.%d" % secrets.randbelow(10**9)


def spec(command, **kw) -> dict:
    return job_schema.new_job(command, **kw)


def run(job, output: Path, **kw) -> tuple[int, dict | None, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = job_runner.run_job(job, str(output), stdout=out, stderr=err, **kw)
    result = json.loads(output.read_text()) if output.is_file() and not output.is_symlink() else None
    return rc, result, out.getvalue(), err.getvalue()


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "result.json"


# --- outcomes and exit codes -------------------------------------------------------------------------


def test_success_writes_a_private_result_and_prints_its_sha256(out):
    job = spec(["sh", "-c", "echo hello; echo warn >&2"])
    rc, result, printed, _err = run(job, out)
    assert rc == job_runner.EXIT_SUCCEEDED == 0
    assert result["state"] == "succeeded" and result["exit_code"] == 0 and result["signal"] is None
    assert result["stdout_tail"] == "hello\n" and result["stderr_tail"] == "warn\n"
    assert result["job_id"] == job["job_id"] and result["error"] is None
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert printed == "%s  %s\n" % (hashlib.sha256(out.read_bytes()).hexdigest(), out)
    assert job_schema.validate_result(out.read_bytes(), expected_job_id=job["job_id"]) == result


def test_nonzero_exit_is_failed(out):
    rc, result, _printed, _err = run(spec(["sh", "-c", "exit 3"]), out)
    assert rc == job_runner.EXIT_FAILED == 1
    assert (result["state"], result["exit_code"], result["signal"]) == ("failed", 3, None)


def test_killed_by_a_signal_is_failed_with_the_signal(out):
    rc, result, _printed, _err = run(spec(["sh", "-c", "kill -9 $$"]), out)
    assert rc == job_runner.EXIT_FAILED
    assert (result["state"], result["exit_code"], result["signal"]) == ("failed", None, 9)


def test_timeout_terminates_the_job(out):
    started = time.monotonic()
    rc, result, _printed, _err = run(spec(["sleep", "30"], timeout_s=0.5), out)
    assert rc == job_runner.EXIT_TIMED_OUT == 3
    assert result["state"] == "timed_out" and result["signal"] == signal.SIGTERM and result["exit_code"] is None
    assert 0.5 <= result["duration_s"] < 5 and time.monotonic() - started < 5


def test_timeout_kills_a_job_that_ignores_sigterm(out):
    job = spec(["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"], timeout_s=0.3)
    rc, result, _printed, _err = run(job, out, kill_grace_s=0.5)
    assert rc == job_runner.EXIT_TIMED_OUT
    assert result["signal"] == signal.SIGKILL


def test_timeout_kills_the_whole_group_and_escaped_children(out):
    mark = marker()
    script = (
        f"sleep {mark}1 & "                                   # background child, same group
        f"setsid sleep {mark}2 & "                            # left the group and the session
        f"(setsid sh -c 'trap \"\" TERM; sleep {mark}3' &) ; "  # double fork, ignores TERM
        f"sleep {mark}4"
    )
    rc, result, _printed, _err = run(spec(["sh", "-c", script], timeout_s=1), out, kill_grace_s=0.5)
    assert rc == job_runner.EXIT_TIMED_OUT
    assert list(_mentioning(mark)) == []


def test_a_job_that_exits_leaves_no_process_behind(out):
    mark = marker()
    script = f"sleep {mark}1 & setsid sleep {mark}2 & (setsid sleep {mark}3 &); echo started"
    started = time.monotonic()
    rc, result, _printed, _err = run(spec(["sh", "-c", script], timeout_s=60), out)
    assert rc == job_runner.EXIT_SUCCEEDED and result["stdout_tail"] == "started\n"
    assert list(_mentioning(mark)) == []
    assert time.monotonic() - started < 10  # not held up until the timeout by the children's open pipes


def test_command_not_found_gets_a_result(out):
    rc, result, _printed, err = run(spec(["hwledger-no-such-command-x"]), out)
    assert rc == job_runner.EXIT_NOT_STARTED == 5
    assert result["state"] == "error" and result["exit_code"] is None
    assert result["error"]["reason"] == "command_not_found"
    assert "hwledger-no-such-command-x" in result["error"]["message"] and "command_not_found" in err


def test_error_messages_stay_within_the_result_schema(out, monkeypatch):
    long_path = ":".join("/nonexistent/%05d" % i for i in range(5000))  # 95 KB, named in the message
    monkeypatch.setenv("PATH", long_path)  # the runner's own PATH (a job env value would be masked)
    job = spec(["hwledger-no-such-command-x"])
    rc, result, _printed, _err = run(job, out)
    assert rc == job_runner.EXIT_NOT_STARTED
    assert len(result["error"]["message"]) == job_schema.ERROR_MESSAGE_MAX_CHARS
    assert job_schema.validate_result(out.read_bytes(), expected_job_id=job["job_id"]) == result


def test_command_not_executable(out, tmp_path):
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    rc, result, _printed, _err = run(spec([str(script)]), out)
    assert rc == job_runner.EXIT_NOT_STARTED
    assert result["error"]["reason"] == "permission_denied"


def test_missing_workdir(out, tmp_path):
    rc, result, _printed, _err = run(spec(["true"], workdir=str(tmp_path / "missing")), out)
    assert rc == job_runner.EXIT_NOT_STARTED
    assert result["error"]["reason"] == "workdir_unavailable"


def test_invalid_spec_gets_an_error_result_with_its_job_id(out):
    job_id = str(uuid.uuid4())
    rc, result, _printed, err = run({"job_id": job_id, "command": "nvidia-smi -L"}, out)
    assert rc == job_runner.EXIT_INVALID == 2
    assert result["state"] == "error" and result["error"]["reason"] == "invalid_job"
    assert result["job_id"] == job_id and "must be a list" in result["error"]["message"]
    assert "invalid_job" in err


def test_invalid_job_id_gives_a_result_without_one(out):
    rc, result, _printed, _err = run({"job_id": "../../x", "command": ["true"]}, out)
    assert rc == job_runner.EXIT_INVALID
    assert result["job_id"] is None and "job_id" in result["error"]["message"]


def test_bad_job_file_gets_an_error_result(tmp_path, out):
    job_file = tmp_path / "job.json"
    job_file.write_text("{broken")
    err = io.StringIO()
    rc = job_runner.run_job_file(str(job_file), str(out), stdout=io.StringIO(), stderr=err)
    assert rc == job_runner.EXIT_INVALID
    result = json.loads(out.read_text())
    assert result["error"]["reason"] == "invalid_job" and "not valid JSON" in result["error"]["message"]


def test_interrupted_runner_kills_the_job_and_reports_it(tmp_path, out, runner_pyz):
    mark = marker()
    job_file = tmp_path / "job.json"
    job_file.write_bytes(job_schema.encode_job(spec(["sh", "-c", f"sleep {mark}1 & sleep {mark}2"], timeout_s=60)))
    proc = subprocess.Popen([sys.executable, str(runner_pyz), "run", str(job_file), "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while len(list(_mentioning(mark))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == job_runner.EXIT_RUNNER_ERROR == 6, stderr
    result = json.loads(out.read_text())
    assert result["state"] == "error" and result["error"]["reason"] == "interrupted"
    assert list(_mentioning(mark)) == []


# --- writing the result ------------------------------------------------------------------------------


def test_a_symlink_at_the_output_is_refused(tmp_path):
    victim = tmp_path / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA original\n")
    link = tmp_path / "result.json"
    link.symlink_to(victim)
    rc, _result, printed, err = run(spec(["true"]), link)
    assert rc == job_runner.EXIT_NO_RESULT == 4
    assert "symlink" in err and printed == ""
    assert victim.read_text() == "ssh-ed25519 AAAA original\n"
    assert link.is_symlink()


def test_a_dangling_symlink_at_the_output_creates_nothing(tmp_path):
    target = tmp_path / "created-through-the-link"
    link = tmp_path / "result.json"
    link.symlink_to(target)
    rc, _result, _printed, _err = run(spec(["true"]), link)
    assert rc == job_runner.EXIT_NO_RESULT and not target.exists()


def test_output_that_is_a_directory_or_in_a_missing_directory(tmp_path):
    (tmp_path / "dir.json").mkdir()
    assert run(spec(["true"]), tmp_path / "dir.json")[0] == job_runner.EXIT_NO_RESULT
    assert run(spec(["true"]), tmp_path / "missing" / "result.json")[0] == job_runner.EXIT_NO_RESULT


def test_a_planted_temp_name_is_never_written_through(tmp_path, out, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    names = iter(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])
    monkeypatch.setattr(private_files.secrets, "token_hex", lambda n: next(names))
    planted = tmp_path / ".result.json.aaaaaaaaaaaaaaaa.tmp"
    planted.symlink_to(victim)
    rc, result, _printed, _err = run(spec(["true"]), out)
    assert rc == 0 and result["state"] == "succeeded"
    assert victim.read_text() == "untouched" and planted.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".result.json.aaaaaaaaaaaaaaaa.tmp", "result.json", "victim"]


def test_existing_result_is_replaced_atomically(out):
    out.write_text("old")
    old_inode = out.stat().st_ino
    rc, result, _printed, _err = run(spec(["true"]), out)
    assert rc == 0 and result["state"] == "succeeded"
    assert out.stat().st_ino != old_inode  # a new file renamed over the old one, not rewritten in place


def test_result_is_0600_whatever_the_umask(out):
    previous = os.umask(0)
    try:
        run(spec(["true"]), out)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temp file left


# --- output, environment, working directory ----------------------------------------------------------


def test_huge_output_is_bounded(out):
    job = spec(["sh", "-c", "head -c 20000000 /dev/zero | tr '\\0' a; echo END; head -c 100000 /dev/zero >&2"])
    rc, result, _printed, _err = run(job, out)
    assert rc == 0
    assert result["stdout_bytes"] == 20000004 and result["stderr_bytes"] == 100000
    assert len(result["stdout_tail"]) == job_schema.TAIL_BYTES and result["stdout_tail"].endswith("aaaEND\n")
    assert len(result["stderr_tail"]) == job_schema.TAIL_BYTES
    assert out.stat().st_size <= job_schema.RESULT_MAX_BYTES


def test_runner_memory_stays_bounded_with_200_mb_of_output(tmp_path, out, runner_pyz):
    job_file = tmp_path / "job.json"
    job_file.write_bytes(job_schema.encode_job(spec(["head", "-c", "200000000", "/dev/urandom"])))
    # Measured from a small fresh interpreter: a child forked straight from this (large, long-lived)
    # pytest process would count pytest's own pages in its peak RSS.
    measure = (
        "import os, subprocess, sys\n"
        "proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "_pid, status, usage = os.wait4(proc.pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n"
    )
    printed = subprocess.run([sys.executable, "-c", measure, sys.executable, str(runner_pyz), "run", str(job_file),
                              "--output", str(out)], capture_output=True, text=True, check=True).stdout
    returncode, maxrss_kib = (int(word) for word in printed.split())
    assert returncode == 0
    assert json.loads(out.read_text())["stdout_bytes"] == 200_000_000
    assert maxrss_kib < 80 * 1024  # far below the 200 MB printed


def test_invalid_utf8_output_becomes_valid_text(out):
    rc, result, _printed, _err = run(spec(["printf", "ok \\377\\376 end"]), out)
    assert rc == 0 and result["stdout_tail"] == "ok \ufffd\ufffd end"


def test_environment_is_minimal_plus_the_jobs(out, monkeypatch):
    monkeypatch.setenv("HWLEDGER_TEST_SECRET", "do-not-leak")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    job = spec(["env"], env={"CUDA_VISIBLE_DEVICES": "1", "LANG": "C"})
    rc, result, _printed, _err = run(job, out)
    env = dict(line.split("=", 1) for line in result["stdout_tail"].splitlines())
    assert rc == 0
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["LANG"] == "C"
    assert env["HWLEDGER_JOB_ID"] == job["job_id"]
    assert env["PATH"] == os.environ["PATH"] and env["HOME"] == os.environ["HOME"]
    assert "HWLEDGER_TEST_SECRET" not in env and "SSH_AUTH_SOCK" not in env
    assert set(env) <= set(job_runner.BASE_ENV_KEYS) | {"CUDA_VISIBLE_DEVICES", "HWLEDGER_JOB_ID", "PWD"}


def test_job_path_is_used_to_find_the_command(tmp_path, out):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "my-tool"
    tool.write_text("#!/bin/sh\necho from-my-tool\n")
    tool.chmod(0o755)
    rc, result, _printed, _err = run(spec(["my-tool"], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}), out)
    assert rc == 0 and result["stdout_tail"] == "from-my-tool\n"


def test_workdir_and_stdin(tmp_path, out):
    work = tmp_path / "work dir"
    work.mkdir()
    rc, result, _printed, _err = run(spec(["sh", "-c", "pwd; cat; echo stdin-closed"], workdir=str(work)), out)
    assert rc == 0 and result["stdout_tail"] == f"{work}\nstdin-closed\n"


def test_default_workdir_is_home(out, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    rc, result, _printed, _err = run(spec(["pwd"]), out)
    assert rc == 0 and result["stdout_tail"] == f"{tmp_path}\n"


def test_argv_is_not_given_to_a_shell(out, tmp_path):
    canary = tmp_path / "canary"
    rc, result, _printed, _err = run(spec(["echo", f"$(touch {canary})", ";", "id"]), out)
    assert rc == 0 and result["stdout_tail"] == f"$(touch {canary}) ; id\n"
    assert not canary.exists()


# --- the command lines: python3 runner.pyz run, hwledger run, Python 3.8 ------------------------------


def cli(python: str, tmp_path: Path, job: dict, *extra: str, bundle: Path) -> subprocess.CompletedProcess:
    job_file = tmp_path / "job.json"
    job_file.write_bytes(job_schema.encode_job(job))
    return subprocess.run([python, "-I", str(bundle), "run", str(job_file), "--output",
                           str(tmp_path / "result.json"), *extra], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("command, code", [(["true"], 0), (["false"], 1), (["sleep", "5"], 3), (["no-such-x"], 5)])
def test_script_exit_codes(tmp_path, command, code, runner_pyz):
    proc = cli(sys.executable, tmp_path, spec(command, timeout_s=0.5), bundle=runner_pyz)
    assert proc.returncode == code, proc.stderr
    digest = proc.stdout.split()[0]
    assert digest == hashlib.sha256((tmp_path / "result.json").read_bytes()).hexdigest()


def test_script_usage_error(runner_pyz):
    proc = subprocess.run([sys.executable, "-I", str(runner_pyz), "run", "job.json"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == job_runner.EXIT_INVALID and "--output" in proc.stderr


def test_runs_on_python_3_8(tmp_path, runner_pyz):
    python38 = find_python38()
    if python38 is None:
        pytest.skip("no python3.8 interpreter on this machine (pyenv install 3.8 to run this check)")
    mark = marker()
    proc = cli(python38, tmp_path, spec(["sh", "-c", f"echo hi; setsid sleep {mark} & sleep 30"], timeout_s=1),
               bundle=runner_pyz)
    assert proc.returncode == job_runner.EXIT_TIMED_OUT, proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["stdout_tail"] == "hi\n" and result["state"] == "timed_out"
    assert list(_mentioning(mark)) == []


def hwledger_run_parser() -> argparse.ArgumentParser:
    from hwledger.commands import run as run_command

    parser = argparse.ArgumentParser(prog="hwledger")
    run_command.register(parser.add_subparsers(dest="command"))
    return parser


def test_hwledger_run_wraps_the_same_runner(tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_bytes(job_schema.encode_job(spec(["sh", "-c", "exit 7"])))
    args = hwledger_run_parser().parse_args(["run", str(job_file), "--output", str(tmp_path / "r.json")])
    assert args.func(args) == job_runner.EXIT_FAILED
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 7


def test_hwledger_run_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        hwledger_run_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    assert "--output RESULT.json" in text and "JOB.json" in text
    for line in ("0  the job exited 0", "3  the job ran past timeout_s", "4  the result file could not be written"):
        assert line in text


# --- the bundle: one stdlib-only file for Python >= 3.8 -----------------------------------------------


def _bundled_sources() -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(job_bundle.bundle())) as archive:
        return {name: archive.read(name).decode() for name in archive.namelist() if name.endswith(".py")}


def test_bundle_holds_the_runner_and_what_it_imports_and_is_reproducible():
    sources = _bundled_sources()
    package = job_bundle.BUNDLE_PACKAGE
    assert set(sources) >= {"__main__.py", *(f"{package}/{m}.py" for m in job_bundle.BUNDLED_MODULES)}
    here = Path(job_runner.__file__).parent
    for module in job_bundle.BUNDLED_MODULES:  # exactly the collection's code, nothing rewritten
        assert sources[f"{package}/{module}.py"] == (here / f"{module}.py").read_text()
    assert job_bundle.bundle() == job_bundle.bundle()


def test_bundled_modules_parse_as_python_3_8():
    for name, text in _bundled_sources().items():
        ast.parse(text, filename=name, feature_version=(3, 8))


def test_bundled_modules_import_only_the_standard_library_and_each_other():
    bundled = {f"ansible_collections.hwledger.fleet.plugins.plugin_utils.{m}" for m in job_bundle.BUNDLED_MODULES}
    names = set()
    for text in _bundled_sources().values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {f"{node.module}.{alias.name}" for alias in node.names} if node.module.endswith(
                    "plugin_utils") else {node.module}
    outside = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n not in bundled}
    assert not outside, outside


def test_bundle_runs_without_site_packages(tmp_path, runner_pyz):
    # -I: isolated mode, no site-packages and no current directory on sys.path: nothing but the stdlib.
    proc = subprocess.run([sys.executable, "-I", str(runner_pyz), "new", "--timeout-s", "30", "--env", "A=b", "--",
                           "nvidia-smi", "-L"], capture_output=True, text=True, check=True, cwd=tmp_path)
    job = json.loads(proc.stdout)
    assert job["command"] == ["nvidia-smi", "-L"] and job["timeout_s"] == 30 and job["env"] == {"A": "b"}
    path = tmp_path / "job.json"
    path.write_text(proc.stdout)
    check = subprocess.run([sys.executable, "-I", str(runner_pyz), "validate", str(path)], capture_output=True,
                           text=True, cwd=tmp_path, check=False)
    assert check.returncode == 0 and json.loads(check.stdout) == job


def test_bundle_validate_reports_bad_fields(tmp_path, runner_pyz):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"job_id": "0f8fad5b-d9cb-469f-a165-70867728950e", "command": "ls -l"}))
    proc = subprocess.run([sys.executable, "-I", str(runner_pyz), "validate", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, env={"PATH": os.environ["PATH"]}, check=False)
    assert proc.returncode == job_runner.EXIT_INVALID
    assert "command: must be a list of arguments" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the job's log (job_log), for `hwledger job logs -f` -------------------------------------------------


def _log_records(directory: Path) -> list:
    from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log
    records = []
    for name in sorted(os.listdir(directory)):
        records.extend(job_log.parse_records((directory / name).read_bytes())[0])
    return records


def test_with_a_log_dir_the_output_is_logged_as_it_comes_and_the_variable_stays_out_of_the_job(tmp_path, out):
    log_dir = tmp_path / "hwledger-job-x"
    log_dir.mkdir(mode=0o700)
    job = spec(["sh", "-c", "echo one; echo two >&2; echo \"[${HWLEDGER_JOB_LOG_DIR-unset}]\""], env={"TOKEN": "s3cret"})
    rc, result, _printed, _err = run(job, out, log_dir=str(log_dir))
    assert rc == 0 and result["state"] == "succeeded"
    records = _log_records(log_dir)
    stdout = b"".join(r.data for r in records if r.stream == "o")
    stderr = b"".join(r.data for r in records if r.stream == "e")
    assert stdout == b"one\n[unset]\n" and stderr == b"two\n"
    assert not any(b"s3cret" in (log_dir / name).read_bytes() for name in os.listdir(log_dir))


def test_the_run_action_takes_the_log_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(job_runner.LOG_DIR_ENV, str(tmp_path))
    args = job_runner.build_parser().parse_args(["run", "job.json", "--output", "r.json"])
    assert args.log_dir == str(tmp_path)


# --- the job's env values are masked in what it prints (tails, log, error messages) ---------------------


def _token() -> str:
    return "hf_" + secrets.token_hex(12)


def _everything_written(out: Path, log_dir: Path) -> bytes:
    return out.read_bytes() + b"".join((log_dir / name).read_bytes() for name in sorted(os.listdir(log_dir)))


def _log_dir(tmp_path: Path) -> Path:
    log_dir = tmp_path / "hwledger-job-log"
    log_dir.mkdir(mode=0o700)
    return log_dir


def test_env_values_the_job_prints_are_masked_in_the_tails_and_the_log_even_split_across_writes(tmp_path, out):
    token, other = _token(), _token()
    gpu = "GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
    # The token printed whole, then in two writes 0.3 s apart (two reads of the pipe, two log records if it
    # were not kept back), on both streams; a short value (under MIN_SECRET_CHARS) and the GPU selection
    # (never masked, by name) are printed too.
    script = ('echo "start $TOKEN end"; printf %s "${TOKEN%????}"; sleep 0.3; printf "%s|\\n" "${TOKEN#${TOKEN%????}}"; '
              'printf %s "${OTHER%??????????}" >&2; sleep 0.3; echo "${OTHER#${OTHER%??????????}} mode=$MODE" >&2; '
              'echo "gpus=$CUDA_VISIBLE_DEVICES"')
    job = spec(["sh", "-c", script], env={"TOKEN": token, "OTHER": other, "MODE": "fast", "CUDA_VISIBLE_DEVICES": gpu})
    log_dir = _log_dir(tmp_path)
    rc, result, _printed, _err = run(job, out, log_dir=log_dir)
    assert rc == 0
    assert result["stdout_tail"] == "start *** end\n***|\ngpus=%s\n" % gpu
    assert result["stderr_tail"] == "*** mode=fast\n"
    written = _everything_written(out, log_dir)
    for value in (token, other):
        assert value.encode() not in written
        assert value[:-4].encode() not in written and value[-10:].encode() not in written  # no part either
    records = _log_records(log_dir)
    stdout = b"".join(r.data for r in records if r.stream == "o")
    stderr = b"".join(r.data for r in records if r.stream == "e")
    assert stdout == result["stdout_tail"].encode() and stderr == result["stderr_tail"].encode()
    # The counts and the log's positions are those of the masked streams, so they agree with the tails.
    assert result["stdout_bytes"] == len(stdout) and result["stderr_bytes"] == len(stderr)
    for stream in ("o", "e"):
        position = 0
        for record in (r for r in records if r.stream == stream):
            assert record.position == position
            position += len(record.data)


def test_masking_keeps_invalid_utf8_around_a_value_byte_exact(tmp_path, out):
    token = _token()
    job = spec(["sh", "-c", 'printf "\\377\\376"; printf %s "$TOKEN"; printf "\\200end %s\\376" "${TOKEN%?}"'],
               env={"TOKEN": token})
    log_dir = _log_dir(tmp_path)
    rc, result, _printed, _err = run(job, out, log_dir=log_dir)
    assert rc == 0
    logged = b"".join(r.data for r in _log_records(log_dir) if r.stream == "o")
    # Only the whole value is masked: its prefix alone is not the value.
    assert logged == b"\xff\xfe***\x80end " + token[:-1].encode() + b"\xfe"
    assert result["stdout_tail"] == logged.decode("utf-8", "replace")
    assert token.encode() not in _everything_written(out, log_dir)


def test_short_values_are_not_masked(out):
    short = "a" * (job_schema.MIN_SECRET_CHARS - 1)
    job = spec(["sh", "-c", 'echo "[$SHORT] [$LONG]"'], env={"SHORT": short, "LONG": short + "b"})
    rc, result, _printed, _err = run(job, out)
    assert rc == 0 and result["stdout_tail"] == "[%s] [***]\n" % short


def test_error_messages_mask_the_job_s_env_values(out):
    path = "/opt/secret-%s/bin" % secrets.token_hex(8)
    job = spec(["hwledger-no-such-command-x"], env={"PATH": path})
    rc, result, _printed, err = run(job, out)
    assert rc == job_runner.EXIT_NOT_STARTED
    assert result["error"]["message"] == "command not found: 'hwledger-no-such-command-x' (PATH=***)"
    assert path not in out.read_text() and path not in err


def test_the_staged_bundle_masks_too(tmp_path, out, runner_pyz):
    token = _token()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec(["sh", "-c", 'printf %s "${TOKEN%???}"; sleep 0.3; echo "${TOKEN#${TOKEN%???}}"'],
                                        env={"TOKEN": token})))
    log_dir = _log_dir(tmp_path)
    proc = subprocess.run([sys.executable, str(runner_pyz), "run", str(job_file), "--output", str(out),
                           "--log-dir", str(log_dir)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["stdout_tail"] == "***\n"
    assert token.encode() not in _everything_written(out, log_dir)
