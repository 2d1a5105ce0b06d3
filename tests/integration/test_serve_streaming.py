"""A serve tick writes each host's heartbeat to the store as it comes in (real sshd, real SQLite).

Issue 6: a host that hangs must not hold back the other hosts' snapshots until the tick's deadline.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from hwledger.fanout import SshFanoutHeartbeat
from hwledger.server import Server
from hwledger.store import Store
from lab import Lab, SshHost
from lab.pinning import pinned_fleet

# The hung host's tool is killed on its host then; the tick lasts until about then. Below serve's interval
# (5 s): a host still out at the interval is left to a later tick, and this one would end without it.
QUERY_TIMEOUT_S = 4


def test_answers_are_recorded_while_a_hung_host_holds_the_tick(lab: Lab, tmp_path: Path, fresh_host: SshHost):
    hung = lab.add_loopback_host(lab.unique_name("hung"), delay=60)
    data = Path(tempfile.mkdtemp(prefix="hwls-", dir="/tmp"))  # the control dir lives below the store
    try:
        fleet = pinned_fleet(tmp_path, data, [fresh_host, hung])
        transport = SshFanoutHeartbeat(fleet.policy(), query_timeout_s=QUERY_TIMEOUT_S)
        server = Server(fleet, transport=transport)
        seen: list[float] = []
        ticking = threading.Event()
        ticking.set()

        def watch(started: float) -> None:  # a second connection, as `hwledger fleet status` has
            with Store.open(fleet.db) as store:
                while ticking.is_set() and not seen:
                    if store.latest_snapshot(fresh_host.name) is not None:
                        seen.append(time.monotonic() - started)
                    time.sleep(0.05)

        try:
            started = time.monotonic()
            watcher = threading.Thread(target=watch, args=(started,))
            watcher.start()
            report = server.tick()
            tick_s = time.monotonic() - started
            ticking.clear()
            watcher.join(10)
        finally:
            ticking.clear()
            server.close()
            transport.close(exit_masters=True)
        seen_at = seen[0] if seen else None
        assert seen_at is not None, "the answering host's snapshot only appeared after the tick ended"
        # Recorded while the hung host still held the tick: well under a second normally (a new connection),
        # 4 s if it had waited for the tick's end; the bound (3 s) is far from both.
        assert seen_at < QUERY_TIMEOUT_S - 1, (seen_at, tick_s)
        assert tick_s >= QUERY_TIMEOUT_S  # the hung host really held the tick open meanwhile
        assert report.outcomes[hung.name].reason == "timeout"
        assert report.outcomes[fresh_host.name].ok
        with Store.open(fleet.db) as store:
            rows = {row.name: row for row in store.list_agents()}
        assert rows[fresh_host.name].state == "online" and rows[hung.name].state == "error"
        # Each outcome was recorded once: the hung host's late one at the end, the other one early.
        assert sorted(change.agent for change in report.changes) == sorted([fresh_host.name, hung.name])
    finally:
        hung.stop()
        shutil.rmtree(data, ignore_errors=True)
