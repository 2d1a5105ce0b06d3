# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""A job's output log on the GPU host: its framing, the bounded writer the runner feeds, and the parser the
controller reads it with. One format, one module (it travels to the hosts in runner.pyz: standard library
only, Python 3.8).

Why a log at all: the result carries only the last 64 KiB of each stream, and only once the job has ended.
The runner also writes everything the job prints, as it comes, to a small log in the job's private
directory, and the server reads what is new there at every heartbeat (docs/jobs.md, "Follow a job").

**Framing.** A log is a sequence of records, each a header line and a payload::

    <stream> SP <position> SP <length> LF <length bytes of payload>

``stream`` is ``o`` (stdout), ``e`` (stderr) or ``n`` (a note of the runner's own, such as why the log
stopped); ``position`` is how many bytes of that stream came before this record (0 for notes); ``length`` is
1..MAX_RECORD_BYTES. A reader takes a header, then exactly ``length`` bytes *without looking at them*, so
nothing a job prints (markers, fake headers, NUL bytes, invalid UTF-8) is ever read as framing: a job cannot
forge a record, end one early or swallow the next. The positions make every record self-placing: the reader
knows exactly which bytes of which stream it holds, so bytes lost to rotation are counted exactly and bytes
read twice are recognised, whichever way the files were read.

**Files.** ``log.00000000``, ``log.00000001``, ... (the generation in the name, fixed width so that a shell
glob lists them oldest first). A record is never split across files. When the current file reaches
ROTATE_BYTES the next one is created and the one before the previous is removed, so at most KEEP_FILES
files exist: the log never takes more than KEEP_FILES * ROTATE_BYTES (plus one record) of the host's disk,
however much the job prints. Files are created 0600 with O_EXCL|O_NOFOLLOW in the private directory.

**Env values masked.** The runner masks the job's env values in what it logs and keeps (``Masker``): the log
and the result's tails hold the stream *as masked*, and every position and byte count is one of that stream,
so the tails and the records always agree (the controller appends the tails past what it read of the log).

**Never at the job's expense.** A log that cannot be written (the disk is full or below MIN_FREE_BYTES, the
directory is not private) stops, with a note record when one still fits; the job runs on and its result
is unaffected.
"""

from __future__ import annotations

import os
import re
from collections import namedtuple

from ansible_collections.hwledger.fleet.plugins.plugin_utils import private_files

STREAMS = {"o": "stdout", "e": "stderr", "n": "note"}
MAX_RECORD_BYTES = 16 * 1024  # a payload; a reader's window always holds a whole record
ROTATE_BYTES = 1024 * 1024
KEEP_FILES = 2
MIN_FREE_BYTES = 64 * 1024 * 1024  # the log stops rather than take the host's last space
FILE_PREFIX = "log."
GENERATION_DIGITS = 8
MAX_GENERATION = 10 ** GENERATION_DIGITS - 1
# A header is at most this long: stream, two spaces, 15 digits of position, 5 of length, LF.
MAX_HEADER_BYTES = 1 + 1 + 15 + 1 + 5 + 1
MAX_POSITION = 10 ** 15 - 1

_HEADER_RE = re.compile(rb"([oen]) (0|[1-9][0-9]{0,14}) ([1-9][0-9]{0,4})\n")

Record = namedtuple("Record", "stream position data")


def file_name(generation):
    """The name of a generation's file (``log.00000003``)."""
    return "%s%0*d" % (FILE_PREFIX, GENERATION_DIGITS, generation)


def encode_record(stream, position, data):
    """One record's bytes (``data`` non-empty, at most MAX_RECORD_BYTES)."""
    if stream not in STREAMS or not 0 < len(data) <= MAX_RECORD_BYTES or not 0 <= position <= MAX_POSITION:
        raise ValueError("not a valid log record: stream %r, position %r, %d bytes" % (stream, position, len(data)))
    return b"%s %d %d\n" % (stream.encode("ascii"), position, len(data)) + bytes(data)


