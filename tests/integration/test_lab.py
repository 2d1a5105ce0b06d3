"""The test lab itself, checked with the real ssh client: what other rooms' integration tests rely on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from lab import (
    DEFAULT_GPU_QUERY_CMD,
    DEFAULT_NVIDIA_STDOUT,
    FIXTURES_DIR,
    Lab,
    SshHost,
    known_hosts_line,
    lab_unavailable_reason,
    write_agents_toml,
)

pytestmark = pytest.mark.root

REPO_ROOT = Path(__file__).resolve().parents[2]


def ssh(host: SshHost, cmd: str, **kwargs) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(host.ssh_argv(cmd, **kwargs), capture_output=True, timeout=60, check=False)


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES_DIR / name).read_bytes()


def lab_traces(needle: str) -> set[int]:
    """Pids whose environment or command line mentions ``needle`` (read straight from /proc).

    Session commands carry the host marker in their environment; sshd's own processes overwrite
    theirs with a title that names the config path (listener) or the login account (connections)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            text = b" ".join(
                Path(f"/proc/{entry}/{name}").read_bytes().replace(b"\0", b" ") for name in ("environ", "cmdline")
            )
        except OSError:
            continue
        if needle.encode() in text and alive(int(entry)):
            found.add(int(entry))
    return found


