"""Printing a job's log (hwledger/job_follow.py) from a real store: escaped, per stream, followed to the
job's end with its exit code, drops said."""

from __future__ import annotations

import io
import uuid

import pytest

from hwledger import job_follow
from hwledger.errors import UserError
from hwledger.store import AgentRecord, LogCursor, Store, job_logs

DIR = "/tmp/hwledger-job-x-Ab12Cd"


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "s" / "fleet.db") as opened:
        opened.upsert_agent(AgentRecord(name="gpu1", hostname="10.0.0.1", port=22, ssh_user="root", key_path="/k"))
        yield opened


def _job(store, state="running") -> str:
    job_id = str(uuid.uuid4())
    store.submit_job("gpu1", {"job_id": job_id, "command": ["true"], "schema_version": 1}, job_id=job_id)
    if state != "queued":
        store.transition_job(job_id, ["queued"], "running", remote_dir=DIR)
    return job_id


class Appender:
    """Stands in for the server between a follower's polls: each sleep appends the next entries."""

    def __init__(self, store, job_id, batches, end=None):
        self.store, self.job_id, self.batches, self.end = store, job_id, list(batches), end
        self.cursor = None
        self.sleeps = 0

    def __call__(self, _seconds):
        self.sleeps += 1
        if self.batches:
            new = LogCursor(DIR, 0, self.sleeps)
            assert self.store.append_job_log(self.job_id, self.cursor, new, self.batches.pop(0))
            self.cursor = new
        elif self.end:
            self.store.transition_job(self.job_id, ["running"], **self.end)
            self.end = None


def _follow(store, job_id, sleep, streams=("stdout", "stderr"), follow=True):
    out, err = io.StringIO(), io.StringIO()
    code = job_follow.print_log(store, store.get_job(job_id), follow=follow, streams=streams, out=out, err=err,
                                poll_s=0, sleep=sleep)
    return code, out.getvalue(), err.getvalue()


def test_follow_prints_in_order_until_the_end_then_the_state_and_exit_code(store):
    job_id = _job(store)
    batches = [[("stdout", f"line {n}\n".encode())] for n in range(3)] + [[("stderr", b"warn\n")]]
    sleep = Appender(store, job_id, batches, end={"to_state": "failed", "exit_code": 3})
    code, out, err = _follow(store, job_id, sleep)
    assert code == 3 and out == "line 0\nline 1\nline 2\n"
    assert err.startswith("warn\n") and f"hwledger: job {job_id} failed (exit code 3)" in err


def test_escape_sequences_are_shown_escaped_and_a_split_character_whole(store):
    job_id = _job(store)
    snowman = "\u2603".encode()
    store.append_job_log(job_id, None, LogCursor(DIR, 0, 1),
                         [("stdout", b"\x1b[2J\x1b]0;owned\x07red\rfake\n" + snowman[:1]), ("stderr", b"\x9b!\xc2\x9b31m\n")])
    store.append_job_log(job_id, LogCursor(DIR, 0, 1), LogCursor(DIR, 0, 2), [("stdout", snowman[1:] + b"\n")])
    code, out, err = _follow(store, job_id, None, follow=False)
    assert code == 0
    assert out == "\\x1b[2J\\x1b]0;owned\\x07red\\x0dfake\n\u2603\n"
    assert "\x1b" not in out + err and "\r" not in out
    assert err == "\ufffd!\\x9b31m\n"  # a raw C1 byte is not UTF-8 (replaced); an encoded C1 CSI is escaped


def test_a_stream_filter_and_notes(store):
    job_id = _job(store)
    store.append_job_log(job_id, None, LogCursor(DIR), [("stdout", b"out\n"), ("note", b"12 bytes of stdout were lost"),
                                                        ("stderr", b"err\n")])
    _code, out, err = _follow(store, job_id, None, streams=("stderr",), follow=False)
    assert out == "" and err == "hwledger: 12 bytes of stdout were lost\nerr\n"


def test_what_the_bound_dropped_is_said_first(store, monkeypatch):
    monkeypatch.setattr(job_logs, "LOG_KEPT_BYTES", 10)
    job_id = _job(store)
    store.append_job_log(job_id, None, LogCursor(DIR), [("stdout", b"old-old\n"), ("stdout", b"new-new\n")])
    _code, out, err = _follow(store, job_id, None, follow=False)
    assert out == "new-new\n" and "the oldest 8 bytes of this job's output were dropped" in err


def test_a_job_not_started_is_refused_without_follow_and_waited_for_with_it(store):
    job_id = _job(store, state="queued")
    with pytest.raises(UserError, match="has not started"):
        _follow(store, job_id, None, follow=False)

    def start_then_end(_seconds):
        job = store.get_job(job_id)
        if job.state == "queued":
            store.transition_job(job_id, ["queued"], "running", remote_dir=DIR)
        else:
            store.transition_job(job_id, ["running"], "timed_out", result={"signal": 9})

    code, _out, err = _follow(store, job_id, start_then_end)
    assert "waiting for it to start" in err and "timed_out" in err and code == 128 + 9


def test_a_finished_job_prints_what_was_kept(store):
    job_id = _job(store)
    store.append_job_log(job_id, None, LogCursor(DIR), [("stdout", b"kept\n")])
    store.transition_job(job_id, ["running"], "succeeded", exit_code=0)
    code, out, err = _follow(store, job_id, None, follow=False)
    assert (code, out) == (0, "kept\n") and "succeeded (exit code 0)" in err
