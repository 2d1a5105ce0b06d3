"""The job spec and result schemas in plugins/plugin_utils/jobs.py (contract E)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import jobs

JOBS_PY = Path(jobs.__file__)
JOB_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def minimal(**overrides):
    spec = {"job_id": JOB_ID, "command": ["nvidia-smi", "-L"]}
    spec.update(overrides)
    return spec


def errors_of(spec) -> dict[str, str]:
    with pytest.raises(jobs.JobSpecError) as info:
        jobs.validate_job(spec)
    return dict(info.value.errors)


# --- valid specs ---------------------------------------------------------------------------------


def test_minimal_spec_is_normalised_with_defaults():
    job = jobs.validate_job(minimal())
    assert job == {
        "schema_version": 1,
        "job_id": JOB_ID,
        "command": ["nvidia-smi", "-L"],
        "env": {},
        "workdir": None,
        "timeout_s": 3600,
        "model_ref": None,
        "metadata": None,
    }


def test_full_spec_keeps_every_value():
    spec = minimal(schema_version=1, env={"CUDA_VISIBLE_DEVICES": "0,1"}, workdir="/srv/work", timeout_s=12.5,
                   model_ref="meta-llama/Llama-3-8B", metadata={"owner": "ml-team", "tags": ["a", 1, None]})
    job = jobs.validate_job(spec)
    assert job["env"] == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert job["workdir"] == "/srv/work"
    assert job["timeout_s"] == 12.5
    assert job["model_ref"] == "meta-llama/Llama-3-8B"
    assert job["metadata"]["tags"] == ["a", 1, None]


def test_uppercase_uuid_is_made_canonical():
    job = jobs.validate_job(minimal(job_id=JOB_ID.upper()))
    assert job["job_id"] == JOB_ID


def test_new_job_has_a_fresh_uuid_and_is_valid():
    first, second = jobs.new_job(["true"]), jobs.new_job(["true"], timeout_s=5)
    assert first["job_id"] != second["job_id"]
    assert uuid.UUID(first["job_id"]).version == 4
    assert second["timeout_s"] == 5
    assert jobs.validate_job(first) == first


def test_encode_job_is_json_the_runner_reads_back(tmp_path):
    path = tmp_path / "job.json"
    path.write_bytes(jobs.encode_job(minimal(env={"A": "{{ not a template }}"})))
    assert jobs.validate_job(jobs.load_job_file(str(path)))["env"] == {"A": "{{ not a template }}"}


def test_async_limit_exceeds_timeout_by_the_runner_overhead():
    job = jobs.validate_job(minimal(timeout_s=10.2))
    assert jobs.async_seconds(job) == 11 + jobs.RUNNER_OVERHEAD_S
    assert jobs.RUNNER_OVERHEAD_S > jobs.KILL_GRACE_S + jobs.DRAIN_S


# --- invalid specs: one message per field ------------------------------------------------------------


def test_missing_command_is_named():
    errors = errors_of({"job_id": JOB_ID})
    assert "command" in errors and "required" in errors["command"]


def test_command_as_a_string_says_to_pass_a_list():
    message = errors_of(minimal(command="nvidia-smi -L"))["command"]
    assert "list" in message and "not a string" in message
    assert '["sh", "-c", "nvidia-smi -L"]' in message


@pytest.mark.parametrize(
    "command, field",
    [([], "command"), (None, "command"), (["ls", 3], "command[1]"), (["ls", "a\x00b"], "command[1]"),
     ([""], "command[0]"), ({"argv": ["ls"]}, "command")],
)
def test_bad_commands(command, field):
    assert field in errors_of(minimal(command=command))


def test_oversized_argv_is_refused():
    assert "command" in errors_of(minimal(command=["echo", "x" * (jobs.ARGV_MAX_BYTES + 1)]))


@pytest.mark.parametrize(
    "env, field",
    [({"N": 1}, "env.N"), ({"N": None}, "env.N"), ({"N": ["a"]}, "env.N"), ("A=1", "env"),
     (["A=1"], "env"), ({"1BAD": "x"}, "env"), ({"A B": "x"}, "env"), ({"A": "a\x00"}, "env.A")],
)
def test_bad_env(env, field):
    assert field in errors_of(minimal(env=env))


def test_env_number_message_suggests_quoting():
    assert 'quote it, e.g. "8"' in errors_of(minimal(env={"THREADS": 8}))["env.THREADS"]


@pytest.mark.parametrize("timeout", [-1, 0, -0.5, True, "60", float("nan"), float("inf"), jobs.MAX_TIMEOUT_S + 1])
def test_bad_timeouts(timeout):
    assert "timeout_s" in errors_of(minimal(timeout_s=timeout))


def test_negative_timeout_message():
    assert "positive" in errors_of(minimal(timeout_s=-5))["timeout_s"]


@pytest.mark.parametrize(
    "job_id",
    ["../../etc/passwd", "a/b", "..", "0f8fad5b-d9cb-469f-a165-70867728950e/..",
     "../0f8fad5b-d9cb-469f-a165-70867728950e", "{0f8fad5b-d9cb-469f-a165-70867728950e}",
     "urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e", "0f8fad5bd9cb469fa16570867728950e", "", 42, None],
)
def test_job_ids_that_are_not_canonical_uuids_are_rejected(job_id):
    assert "job_id" in errors_of(minimal(job_id=job_id))


def test_job_id_with_a_slash_says_why():
    assert "must not contain '/' or '..'" in errors_of(minimal(job_id="../x"))["job_id"]


def test_missing_job_id():
    assert "required" in errors_of({"command": ["ls"]})["job_id"]


@pytest.mark.parametrize("key, suggestion", [("comand", "command"), ("timeout", "timeout_s"), ("envs", "env"),
                                             ("work_dir", "workdir"), ("modelref", "model_ref")])
def test_unknown_key_suggests_the_nearest(key, suggestion):
    errors = errors_of(minimal(**{key: "x"}))
    assert errors[key] == "unknown key in the job spec: did you mean %r?" % suggestion


def test_unknown_key_without_a_near_one_lists_the_valid_keys():
    assert "valid keys: schema_version, job_id, command" in errors_of(minimal(zzz=1))["zzz"]


@pytest.mark.parametrize("workdir", ["relative/dir", "", 5, "/a\x00b"])
def test_bad_workdir(workdir):
    assert "workdir" in errors_of(minimal(workdir=workdir))


@pytest.mark.parametrize("model_ref", ["", "a\nb", "x" * 1025, 7])
def test_bad_model_ref(model_ref):
    assert "model_ref" in errors_of(minimal(model_ref=model_ref))


@pytest.mark.parametrize("metadata", [[1, 2], "x", {"s": {1, 2}}, {"big": "x" * jobs.METADATA_MAX_BYTES},
                                      {"nan": float("nan")}])
def test_bad_metadata(metadata):
    assert "metadata" in errors_of(minimal(metadata=metadata))


@pytest.mark.parametrize("version", [2, 0, "1", True])
def test_unsupported_schema_version(version):
    assert "schema_version" in errors_of(minimal(schema_version=version))


def test_all_problems_are_reported_at_once():
    errors = errors_of({"job_id": "../x", "command": "ls", "env": {"A": 1}, "timeout_s": -1, "comand": []})
    assert set(errors) == {"job_id", "command", "env.A", "timeout_s", "comand"}


def test_not_a_mapping():
    assert "job" in errors_of(["nvidia-smi"])


# --- job files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [(b"{not json", "not valid JSON"), (b'{"timeout_s": NaN}', "NaN"), (b"\xff\xfe", "not valid JSON"),
     (b'{"a": 1, "a": 2}', "duplicate key"), (b"[" * 100000 + b"]" * 100000, "not valid JSON")],
)
def test_bad_job_files(tmp_path, content, needle):
    path = tmp_path / "job.json"
    path.write_bytes(content)
    with pytest.raises(jobs.JobSpecError) as info:
        jobs.load_job_file(str(path))
    assert needle in str(info.value) and str(path) in str(info.value)


def test_job_file_size_limit(tmp_path):
    path = tmp_path / "job.json"
    path.write_bytes(b" " * (jobs.JOB_FILE_MAX_BYTES + 1))
    with pytest.raises(jobs.JobSpecError, match="larger than"):
        jobs.load_job_file(str(path))


def test_job_file_must_be_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):  # a FIFO must not make the runner hang
        with pytest.raises(jobs.JobSpecError, match="not a regular file"):
            jobs.load_job_file(str(path))


# --- paths on the controller -------------------------------------------------------------------------


def test_result_path_is_job_id_dot_json_under_the_results_dir(tmp_path):
    assert jobs.result_path(tmp_path, JOB_ID.upper()) == tmp_path / (JOB_ID + ".json")


@pytest.mark.parametrize("job_id", ["../escape", "/etc/passwd", "..", "a/../../b"])
def test_result_path_refuses_anything_but_a_uuid(tmp_path, job_id):
    with pytest.raises(jobs.JobSpecError):
        jobs.result_path(tmp_path, job_id)


def test_staging_path_is_a_hidden_sibling(tmp_path):
    staging = jobs.staging_path(tmp_path, JOB_ID)
    assert staging.parent == tmp_path
    assert staging.name == "." + JOB_ID + ".json.unverified"


# --- results -----------------------------------------------------------------------------------------


def result(**overrides):
    value = jobs.make_result(JOB_ID, "succeeded", started=1_700_000_000.0, finished=1_700_000_001.5, exit_code=0,
                             stdout=b"GPU 0: H100\n")
    value.update(overrides)
    return value


def raw(value) -> bytes:
    return json.dumps(value).encode()


def test_a_valid_result_round_trips():
    value = result()
    assert jobs.validate_result(jobs.encode_result(value), expected_job_id=JOB_ID) == value
    assert value["started_at"] == "2023-11-14T22:13:20.000000Z"
    assert value["duration_s"] == 1.5


def refusal(data: bytes, job_id=JOB_ID) -> jobs.ResultError:
    with pytest.raises(jobs.ResultError) as info:
        jobs.validate_result(data, expected_job_id=job_id)
    return info.value


def test_too_big_result_is_refused_before_parsing():
    assert refusal(b" " * (jobs.RESULT_MAX_BYTES + 1)).reason == "result_too_large"


@pytest.mark.parametrize("data", [b"not json", b"\xff", b'{"state": NaN}', b"[" * 5000, b'{"a":1,"a":1}',
                                  b'{"exit_code": ' + b"9" * 5000 + b"}"])
def test_not_json_results_are_refused(data):
    assert refusal(data).reason == "result_not_json"


def test_result_of_another_job_is_refused():
    other = str(uuid.uuid4())
    error = refusal(raw(result(job_id=other)))
    assert error.reason == "result_wrong_job" and other in str(error)


def test_expected_job_id_must_itself_be_valid():
    with pytest.raises(jobs.JobSpecError):
        jobs.validate_result(raw(result()), expected_job_id="../x")


@pytest.mark.parametrize(
    "overrides",
    [{"state": "done"}, {"exit_code": "0"}, {"exit_code": True}, {"exit_code": 256}, {"signal": 0},
     {"started_at": "yesterday"}, {"duration_s": -1}, {"stdout_tail": "x" * (jobs.TAIL_BYTES + 1)},
     {"stderr_tail": 5}, {"host": "a\x1b[2Kb"}, {"error": {"reason": "oops", "message": "x"}},
     {"schema_version": 2}, {"stdout_bytes": -1},
     {"state": "succeeded", "exit_code": 3},
     {"state": "failed", "exit_code": 0},
     {"state": "error", "error": None}],
)
def test_invalid_results_are_refused(overrides):
    assert refusal(raw(result(**overrides))).reason == "result_invalid"


def test_unknown_and_missing_result_keys_are_refused():
    value = result(ansible_facts={"discovered_interpreter_python": "/tmp/evil"})
    assert refusal(raw(value)).reason == "result_invalid"
    value = result()
    del value["stdout_tail"]
    assert refusal(raw(value)).reason == "result_invalid"


def test_result_strings_are_kept_literally():
    payload = "{{ lookup('pipe', 'id') }}"
    value = result(stdout_tail=payload)
    assert jobs.validate_result(raw(value), expected_job_id=JOB_ID)["stdout_tail"] == payload


def test_worst_case_result_fits_the_limit():
    # 64 KiB of control bytes in both tails: each escapes to six characters in JSON.
    value = jobs.make_result(JOB_ID, "failed", started=0.0, finished=1.0, exit_code=1, stdout=b"\x01" * 200000,
                             stderr=b"\x00" * 200000, stdout_bytes=200000, stderr_bytes=200000)
    data = jobs.encode_result(value)
    assert len(data) <= jobs.RESULT_MAX_BYTES
    assert jobs.validate_result(data, expected_job_id=JOB_ID)["stdout_bytes"] == 200000


# --- tails -------------------------------------------------------------------------------------------


def test_tail_cut_in_a_multibyte_character_drops_the_broken_start():
    data = "é".encode() * 40000  # two bytes each: a 65536-byte cut lands between characters...
    tail = jobs.decode_tail(data + b"x")  # ...so shift by one byte: now it lands inside one
    assert "\ufffd" not in tail
    assert set(tail) == {"é", "x"} and tail.endswith("éx")
    assert len(tail.encode()) <= jobs.TAIL_BYTES


def test_tail_replaces_invalid_bytes_and_is_valid_utf8():
    tail = jobs.decode_tail(b"ok \xff\xfe end")
    assert tail == "ok \ufffd\ufffd end"
    tail.encode("utf-8")  # no lone surrogates


def test_uncut_output_keeps_its_invalid_start_as_replacement_characters():
    data = b"\x80" + b"a" * (jobs.TAIL_BYTES - 1)  # exactly the limit, nothing cut: nothing is dropped
    assert jobs.decode_tail(data, cut=False) == "\ufffd" + "a" * (jobs.TAIL_BYTES - 1)
    assert jobs.decode_tail(b"\x80" + data, cut=True) == "a" * (jobs.TAIL_BYTES - 1)


def test_short_output_is_kept_whole():
    assert jobs.decode_tail("\u00e9t\u00e9\n".encode()) == "\u00e9t\u00e9\n"


def test_parse_sha256_line():
    digest = "ab" * 32
    assert jobs.parse_sha256_line("%s  /tmp/x/result.json\n" % digest) == digest
    assert jobs.parse_sha256_line(digest.upper()) == digest
    assert jobs.parse_sha256_line("garbage") is None
    assert jobs.parse_sha256_line("") is None


# --- the file itself: one stdlib-only file for Python >= 3.8 -------------------------------------------


def test_jobs_py_parses_as_python_3_8():
    ast.parse(JOBS_PY.read_text(), feature_version=(3, 8))


def test_jobs_py_imports_only_the_standard_library():
    tree = ast.parse(JOBS_PY.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names and names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


def test_jobs_py_runs_as_a_script_without_site_packages(tmp_path):
    # -I: isolated mode, no site-packages and no current directory on sys.path: nothing but the stdlib.
    proc = subprocess.run([sys.executable, "-I", str(JOBS_PY), "new", "--timeout-s", "30", "--env", "A=b", "--",
                           "nvidia-smi", "-L"], capture_output=True, text=True, check=True, cwd=tmp_path)
    job = json.loads(proc.stdout)
    assert job["command"] == ["nvidia-smi", "-L"] and job["timeout_s"] == 30 and job["env"] == {"A": "b"}
    path = tmp_path / "job.json"
    path.write_text(proc.stdout)
    check = subprocess.run([sys.executable, "-I", str(JOBS_PY), "validate", str(path)], capture_output=True,
                           text=True, cwd=tmp_path, check=False)
    assert check.returncode == 0 and json.loads(check.stdout) == job


def test_jobs_py_validate_reports_bad_fields(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"job_id": JOB_ID, "command": "ls -l"}))
    proc = subprocess.run([sys.executable, "-I", str(JOBS_PY), "validate", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, env={"PATH": os.environ["PATH"]}, check=False)
    assert proc.returncode == jobs.EXIT_INVALID
    assert "command: must be a list of arguments" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the controller side: hwledger.fleet.job_result's checks -------------------------------------------


def read_of(data: bytes | str, rc: int = 0, stderr: str = "") -> dict:
    """What the role's bounded-read task registers: ansible.builtin.command running head -c on result.json."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    return {"rc": rc, "stdout": text, "stderr": stderr, "changed": False, "failed": False}


