# Copyright: hwledger-fleet developers
# Apache License 2.0 (see LICENSE)
"""Reading running jobs' logs in the heartbeat's own exec: the POSIX-sh piece the probe runs after its
``done`` line, and the parser of what that piece prints.

Why in the heartbeat's exec: the server already opens one channel per host and tick; the few ``wc``,
``tail`` and ``head`` runs that read what is new in a job's log (``job_log``) cost far less than another
exec. Why after ``done``: the probe's frames end there, so nothing a job printed can ever be taken for
one of them, whatever it contains (the probe's token is visible to the host's processes).

For each job asked (its recorded private dir, the generation and offset read so far), the piece prints::

    T log <job_id> gone                                     # no private dir: the job's run has ended
    T log <job_id> none                                     # no log file of that generation or later (yet)
    T log <job_id> bad <generation>                         # the file could not be measured
    T log <job_id> data <generation> <offset> <size> <count>
    <exactly count bytes of the file from offset>           # count <= READ_BYTES
    (an empty line)

"data" comes for the file of the generation asked (or the oldest one left, when that one was rotated away:
offset 0) and, when a newer file exists, for that one from 0 too: at most two sections, 2 * READ_BYTES,
per job and exec. The count is computed on the host before reading and the bytes are padded to it, so a
file that shrinks meanwhile cannot shift the frames. Paths are checked here (only a job's own private dir,
``hwledger-job-<job_id>-<random>``) and shell-quoted; numbers are ours.

A job that replaces its own log file by a FIFO between the type check and the read makes its host's exec
wait until the controller's deadline; a job runs as the same user as the heartbeat and can stall it in
plainer ways (it can kill its shell). It cannot make the controller take its bytes for anything but its own
log.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log, job_remote, job_schema

READ_BYTES = 128 * 1024  # per file section: at most 2 sections, 256 KiB, per job and tick
MAX_READS = 8  # jobs per host and exec; more wait for a later tick
# A section's frame line and its trailing newline, generously.
SECTION_OVERHEAD = 160

_MAX_OFFSET = 10 ** 15
_FRAME_RE = re.compile(
    rb"(hwl[0-9a-f]{24}) log ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    rb" (gone|none|bad|data)((?: [0-9]{1,16}){0,4})\n")

_PIECE = r"""
hwl_log() {
  jlk=$1 jld=$2 jlg=$3 jlo=$4 jlf= jln=
  if [ ! -d "$jld" ] || [ -h "$jld" ]; then printf '%s log %s gone\n' "$B" "$jlk"; return; fi
  for jlx in "$jld"/@GLOB@; do
    [ -f "$jlx" ] && [ ! -h "$jlx" ] || continue
    jly=${jlx##*/@PREFIX@}
    if [ -z "$jlf" ]; then
      [ "$jly" -ge "$jlg" ] && jlf=$jly
    elif [ -z "$jln" ]; then
      jln=$jly
    fi
  done
  if [ -z "$jlf" ]; then printf '%s log %s none\n' "$B" "$jlk"; return; fi
  [ "$jlf" -eq "$jlg" ] || jlo=0
  hwl_section "$jlk" "$jld/@PREFIX@$jlf" "$jlf" "$jlo"
  [ -n "$jln" ] && hwl_section "$jlk" "$jld/@PREFIX@$jln" "$jln" 0
  return 0
}
hwl_section() {
  jlz=$(wc -c 2>/dev/null <"$2") || jlz=
  jlz=${jlz##* }
  case $jlz in ''|*[!0-9]*) printf '%s log %s bad %s\n' "$B" "$1" "$3"; return ;; esac
  jlc=0
  [ "$jlz" -gt "$4" ] && jlc=$((jlz - $4))
  [ "$jlc" -gt @READ@ ] && jlc=@READ@
  printf '%s log %s data %s %s %s %s\n' "$B" "$1" "$3" "$4" "$jlz" "$jlc"
  if [ "$jlc" -gt 0 ]; then
    { tail -c +$(($4 + 1)) "$2" 2>/dev/null | head -c "$jlc"; head -c "$jlc" /dev/zero; } | head -c "$jlc"
  fi
  printf '\n'
}
"""


@dataclass(frozen=True)
class LogRead:
    """What to read of one running job's log: its private dir, and the generation and offset read so far."""

    job_id: str
    remote_dir: str
    generation: int = 0
    offset: int = 0


@dataclass(frozen=True)
class LogChunk:
    """One section the piece printed for a job: ``kind`` is "data" (``data`` is the file's bytes from
    ``offset``; ``size`` the file's size when measured), "gone", "none" or "bad". ``remote_dir`` is the
    private dir it was read from (that of the read that asked for it)."""

    job_id: str
    remote_dir: str
    kind: str
    generation: int | None = None
    offset: int = 0
    size: int = 0
    data: bytes = b""


def is_private_dir_of(path: str, job_id: str) -> bool:
    """Whether ``path`` can only be the private dir of job ``job_id``: a job dir's shape
    (``job_remote.is_job_dir``) whose name is ``hwledger-job-<job_id>-`` and mktemp's random letters."""
    return (job_remote.is_job_dir(path)
            and re.fullmatch(r"hwledger-job-%s-[A-Za-z0-9]{6,32}" % re.escape(job_id), path.rsplit("/", 1)[-1]) is not None)


def check_read(read: LogRead) -> LogRead:
    """``read`` when it is safe to put in a script, else ValueError saying why."""
    job_id = job_schema.validate_job_id(read.job_id)
    if job_id != read.job_id:
        raise ValueError("job id %r is not in its canonical (lowercase) form" % read.job_id)
    if not isinstance(read.remote_dir, str) or not is_private_dir_of(read.remote_dir, job_id):
        raise ValueError("%r is not the private dir of job %s" % (read.remote_dir, job_id))
    for name, value, top in (("generation", read.generation, job_log.MAX_GENERATION), ("offset", read.offset, _MAX_OFFSET)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            raise ValueError("%s %r is out of range" % (name, value))
    return read


def script_piece(reads) -> str:
    """The sh to run after the probe's ``done`` line (``$B`` is the probe's token); "" for no reads.
    At most MAX_READS reads; each is checked (``check_read``) and its values quoted."""
    reads = [check_read(read) for read in reads]
    if not reads:
        return ""
    if len(reads) > MAX_READS:
        raise ValueError("at most %d job logs are read per exec, not %d" % (MAX_READS, len(reads)))
    values = {"@GLOB@": job_log.FILE_PREFIX + "[0-9]" * job_log.GENERATION_DIGITS, "@PREFIX@": job_log.FILE_PREFIX,
              "@READ@": str(READ_BYTES)}
    piece = re.sub("|".join(values), lambda m: values[m.group(0)], _PIECE)
    calls = "".join("hwl_log %s %s %d %d\n" % (read.job_id, shlex.quote(read.remote_dir), read.generation, read.offset)
                    for read in reads)
    return piece + calls


def max_output_bytes(count: int) -> int:
    """The most the piece prints for ``count`` reads."""
    return count * 2 * (READ_BYTES + SECTION_OVERHEAD)


def parse(region: bytes, token: str, reads) -> dict[str, list[LogChunk]]:
    """The chunks in ``region`` (the exec's output after the probe's ``done`` line), by job id. Only jobs
    that were asked are taken; anything unexpected (a cut connection, junk) ends the parse, keeping what
    came before it whole."""
    asked = {read.job_id: read.remote_dir for read in reads}
    found: dict[str, list[LogChunk]] = {}
    expected_token = token.encode("ascii")
    pos = 0
    while pos < len(region):
        match = _FRAME_RE.match(region, pos)
        if match is None or match.group(1) != expected_token:
            break
        job_id = match.group(2).decode("ascii")
        kind = match.group(3).decode("ascii")
        numbers = [int(n) for n in match.group(4).split()]
        pos = match.end()
        if kind == "data":
            if len(numbers) != 4 or numbers[3] > READ_BYTES:
                break
            generation, offset, size, count = numbers
            data = region[pos:pos + count]
            if len(data) != count or region[pos + count:pos + count + 1] != b"\n":
                break  # cut off: the next tick reads it again
            pos += count + 1
            chunk = LogChunk(job_id, asked.get(job_id, ""), kind, generation, offset, size, bytes(data))
        elif kind == "bad" and len(numbers) == 1:
            chunk = LogChunk(job_id, asked.get(job_id, ""), kind, numbers[0])
        elif kind in ("gone", "none") and not numbers:
            chunk = LogChunk(job_id, asked.get(job_id, ""), kind)
        else:
            break
        if job_id in asked:
            found.setdefault(job_id, []).append(chunk)
    return found
