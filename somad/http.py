"""The ``/metrics`` and ``/healthz`` HTTP server (loopback by default, on its own port).

- ``/metrics``: the registry in Prometheus text format, served by client_python's own WSGI
  app (content negotiation for OpenMetrics, gzip, ``name[]`` filters, exactly as the client does);
- ``/healthz``: ``200 {"status": "ok", "streams": {...}}`` when every stream is alive and not
  wedged, ``503`` with ``"status": "unhealthy"`` otherwise; the per-stream dicts come from
  the ``health`` callable the daemon passes in (each must hold ``alive``, and may hold
  ``wedged``; it is called from the request's thread, so it must be thread-safe);
- 404 anywhere else. Requests are not logged (a scrape every 15 s is not news).

>>> parse_listen("127.0.0.1:9464"), parse_listen("[::1]:0"), parse_listen(":9100")
(('127.0.0.1', 9464), ('::1', 0), ('0.0.0.0', 9100))
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app

from adapters.addresses import parse_listen as parse_address

DEFAULT_LISTEN = "127.0.0.1:9464"  # loopback: expose on purpose, not by accident
REQUEST_TIMEOUT_S = 10.0  # a client that stalls mid-request loses its connection after this

log = structlog.get_logger("somad.http")

HealthFn = Callable[[], Mapping[str, Mapping]]


def parse_listen(listen: str, key: str = "metrics.listen") -> tuple[str, int]:
    """The shared listen-address rules (``adapters.addresses``), errors naming ``key``;
    an empty host (``:PORT``) means every IPv4 interface."""
    try:
        host, port = parse_address(listen)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return host or "0.0.0.0", port


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format, *args):
        """No per-request lines on stderr."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scraper never holds up shutdown
    allow_reuse_address = True  # restart on the same port without waiting for TIME_WAIT

    def handle_error(self, request, client_address):
        """A client that hangs up mid-response is not a fault of ours; anything else is logged once."""
        exc = sys.exc_info()[1]  # socketserver calls this from inside its except block
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        log.warning("http request failed", client=client_address[0], exc_info=exc)


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves ``registry`` and ``health()`` on ``listen`` (``DEFAULT_LISTEN`` is the config's
    default). ``start()`` binds (port 0: any free port, read it back from ``port``) and raises
    ``OSError`` naming the address when it cannot; ``stop()`` closes the socket, idempotent."""

    def __init__(self, listen: str, registry: CollectorRegistry, health: HealthFn):
        self.listen = listen
        self.host, self._requested_port = parse_listen(listen)
        self._health = health
        self._metrics_app = make_wsgi_app(registry)
        self._server: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return self._server.server_address[1]

    @property
    def address(self) -> str:
        """The bound ``host:port`` (the real port when ``listen`` asked for port 0)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{self.address}{path}"

    def start(self) -> None:
        if self._server is not None:
            return
        server_class = _ThreadingServer6 if _is_ipv6(self.host) else _ThreadingServer
        try:
            server = server_class((self.host, self._requested_port), _QuietHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve /metrics on {self.listen!r}: {exc.strerror or exc}") from exc
        server.set_app(self._route)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="somad-http", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()  # returns once serve_forever has left its loop
        server.server_close()
        if thread is not None:
            thread.join(timeout)

    # ------------------------------------------------------------------ WSGI

    def _route(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            return self._healthz(environ, start_response)
        return _reply(start_response, "404 Not Found", b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

    def _healthz(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"use GET\n", "text/plain; charset=utf-8", [("Allow", "GET, HEAD")])
        status, report = health_report(self._health)
        body = json.dumps(report, default=str, sort_keys=True).encode() + b"\n"
        reply = _reply(start_response, status, body, "application/json", [("Cache-Control", "no-store")])
        return [b""] if method == "HEAD" else reply  # HEAD: the GET's headers, no body


def health_report(health: HealthFn) -> tuple[str, dict]:
    """(HTTP status, JSON body) for ``/healthz``: ok only when every stream says ``alive`` and
    none says ``wedged`` (a worker stuck inside a step: alive, but learning nothing).

    >>> health_report(lambda: {"a": {"alive": True}})
    ('200 OK', {'status': 'ok', 'streams': {'a': {'alive': True}}})
    >>> health_report(lambda: {"a": {"alive": True}, "b": {"alive": False}})[0]
    '503 Service Unavailable'
    >>> health_report(lambda: {"a": {"alive": True, "wedged": True}})[0]
    '503 Service Unavailable'
    """
    try:
        streams = {str(name): dict(info) for name, info in health().items()}
    except Exception as exc:  # a broken health callback means we cannot vouch for anything
        log.exception("health check failed")
        return "503 Service Unavailable", {"status": "error", "error": f"{type(exc).__name__}: {exc}", "streams": {}}
    healthy = all(bool(info.get("alive", False)) and not info.get("wedged", False) for info in streams.values())
    status = "200 OK" if healthy else "503 Service Unavailable"
    return status, {"status": "ok" if healthy else "unhealthy", "streams": streams}


def _reply(start_response, status: str, body: bytes, content_type: str, extra_headers=()):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra_headers])
    return [body]


def _is_ipv6(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return True
    except OSError:
        return False
