"""Slow and many HTTP clients never hold back a real `hwledger fleet serve --http`'s ticks: a client that asks
for megabytes and never reads, idle connections that never send, and dozens of clients at once, while the
loop keeps heartbeating a lab host; the stuck client is dropped after the client timeout and its slot comes
back. And the hourly prune runs beside the loop from the start."""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timedelta, timezone

from hwledger.store.retention import iso
from hwledger.web.http import CLIENT_TIMEOUT_S
from tests.integration.fleet_support import wait_for
from tests.integration.watch_support import add_h200, get, serve_http, value

INTERVAL_S = 0.5


def _ticks(base: str) -> float:
    return value(get(base + "/metrics")[1].decode(), "hwledger_tick_duration_seconds_count") or 0.0


def _big_jobs(fleet_env, agent: str, count: int) -> None:
    """Finished jobs with both output tails full (64 KiB each), as the server records them: /api/jobs then
    answers megabytes, more than the kernel buffers between a server and a client that never reads."""
    with fleet_env.store() as store:
        for _job in range(count):
            job = store.submit_job(agent, {"command": ["python3", "train.py"]})
            store.transition_job(job.id, ["queued"], "dispatched")
            store.transition_job(job.id, ["dispatched"], "running")
            store.transition_job(job.id, ["running"], "succeeded",
                                 result={"stdout_tail": "o" * 65536, "stderr_tail": "e" * 65536})


def test_a_client_that_never_reads_and_many_clients_never_hold_back_the_ticks(fleet_env, lab):
    host = add_h200(lab, fleet_env)
    _big_jobs(fleet_env, host.name, 60)
    base = serve_http(fleet_env, "--interval", str(INTERVAL_S))
    port = int(base.rsplit(":", 1)[1])
    wait_for(lambda: _ticks(base) >= 2, timeout=60, what="the first ticks")

    def seen():
        with fleet_env.store() as store:
            return store.get_agent(host.name).last_seen

    wait_for(seen, timeout=60, what="the lab host's first answer")

    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", port))
    stuck.sendall(b"GET /api/jobs HTTP/1.0\r\n\r\n")  # about 8 MB, never read
    idle = [socket.create_connection(("127.0.0.1", port)) for _idle in range(16)]  # never send a byte
    seen_before = seen()
    started, ticks_before = time.monotonic(), _ticks(base)

    statuses: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for path in ("/metrics", "/", "/api/fleet", "/api/jobs?limit=5", "/metrics")[n % 2:]:
            status, _body = get(base + path, timeout=60)
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert statuses and set(statuses) == {200}, statuses

    # The loop kept ticking through it all: at least a fifth of the ticks its interval allows.
    time.sleep(2)
    elapsed, done = time.monotonic() - started, _ticks(base) - ticks_before
    assert done >= max(3, elapsed / INTERVAL_S / 5), (done, elapsed)
    assert seen() > seen_before
    text = get(base + "/metrics")[1].decode()
    assert value(text, "hwledger_http_connections") >= 2  # the stuck client still holds its slot (and this one)

    for sock in idle:
        sock.close()
    # The stuck client is dropped after the client timeout; only this request is left being served.
    wait_for(lambda: value(get(base + "/metrics")[1].decode(), "hwledger_http_connections") == 1,
             timeout=6 * CLIENT_TIMEOUT_S, what="the stuck client to be dropped")
    stuck.close()


def test_serve_prunes_old_rows_from_the_start_and_counts_them(fleet_env, lab):
    host = add_h200(lab, fleet_env)
    long_ago = iso(datetime.now(timezone.utc) - timedelta(days=120))
    recent = iso(datetime.now(timezone.utc) - timedelta(days=3))
    with fleet_env.store() as store:
        old, young = (store.submit_job(host.name, {"command": ["true"]}) for _job in range(2))
        for job, when in ((old, long_ago), (young, recent)):
            store.request_cancel(job.id)
            with store._write() as conn:  # pylint: disable=protected-access  # finished back then
                conn.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (when, job.id))
                conn.execute("INSERT INTO events (at, kind, agent) VALUES (?, 'ancient', ?)", (when, host.name))
    base = serve_http(fleet_env, "--interval", "1")

    def pruned():
        text = get(base + "/metrics")[1].decode()
        return value(text, "hwledger_pruned_rows_total", table="jobs") == 1 and text
    text = wait_for(pruned, timeout=60, what="the prune at start")
    assert value(text, "hwledger_pruned_rows_total", table="events") >= 1
    with fleet_env.store() as store:
        assert store.get_job(old.id) is None and store.get_job(young.id) is not None
        ancient = [e.at for e in store.list_events(kind="ancient")]
    assert ancient == [recent]
    assert "pruned 1 finished job(s)" in fleet_env.server_log()
