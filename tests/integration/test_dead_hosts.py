"""Dead hosts never slow the healthy ones (reliability audit, case 0).

A rented box that expired, a hung sshd or a firewall that drops traffic after the handshake: its address
accepts TCP and never says a word. Each attempt to reach it costs `ConnectTimeout`. Before, every tick
waited for those attempts (40 dead hosts, 16 new connections at a time, 10 s each: 30 s ticks), so the
healthy agents were heard every 30 s instead of every 5 s, and the dead ones were dialled forever.
Now a tick waits for new connections only within its budget (the interval), an attempt in flight is not
started again, and an offline agent is dialled again only after its backoff.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from datetime import datetime, timezone

from ansible_collections.hwledger.fleet.plugins.plugin_utils import ssh
from ansible_collections.hwledger.fleet.plugins.plugin_utils.processes import mentioning

from hwledger.cli import main
from hwledger.fanout import SshFanoutHeartbeat
from hwledger.heartbeat import BACKOFF_FIRST_S
from hwledger.server import Server
from hwledger.store import parse_time
from lab import write_agents_toml
from lab.pinning import pinned_fleet

HEALTHY = 10
SILENT = 100
CONNECT_TIMEOUT_S = 3  # each attempt on a silent host ends after this (the product's default is 10)


class SilentListeners:
    """`count` TCP listeners on 127.0.x.y:`port` that accept connections (the kernel completes the
    handshake) and never send a byte."""

    def __init__(self, count: int, port: int) -> None:
        self.sockets: list[socket.socket] = []
        while len(self.sockets) < count:
            address = f"127.0.{200 + secrets.randbelow(50)}.{1 + secrets.randbelow(254)}"
            sock = socket.socket()
            try:
                sock.bind((address, port))
            except OSError:  # taken (another test run, or one of ours)
                sock.close()
                continue
            sock.listen(16)
            self.sockets.append(sock)

    @property
    def addresses(self) -> list[str]:
        return [sock.getsockname()[0] for sock in self.sockets]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_silent_hosts_never_hold_a_tick_and_back_off(lab, tmp_path, capsys, monkeypatch):
    healthy = [lab.add_loopback_host(lab.unique_name("alive")) for _index in range(HEALTHY)]
    silent = SilentListeners(SILENT, lab.port)
    (tmp_path / "cfg").mkdir(mode=0o700)
    fleet = pinned_fleet(tmp_path / "cfg", tmp_path / "data", healthy)
    policy = ssh.SshPolicy(known_hosts=str(fleet.known_hosts), control_dir=str(fleet.control_dir),
                           connect_timeout=CONNECT_TIMEOUT_S)
    transport = SshFanoutHeartbeat(policy, query_timeout_s=5, max_parallel=128, max_new_connections=64)
    # An interval shorter than one attempt on a silent host: a tick that waited for them could not keep it.
    # The first tick dials the healthy hosts cold, which a loaded 2-core machine may not do within that
    # interval; it gets a long budget, since what is tested starts once their masters are up.
    server = Server(fleet, interval_s=60, transport=transport)
    healthy_names = {host.name for host in healthy}
    silent_names = {f"silent-{n}" for n in range(SILENT)}
    try:
        report = server.tick()  # the healthy hosts answer and keep their masters
        assert {name for name, outcome in report.outcomes.items() if outcome.ok} == healthy_names
        server.interval_s = 2

        entries = [host.agent_entry() for host in healthy] + [
            {"name": name, "hostname": address, "ssh_user": "nobody", "ssh_key_path": str(lab.client_key),
             "ssh_port": lab.port} for name, address in zip(sorted(silent_names), silent.addresses)]
        write_agents_toml(fleet.config, entries)

        report = server.tick()
        assert {name for name, outcome in report.outcomes.items() if outcome.ok} == healthy_names
        # The tick ended while the silent hosts' connection attempts were still in flight: they did not
        # hold it open, and they answer (with a miss) in a later tick.
        in_flight = transport.in_flight()
        assert in_flight and set(in_flight) <= silent_names

        deadline = time.monotonic() + 30 * CONNECT_TIMEOUT_S * 3  # far beyond the ~10 s this takes
        ticks = 0
        while True:
            report = server.tick()
            ticks += 1
            # Every tick hears every healthy agent, whatever the dead ones do.
            assert {name for name, outcome in report.outcomes.items() if outcome.ok} >= healthy_names
            # One attempt per silent host at a time: an attempt in flight is not started again.
            assert len(transport.in_flight()) == len(set(transport.in_flight()))
            for address in silent.addresses[:5]:
                assert len([line for line in mentioning(f"-- {address} ").values() if "[mux]" not in line]) <= 1
            with fleet.open_store() as store:
                states = {row.name: row for row in store.list_agents()}
            if all(states[name].state == "offline" for name in silent_names):
                break
            assert time.monotonic() < deadline, {name: states[name].state for name in sorted(silent_names)[:5]}
            time.sleep(0.5)
        assert all(states[name].state == "online" for name in healthy_names)
        now = datetime.now(timezone.utc)
        for name in silent_names:
            wait = (parse_time(states[name].next_attempt_at) - now).total_seconds()
            assert 0 < wait <= BACKOFF_FIRST_S, (name, wait)

        # Offline and within their backoff: not dialled at all.
        report = server.tick()
        assert not set(report.outcomes) & silent_names and transport.in_flight() == []

        # `fleet status` says when each one is tried next.
        monkeypatch.setenv("HWLEDGER_CONFIG", str(fleet.config))
        monkeypatch.setenv("HWLEDGER_KNOWN_HOSTS", str(fleet.known_hosts))
        monkeypatch.setenv("HWLEDGER_DB", str(fleet.db))
        capsys.readouterr()
        assert main(["fleet", "status", "--json"]) == 0
        items = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
        assert all(0 < items[name]["next_attempt_in_s"] <= BACKOFF_FIRST_S for name in silent_names)
        assert all(items[name]["next_attempt_in_s"] is None for name in healthy_names)
        assert main(["fleet", "status"]) == 0
        assert "offline (next try in " in capsys.readouterr().out
    finally:
        server.close()
        transport.close(exit_masters=True)
        silent.close()
        for host in healthy:
            host.stop()


def test_a_hung_gpu_tool_never_holds_the_others_cadence(lab, tmp_path):
    """A connected host whose GPU tool hangs keeps its exec until the tool's watchdog (query_timeout_s,
    here 8 s); the ticks (interval 1 s) do not wait for it: the healthy host is heard at every tick, the
    hung one is not asked again while its exec runs, and its timeout is recorded by a later tick."""
    healthy = lab.add_loopback_host(lab.unique_name("alive"))
    hung = lab.add_loopback_host(lab.unique_name("hung"))
    (tmp_path / "cfg").mkdir(mode=0o700)
    try:
        fleet = pinned_fleet(tmp_path / "cfg", tmp_path / "data", [healthy, hung])
        transport = SshFanoutHeartbeat(fleet.policy(), query_timeout_s=8)
        server = Server(fleet, interval_s=1, transport=transport)
        try:
            first = server.tick()  # both answer; their masters are up
            assert first.outcomes[healthy.name].ok and first.outcomes[hung.name].ok
            hung.set_tool(delay=3600)
            report = server.tick()
            assert set(report.outcomes) == {healthy.name} and report.outcomes[healthy.name].ok
            assert transport.in_flight() == [hung.name]  # the tick ended while the hung tool still ran
            give_up = time.monotonic() + 8 * 5  # the watchdog answers after about 8 s
            while hung.name not in report.outcomes:
                assert time.monotonic() < give_up, "the hung host's exec was never reported"
                time.sleep(0.3)
                report = server.tick()
                assert report.outcomes[healthy.name].ok  # every tick hears the healthy host
            assert report.outcomes[hung.name].reason == "timeout"
            assert len(hung.tool_calls()) == 2  # the first tick's run and the hung one: no run in between
            with fleet.open_store() as store:
                assert store.get_agent(hung.name).state == "error"
        finally:
            server.close()
            transport.close(exit_masters=True)
    finally:
        healthy.stop()
        hung.stop()