def publish(results_dir: Path, read: dict, printed: str = "") -> dict:
    from ansible_collections.hwledger.fleet.plugins.action import job_result

    return job_result.verify_and_publish(str(results_dir), JOB_ID, job_result.result_bytes(read), printed)


def publish_refusal(results_dir: Path, read: dict, printed: str = ""):
    from ansible_collections.hwledger.fleet.plugins.action import job_result

    with pytest.raises(job_result.RefusedResult) as info:
        publish(results_dir, read, printed)
    return info.value


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    path = tmp_path / "results"
    path.mkdir(mode=0o700)
    return path


def test_encoded_results_are_ascii_whatever_the_job_printed():
    """job_result refuses non-ASCII bytes: that relies on the runner writing ASCII only."""
    data = jobs.encode_result(result(stdout_tail="caf\u00e9 \u2603 \U0001f600 \udcff\n",
                                     stderr_tail=jobs.decode_tail(b"\xff\xfe broken \xe2\x82")))
    assert max(data) < 0x80
    assert jobs.validate_result(data, expected_job_id=JOB_ID)["stdout_tail"].startswith("caf\u00e9 \u2603")


def test_valid_result_is_published_0600_with_the_exact_bytes(results_dir):
    data = jobs.encode_result(result())
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        published = publish(results_dir, read_of(data), "%s  /x/result.json\n" % hashlib.sha256(data).hexdigest())
    finally:
        os.umask(old_umask)
    final = results_dir / (JOB_ID + ".json")
    assert published["path"] == str(final) and published["result"]["state"] == "succeeded"
    assert published["sha256"] == hashlib.sha256(data).hexdigest()
    assert final.read_bytes() == data and oct(final.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in results_dir.iterdir()) == [JOB_ID + ".json"]  # no temp file left


