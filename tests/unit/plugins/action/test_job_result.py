"""hwledger.fleet.job_result's checks on the controller: what is read from the remote is validated before
one byte of it is published as <results_dir>/<job_id>.json."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from ansible_collections.hwledger.fleet.plugins.action import job_result
from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_schema

JOB_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def result(**overrides):
    value = job_schema.make_result(JOB_ID, "succeeded", started=1_700_000_000.0, finished=1_700_000_001.5, exit_code=0,
                                   stdout=b"GPU 0: H100\n")
    value.update(overrides)
    return value


def read_of(data: bytes | str, rc: int = 0, stderr: str = "") -> dict:
    """What the role's bounded-read task registers: ansible.builtin.command running head -c on result.json."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    return {"rc": rc, "stdout": text, "stderr": stderr, "changed": False, "failed": False}


def publish(results_dir: Path, read: dict, printed: str = "") -> dict:
    return job_result.verify_and_publish(str(results_dir), JOB_ID, job_result.result_bytes(read), printed)


def publish_refusal(results_dir: Path, read: dict, printed: str = ""):
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
    data = job_schema.encode_result(result(stdout_tail="caf\u00e9 \u2603 \U0001f600 \udcff\n",
                                           stderr_tail=job_schema.decode_tail(b"\xff\xfe broken \xe2\x82")))
    assert max(data) < 0x80
    assert job_schema.validate_result(data, expected_job_id=JOB_ID)["stdout_tail"].startswith("caf\u00e9 \u2603")


def test_valid_result_is_published_0600_with_the_exact_bytes(results_dir):
    data = job_schema.encode_result(result())
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
    publish(results_dir, read_of(job_schema.encode_result(result(stdout_tail="first\n"))))
    publish(results_dir, read_of(job_schema.encode_result(result(stdout_tail="second\n"))))
    assert json.loads((results_dir / (JOB_ID + ".json")).read_text())["stdout_tail"] == "second\n"


@pytest.mark.parametrize(
    "read, reason",
    [(read_of(b" " * job_schema.RESULT_MAX_BYTES + b"x"), "result_too_large"),  # what head -c MAX+1 gives at most
     (read_of(b"\0" * (job_schema.RESULT_MAX_BYTES + 1)), "result_too_large"),  # a symlink to /dev/zero
     (read_of(b"{"), "result_not_json"),
     (read_of(job_schema.encode_result(result()).replace(b"GPU 0", b"GPU \xc3\xa9")), "result_not_json"),  # not ASCII
     (read_of(job_schema.encode_result(result(job_id=str(uuid.uuid4())))), "result_wrong_job"),
     (read_of(job_schema.encode_result(result(state="owned"))), "result_invalid"),
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
    data = job_schema.encode_result(result())
    padded = data[:-1] + b" " * (job_schema.RESULT_MAX_BYTES - len(data)) + b"\n"  # JSON allows the whitespace
    assert len(padded) == job_schema.RESULT_MAX_BYTES
    assert publish(results_dir, read_of(padded))["result"]["state"] == "succeeded"


def test_read_failure_message_escapes_the_remote_stderr(results_dir):
    error = publish_refusal(results_dir, read_of(b"", rc=1, stderr="head: \x1b[31mred\x1b[0m"))
    assert "\x1b" not in str(error) and "\\x1b[31mred" in str(error)


def test_checksum_mismatch_is_refused(results_dir):
    error = publish_refusal(results_dir, read_of(job_schema.encode_result(result())), "%s  result.json" % ("0" * 64))
    assert error.reason == "result_checksum_mismatch"
    assert list(results_dir.iterdir()) == []


def test_a_symlink_at_the_result_path_is_not_followed(results_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("controller secret\n")
    (results_dir / (JOB_ID + ".json")).symlink_to(victim)
    assert publish_refusal(results_dir, read_of(job_schema.encode_result(result()))).reason == "results_dir_unsafe"
    assert victim.read_text() == "controller secret\n"
    assert [p.name for p in results_dir.iterdir()] == [JOB_ID + ".json"]  # no temp file left


def test_results_dir_that_became_group_writable_is_refused_at_publish(results_dir):
    results_dir.chmod(0o770)
    error = publish_refusal(results_dir, read_of(job_schema.encode_result(result())))
    assert error.reason == "results_dir_unsafe" and "writable by its group" in str(error)
    assert list(results_dir.iterdir()) == []


# -- the role reads result.json as hex (od -An -v -tx1): any bytes come back exactly ---------------------


def od_of(data: bytes) -> str:
    """What `od -An -v -tx1` prints for `data` (16 bytes a line, each as " xx")."""
    return "".join("".join(f" {byte:02x}" for byte in data[i:i + 16]) + "\n" for i in range(0, len(data), 16))


def publish_hex(results_dir: Path, data: bytes, printed: str = "") -> dict:
    raw = job_result.result_bytes(read_of(od_of(data)), "hex")
    return job_result.verify_and_publish(str(results_dir), JOB_ID, raw, printed)


def test_a_hex_read_publishes_the_exact_bytes(results_dir):
    data = job_schema.encode_result(result())
    published = publish_hex(results_dir, data, printed=f"{hashlib.sha256(data).hexdigest()}  result.json\n")
    assert (results_dir / f"{JOB_ID}.json").read_bytes() == data and published["result"]["state"] == "succeeded"


@pytest.mark.parametrize(
    ("data", "reason", "says"),
    [
        # Invalid UTF-8 inside a string of an otherwise valid result (ansible-core 2.19 cannot carry it as text).
        (job_schema.encode_result(result()).replace(b"GPU 0", b"GPU \xff\xfe"), "result_not_json", "byte"),
        (b"\x00\x00{}", "result_not_json", ""),
        (b"", "result_not_json", ""),
        (b" " * (job_schema.RESULT_MAX_BYTES + 1), "result_too_large", "more than"),
    ],
    ids=["invalid utf-8", "nul bytes", "empty", "too large"],
)
def test_a_hex_read_refuses_what_the_runner_never_writes(results_dir, data, reason, says):
    with pytest.raises(job_result.RefusedResult) as info:
        publish_hex(results_dir, data)
    assert info.value.reason == reason and says in str(info.value)
    assert list(results_dir.iterdir()) == []


@pytest.mark.parametrize("printed", ["not hex at all {{ x }}", " 7b 2", "7" * (4 * job_schema.RESULT_MAX_BYTES + 8)])
def test_a_hex_read_that_is_not_a_hex_dump_is_refused(printed):
    with pytest.raises(job_result.RefusedResult) as info:
        job_result.result_bytes(read_of(printed), "hex")
    assert info.value.reason == "result_not_json"


def test_the_role_reads_as_many_bytes_as_the_schema_allows():
    import yaml

    role_vars = yaml.safe_load((Path(job_result.__file__).parents[2] / "roles" / "job" / "vars" / "main.yml").read_text())
    assert role_vars["__job_result_max_bytes"] == job_schema.RESULT_MAX_BYTES
