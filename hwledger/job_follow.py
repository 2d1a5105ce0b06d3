"""`hwledger job logs [-f]`: print a job's log as the store holds it (hwledger/job_logs.py fills it), and
with `follow` keep printing until the job ends.

Why every byte goes through `printable`: the log is what a remote job printed. Escape sequences, carriage
returns and bidi overrides are shown escaped (`\\x1b`), newlines kept, so nothing a job prints can move the
operator's cursor, rewrite a line or fake hwledger's own notes. Each stream has its own incremental UTF-8
decoder, so a character cut between two reads is printed whole. The job's stdout goes to our stdout and
its stderr to our stderr (so `hwledger job logs JOB > out.txt` keeps the job's stdout apart); hwledger's
own notes (output dropped, lost to rotation, the final state) go to stderr, prefixed `hwledger:`.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Collection
from typing import TextIO

from hwledger.display import printable
from hwledger.errors import UserError
from hwledger.store import LOG_KEPT_BYTES, JobLogView, JobRow, Store

POLL_S = 0.5  # how often a follower looks at the store (the server appends once per tick)
NOT_STARTED = ("queued", "dispatched")


def escaped(text: str) -> str:
    """`text` with every control character escaped but the newlines."""
    return "\n".join(printable(part) for part in text.split("\n"))


def exit_code_of(job: JobRow) -> int:
    """The job's exit code as a shell gives it: its own; 128 + the signal that killed it; else 0 when it
    succeeded and 1 when not (timed out, lost, cancelled, failed to start)."""
    if job.exit_code is not None:
        return job.exit_code
    signal = (job.result or {}).get("signal")
    if isinstance(signal, int) and not isinstance(signal, bool) and 0 < signal < 128:
        return 128 + signal
    return 0 if job.state == "succeeded" else 1


class LogPrinter:
    """Writes log entries: the job's streams escaped to `out`/`err`, notes to `err`."""

    def __init__(self, out: TextIO, err: TextIO, streams: Collection[str]):
        self.targets = {"stdout": out, "stderr": err}
        self.err = err
        self.streams = set(streams)
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in self.targets}

    def note(self, text: str) -> None:
        self.err.write(f"hwledger: {printable(text)}\n")
        self.err.flush()

    def entry(self, stream: str, data: bytes) -> None:
        if stream == "note":
            self.note(data.decode("utf-8", "replace"))
        elif stream in self.streams:
            text = self.decoders[stream].decode(data)
            if text:
                self.targets[stream].write(escaped(text))
                self.targets[stream].flush()

    def finish(self) -> None:
        for stream in self.streams:
            text = self.decoders[stream].decode(b"", final=True)
            if text:
                self.targets[stream].write(escaped(text))
                self.targets[stream].flush()


def _dropped_note(view: JobLogView) -> str:
    return (f"the oldest {view.dropped_bytes} bytes of this job's output were dropped: the store keeps the newest "
            f"{LOG_KEPT_BYTES // (1024 * 1024)} MiB of each job's log")


def _final_note(job: JobRow) -> str:
    text = f"job {job.id} {job.state}"
    if job.exit_code is not None:
        text += f" (exit code {job.exit_code})"
    elif (job.result or {}).get("signal"):
        text += f" (signal {job.result['signal']})"
    return text + (f": {job.error}" if job.error else "")


def print_log(store: Store, job: JobRow, *, follow: bool, streams: Collection[str], out: TextIO, err: TextIO,
              poll_s: float = POLL_S, sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the job's log. Without `follow`: what is there now (0). With it: on until the job ends, then
    its final state; returns the job's exit code (`exit_code_of`)."""
    if job.state in NOT_STARTED and not follow:
        raise UserError(f"job {job.id} is {job.state}: it has not started, so it has no output yet; "
                        f"`hwledger job logs -f {job.id}` waits for it and follows it")
    printer = LogPrinter(out, err, streams)
    last_seq = 0
    said_waiting = said_drop = False
    while True:
        view = store.read_job_log(job.id, after_seq=last_seq)
        if view is None:  # pruned while we followed
            printer.finish()
            raise UserError(f"job {job.id} is gone from the store (pruned); nothing more to show")
        if view.dropped_to_seq > last_seq:
            # Dropped before we showed it: at the start (the job printed more than the bound), or a follower
            # that fell behind a job printing faster than it reads.
            printer.note(_dropped_note(view) if not said_drop else
                         "output was dropped here before it could be shown (the store's bound per job)")
            said_drop = True
        for entry in view.entries:
            printer.entry(entry.stream, entry.data)
            last_seq = entry.seq
        if view.more:
            continue
        if view.job.state in NOT_STARTED and not said_waiting:
            printer.note(f"job {job.id} is {view.job.state}; waiting for it to start")
            said_waiting = True
        if view.job.terminal:
            printer.finish()
            printer.note(_final_note(view.job))
            return exit_code_of(view.job) if follow else 0
        if not follow:
            printer.finish()
            return 0
        sleep(poll_s)
