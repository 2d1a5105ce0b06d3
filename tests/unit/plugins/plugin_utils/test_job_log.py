"""The job's output log on the host (job_log): its framing, and the bounded rotating writer, on real files."""

from __future__ import annotations

import os
import random
import stat

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log


def _private(tmp_path):
    path = tmp_path / "hwledger-job-x"
    path.mkdir(mode=0o700)
    return path


def _read_all(directory) -> list[job_log.Record]:
    records = []
    for name in sorted(os.listdir(directory)):
        data = (directory / name).read_bytes()
        found, consumed, damaged = job_log.parse_records(data)
        assert consumed == len(data) and not damaged
        records.extend(found)
    return records


def test_records_round_trip_whatever_the_payload_holds():
    # A payload that looks like framing (a header, NULs, a newline, invalid UTF-8) is taken as bytes.
    evil = b"o 0 5\nhello\x00\xff\x1b[2J\n"
    data = job_log.encode_record("o", 0, evil) + job_log.encode_record("e", 7, b"err")
    records, consumed, damaged = job_log.parse_records(data)
    assert records == [job_log.Record("o", 0, evil), job_log.Record("e", 7, b"err")]
    assert consumed == len(data) and not damaged


def test_a_cut_record_is_left_for_the_next_read_and_junk_is_damage():
    whole = job_log.encode_record("o", 0, b"abc")
    cut = whole + job_log.encode_record("o", 3, b"defgh")[:-2]
    records, consumed, damaged = job_log.parse_records(cut)
    assert records == [job_log.Record("o", 0, b"abc")] and consumed == len(whole) and not damaged
    records, consumed, damaged = job_log.parse_records(whole + b"not a header at all, and long enough\n")
    assert len(records) == 1 and consumed == len(whole) and damaged


def test_the_writer_keeps_each_stream_in_order_with_positions(tmp_path):
    directory = _private(tmp_path)
    writer = job_log.LogWriter(directory)
    writer.write("o", b"one\n")
    writer.write("e", b"oops\n")
    writer.write("o", b"x" * (job_log.MAX_RECORD_BYTES + 10))
    writer.close()
    records = _read_all(directory)
    assert [(r.stream, r.position, len(r.data)) for r in records] == [
        ("o", 0, 4), ("e", 0, 5), ("o", 4, job_log.MAX_RECORD_BYTES), ("o", 4 + job_log.MAX_RECORD_BYTES, 10)]
    name = job_log.file_name(0)
    assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600


def test_rotation_bounds_the_disk_whatever_the_job_prints(tmp_path):
    directory = _private(tmp_path)
    writer = job_log.LogWriter(directory, rotate_bytes=64 * 1024, keep_files=2, min_free_bytes=0)
    chunk = b"y" * 4000
    for _round in range(1000):  # ~4 MB through a log bounded at 2 x 64 KiB
        writer.write("o", chunk)
    writer.close()
    names = sorted(os.listdir(directory))
    assert len(names) <= 2
    total = sum((directory / name).stat().st_size for name in names)
    assert total <= 2 * 64 * 1024 + job_log.MAX_RECORD_BYTES + job_log.MAX_HEADER_BYTES
    # What is left is the newest output, self-placing: its positions say what was rotated away.
    records = _read_all(directory)
    assert records[-1].position + len(records[-1].data) == 1000 * 4000
    assert names[-1] == job_log.file_name(writer.generation)


def test_a_log_that_cannot_be_kept_stops_with_a_note_and_never_raises(tmp_path):
    directory = _private(tmp_path)
    writer = job_log.LogWriter(directory, rotate_bytes=100, min_free_bytes=0)
    writer.min_free_bytes = 1 << 62  # from now on no disk is free enough
    writer.write("o", b"z" * 200)  # fills the first file; the next is refused for want of space
    writer.write("o", b"more")
    writer.close()
    assert writer.stopped and "free" in writer.stopped
    records = _read_all(directory)
    assert records[-1].stream == "n" and b"stopped" in records[-1].data
    assert writer.positions["o"] == 204  # still counted