def test_a_rerun_of_the_same_job_id_replaces_the_result(results_dir):
    publish(results_dir, read_of(jobs.encode_result(result(stdout_tail="first\n"))))
    publish(results_dir, read_of(jobs.encode_result(result(stdout_tail="second\n"))))
    assert json.loads((results_dir / (JOB_ID + ".json")).read_text())["stdout_tail"] == "second\n"


@pytest.mark.parametrize(
    "read, reason",
    [(read_of(b" " * jobs.RESULT_MAX_BYTES + b"x"), "result_too_large"),  # what head -c MAX+1 gives at most
     (read_of(b"\0" * (jobs.RESULT_MAX_BYTES + 1)), "result_too_large"),  # a symlink to /dev/zero
     (read_of(b"{"), "result_not_json"),
     (read_of(jobs.encode_result(result()).replace(b"GPU 0", b"GPU \xc3\xa9")), "result_not_json"),  # not ASCII
     (read_of(jobs.encode_result(result(job_id=str(uuid.uuid4())))), "result_wrong_job"),
     (read_of(jobs.encode_result(result(state="owned"))), "result_invalid"),
     (read_of(b"", rc=1, stderr="head: cannot open 'result.json' for reading: No such file or directory"),
      "result_missing"),
     ({"failed": True, "msg": "[Errno 2] No such file or directory: b'head'", "rc": 2}, "result_missing")],
    ids=["over the limit", "endless zeros", "not json", "not ascii", "another job", "schema", "read failed",
         "no head"],
)
def test_refused_results_are_never_written(results_dir, read, reason):
    assert publish_refusal(results_dir, read).reason == reason
    assert list(results_dir.iterdir()) == []


