"""One hostile host never stops the fleet being recorded (reliability audit, case 1; checklist A7).

A host whose GPU tool fails with invalid UTF-8 on stderr (`Failed to initialize NVML: \\xff\\xfe ...`,
exit 9) used to make every tick fail in the store (`surrogates not allowed`): the healthy hosts stayed
`pending` forever and no job was dispatched. Now that host goes to `error` with an escaped message and
every other host is recorded, whichever transport carries the heartbeats; `register-ssh` says what is
wrong without a traceback.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from hwledger.fanout import SshFanoutHeartbeat
from hwledger.server import Server
from lab.pinning import pinned_fleet

HOSTILE_STDERR = b"Failed to initialize NVML: \xff\xfe Unknown Error\x1b[31m\r\n"


@pytest.fixture
def short_data_dir():
    path = Path(tempfile.mkdtemp(prefix="hwlh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("transport", ["fanout", "ansible"])
def test_a_host_printing_invalid_utf8_does_not_stop_the_others(lab, tmp_path, short_data_dir, transport):
    healthy = [lab.add_loopback_host(lab.unique_name("ok")) for _index in range(3)]
    hostile = lab.add_loopback_host(lab.unique_name("nvml"))
    hostile.set_tool(stdout=b"", stderr=HOSTILE_STDERR, rc=9)
    try:
        fleet = pinned_fleet(tmp_path, short_data_dir, [*healthy, hostile])
        heartbeat = SshFanoutHeartbeat(fleet.policy(), query_timeout_s=20) if transport == "fanout" else None
        server = Server(fleet, transport=heartbeat, query_timeout_s=20)
        try:
            server.tick()
            rows = {row.name: row for row in server.store.list_agents()}
        finally:
            server.close()
        for host in healthy:
            assert rows[host.name].state == "online", rows[host.name]
        bad = rows[hostile.name]
        assert (bad.state, bad.state_reason) == ("error", "nvml_error"), bad
        # The message is kept, escaped: no surrogate, no escape sequence, the bytes shown as \\x..
        assert "NVML failed to initialize (exit status 9)" in bad.state_msg, bad.state_msg
        assert "\\xff\\xfe Unknown Error" in bad.state_msg, bad.state_msg
        bad.state_msg.encode("utf-8")  # strict: would raise on a lone surrogate
    finally:
        for host in (*healthy, hostile):
            host.stop()


def test_register_ssh_names_the_failure_without_a_traceback(lab, fleet_env):
    hostile = lab.add_loopback_host(lab.unique_name("nvml"))
    hostile.set_tool(stdout=b"", stderr=HOSTILE_STDERR, rc=9)
    try:
        proc = fleet_env.hw("fleet", "register-ssh", "--host", f"{hostile.user}@{hostile.address}:{hostile.port}",
                            "--key", str(lab.client_key), "--name", hostile.name, "--accept-new-host-key")
        status = fleet_env.hw("fleet", "status")
    finally:
        hostile.stop()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "first heartbeat failed (nvml_error)" in proc.stderr and "\\xff\\xfe Unknown" in proc.stderr, proc.stderr
    assert "\x1b" not in proc.stderr
    assert "surrogates" not in proc.stdout + proc.stderr
    # Shown on a terminal, the escape sequence the host sent is made visible, never sent raw.
    assert status.returncode == 0 and hostile.name in status.stdout, status
    assert "\x1b" not in status.stdout and "\\xff\\xfe Unknown" in status.stdout, status.stdout
