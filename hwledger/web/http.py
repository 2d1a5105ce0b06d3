"""`hwledger fleet serve --http ADDR:PORT`: `/metrics`, `/`, `/api/fleet` and `/api/jobs`, read-only, from
the serving process and its store.

Why it is built this way:
- The standard library's ThreadingHTTPServer in a thread of its own beside the tick loop, one daemon thread
  per connection. Every answer is rendered from a read-only store connection of its own, opened for it and
  closed before the first byte goes out: a slow client never holds a read transaction (which would keep
  the write-ahead log from being checkpointed), and the loop's connection is never shared.
- Slow or many clients never delay a tick. At most MAX_CONNECTIONS are served at once; the next one gets a
  503 at once, never a queue. Every socket operation of a connection times out after CLIENT_TIMEOUT_S, so a
  client that connects and never sends, or never reads, is dropped then. An answer is rendered at most once
  per CACHE_S for each path and query, one rendering at a time, however many clients ask: rendering is
  what costs CPU the loop would miss.
- Loopback unless a bearer token guards it: binding any other address needs --http-token-file, and the
  token is compared in constant time (hmac.compare_digest). GET and HEAD only: nothing served changes
  anything.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hwledger.display import dumps, printable
from hwledger.errors import UserError
from hwledger.fleet import Fleet
from hwledger.reports import DEFAULT_STALE_AFTER_S
from hwledger.store import JOB_ACTIVE_STATES, Store
from hwledger.web import api, page
from hwledger.web.metrics import CONTENT_TYPE as METRICS_TYPE
from hwledger.web.metrics import FleetMetrics

log = logging.getLogger("hwledger.http")

MAX_CONNECTIONS = 64
CLIENT_TIMEOUT_S = 10.0
CACHE_S = 1.0
MAX_CACHED = 64
MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE_BYTES = 4096
PAGE_REFRESH_S = 5
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page needs inline CSS and inline SVG, nothing else: no script, no request anywhere.
    "Content-Security-Policy": ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
}
PATHS = ("/", "/metrics", "/api/fleet", "/api/jobs")
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class HttpOptions:
    host: str
    port: int
    token: bytes | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def parse_address(text: str) -> tuple[str, int]:
    """`ADDR:PORT` (IPv6 as `[ADDR]:PORT`; `localhost` means 127.0.0.1) -> (ip, port)."""
    where, sep, port_text = text.rpartition(":")
    if not sep or not where:
        raise UserError(f"--http {text!r}: give ADDR:PORT, e.g. 127.0.0.1:9835")
    if where.startswith("[") and where.endswith("]"):
        where = where[1:-1]
    if where == "localhost":
        where = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(where)
    except ValueError:
        raise UserError(f"--http {text!r}: {where!r} is not an IP address; give one (127.0.0.1 for this machine "
                        "only, or an address of one of its interfaces)") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UserError(f"--http {text!r}: the port must be a number from 0 to 65535 (0: any free port)")
    return str(ip), int(port_text)


def load_token(path: str) -> bytes:
    """The bearer token in `path`: a private file of ours (not readable by others), one line of at least
    MIN_TOKEN_CHARS visible ASCII characters."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UserError(f"--http-token-file {path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"--http-token-file {path}: not a regular file")
    if info.st_uid != os.geteuid():
        raise UserError(f"--http-token-file {path}: owned by uid {info.st_uid}, not by this user")
    if info.st_mode & 0o077:
        raise UserError(f"--http-token-file {path}: group or others can read it (mode {stat.S_IMODE(info.st_mode):o}); "
                        f"chmod 600 {path}")
    if info.st_size > MAX_TOKEN_FILE_BYTES:
        raise UserError(f"--http-token-file {path}: {info.st_size} bytes; a token file holds one line")
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise UserError(f"--http-token-file {path}: cannot read it ({exc.strerror})") from None
    if len(token) < MIN_TOKEN_CHARS or not all(0x21 <= byte <= 0x7E for byte in token):
        raise UserError(f"--http-token-file {path}: the token must be one line of at least {MIN_TOKEN_CHARS} visible "
                        "ASCII characters (e.g. the output of `openssl rand -hex 32`)")
    return token


def http_options(address: str, token_file: str | None) -> HttpOptions:
    host, port = parse_address(address)
    token = load_token(token_file) if token_file else None
    if token is None and not ipaddress.ip_address(host).is_loopback:
        raise UserError(f"--http {address}: {host} is reachable from other machines, and the page and the API show "
                        "the whole fleet; protect it with --http-token-file FILE (clients send `Authorization: "
                        "Bearer <token>`), or bind 127.0.0.1")
    return HttpOptions(host, port, token)