def host_traces(host: SshHost) -> set[int]:
    return (
        lab_traces(f"HWLEDGER_LAB_HOST={host.marker} ")
        | lab_traces(f"{host.config_path} ")
        | lab_traces(f"sshd: {host.user}")
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def is_sleep(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0")
    except OSError:
        return False


def sleeping(host: SshHost) -> bool:
    """True once a hung fake tool of ``host`` is in its sleep (the session is fully set up)."""
    return any(is_sleep(pid) for pid in host_traces(host))


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines()}


def passwd_names() -> set[str]:
    return {line.split(":", 1)[0] for line in Path("/etc/passwd").read_text().splitlines()}


# --- loopback hosts ---------------------------------------------------------------------------------


def test_default_host_answers_the_default_query_with_real_output(fresh_host: SshHost) -> None:
    # The default output is the real 2-GPU capture of exactly this query, minus its csv header line.
    header, *rows = fixture_bytes(
        "nvidia/csv-header-index-name-memtotal-memfree-2xRTX4070Laptop-RTX5070Ti-windows.txt"
    ).splitlines(keepends=True)
    assert header.startswith(b"index, name, memory.total [MiB], memory.free [MiB]")
    assert DEFAULT_NVIDIA_STDOUT.encode() == b"".join(rows)

    result = ssh(fresh_host, DEFAULT_GPU_QUERY_CMD)

    assert (result.returncode, result.stdout, result.stderr) == (0, b"".join(rows), b"")
    assert fresh_host.tool_calls() == [DEFAULT_GPU_QUERY_CMD.removeprefix("nvidia-smi ")]
    assert fresh_host.address.startswith("127.0.") and fresh_host.address != "127.0.0.1"


def test_capture_is_replayed_byte_for_byte(fresh_host: SshHost) -> None:
    # This capture has no final newline: an exact replay must not add one.
    capture = "nvidia/csv-nounits-header-15fields-1xTeslaP100-PCIE-16GB.txt"
    assert not fixture_bytes(capture).endswith(b"\n")
    fresh_host.set_tool(capture=capture)
    fresh_host.set_tool("rocm-smi", capture="rocm/json-pretty-showproductname-1xMI250X.json")

    nvidia = ssh(fresh_host, "nvidia-smi --query-gpu=whatever --format=csv,nounits")
    rocm = ssh(fresh_host, "rocm-smi --showproductname --json")

    assert (nvidia.returncode, nvidia.stdout) == (0, fixture_bytes(capture))
    assert (rocm.returncode, rocm.stdout) == (0, fixture_bytes("rocm/json-pretty-showproductname-1xMI250X.json"))


def test_exit_code_stderr_and_delay_are_replayed(fresh_host: SshHost) -> None:
    capture = "nvidia/failure-nvml-driver-library-version-mismatch.txt"  # exit code 18 per SOURCES.md
    fresh_host.set_tool(capture=capture, stderr="warning: on stderr\n", rc=18, delay=0.6)

    started = time.monotonic()
    result = ssh(fresh_host, "nvidia-smi")
    elapsed = time.monotonic() - started

    assert result.returncode == 18
    assert result.stdout == fixture_bytes(capture)
    assert result.stderr == b"warning: on stderr\n"
    assert elapsed >= 0.6


def test_hung_tool_dies_with_its_sleeper_on_sigterm(fresh_host: SshHost) -> None:
    fresh_host.set_tool(delay=600)

    started = time.monotonic()
    # --foreground: timeout(1) signals only the tool, not its process group, so the tool's own
    # SIGTERM handling has to take the sleeper down.
    result = ssh(fresh_host, "timeout --foreground 1 nvidia-smi; echo rc=$?")

    assert time.monotonic() - started < 10
    assert result.stdout == b"rc=124\n"
    # The tool's SIGTERM trap took its sleep along: nothing of the session is left, only the listener.
    assert wait_for(lambda: host_traces(fresh_host) == {fresh_host.pid}, timeout=5), host_traces(fresh_host)
    assert fresh_host.processes() == {fresh_host.pid}


def test_remote_path_has_posix_tools_but_no_python(lab: Lab, fresh_host: SshHost) -> None:
    result = ssh(fresh_host, 'echo "$PATH"; command -v python3; echo "rc=$?"; python3 -c 1; echo "rc=$?"')
    assert result.stdout.decode().splitlines() == [str(fresh_host.bin_dir), "rc=127", "rc=127"], result
    tools = ssh(fresh_host, "for t in sh cat mktemp sleep timeout base64 od pkill ps sed; do command -v $t; done")
    assert tools.returncode == 0, tools.stderr
    assert len(tools.stdout.splitlines()) == 10

    with_python = lab.add_loopback_host(lab.unique_name("python"), python=True)
    try:
        found = ssh(with_python, "command -v python3 && python3 -c 'import sys; print(sys.version_info >= (3, 8))'")
        assert found.stdout.decode().splitlines() == [str(with_python.bin_dir / "python3"), "True"]
    finally:
        with_python.stop()


def test_set_tool_changes_behaviour_without_restarting_sshd(fresh_host: SshHost) -> None:
    pid = fresh_host.pid
    fresh_host.set_tool(stdout="0, Fake GPU, 1 MiB, 1 MiB\n", rc=3)
    first = ssh(fresh_host, "nvidia-smi")
    fresh_host.remove_tool()
    second = ssh(fresh_host, "nvidia-smi")
    fresh_host.set_tool()
    third = ssh(fresh_host, DEFAULT_GPU_QUERY_CMD)

    assert (first.returncode, first.stdout) == (3, b"0, Fake GPU, 1 MiB, 1 MiB\n")
    assert second.returncode == 127 and b"not found" in second.stderr
    assert (third.returncode, third.stdout) == (0, DEFAULT_NVIDIA_STDOUT.encode())
    assert fresh_host.pid == pid


def test_capture_must_be_a_fixture_file(fresh_host: SshHost) -> None:
    with pytest.raises(ValueError, match="not a file under"):
        fresh_host.set_tool(capture="../../conftest.py")
    with pytest.raises(ValueError, match="not both"):
        fresh_host.set_tool(capture="nvidia/csv-noheader-utilization-gpu-1xGPU.txt", stdout="x")


def test_rotated_host_key_fails_strict_checking_before_any_userauth(lab: Lab, fresh_host: SshHost) -> None:
    old_fingerprint = fresh_host.host_key_fingerprint
    fresh_host.rotate_host_key()
    mark = fresh_host.log_mark()

    result = ssh(fresh_host, "nvidia-smi")

    assert fresh_host.host_key_fingerprint != old_fingerprint
    assert result.returncode == 255
    assert b"Host key verification failed" in result.stderr
    assert fresh_host.tool_calls() == []
    log = fresh_host.log_text(since=mark)
    assert "Connection from" in log  # the attempt reached this sshd ...
    assert "publickey" not in log and "Accepted" not in log  # ... and stopped before authentication

    lab.trust(fresh_host)
    assert ssh(fresh_host, "nvidia-smi").returncode == 0


def test_host_key_fingerprint_and_known_hosts_line(tmp_path: Path, fresh_host: SshHost) -> None:
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{fresh_host.host_key_path}.pub"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed[1] == fresh_host.host_key_fingerprint

    known = tmp_path / "known_hosts"
    known.write_text(known_hosts_line("my-alias", fresh_host) + "\n")
    result = ssh(fresh_host, "true", known_hosts=known)
    assert result.returncode == 255  # pinned under an alias, the address itself is unknown
    argv = fresh_host.ssh_argv("true", known_hosts=known)
    argv[1:1] = ["-o", "HostKeyAlias=my-alias"]
    assert subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


def test_stop_and_start_keep_address_port_and_key(fresh_host: SshHost) -> None:
    before = (fresh_host.address, fresh_host.port, fresh_host.host_key_pub)
    old_pid = fresh_host.pid
    fresh_host.stop()

    down = ssh(fresh_host, "true")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((fresh_host.address, fresh_host.port), timeout=2).close()
    fresh_host.start()
    up = ssh(fresh_host, "true")

    assert down.returncode == 255
    assert not alive(old_pid)
    assert up.returncode == 0
    assert (fresh_host.address, fresh_host.port, fresh_host.host_key_pub) == before


def test_many_sessions_at_once(fresh_host: SshHost) -> None:
    procs = [subprocess.Popen(fresh_host.ssh_argv("nvidia-smi"), stdout=subprocess.PIPE) for _session in range(12)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 12
    assert set(outputs) == {DEFAULT_NVIDIA_STDOUT.encode()}


# --- bastion pair -----------------------------------------------------------------------------------


def test_bastion_is_reachable_from_the_controller(bastion_pair: tuple[SshHost, SshHost]) -> None:
    bastion, _internal = bastion_pair
    result = ssh(bastion, "echo $SSH_CONNECTION")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[2:] == [bastion.address.encode(), str(bastion.port).encode()]


def test_internal_host_is_unreachable_from_the_controller(bastion_pair: tuple[SshHost, SshHost]) -> None:
    _bastion, internal = bastion_pair
    mark = internal.log_mark()
    direct = internal.ssh_argv("true", via_bastion=False)
    direct[1:1] = ["-o", "ConnectTimeout=2"]  # the first value given wins in ssh
    assert not any("ProxyCommand" in arg for arg in direct)

    started = time.monotonic()
    result = subprocess.run(direct, capture_output=True, timeout=30, check=False)
    assert result.returncode == 255
    assert time.monotonic() - started < 10
    # A raw connect gets refused, unreachable or timed out; where the network answers every
    # connection itself (some sandboxes do), it is answered by something that is not the lab host.
    try:
        with socket.create_connection((internal.address, internal.port), timeout=2) as sock:
            sock.settimeout(2)
            sock.recv(64)
    except OSError:
        pass
    # Either way the internal sshd never saw a connection from here ...
    time.sleep(0.2)
    assert "Connection from" not in internal.log_text(since=mark)
    # ... and no route of the lab leads there: the only lab route in this namespace is the bastion's /30.
    route = subprocess.run(["ip", "route", "get", internal.address], capture_output=True, text=True, check=False).stdout
    assert "hwl-" not in route


def test_internal_host_is_reached_through_the_bastion(bastion_pair: tuple[SshHost, SshHost]) -> None:
    bastion, internal = bastion_pair
    proxy = [opt for opt in internal.ssh_options() if opt.startswith("ProxyCommand=")]
    assert len(proxy) == 1 and f"-W %h:%p {bastion.address}" in proxy[0]

    mark = internal.log_mark()
    result = ssh(internal, f"{DEFAULT_GPU_QUERY_CMD}; echo $SSH_CONNECTION")

    assert result.returncode == 0, result.stderr
    *gpus, connection = result.stdout.decode().splitlines(keepends=True)
    assert "".join(gpus) == DEFAULT_NVIDIA_STDOUT
    # The internal sshd saw the connection come from the bastion's side of their private link.
    client_address, _client_port, server_address, server_port = connection.split()
    assert server_address == internal.address and int(server_port) == internal.port
    assert client_address != bastion.address and client_address.startswith("10.232.")
    assert f"Connection from {client_address} port" in internal.log_text(since=mark)
    assert f"Accepted publickey for {internal.user}" in internal.log_text(since=mark)
    assert internal.bastion is bastion and bastion.bastion is None


def test_bastion_does_not_forward_packets(bastion_pair: tuple[SshHost, SshHost]) -> None:
    bastion, internal = bastion_pair
    for ns in (bastion.netns, internal.netns):
        value = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_forward"], capture_output=True, text=True,
            check=False,
        ).stdout
        assert value.strip() == "0", ns


def test_agent_entries_round_trip_through_toml(tmp_path: Path, bastion_pair: tuple[SshHost, SshHost]) -> None:
    bastion, internal = bastion_pair
    entry = internal.agent_entry(gpu_query_cmd="rocm-smi --showmeminfo vram --csv", note='a "{{ x }}"\n')
    path = write_agents_toml(tmp_path / "ssh-agents.toml", [entry, bastion.agent_entry(gpu_query_cmd=None)])

    assert path.stat().st_mode & 0o777 == 0o600
    loaded = tomllib.loads(path.read_text())["agents"]
    assert loaded[0] == {
        "name": internal.name,
        "hostname": internal.address,
        "ssh_user": internal.user,
        "ssh_key_path": str(internal.lab.client_key),
        "ssh_port": internal.port,
        "gpu_query_cmd": "rocm-smi --showmeminfo vram --csv",
        "note": 'a "{{ x }}"\n',
        "bastion": {
            "hostname": bastion.address,
            "ssh_user": bastion.user,
            "ssh_key_path": str(internal.lab.client_key),
            "ssh_port": bastion.port,
        },
    }
    assert "gpu_query_cmd" not in loaded[1] and "bastion" not in loaded[1]


# --- teardown ---------------------------------------------------------------------------------------


def test_lab_stop_leaves_no_process_namespace_or_account(tmp_path: Path) -> None:
    own = Lab(tmp_path / "lab")
    host = own.add_loopback_host("solo", delay=600)
    bastion, internal = own.add_bastion_pair("pair", delay=600)
    # Sessions in flight (hung tools) on a loopback host and behind the bastion.
    clients = [subprocess.Popen(h.ssh_argv("nvidia-smi"), stdout=subprocess.DEVNULL) for h in (host, internal)]
    assert wait_for(lambda: all(sleeping(h) for h in (host, internal)))
    pids = set().union(*(h.processes() for h in (host, bastion, internal)))
    assert {host.pid, bastion.pid, internal.pid} <= pids
    assert set().union(*(host_traces(h) for h in (host, bastion, internal))) == pids
    users = {h.user for h in (host, bastion, internal)}
    lab_namespaces = {bastion.netns, internal.netns}
    assert lab_namespaces <= namespaces() and users <= passwd_names()

    own.stop()

    assert [pid for pid in pids if alive(pid)] == []
    assert lab_traces(f"HWLEDGER_LAB_HOST={own.id}:") == set()
    assert lab_traces(str(own.root)) - {c.pid for c in clients} == set()  # clients name the key path
    assert not lab_namespaces & namespaces()
    assert not {name for name in links() if name.startswith(f"hwl-{own.id}")}
    assert not users & passwd_names()
    for client in clients:  # their sessions are gone, so the clients end too
        assert client.wait(timeout=10) == 255
    own.stop()  # idempotent


def test_unprivileged_lab_logs_in_without_root_and_leaves_nothing(tmp_path: Path) -> None:
    """Lab(root, unprivileged=True), the demo's lab: ordinary accounts, and the tools still work, even when
    the lab's files are written under a strict umask (what the login must read is chmod-ed explicitly)."""
    own = Lab(tmp_path / "lab", unprivileged=True)
    try:
        previous = os.umask(0o077)
        try:
            host = own.add_loopback_host("plain", python=True)
            host.set_tool("nvidia-smi")  # a second behaviour version, written under the same umask
        finally:
            os.umask(previous)
        result = ssh(host, "id -u; pwd; nvidia-smi --query-gpu=index --format=csv,noheader >/dev/null && echo tool; "
                           "touch ~/written && echo home; python3 -c 'print(2 + 2)'")
        uid, cwd, tool, home, python = result.stdout.decode().split()
        assert result.returncode == 0, result.stderr
        assert int(uid) != 0 and int(uid) == host.home.stat().st_uid
        assert (cwd, tool, home, python) == (str(host.home), "tool", "home", "4")
        assert host.tool_calls() == ["--query-gpu=index --format=csv,noheader"]
        # The login reaches its own directories only: not the lab's private root with the client key.
        assert ssh(host, f"cat {own.client_key}").returncode != 0
        remote_root, user = own.remote_root, host.user
        assert remote_root is not None and host.home.is_relative_to(remote_root)
    finally:
        own.stop()
    assert not remote_root.exists()
    assert user not in passwd_names()
    assert lab_traces(f"HWLEDGER_LAB_HOST={own.id}:") == set()


def test_new_lab_removes_what_a_crashed_lab_left(tmp_path: Path) -> None:
    crash = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from lab import Lab
        import subprocess, time
        lab = Lab(Path(sys.argv[1]))
        host = lab.add_loopback_host("left", delay=600)
        bastion, internal = lab.add_bastion_pair("left-pair", delay=600)
        # Hung queries in flight, so sessions outlive this process.
        for h in (host, internal):
            subprocess.Popen(h.ssh_argv("nvidia-smi"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while not (host.tool_calls() and internal.tool_calls()):
            time.sleep(0.05)
        print(lab.id, bastion.netns, internal.netns, bastion.user, flush=True)
        os._exit(0)  # no atexit, no teardown: as if the test run was killed
        """)
    out = subprocess.run(
        [sys.executable, "-c", crash, str(tmp_path / "crashed")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    crashed_id, bastion_ns, internal_ns, user = out
    assert {bastion_ns, internal_ns} <= namespaces() and user in passwd_names()
    marker = f"HWLEDGER_LAB_HOST={crashed_id}:"
    assert wait_for(lambda: len([pid for pid in lab_traces(marker) if is_sleep(pid)]) == 2), "hung sessions gone?"

    Lab(tmp_path / "next").stop()

    assert lab_traces(f"HWLEDGER_LAB_HOST={crashed_id}:") == set()
    assert lab_traces(f"sshd: hwl-{crashed_id}-") == set()
    # The orphaned ssh clients end once their sessions are gone.
    assert wait_for(lambda: not lab_traces(str(tmp_path / "crashed"))), lab_traces(str(tmp_path / "crashed"))

    assert not {bastion_ns, internal_ns} & namespaces()
    assert not {name for name in links() if name.startswith(f"hwl-{crashed_id}")}
    assert not {name for name in passwd_names() if name.startswith(f"hwl-{crashed_id}")}
    assert not Path(f"/run/hwledger-lab/{crashed_id}.json").exists()


def test_lab_reports_why_it_cannot_run() -> None:
    # Here (root, sshd installed) there is nothing to report; the message for a non-root run is
    # checked by asking for it with a fake uid.
    assert lab_unavailable_reason() is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "geteuid", lambda: 1000)
        assert "needs root" in (lab_unavailable_reason() or "")
