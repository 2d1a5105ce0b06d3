"""The HTTP side (hwledger/web/http.py) in-process on 127.0.0.1: address and token checks, the bearer token,
headers, routes, and the connection cap answering 503 at once instead of queueing."""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from hwledger.errors import UserError
from hwledger.fleet import Fleet
from hwledger.store import Store
from hwledger.web import http
from hwledger.web.metrics import FleetMetrics

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9835", ("127.0.0.1", 9835)), ("localhost:0", ("127.0.0.1", 0)), ("[::1]:80", ("::1", 80)),
    ("0.0.0.0:9835", ("0.0.0.0", 9835)),
])
def test_addresses(text, expected):
    assert http.parse_address(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("9835", "give ADDR:PORT"), ("gpu.example.com:9835", "not an IP address"), ("127.0.0.1:99999", "port must"),
    ("127.0.0.1:http", "port must"), (":9835", "give ADDR:PORT"),
])
def test_bad_addresses_are_refused_in_words(text, message):
    with pytest.raises(UserError, match=message):
        http.parse_address(text)


def _token_file(tmp_path, content=TOKEN, mode=0o600):
    path = tmp_path / "token"
    path.write_text(content + "\n")
    os.chmod(path, mode)
    return str(path)


def test_a_non_loopback_address_needs_a_token(tmp_path):
    with pytest.raises(UserError, match="--http-token-file"):
        http.http_options("0.0.0.0:9835", None)
    assert http.http_options("0.0.0.0:9835", _token_file(tmp_path)).token == TOKEN.encode()
    assert http.http_options("127.0.0.1:9835", None).token is None


@pytest.mark.parametrize(("content", "mode", "message"), [
    (TOKEN, 0o644, "group or others can read it"), ("short", 0o600, "at least 16"),
    ("has space in the token!", 0o600, "visible ASCII"),
])
def test_bad_token_files_are_refused_in_words(tmp_path, content, mode, message):
    with pytest.raises(UserError, match=message):
        http.load_token(_token_file(tmp_path, content, mode))


def test_a_missing_token_file_is_refused_in_words(tmp_path):
    with pytest.raises(UserError, match="cannot read it"):
        http.load_token(str(tmp_path / "nope"))


@pytest.fixture
def served(fleet_store, tmp_path):
    fleet = Fleet(tmp_path / "none.toml", tmp_path / "kh", fleet_store.path)
    metrics = FleetMetrics(lambda: Store.open(fleet.db, read_only=True))
    servers = []

    def start(token=None):
        server = http.WatchServer(http.HttpOptions("127.0.0.1", 0, token), fleet, metrics, interval_s=5)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server._server.server_address[1]}"  # pylint: disable=protected-access

    yield start
    for server in servers:
        server.stop()


def _get(url, *, token=None, method="GET"):
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_routes_headers_and_methods(served):
    base = served()
    status, headers, body = _get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src" not in headers["Content-Security-Policy"] and "default-src 'none'" in headers[
        "Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Server"] == "hwledger"
    assert b'data-agent="h200"' in body
    assert _get(base + "/metrics")[2].count(b"hwledger_gpu_memory_free_bytes{") == 2
    assert _get(base + "/api/fleet")[0] == 200 and _get(base + "/api/jobs?limit=1")[0] == 200
    assert _get(base + "/api/jobs?limit=0")[0] == 400
    assert _get(base + "/etc/passwd")[0] == 404
    assert _get(base + "/", method="HEAD")[2] == b""
    assert _get(base + "/", method="POST")[0] == 501


def test_the_bearer_token_is_required_on_every_path(served):
    base = served(TOKEN.encode())
    for path in ("/", "/metrics", "/api/fleet", "/api/jobs"):
        status, headers, _body = _get(base + path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert _get(base + path, token="wrong-token-wrong-token")[0] == 401
        assert _get(base + path, token=TOKEN)[0] == 200


def test_connections_past_the_cap_get_503_at_once_and_slots_come_back(served, monkeypatch):
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 3)
    base = served()
    port = int(base.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _idle in range(3)]  # connect, never send
    try:
        time.sleep(0.5)  # accepted and holding their slots
        started = time.monotonic()
        status = _get(base + "/metrics")[0]
        assert status == 503 and time.monotonic() - started < 5  # turned away, not queued behind them
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while _get(base + "/metrics")[0] != 200:
        assert time.monotonic() < deadline, "the slots never came back"
        time.sleep(0.2)
    body = _get(base + "/metrics")[2].decode()
    rejected = re.search(r"^hwledger_http_rejected_connections_total (\S+)$", body, re.M)
    assert rejected and float(rejected.group(1)) >= 1  # that one (and any retry above while slots were freed)