class WatchApp:
    """What is served, independent of sockets: routes, the token check, and the short-lived answer cache."""

    def __init__(self, fleet: Fleet, metrics: FleetMetrics, *, token: bytes | None, interval_s: float):
        self.fleet = fleet
        self.metrics = metrics
        self.token = token
        self.stale_after = max(DEFAULT_STALE_AFTER_S, 3 * interval_s)
        self._cache: dict[tuple[str, str], tuple[float, tuple[int, bytes, str]]] = {}
        self._cache_lock = threading.Lock()
        self._render_lock = threading.Lock()

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _space, given = (header or "").partition(" ")
        presented = given.strip().encode("utf-8", "surrogateescape")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented, self.token)

    def answer(self, path: str, query: str) -> tuple[int, bytes, str]:
        if path not in PATHS:
            return 404, f"not found; served here: {', '.join(PATHS)}\n".encode(), TEXT_TYPE
        key = (path, query)
        cached = self._cached(key)
        if cached is not None:
            return cached
        with self._render_lock:  # one rendering at a time; whoever waited finds it cached
            cached = self._cached(key)
            if cached is not None:
                return cached
            result = self._render(path, query)
            with self._cache_lock:
                if len(self._cache) >= MAX_CACHED:
                    self._cache.clear()
                self._cache[key] = (time.monotonic(), result)
            return result

    def _cached(self, key: tuple[str, str]) -> tuple[int, bytes, str] | None:
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < CACHE_S:
            return hit[1]
        return None

    def _render(self, path: str, query: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, self.metrics.render(), METRICS_TYPE
        try:
            with Store.open(self.fleet.db, read_only=True) as store:
                secrets = api.key_paths(self.fleet, store)
                if path == "/api/fleet":
                    return 200, (dumps(api.fleet_items(store, secrets, stale_after=self.stale_after)) + "\n").encode(), \
                        JSON_TYPE
                if path == "/api/jobs":
                    return 200, (dumps(api.job_items(store, secrets, query)) + "\n").encode(), JSON_TYPE
                return 200, self._page(store, secrets).encode(), HTML_TYPE
        except (api.BadRequest, ValueError) as exc:
            return 400, f"{exc}\n".encode(), TEXT_TYPE

    def _page(self, store: Store, secrets: api.Secrets) -> str:
        items = api.fleet_items(store, secrets, stale_after=self.stale_after)
        histories = {item["name"]: store.memory_history(item["name"]) for item in items}
        active = api.stored_jobs(store, secrets, states=["queued", *JOB_ACTIVE_STATES], limit=api.MAX_JOB_LIMIT)
        return page.render(items, histories, active, now=datetime.now(timezone.utc),
                           refresh_s=PAGE_REFRESH_S)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.0"  # one answer per connection: no idle keep-alive holding a slot
    server_version = "hwledger"
    sys_version = ""
    timeout = CLIENT_TIMEOUT_S  # every socket operation of this connection (StreamRequestHandler.setup)

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._respond(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head=True)

    def _respond(self, *, head: bool) -> None:
        app = self.server.app
        if not app.authorized(self.headers.get("Authorization")):
            self._send(401, b"a bearer token is required (Authorization: Bearer <token>)\n", TEXT_TYPE, head,
                       {"WWW-Authenticate": 'Bearer realm="hwledger"'})
            return
        path, _mark, query = self.path.partition("?")
        try:
            status, body, content_type = app.answer(path, query)
        except Exception:  # pylint: disable=broad-exception-caught
            log.exception("answering %s failed", printable(path, limit=100))
            status, body, content_type = 500, b"internal error; see the server log\n", TEXT_TYPE
        self._send(status, body, content_type, head)

    def _send(self, status: int, body: bytes, content_type: str, head: bool, extra: dict | None = None) -> None:
        self.send_response(status)
        for name, value in {**SECURITY_HEADERS, **(extra or {}), "Content-Type": content_type,
                            "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: object) -> None:  # pylint: disable=redefined-builtin
        # The request line is the client's text: escaped, and at debug level (a scraper every 15 s is noise).
        log.debug("http %s %s", self.client_address[0], printable(format % args, limit=300))


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never holds the process at exit
    request_queue_size = 128

    def __init__(self, options: HttpOptions, app: WatchApp):
        self.app = app
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.address_family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        super().__init__((options.host, options.port), _Handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.app.metrics.http_rejected.inc()
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.app.metrics.http_connections.inc()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        self.app.metrics.http_connections.dec()
        self.slots.release()

    def handle_error(self, request, client_address) -> None:
        # A client that timed out or went away: not the server's problem, and no traceback on stderr.
        log.debug("http connection from %s ended early", client_address[0], exc_info=True)


class WatchServer:
    """`serve`'s companion that serves HTTP (see the module's notes) and feeds the tick series of /metrics."""

    def __init__(self, options: HttpOptions, fleet: Fleet, metrics: FleetMetrics, *, interval_s: float):
        self.options = options
        self.metrics = metrics
        self.app = WatchApp(fleet, metrics, token=options.token, interval_s=interval_s)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server = _Server(self.options, self.app)
        except OSError as exc:
            raise UserError(self._bind_error(exc)) from None
        host, port = self._server.server_address[:2]
        bound = HttpOptions(host, port, self.options.token)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="hwledger-http", daemon=True)
        self._thread.start()
        log.info("serving %s (/metrics, /, /api/fleet, /api/jobs)%s", bound.url,
                 " for bearer-token holders" if self.options.token else "")

    def _bind_error(self, exc: OSError) -> str:
        where = f"--http {HttpOptions(self.options.host, self.options.port, None).url.rstrip('/')[7:]}"
        if exc.errno == errno.EADDRINUSE:
            return f"{where}: the address is in use (another process listens there); choose another port"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{where}: {self.options.host} is not an address of this machine"
        if exc.errno == errno.EACCES:
            return f"{where}: permission denied (ports below 1024 need privileges); choose a port above 1023"
        return f"{where}: cannot listen there: {exc.strerror or exc}"

    def tick_done(self, report, *, elapsed_s: float, overran: bool) -> None:
        answered = sum(1 for outcome in report.outcomes.values() if outcome.ok)
        self.metrics.tick_done(duration_s=elapsed_s, asked=report.asked, answered=answered, overran=overran)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # returns once serve_forever has noticed (within poll_interval)
            self._server.server_close()
            self._server = None
