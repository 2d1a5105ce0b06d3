"""Following running jobs' logs in the serve loop: what each host is asked for at a tick, and what its answer
adds to the store (read back by `hwledger job logs`, hwledger/job_follow.py).

At every tick the server asks each host it heartbeats for the new bytes of its running jobs' logs, from where
the store's cursor stands (`job_log_read`): in the heartbeat's own exec with the fan-out transport; with the
Ansible transport in one more exec over the same ssh master (`fetch`, a liveness exec of the fan-out without
host metrics: a channel, ~10 ms, where a `raw` playbook would cost ansible-playbook's start of ~0.7 s and
its CPU, and the heartbeat module stays what AWX runs, with no job output in its events).

The runner frames the log (`job_log`): every record says which bytes of which stream it holds, so

- bytes read twice are skipped, and bytes the host's log rotated away before they were read (the job printed
  faster than the heartbeat reads, 256 KiB per job and tick) are counted and said where they were lost;
- a file that shrank below what was read of it (truncated or replaced) is read again from its start, and a
  damaged one (not records) is skipped to the next file: both said in the log;
- the cursor moves by complete records only, in the same transaction as the bytes and only from where it
  stood when the read was planned (compare-and-set): a restarted server reads on where the last one stopped,
  and nothing is appended twice.

What the job printed after the last tick is not left out: the job's run reads its result and removes the
private dir in one exec, so before the job is settled `finish_log` appends what the result's tails hold past
the cursor (`stdout_bytes`/`stderr_bytes` say exactly how much that is).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from ansible_collections.hwledger.fleet.plugins.plugin_utils import job_log, job_log_read, ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.agents import Agent
from ansible_collections.hwledger.fleet.plugins.plugin_utils.job_log_read import LogChunk, LogRead
from ansible_collections.hwledger.fleet.plugins.plugin_utils.probe_outcome import ProbeOutcome

from hwledger.fanout import SshFanoutHeartbeat
from hwledger.store import LogCursor, Store, StoreError

log = logging.getLogger("hwledger.job_logs")

# The Ansible transport's log exec: how long it may take (it reads files; a host that does not answer by then
# is asked again at the next tick).
FETCH_DEADLINE_S = 10.0
_STREAM_NAMES = {"o": "stdout", "e": "stderr"}


def note(text: str) -> tuple[str, bytes]:
    return "note", text.encode("utf-8")


def apply_chunks(cursor: LogCursor, chunks: Sequence[LogChunk]) -> tuple[list[tuple[str, bytes]], LogCursor]:
    """What `chunks` (one exec's answer for one job, in order) add to the job's log, and the cursor after
    them. Pure: the store writes both in one transaction (`Store.append_job_log`)."""
    entries: list[tuple[str, bytes]] = []
    positions = {"o": cursor.stdout_pos, "e": cursor.stderr_pos}
    generation, offset = cursor.generation, cursor.offset
    at_file_end = False
    for index, chunk in enumerate(chunks):
        if chunk.kind != "data" or chunk.generation is None:
            continue  # gone (the run ended), none (no log yet: an older runner logs nothing), bad (rotating)
        same_file = chunk.generation == generation and chunk.offset == offset
        # A newer file: the first chunk when the asked one was rotated away, or the second once the first
        # was read to its end.
        newer = chunk.generation > generation and chunk.offset == 0 and (index == 0 or at_file_end)
        if not (same_file or newer):
            continue  # read from a position that is not current: stale
        if same_file and chunk.size < offset:
            entries.append(note(f"the job's log file {chunk.generation} on the host shrank below what was read of "
                                f"it ({offset} > {chunk.size} bytes): it was truncated or replaced; it is read again "
                                "from its start, and what was already shown is not shown twice"))
            offset = 0
            break
        records, consumed, damaged = job_log.parse_records(chunk.data)
        for record in records:
            _take(record, positions, entries)
        generation, offset = chunk.generation, chunk.offset + consumed
        at_file_end = offset >= chunk.size
        if damaged:
            entries.append(note(f"the job's log file {chunk.generation} on the host is damaged at byte {offset} (it "
                                "holds something other than hwledger's records); the rest of that file is skipped"))
            generation, offset = generation + 1, 0
            break
    return _merged(entries), replace(cursor, generation=generation, offset=offset, stdout_pos=positions["o"],
                                     stderr_pos=positions["e"])


def _take(record: job_log.Record, positions: dict[str, int], entries: list[tuple[str, bytes]]) -> None:
    if record.stream == "n":
        entries.append(note("the job's runner on the host: " + record.data.decode("utf-8", "replace")))
        return
    have = positions[record.stream]
    end = record.position + len(record.data)
    if end <= have:
        return  # already in hand
    name = _STREAM_NAMES[record.stream]
    if record.position > have:
        entries.append(note(f"{record.position - have} bytes of {name} were lost here: the job printed faster than "
                            f"the heartbeat reads its log ({2 * job_log_read.READ_BYTES // 1024} KiB per tick), and "
                            "the log on the host rotated before they were read"))
    entries.append((name, record.data[max(0, have - record.position):]))
    positions[record.stream] = end


def _merged(entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Consecutive bytes of one stream as one entry (one row)."""
    merged: list[tuple[str, bytes]] = []
    for stream, data in entries:
        if merged and stream != "note" and merged[-1][0] == stream:
            merged[-1] = (stream, merged[-1][1] + data)
        else:
            merged.append((stream, data))
    return merged


def finish_log(store: Store, job_id: str, result: Mapping) -> bool:
    """Append what a finished job's result holds of its output past what the heartbeats read (called before
    the job's terminal state is committed, so a follower that sees the state has seen all of it). True when
    the log grew. The tail after the last tick is in stdout-then-stderr order (the result keeps no
    interleaving); bytes neither read nor in the tails are said as lost."""
    for _attempt in range(3):  # a tick that appended meanwhile moved the cursor: compute again from it
        stored = store.job_log_cursor(job_id)
        job = store.get_job(job_id)
        if job is None:
            return False
        remote_dir = job.remote_dir or (stored.remote_dir if stored else "")
        start = stored if stored is not None and stored.remote_dir == remote_dir else LogCursor(remote_dir)
        entries: list[tuple[str, bytes]] = []
        positions = {}
        for key, name, have in (("o", "stdout", start.stdout_pos), ("e", "stderr", start.stderr_pos)):
            total = result.get(f"{name}_bytes")
            tail = str(result.get(f"{name}_tail") or "").encode("utf-8", "replace")
            if not isinstance(total, int) or isinstance(total, bool) or total <= have:
                positions[key] = have
                continue
            missing = total - have
            if missing > len(tail):
                entries.append(note(f"{missing - len(tail)} bytes of {name} were not read before the job ended "
                                    f"(they are not in its result's last {len(tail)} bytes either)"))
                missing = len(tail)
            if missing:
                entries.append((name, tail[len(tail) - missing:]))
            positions[key] = total
        if not entries:
            return False
        cursor = replace(start, stdout_pos=positions["o"], stderr_pos=positions["e"])
        if store.append_job_log(job_id, stored, cursor, entries):
            return True
    return False


class LogFollower:
    """The serve loop's part: `reads` before the heartbeat, `record` after it (the loop's thread only)."""

    def __init__(self, policy: ssh.SshPolicy | None, *, fetch_deadline_s: float = FETCH_DEADLINE_S):
        self.policy = policy
        self.fetch_deadline_s = fetch_deadline_s
        self._fetcher: SshFanoutHeartbeat | None = None
        self._refused: set[str] = set()  # jobs whose recorded dir is refused (said once)

    def close(self) -> None:
        """Stop the Ansible transport's log execs still in flight (their masters expire on their own)."""
        if self._fetcher is not None:
            self._fetcher.stop_in_flight()

    def reads(self, store: Store, agents: Iterable[str]) -> dict[str, list[LogRead]]:
        """{agent: the reads of its running jobs} for the agents asked this tick (at most MAX_READS each,
        the oldest jobs first; the others wait for a later tick)."""
        wanted = set(agents)
        plan: dict[str, list[LogRead]] = {}
        for running in store.running_job_logs():
            if running.agent not in wanted or len(plan.get(running.agent, ())) >= job_log_read.MAX_READS:
                continue
            cursor = running.cursor
            if cursor is None or cursor.remote_dir != running.remote_dir:
                cursor = LogCursor(running.remote_dir)  # first read, or a new attempt in a new private dir
            read = LogRead(running.job_id, running.remote_dir, cursor.generation, cursor.offset)
            try:
                job_log_read.check_read(read)
            except ValueError as exc:
                if running.job_id not in self._refused:
                    self._refused.add(running.job_id)
                    log.warning("job %s: its log is not read: %s", running.job_id, exc)
                continue
            plan.setdefault(running.agent, []).append(read)
        return plan

    def record(self, store: Store, outcomes: Mapping[str, ProbeOutcome], reads: Mapping[str, Sequence[LogRead]],
               *, agents: Mapping[str, Agent], same_exec: bool, cancel: Callable[[], bool]) -> int:
        """Append what the tick's execs read; without `same_exec` (a transport that cannot read logs in its
        heartbeat), read them first with one exec per answering host (`fetch`). Returns how many jobs' logs
        grew. Never fails the tick: a problem is logged, and the next tick reads again from the cursor."""
        try:
            if not same_exec:
                answered = {name: found for name, found in reads.items()
                            if found and name in agents and name in outcomes and outcomes[name].ok}
                outcomes = self.fetch([agents[name] for name in answered], answered, cancel=cancel)
            grown = 0
            for outcome in outcomes.values():
                by_job: dict[str, list[LogChunk]] = {}
                for chunk in outcome.job_logs:
                    by_job.setdefault(chunk.job_id, []).append(chunk)
                for job_id, chunks in by_job.items():
                    grown += self.record_chunks(store, job_id, chunks)
            return grown
        except (StoreError, OSError, ValueError) as exc:
            log.warning("job logs were not recorded this tick (read again at the next): %s", exc)
            return 0

    @staticmethod
    def record_chunks(store: Store, job_id: str, chunks: Sequence[LogChunk]) -> int:
        """Apply one job's chunks at its current cursor; 1 when its log (or cursor) moved."""
        job = store.get_job(job_id)
        if job is None or not chunks or job.remote_dir != chunks[0].remote_dir:
            return 0  # pruned, or read from an earlier attempt's dir
        stored = store.job_log_cursor(job_id)
        start = stored if stored is not None and stored.remote_dir == job.remote_dir else LogCursor(job.remote_dir)
        entries, cursor = apply_chunks(start, chunks)
        if stored is not None and stored.remote_dir != job.remote_dir:
            entries.insert(0, note("the job was started again, in a new private dir on the host; its output "
                                   "from here on is that of the new attempt"))
        if not entries and cursor == start:
            return 0
        return 1 if store.append_job_log(job_id, stored, cursor, entries) else 0

    def fetch(self, agents: Sequence[Agent], reads: Mapping[str, Sequence[LogRead]], *,
              cancel: Callable[[], bool]) -> dict[str, ProbeOutcome]:
        """One exec per host over its ssh master: a liveness probe without host metrics, with the log reads
        (the fan-out's machinery: bounded output, a deadline, nothing left running when it returns)."""
        if not agents or self.policy is None:
            return {}
        if self._fetcher is None:
            self._fetcher = SshFanoutHeartbeat(self.policy, host_metrics=False, deadline_s=self.fetch_deadline_s)
        return self._fetcher.tick(agents, cancel=cancel, liveness={agent.name for agent in agents},
                                  log_reads=reads, budget_s=None)