def parse_records(data):
    """The complete records at the start of ``data``: ``(records, consumed, damaged)``.

    ``consumed`` is how many bytes they took (a record cut off at the end is left for the next read);
    ``damaged`` is True when the bytes after them are not a record header at all (the file was tampered
    with, or read from a wrong offset): the caller must not read on from there.
    """
    records = []
    pos = 0
    end = len(data)
    while pos < end:
        newline = data.find(b"\n", pos, min(end, pos + MAX_HEADER_BYTES))
        if newline < 0:
            # No header line yet: damaged when a whole header's worth is there, else a header being written.
            return records, pos, end - pos >= MAX_HEADER_BYTES
        match = _HEADER_RE.fullmatch(data, pos, newline + 1)
        if match is None:
            return records, pos, True
        length = int(match.group(3))
        if length > MAX_RECORD_BYTES:
            return records, pos, True
        start = newline + 1
        if start + length > end:
            return records, pos, False  # the payload is still being written, or cut by the read's window
        records.append(Record(match.group(1).decode("ascii"), int(match.group(2)), bytes(data[start:start + length])))
        pos = start + length
    return records, pos, False


class Masker:
    """Masks values (bytes) in one stream that comes in pieces: every byte covered by an occurrence of any of
    them (overlapping and adjacent occurrences too) is gone, and each run of covered bytes becomes one
    MASK. The result is the same however the stream was cut into pieces.

    ``feed`` returns the bytes that are final; it keeps back the end of the stream that may still be the
    start of a value (at most the longest value's length - 1 bytes), until more data or ``flush`` (the end
    of the stream) says what it is.
    """

    MASK = b"***"
    # How many places at the end of the stream a value is checked as possibly starting at (each a memcmp of
    # at most its length): past them the rest is kept back whole, which is always safe.
    _MAX_CANDIDATES = 64

    def __init__(self, values):
        self.values = sorted({bytes(v) for v in values if v}, key=len, reverse=True)
        self.periods = [_smallest_period(value) for value in self.values]
        self.pending = b""  # kept back: the raw stream from `base` on
        self.base = 0
        self.cover_end = 0  # the pending bytes before it are covered by an occurrence that started earlier
        self.in_run = False  # the byte before `base` was covered (its run's MASK is already out)

    def held(self):
        """How many bytes are kept back now."""
        return len(self.pending)

    def feed(self, data):
        if not self.values:
            return bytes(data)
        if not data:
            return b""
        return self._step(self.pending + bytes(data), final=False)

    def flush(self):
        """The rest of the stream, at its end (the masker can go on with a new stream after it)."""
        out = self._step(self.pending, final=True) if self.pending else b""
        self.cover_end = self.base
        self.in_run = False
        return out

    def _step(self, buf, final):
        base = self.base
        end = base + len(buf)
        runs = []
        if self.cover_end > base:
            runs.append((base, self.cover_end))
        for value, period in zip(self.values, self.periods):
            size = len(value)
            found = buf.find(value)
            while found >= 0:
                # The chain of occurrences `period` apart (the value's smallest period) that starts here runs
                # as far as buf keeps that period: found with a few memcmps rather than one search per byte
                # (a value such as "000000" in a run of zeros). Any other occurrence that starts inside the
                # chain ends inside what the chain covers, so the search goes on after its last one.
                last = found
                if period < size:
                    same = _common_prefix(buf, found + period, found, size - period)
                    last = found + (period + same - size) // period * period
                runs.append((base + found, base + last + size))
                found = buf.find(value, last + 1)
        runs.sort()
        merged = []
        for start, stop in runs:
            if merged and start <= merged[-1][1]:
                if stop > merged[-1][1]:
                    merged[-1][1] = stop
            else:
                merged.append([start, stop])
        cut = end if final else self._first_open_start(buf, base)
        out = []
        at = base
        for start, stop in merged:
            if start >= cut:
                break
            out.append(buf[at - base:start - base])
            if not (start == base and self.in_run):
                out.append(self.MASK)
            at = min(stop, cut)
        if at < cut:
            out.append(buf[at - base:cut - base])
        if cut > base:  # else nothing went out: what is known of the byte before `base` still holds
            crossing = [stop for start, stop in merged if start < cut <= stop]
            self.in_run = bool(crossing)
            self.cover_end = crossing[0] if crossing else cut
        self.pending = buf[cut - base:]
        self.base = cut
        return b"".join(out)

    def _first_open_start(self, buf, base):
        """Where the earliest occurrence that the bytes still to come could complete may start (the end of
        ``buf`` when none): its start is the start of a suffix of ``buf`` that is a proper prefix of a value."""
        size = len(buf)
        cut = size
        for value in self.values:
            first = max(0, size - len(value) + 1)
            at = buf.find(value[:1], first)
            tried = 0
            while 0 <= at < cut:
                tried += 1
                if tried > self._MAX_CANDIDATES or value.startswith(buf[at:]):
                    cut = at
                    break
                at = buf.find(value[:1], at + 1)
        return base + cut