def test_a_directory_that_is_not_private_gets_no_log(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    writer = job_log.LogWriter(shared)
    writer.write("o", b"secret")
    writer.close()
    assert writer.stopped and os.listdir(shared) == []


# --- masking the job's env values as the stream comes (Masker: what the runner feeds the log and the tails) ---


def _masked_whole(data: bytes, values: list[bytes]) -> bytes:
    """The reference: every byte inside an occurrence of a value is covered; each run of covered bytes is one
    mask. Written plainly, byte by byte, to check the streaming masker against."""
    covered = [False] * len(data)
    for value in values:
        for start in range(len(data) - len(value) + 1):
            if data[start:start + len(value)] == value:
                covered[start:start + len(value)] = [True] * len(value)
    out = bytearray()
    for index, byte in enumerate(data):
        if not covered[index]:
            out.append(byte)
        elif index == 0 or not covered[index - 1]:
            out += job_log.Masker.MASK
    return bytes(out)


def _through(masker: job_log.Masker, pieces) -> bytes:
    return b"".join(masker.feed(piece) for piece in pieces) + masker.flush()


def test_a_value_split_across_writes_is_masked_and_only_its_possible_start_is_kept_back():
    masker = job_log.Masker([b"hf_secret42"])
    assert masker.feed(b"token: hf_sec") == b"token: "  # "hf_sec" may be the start of the value: kept back
    assert masker.held() == len("hf_sec")
    assert masker.feed(b"ret42 done\n") == b"*** done\n"
    assert masker.held() == 0  # nothing at the end can start the value: nothing waits for more output
    assert masker.feed(b"hf_se") == b"" and masker.flush() == b"hf_se"  # the end of the stream: it was not


def test_overlapping_and_adjacent_values_are_all_masked_whatever_the_pieces():
    values = [b"abcdef", b"defghi", b"xyz123"]
    data = b"<abcdefghi><xyz123abcdef><abcde>"
    expected = b"<***><***><abcde>"
    assert _masked_whole(data, values) == expected
    for size in range(1, len(data) + 1):  # the same output whatever the pieces the stream came in
        assert _through(job_log.Masker(values), [data[i:i + size] for i in range(0, len(data), size)]) == expected


def test_a_self_overlapping_value_in_a_long_run_is_one_mask_and_the_run_s_end_is_kept():
    data = b"x" + b"0" * 200_000 + b"12 y"
    pieces = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    assert _through(job_log.Masker([b"000000"]), pieces) == b"x***12 y"
    assert _through(job_log.Masker([b"0000012"]), pieces) == b"x" + b"0" * 199_995 + b"*** y"
    assert job_log.mask(b"aabaaabaaabaa!", [b"aabaa"]) == b"***!"  # occurrences 4 apart, its period is 3


def test_the_masker_agrees_with_the_whole_stream_and_keeps_back_less_than_the_longest_value():
    rng = random.Random(1313)
    for _trial in range(3000):
        alphabet = rng.choice([b"ab", b"abc", b"ab\xff"])
        values = [bytes(rng.choice(alphabet) for _byte in range(rng.randint(2, 7))) for _value in range(rng.randint(1, 3))]
        data = bytes(rng.choice(alphabet + b"x") for _byte in range(rng.randint(0, 60)))
        masker = job_log.Masker(values)
        pieces, out, at = [], b"", 0
        while at < len(data):
            size = rng.randint(1, 9)
            pieces.append(data[at:at + size])
            at += size
        for piece in pieces:
            out += masker.feed(piece)
            assert masker.held() <= max(len(v) for v in values) - 1
        out += masker.flush()
        assert out == _masked_whole(data, values) == job_log.mask(data, values), (values, pieces)


def test_a_log_fed_through_the_masker_keeps_valid_records_positions_and_rotation(tmp_path):
    directory = _private(tmp_path)
    secret = b"hf_" + b"S" * 40
    writer = job_log.LogWriter(directory, rotate_bytes=64 * 1024, keep_files=2, min_free_bytes=0)
    masker = job_log.Masker([secret])
    stream = (b"x" * (job_log.MAX_RECORD_BYTES - 10) + secret + b"\n") * 20  # values across record bounds
    sent = 0
    for start in range(0, len(stream), 7001):  # and across the pieces
        piece = masker.feed(stream[start:start + 7001])
        writer.write("o", piece)
        sent += len(piece)
    rest = masker.flush()
    writer.write("o", rest)
    writer.close()
    expected = job_log.mask(stream, [secret])
    assert sent + len(rest) == len(expected) == writer.positions["o"]
    records = _read_all(directory)  # every file is whole records (asserted there)
    data = b"".join(r.data for r in records)
    assert secret not in data and b"hf_" not in data
    for before, after in zip(records, records[1:]):  # contiguous: nothing lost or repeated but the rotated part
        assert after.position == before.position + len(before.data)
    assert records[-1].position + len(records[-1].data) == len(expected)
    assert expected.endswith(data)
