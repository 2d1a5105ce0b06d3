"""The job spec and result schemas (plugins/plugin_utils/job_schema.py)."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_runner, job_schema
JOB_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def minimal(**overrides):
    spec = {"job_id": JOB_ID, "command": ["nvidia-smi", "-L"]}
    spec.update(overrides)
    return spec


def errors_of(spec) -> dict[str, str]:
    with pytest.raises(job_schema.JobSpecError) as info:
        job_schema.validate_job(spec)
    return dict(info.value.errors)


# --- valid specs ---------------------------------------------------------------------------------


def test_minimal_spec_is_normalised_with_defaults():
    job = job_schema.validate_job(minimal())
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
    job = job_schema.validate_job(spec)
    assert job["env"] == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert job["workdir"] == "/srv/work"
    assert job["timeout_s"] == 12.5
    assert job["model_ref"] == "meta-llama/Llama-3-8B"
    assert job["metadata"]["tags"] == ["a", 1, None]


def test_uppercase_uuid_is_made_canonical():
    job = job_schema.validate_job(minimal(job_id=JOB_ID.upper()))
    assert job["job_id"] == JOB_ID


def test_new_job_has_a_fresh_uuid_and_is_valid():
    first, second = job_schema.new_job(["true"]), job_schema.new_job(["true"], timeout_s=5)
    assert first["job_id"] != second["job_id"]
    assert uuid.UUID(first["job_id"]).version == 4
    assert second["timeout_s"] == 5
    assert job_schema.validate_job(first) == first


def test_encode_job_is_json_the_runner_reads_back(tmp_path):
    path = tmp_path / "job.json"
    path.write_bytes(job_schema.encode_job(minimal(env={"A": "{{ not a template }}"})))
    assert job_schema.validate_job(job_schema.load_job_file(str(path)))["env"] == {"A": "{{ not a template }}"}


def test_async_limit_exceeds_timeout_by_the_runner_overhead():
    job = job_schema.validate_job(minimal(timeout_s=10.2))
    assert job_schema.async_seconds(job) == 11 + job_schema.RUNNER_OVERHEAD_S
    assert job_schema.RUNNER_OVERHEAD_S > job_runner.KILL_GRACE_S + job_runner.DRAIN_S


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
    assert "command" in errors_of(minimal(command=["echo", "x" * (job_schema.ARGV_MAX_BYTES + 1)]))


@pytest.mark.parametrize(
    "env, field",
    [({"N": 1}, "env.N"), ({"N": None}, "env.N"), ({"N": ["a"]}, "env.N"), ("A=1", "env"),
     (["A=1"], "env"), ({"1BAD": "x"}, "env"), ({"A B": "x"}, "env"), ({"A": "a\x00"}, "env.A")],
)
def test_bad_env(env, field):
    assert field in errors_of(minimal(env=env))


def test_env_number_message_suggests_quoting():
    assert 'quote it, e.g. "8"' in errors_of(minimal(env={"THREADS": 8}))["env.THREADS"]


@pytest.mark.parametrize("timeout", [-1, 0, -0.5, True, "60", float("nan"), float("inf"), job_schema.MAX_TIMEOUT_S + 1])
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


@pytest.mark.parametrize("metadata", [[1, 2], "x", {"s": {1, 2}}, {"big": "x" * job_schema.METADATA_MAX_BYTES},
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
    with pytest.raises(job_schema.JobSpecError) as info:
        job_schema.load_job_file(str(path))
    assert needle in str(info.value) and str(path) in str(info.value)


def test_job_file_size_limit(tmp_path):
    path = tmp_path / "job.json"
    path.write_bytes(b" " * (job_schema.JOB_FILE_MAX_BYTES + 1))
    with pytest.raises(job_schema.JobSpecError, match="larger than"):
        job_schema.load_job_file(str(path))


def test_job_file_must_be_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):  # a FIFO must not make the runner hang
        with pytest.raises(job_schema.JobSpecError, match="not a regular file"):
            job_schema.load_job_file(str(path))


# --- paths on the controller -------------------------------------------------------------------------


def test_result_path_is_job_id_dot_json_under_the_results_dir(tmp_path):
    assert job_schema.result_path(tmp_path, JOB_ID.upper()) == tmp_path / (JOB_ID + ".json")


@pytest.mark.parametrize("job_id", ["../escape", "/etc/passwd", "..", "a/../../b"])
def test_result_path_refuses_anything_but_a_uuid(tmp_path, job_id):
    with pytest.raises(job_schema.JobSpecError):
        job_schema.result_path(tmp_path, job_id)


# --- results -----------------------------------------------------------------------------------------


def result(**overrides):
    value = job_schema.make_result(JOB_ID, "succeeded", started=1_700_000_000.0, finished=1_700_000_001.5,
                                   exit_code=0, stdout=b"GPU 0: H100\n")
    value.update(overrides)
    return value


def raw(value) -> bytes:
    return json.dumps(value).encode()


def test_a_valid_result_round_trips():
    value = result()
    assert job_schema.validate_result(job_schema.encode_result(value), expected_job_id=JOB_ID) == value
    assert value["started_at"] == "2023-11-14T22:13:20.000000Z"
    assert value["duration_s"] == 1.5


def refusal(data: bytes, job_id=JOB_ID) -> job_schema.ResultError:
    with pytest.raises(job_schema.ResultError) as info:
        job_schema.validate_result(data, expected_job_id=job_id)
    return info.value


def test_too_big_result_is_refused_before_parsing():
    assert refusal(b" " * (job_schema.RESULT_MAX_BYTES + 1)).reason == "result_too_large"


@pytest.mark.parametrize("data", [b"not json", b"\xff", b'{"state": NaN}', b"[" * 5000, b'{"a":1,"a":1}',
                                  b'{"exit_code": ' + b"9" * 5000 + b"}"])
def test_not_json_results_are_refused(data):
    assert refusal(data).reason == "result_not_json"


def test_result_of_another_job_is_refused():
    other = str(uuid.uuid4())
    error = refusal(raw(result(job_id=other)))
    assert error.reason == "result_wrong_job" and other in str(error)


def test_expected_job_id_must_itself_be_valid():
    with pytest.raises(job_schema.JobSpecError):
        job_schema.validate_result(raw(result()), expected_job_id="../x")


@pytest.mark.parametrize(
    "overrides",
    [{"state": "done"}, {"exit_code": "0"}, {"exit_code": True}, {"exit_code": 256}, {"signal": 0},
     {"started_at": "yesterday"}, {"duration_s": -1}, {"stdout_tail": "x" * (job_schema.TAIL_BYTES + 1)},
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
    assert job_schema.validate_result(raw(value), expected_job_id=JOB_ID)["stdout_tail"] == payload


def test_worst_case_result_fits_the_limit():
    # 64 KiB of control bytes in both tails: each escapes to six characters in JSON.
    value = job_schema.make_result(JOB_ID, "failed", started=0.0, finished=1.0, exit_code=1, stdout=b"\x01" * 200000,
                                   stderr=b"\x00" * 200000, stdout_bytes=200000, stderr_bytes=200000)
    data = job_schema.encode_result(value)
    assert len(data) <= job_schema.RESULT_MAX_BYTES
    assert job_schema.validate_result(data, expected_job_id=JOB_ID)["stdout_bytes"] == 200000


# --- tails -------------------------------------------------------------------------------------------


def test_tail_cut_in_a_multibyte_character_drops_the_broken_start():
    data = "é".encode() * 40000  # two bytes each: a 65536-byte cut lands between characters...
    tail = job_schema.decode_tail(data + b"x")  # ...so shift by one byte: now it lands inside one
    assert "\ufffd" not in tail
    assert set(tail) == {"é", "x"} and tail.endswith("éx")
    assert len(tail.encode()) <= job_schema.TAIL_BYTES


def test_tail_replaces_invalid_bytes_and_is_valid_utf8():
    tail = job_schema.decode_tail(b"ok \xff\xfe end")
    assert tail == "ok \ufffd\ufffd end"
    tail.encode("utf-8")  # no lone surrogates


def test_uncut_output_keeps_its_invalid_start_as_replacement_characters():
    data = b"\x80" + b"a" * (job_schema.TAIL_BYTES - 1)  # exactly the limit, nothing cut: nothing is dropped
    assert job_schema.decode_tail(data, cut=False) == "\ufffd" + "a" * (job_schema.TAIL_BYTES - 1)
    assert job_schema.decode_tail(b"\x80" + data, cut=True) == "a" * (job_schema.TAIL_BYTES - 1)


def test_short_output_is_kept_whole():
    assert job_schema.decode_tail("\u00e9t\u00e9\n".encode()) == "\u00e9t\u00e9\n"


def test_parse_sha256_line():
    digest = "ab" * 32
    assert job_schema.parse_sha256_line("%s  /tmp/x/result.json\n" % digest) == digest
    assert job_schema.parse_sha256_line(digest.upper()) == digest
    assert job_schema.parse_sha256_line("garbage") is None
    assert job_schema.parse_sha256_line("") is None
