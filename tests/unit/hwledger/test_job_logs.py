"""What the heartbeats' reads add to a job's log (hwledger/job_logs.py): bytes read twice are skipped, bytes
rotated away are said, a shrunk or damaged file is said and read on from a safe place, the end of the output
comes from the result, and the serve loop's plan reads only checked dirs."""

from __future__ import annotations

import uuid

import pytest

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log
from ansible_collections.hwledger.fleet.plugins.plugin_utils.job_log_read import LogChunk

from hwledger.job_logs import LogFollower, apply_chunks, finish_log
from hwledger.store import AgentRecord, LogCursor, Store

DIR = "/tmp/hwledger-job-x-Ab12Cd"


def rec(stream, position, data):
    return job_log.encode_record(stream, position, data)


def chunk(data, generation=0, offset=0, size=None):
    return LogChunk("j", DIR, "data", generation, offset, offset + len(data) if size is None else size, data)


def test_records_become_entries_and_the_cursor_moves_by_whole_records():
    first = rec("o", 0, b"a\n") + rec("e", 0, b"err\n") + rec("o", 2, b"b\n")
    cut = rec("o", 4, b"c\n")[:-1]
    entries, cursor = apply_chunks(LogCursor(DIR), [chunk(first + cut)])
    assert entries == [("stdout", b"a\n"), ("stderr", b"err\n"), ("stdout", b"b\n")]
    assert cursor == LogCursor(DIR, 0, len(first), 4, 4)


def test_bytes_already_in_hand_are_not_shown_twice():
    data = rec("o", 0, b"abc") + rec("o", 3, b"def")
    entries, cursor = apply_chunks(LogCursor(DIR, 5, 0, stdout_pos=4), [chunk(data, generation=5)])
    assert entries == [("stdout", b"ef")] and cursor.stdout_pos == 6


def test_bytes_lost_to_rotation_are_said_where_they_were_lost():
    # Generation 0 was read up to byte 10; the host has only generation 2 left, whose output starts at 500.
    entries, cursor = apply_chunks(LogCursor(DIR, 0, 10, stdout_pos=100), [chunk(rec("o", 500, b"late\n"), generation=2)])
    assert entries[0][0] == "note" and b"400 bytes of stdout were lost" in entries[0][1]
    assert entries[1] == ("stdout", b"late\n") and (cursor.generation, cursor.stdout_pos) == (2, 505)


def test_a_stale_chunk_changes_nothing_and_a_shrunk_file_is_read_again():
    cursor = LogCursor(DIR, 1, 50, stdout_pos=40)
    assert apply_chunks(cursor, [chunk(b"zzz", generation=1, offset=20)]) == ([], cursor)
    entries, moved = apply_chunks(cursor, [chunk(b"", generation=1, offset=50, size=10)])
    assert b"shrank" in entries[0][1] and (moved.generation, moved.offset) == (1, 0)


def test_a_damaged_file_is_said_and_skipped_to_the_next():
    good = rec("o", 0, b"ok\n")
    entries, cursor = apply_chunks(LogCursor(DIR), [chunk(good + b"\x1b[2J this is not a record header ok\n")])
    assert entries[0] == ("stdout", b"ok\n") and b"damaged" in entries[1][1]
    assert (cursor.generation, cursor.offset) == (1, 0)


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "s" / "fleet.db") as opened:
        opened.upsert_agent(AgentRecord(name="gpu1", hostname="10.0.0.1", port=22, ssh_user="root", key_path="/k"))
        yield opened


def _running(store, remote_dir=None) -> str:
    job_id = str(uuid.uuid4())
    store.submit_job("gpu1", {"job_id": job_id, "command": ["true"], "schema_version": 1}, job_id=job_id)
    store.transition_job(job_id, ["queued"], "running",
                         remote_dir=remote_dir or f"/tmp/hwledger-job-{job_id}-Ab12Cd")
    return job_id


def test_the_end_of_the_output_comes_from_the_result_past_what_was_read(store):
    job_id = _running(store)
    remote_dir = store.get_job(job_id).remote_dir
    store.append_job_log(job_id, None, LogCursor(remote_dir, 0, 9, 6, 0), [("stdout", b"line1\n")])
    result = {"stdout_tail": "line1\nline2\n", "stdout_bytes": 12, "stderr_tail": "bye\n", "stderr_bytes": 4}
    assert finish_log(store, job_id, result)
    assert [(e.stream, e.data) for e in store.read_job_log(job_id).entries] == [
        ("stdout", b"line1\n"), ("stdout", b"line2\n"), ("stderr", b"bye\n")]
    assert not finish_log(store, job_id, result)  # nothing twice


def test_output_in_neither_the_log_nor_the_tail_is_said(store):
    job_id = _running(store)
    assert finish_log(store, job_id, {"stdout_tail": "end\n", "stdout_bytes": 1000, "stderr_tail": "", "stderr_bytes": 0})
    entries = store.read_job_log(job_id).entries
    assert entries[0].stream == "note" and b"996 bytes of stdout" in entries[0].data
    assert (entries[1].stream, entries[1].data) == ("stdout", b"end\n")


def test_the_plan_reads_running_jobs_from_their_cursor_and_refuses_a_bad_dir(store, caplog):
    good = _running(store)
    bad = _running(store, remote_dir="/tmp/hwledger-job-someone-elses-Ab12Cd")
    follower = LogFollower(None)
    plan = follower.reads(store, ["gpu1"])
    assert [read.job_id for read in plan["gpu1"]] == [good]
    assert bad in caplog.text
    assert follower.reads(store, ["gpu2"]) == {}


def test_chunks_are_recorded_once_even_when_applied_twice(store):
    job_id = _running(store)
    remote_dir = store.get_job(job_id).remote_dir
    data = rec("o", 0, b"hello\n")
    chunks = [LogChunk(job_id, remote_dir, "data", 0, 0, len(data), data)]
    assert LogFollower.record_chunks(store, job_id, chunks) == 1
    assert LogFollower.record_chunks(store, job_id, chunks) == 0  # stale now: the cursor moved on
    assert [e.data for e in store.read_job_log(job_id).entries] == [b"hello\n"]
    other = [LogChunk(job_id, "/tmp/hwledger-job-old-Ab12Cd", "data", 0, 0, len(data), data)]
    assert LogFollower.record_chunks(store, job_id, other) == 0  # an earlier attempt's dir