def _smallest_period(value):
    """The smallest p > 0 with value[i] == value[i + p] for every i (its length when there is none shorter):
    the length minus its longest proper border (Knuth-Morris-Pratt)."""
    border = [0] * len(value)
    k = 0
    for i in range(1, len(value)):
        while k and value[i] != value[k]:
            k = border[k - 1]
        if value[i] == value[k]:
            k += 1
        border[i] = k
    return len(value) - (border[-1] if value else 0)


def _common_prefix(buf, a, b, known):
    """The largest k with buf[a:a + k] == buf[b:b + k] (b < a), given that it is at least ``known``."""
    low, high = known, len(buf) - a
    step = max(1, known)
    while low + step <= high and buf[a + low:a + low + step] == buf[b + low:b + low + step]:
        low += step
        step *= 2
    high = min(high, low + step - 1)
    while low < high:  # buf[a:a + low] matches; buf[a:a + high + 1] does not (or is past the end)
        middle = (low + high + 1) // 2
        if buf[a + low:a + middle] == buf[b + low:b + middle]:
            low = middle
        else:
            high = middle - 1
    return low


def mask(data, values):
    """``data`` (bytes) with every occurrence of the ``values`` masked (``Masker`` on the whole of it)."""
    masker = Masker(values)
    return masker.feed(data) + masker.flush()


class LogWriter:
    """The runner's side: appends the job's output as records to the rotating files in ``directory``.

    Every method is safe to call after the log stopped (it then only counts). ``stopped`` says why it did.
    """

    def __init__(self, directory, *, rotate_bytes=ROTATE_BYTES, keep_files=KEEP_FILES, min_free_bytes=MIN_FREE_BYTES):
        self.directory = os.fspath(directory)
        self.rotate_bytes = rotate_bytes
        self.keep_files = max(1, keep_files)
        self.min_free_bytes = min_free_bytes
        self.positions = {"o": 0, "e": 0}
        self.generation = -1
        self.fd = None
        self.size = 0
        self.stopped = None
        problem = private_files.private_dir_problem(self.directory, "the log directory")
        if problem is not None:
            self.stopped = problem
            return
        self._next_file()

    def write(self, stream, data):
        """Append ``data`` of ``stream`` ("o" or "e") as records (split at MAX_RECORD_BYTES)."""
        view = memoryview(data)
        for start in range(0, len(view), MAX_RECORD_BYTES):
            piece = view[start:start + MAX_RECORD_BYTES]
            position = self.positions[stream]
            self.positions[stream] = position + len(piece)
            if self.fd is not None:
                self._append(encode_record(stream, min(position, MAX_POSITION), piece))

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    # -- files ---------------------------------------------------------------------------------------

    def _append(self, record):
        try:
            _write_all(self.fd, record)
        except OSError as exc:
            self._stop("the log stopped: %s" % (exc.strerror or exc))
            return
        self.size += len(record)
        if self.size >= self.rotate_bytes:
            self._next_file()

    def _next_file(self):
        """Start the next generation (the file before the previous one goes), or stop the log (with a note
        in the current file, when there is one)."""
        if self.generation >= MAX_GENERATION:
            self._stop("the log stopped: it has no generation numbers left")
            return
        try:
            info = os.statvfs(self.directory)
            free = info.f_bavail * info.f_frsize
        except (OSError, AttributeError):
            free = None
        if free is not None and free < self.min_free_bytes:
            self._stop("the log stopped: the host's disk has %d bytes free, less than the %d it leaves free"
                       % (free, self.min_free_bytes))
            return
        self.close()
        self.generation += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(os.path.join(self.directory, file_name(self.generation)), flags, 0o600)
        except OSError as exc:
            self._stop("the log stopped: cannot create %s: %s" % (file_name(self.generation), exc.strerror or exc))
            return
        self.size = 0
        old = self.generation - self.keep_files
        if old >= 0:
            try:
                os.unlink(os.path.join(self.directory, file_name(old)))
            except OSError:
                pass  # already gone (or never made)

    def _stop(self, why):
        """Stop logging, leaving a note in the current file when there is one (a full disk may refuse it)."""
        if self.stopped is None:
            self.stopped = why
        if self.fd is not None:
            try:
                _write_all(self.fd, encode_record("n", 0, why.encode("utf-8", "replace")[:MAX_RECORD_BYTES]))
            except OSError:
                pass
        self.close()


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
