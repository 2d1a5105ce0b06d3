"""Helpers for the `serve --http` integration tests: lab hosts replaying real captures, starting a real
`hwledger fleet serve --http 127.0.0.1:0` and finding its port in its log, and plain HTTP requests."""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.fleet_support import FleetEnv, wait_for

MIB = 1048576
# A real H200 under load (tests/fixtures/gpu/SOURCES.md); its header names the columns, so the agent's
# query asks for the few fields the exporter shows.
H200_CAPTURE = "nvidia/csv-header-allfields-1xH200-linux-590.48.01-load.txt"
H200_CMD = ("nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used,memory.free,utilization.gpu,"
            "temperature.gpu,power.draw --format=csv")
H200_FREE_BYTES = 110796 * MIB  # memory.free of that capture
XSS_NAME = "<script>document.title='pwned'</script>"
XSS_STDOUT = f"0, {XSS_NAME}, 8188 MiB, 7948 MiB\n"
TOKEN = "hwl-test-token-0123456789abcdef"


def add_h200(lab, fleet_env: FleetEnv, prefix: str = "h200"):
    host = lab.add_loopback_host(lab.unique_name(prefix), capture=H200_CAPTURE)
    fleet_env.register(host, extra=("--skip-heartbeat", "--gpu-query-cmd", H200_CMD))
    return host


def add_xss(lab, fleet_env: FleetEnv, prefix: str = "xss"):
    host = lab.add_loopback_host(lab.unique_name(prefix), stdout=XSS_STDOUT)
    fleet_env.register(host)
    return host


def token_file(root: Path) -> Path:
    path = root / "http.token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    return path


def serve_http(fleet_env: FleetEnv, *args: str, token: Path | None = None) -> str:
    """Start `hwledger fleet serve --http 127.0.0.1:0 ARGS`; the base URL once it listens."""
    extra = ["--http-token-file", str(token)] if token else []
    proc = fleet_env.serve("--http", "127.0.0.1:0", *extra, *args)
    index = len(fleet_env.servers) - 1

    def listening():
        assert proc.poll() is None, fleet_env.server_log(index)
        match = re.search(r"serving (http://127\.0\.0\.1:\d+)/", fleet_env.server_log(index))
        return match.group(1) if match else None

    return wait_for(listening, timeout=60, what="serve --http to listen")


def get(url: str, *, token: str | None = None, timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, metric: str, **labels: str) -> float | None:
    found = [s.value for s in samples(text) if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())]
    return found[0] if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium_argv(chromium: str, profile: Path, *args: str) -> list[str]:
    """Headless Chromium that needs nothing but this machine: no sandbox (tests run as root), no GPU, a
    throw-away profile."""
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", *args]