def test_a_result_just_at_the_limit_is_not_refused_for_its_size(results_dir):
    data = jobs.encode_result(result())
    padded = data[:-1] + b" " * (jobs.RESULT_MAX_BYTES - len(data)) + b"\n"  # JSON allows the whitespace
    assert len(padded) == jobs.RESULT_MAX_BYTES
    assert publish(results_dir, read_of(padded))["result"]["state"] == "succeeded"


def test_read_failure_message_escapes_the_remote_stderr(results_dir):
    error = publish_refusal(results_dir, read_of(b"", rc=1, stderr="head: \x1b[31mred\x1b[0m"))
    assert "\x1b" not in str(error) and "\\x1b[31mred" in str(error)


def test_checksum_mismatch_is_refused(results_dir):
    error = publish_refusal(results_dir, read_of(jobs.encode_result(result())), "%s  result.json" % ("0" * 64))
    assert error.reason == "result_checksum_mismatch"
    assert list(results_dir.iterdir()) == []


def test_a_symlink_at_the_result_path_is_not_followed(results_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("controller secret\n")
    (results_dir / (JOB_ID + ".json")).symlink_to(victim)
    assert publish_refusal(results_dir, read_of(jobs.encode_result(result()))).reason == "results_dir_unsafe"
    assert victim.read_text() == "controller secret\n"
    assert [p.name for p in results_dir.iterdir()] == [JOB_ID + ".json"]  # no temp file left


def test_results_dir_that_became_group_writable_is_refused_at_publish(results_dir):
    results_dir.chmod(0o770)
    error = publish_refusal(results_dir, read_of(jobs.encode_result(result())))
    assert error.reason == "results_dir_unsafe" and "writable by its group" in str(error)
    assert list(results_dir.iterdir()) == []


# --- the controller side: hwledger.fleet.job_spec ----------------------------------------------------------


def test_spec_returned_to_the_play_masks_env_values_but_job_json_is_exact():
    from ansible_collections.hwledger.fleet.plugins.action import job_spec

    job = jobs.validate_job(minimal(env={"HF_TOKEN": "hf_secret_value", "MODE": "fast"}))
    masked = job_spec.masked_spec(job)
    assert masked["env"] == {"HF_TOKEN": job_spec.ENV_VALUE_MASK, "MODE": job_spec.ENV_VALUE_MASK}
    assert "hf_secret_value" not in json.dumps(masked) and "fast" not in json.dumps(masked["env"])
    assert {k: v for k, v in masked.items() if k != "env"} == {k: v for k, v in job.items() if k != "env"}
    assert job["env"]["HF_TOKEN"] == "hf_secret_value"  # the validated job itself is untouched
    assert json.loads(jobs.encode_job(job))["env"]["HF_TOKEN"] == "hf_secret_value"


def test_missing_results_dir_is_created_0700(tmp_path):
    from ansible_collections.hwledger.fleet.plugins.action import job_spec

    path = tmp_path / "a" / "results"
    assert job_spec.prepare_results_dir(str(path), create=True) == str(path)
    assert path.is_dir() and oct(path.stat().st_mode & 0o777) == "0o700"


def test_missing_results_dir_is_not_created_in_check_mode(tmp_path):
    from ansible_collections.hwledger.fleet.plugins.action import job_spec

    assert job_spec.prepare_results_dir(str(tmp_path / "results"), create=False) == str(tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_private_existing_results_dir_is_accepted(tmp_path):
    from ansible_collections.hwledger.fleet.plugins.action import job_spec

    path = tmp_path / "results"
    path.mkdir(mode=0o755)  # readable by others is fine: the results are 0600; writable is not
    path.chmod(0o755)
    assert job_spec.prepare_results_dir(str(path), create=True) == str(path)


@pytest.mark.parametrize(
    "make, needle",
    [(lambda p: (p.mkdir(), p.chmod(0o775)), "writable by its group (mode 0775)"),
     (lambda p: (p.mkdir(), p.chmod(0o1777)), "writable by group and others (mode 1777)"),
     (lambda p: (p.mkdir(), p.chmod(0o702)), "writable by others"),
     (lambda p: p.write_text("not a dir"), "exists and is not a directory"),
     (lambda p: ((p.parent / "real").mkdir(mode=0o700), p.symlink_to(p.parent / "real")), "is a symlink")],
    ids=["group-writable", "world-writable sticky", "other-writable", "a file", "a symlink"],
)
def test_unsafe_existing_results_dirs_are_refused(tmp_path, make, needle):
    from ansible_collections.hwledger.fleet.plugins.action import job_spec

    path = tmp_path / "results"
    make(path)
    with pytest.raises(job_spec.UnsafeResultsDir) as info:
        job_spec.prepare_results_dir(str(path), create=True)
    assert needle in str(info.value) and str(path) in str(info.value)
    assert "results_dir is not safe for job results" in str(info.value)


def test_results_dir_of_another_user_is_refused(tmp_path):
    from ansible_collections.hwledger.fleet.plugins.action import job_spec

    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    path = tmp_path / "results"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(job_spec.UnsafeResultsDir) as info:
        job_spec.prepare_results_dir(str(path), create=True)
    assert "is owned by uid 65534, not by you" in str(info.value)
