"""A simulated year: a store filled (straight SQL, fast) with what 365 days of a 100-agent fleet leave
behind, pruned by the real `hwledger fleet prune`, which must keep every job of the last 30 days and every
event of the last 90, refuse to delete a younger event, and give the space back.

What a year leaves (the 5 s heartbeats themselves leave no rows: snapshots are bounded per agent, and an
agent's history is one row per GPU and minute for the last hour):
- jobs: JOBS_PER_AGENT_DAY per agent and day (4-hour GPU jobs, around the clock), each with its result; one in
  BIG_OUTPUT_EVERY has both output tails full (64 KiB each, the job runner's cap), the others a few KiB;
- events: 4 state changes per job (queued, dispatched, running, final), FLAPS_PER_AGENT_DAY agent state
  changes per agent and day, and a throttled server event (tick_overrun) every hour.

The figures (rows, sizes before and after, seconds) go to tests/output/year-store.json; the README quotes
them.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from hwledger.store import AgentRecord, Store
from hwledger.store.retention import iso
from tests.integration.fleet_support import FleetEnv

pytestmark = pytest.mark.slow

AGENTS = 100
DAYS = 365
JOBS_PER_AGENT_DAY = 6
FLAPS_PER_AGENT_DAY = 4
BIG_OUTPUT_EVERY = 50
TAIL_MAX = 65536
GPUS_PER_AGENT = 8
REPO = Path(__file__).resolve().parents[2]


def _fill(db: Path, now: datetime) -> dict:
    start = now - timedelta(days=DAYS)
    jobs = AGENTS * DAYS * JOBS_PER_AGENT_DAY
    step_s = DAYS * 86400 / jobs
    conn = sqlite3.connect(db, isolation_level=None)
    # A fixture's speed-ups only: the store's own connections keep WAL and synchronous=FULL.
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.execute("CREATE TEMP TABLE seq (n INTEGER PRIMARY KEY)")
    conn.execute("WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n < ?) "
                 "INSERT INTO seq SELECT n FROM s", (max(jobs, AGENTS * DAYS * FLAPS_PER_AGENT_DAY),))
    # Jobs: created every step_s seconds across the year, round-robin over agents, ran for ~4 hours.
    conn.execute(
        """
        INSERT INTO jobs (id, agent, spec, state, created_at, updated_at, dispatched_at, started_at, finished_at,
                          attempts, timeout_s, exit_code, result)
        SELECT printf('%08x-0000-4000-8000-%012x', n, n), 'agent-' || (n % ?1),
               json_object('schema_version', 1, 'job_id', printf('%08x-0000-4000-8000-%012x', n, n),
                           'command', json_array('python3', 'train.py', '--epochs', n % 7 + 1),
                           'env', json_object('WANDB_MODE', 'offline'), 'timeout_s', 86400),
               CASE WHEN n % 97 = 0 THEN 'failed' ELSE 'succeeded' END,
               strftime('%Y-%m-%dT%H:%M:%f+00:00', ?2, '+' || (n * ?3) || ' seconds'),
               strftime('%Y-%m-%dT%H:%M:%f+00:00', ?2, '+' || (n * ?3 + 14400) || ' seconds'),
               strftime('%Y-%m-%dT%H:%M:%f+00:00', ?2, '+' || (n * ?3 + 5) || ' seconds'),
               strftime('%Y-%m-%dT%H:%M:%f+00:00', ?2, '+' || (n * ?3 + 6) || ' seconds'),
               strftime('%Y-%m-%dT%H:%M:%f+00:00', ?2, '+' || (n * ?3 + 14400) || ' seconds'),
               1, 86400, CASE WHEN n % 97 = 0 THEN 1 ELSE 0 END,
               json_object('schema_version', 1, 'state', 'succeeded', 'exit_code', 0, 'duration_s', 14394.2,
                           'stdout_tail', printf('%.*c', CASE WHEN n % ?4 = 0 THEN ?5 ELSE 1024 + n % 3072 END, 'o'),
                           'stderr_tail', printf('%.*c', CASE WHEN n % ?4 = 0 THEN ?5 ELSE 256 + n % 512 END, 'e'))
        FROM seq WHERE n < ?6
        """,
        (AGENTS, iso(start), step_s, BIG_OUTPUT_EVERY, TAIL_MAX, jobs))
    # Events are written as they happen, so their ids follow time: gathered first, then added in time order.
    conn.execute("CREATE TEMP TABLE ev (at TEXT, kind TEXT, agent TEXT, job_id TEXT, detail TEXT)")
    # Four state events per job, at its own times.
    conn.execute(
        """
        INSERT INTO ev (at, kind, agent, job_id, detail)
        SELECT CASE s.k WHEN 0 THEN j.created_at WHEN 1 THEN j.dispatched_at WHEN 2 THEN j.started_at
                        ELSE j.finished_at END,
               'job_state', j.agent, j.id,
               json_object('old', CASE s.k WHEN 0 THEN NULL WHEN 1 THEN 'queued' WHEN 2 THEN 'dispatched'
                                   ELSE 'running' END,
                           'new', CASE s.k WHEN 0 THEN 'queued' WHEN 1 THEN 'dispatched' WHEN 2 THEN 'running'
                                  ELSE j.state END)
        FROM jobs j JOIN (SELECT n AS k FROM seq WHERE n < 4) s
        """)
    flaps = AGENTS * DAYS * FLAPS_PER_AGENT_DAY
    conn.execute(
        """
        INSERT INTO ev (at, kind, agent, detail)
        SELECT strftime('%Y-%m-%dT%H:%M:%f+00:00', ?1, '+' || (n * ?2) || ' seconds'), 'agent_state',
               'agent-' || (n % ?3),
               json_object('old', CASE n % 2 WHEN 0 THEN 'online' ELSE 'stale' END,
                           'new', CASE n % 2 WHEN 0 THEN 'stale' ELSE 'online' END, 'reason', 'unreachable',
                           'msg', 'ssh: connect to host 10.0.0.1 port 22: Connection timed out')
        FROM seq WHERE n < ?4
        """, (iso(start), DAYS * 86400 / flaps, AGENTS, flaps))
    conn.execute(
        """
        INSERT INTO ev (at, kind, detail)
        SELECT strftime('%Y-%m-%dT%H:%M:%f+00:00', ?1, '+' || (n * 3600) || ' seconds'), 'tick_overrun',
               json_object('occurrences', 3, 'duration_s', 5.4, 'interval_s', 5.0, 'hosts', 100)
        FROM seq WHERE n < ?2
        """, (iso(start), DAYS * 24))
    conn.execute("INSERT INTO events (at, kind, agent, job_id, detail) SELECT * FROM ev ORDER BY at")
    # The bounded parts, at their steady size: 13 snapshots per agent and an hour of history per GPU.
    gpus = json.dumps([{"index": g, "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 85520809984,
                        "memory_free_bytes": 80000000000, "memory_used_bytes": 5520809984} for g in range(8)])
    conn.execute(
        """
        INSERT INTO snapshots (agent, recorded_at, ok, data)
        SELECT 'agent-' || (n % ?1), ?2, 1, json_object('backend', 'nvidia', 'gpus', json(?3))
        FROM seq WHERE n < ?1 * 13
        """, (AGENTS, iso(now), gpus))
    conn.execute(
        """
        INSERT OR IGNORE INTO gpu_memory_history (agent, gpu, minute, free_bytes, total_bytes)
        SELECT 'agent-' || (n % ?1), (n / ?1) % ?2, strftime('%Y-%m-%dT%H:%M', ?3, '-' || (n / (?1 * ?2)) || ' minutes'),
               80000000000, 85520809984
        FROM seq WHERE n < ?1 * ?2 * 61
        """, (AGENTS, GPUS_PER_AGENT, iso(now)))
    conn.execute("COMMIT")
    counts = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
              for table in ("jobs", "events", "snapshots", "gpu_memory_history")}
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return counts


def test_a_year_of_a_100_agent_fleet_prunes_to_its_last_month(tmp_path: Path):
    env = FleetEnv.create(tmp_path)
    now = datetime.now(timezone.utc)
    with Store.open(env.db) as store:
        for n in range(AGENTS):
            store.upsert_agent(AgentRecord(name=f"agent-{n}", hostname=f"10.0.{n // 250}.{n % 250 + 1}", port=22,
                                           ssh_user="root", key_path="/keys/fleet"))
    filled = _fill(env.db, now)
    size_before = env.db.stat().st_size
    # `prune` takes its cut when it runs, a little later than `now`: what is an hour younger than 30 / 90
    # days before `now` must all be there afterwards.
    job_bound, event_bound = iso(now - timedelta(days=30, hours=-1)), iso(now - timedelta(days=90, hours=-1))
    counting = ("SELECT count(*) FROM jobs WHERE finished_at >= ?", "SELECT count(*) FROM events WHERE at >= ?")
    with sqlite3.connect(env.db) as conn:
        young = [conn.execute(sql, (bound,)).fetchone()[0] for sql, bound in zip(counting, (job_bound, event_bound))]

    proc = env.hw("fleet", "prune", "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)

    with sqlite3.connect(env.db) as conn:
        left = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("jobs", "events", "snapshots", "gpu_memory_history")}
        assert [conn.execute(sql, (bound,)).fetchone()[0]
                for sql, bound in zip(counting, (job_bound, event_bound))] == young
        assert conn.execute("SELECT min(finished_at) FROM jobs").fetchone()[0] >= report["jobs_before"]
        assert conn.execute("SELECT min(at) FROM events").fetchone()[0] >= report["events_before"]
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events WHERE id = (SELECT min(id) FROM events)")
    assert report["jobs"] + left["jobs"] == filled["jobs"] and report["events"] + left["events"] == filled["events"]
    assert left["snapshots"] == filled["snapshots"]
    # The hour of history is kept; only minutes that aged past the hour while the test ran (a slow machine
    # takes minutes to fill and prune a year) are trimmed, as the heartbeats' own trigger would.
    assert report["history"] + left["gpu_memory_history"] == filled["gpu_memory_history"]
    aged = (datetime.now(timezone.utc) - now).total_seconds() // 60 + 1
    assert report["history"] <= aged * AGENTS * GPUS_PER_AGENT, (report["history"], aged)
    size_after = env.db.stat().st_size + (Path(f"{env.db}-wal").stat().st_size if Path(f"{env.db}-wal").exists() else 0)
    assert report["size_after"] == size_after
    assert size_after < size_before * 0.2, (size_before, size_after)

    figures = {"agents": AGENTS, "days": DAYS, "rows_before": filled, "rows_after": left,
               "size_before_bytes": size_before, "size_after_bytes": size_after, "prune_seconds": report["seconds"],
               "vacuum": report["vacuum"]}
    out = REPO / "tests" / "output"
    out.mkdir(exist_ok=True)
    (out / "year-store.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures), file=sys.stderr)
