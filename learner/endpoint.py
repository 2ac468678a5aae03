"""The learner's HTTP endpoint (`kto-loop learn --port N`): `GET /metrics` and `GET /healthz`.

A standard-library HTTP server on a daemon thread: the learner has no other HTTP to do, and its
loop must not share an event loop with anything. `/healthz` says the process is alive and its
loop has not stopped; it does not turn unhealthy during a long update (the `LearnerStalled`
alert in deploy/prometheus/alerts.yml watches progress). Everything else is a 404.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serves ``registry`` on ``host:port`` (0 picks a free port; ``port`` is the bound one)."""

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, alive: Callable[[], bool] = lambda: True
    ) -> None:
        """``alive()``: False once the loop has stopped, so /healthz answers 503 while shutting down."""
        handler = type("Handler", (_Handler,), {"registry": registry, "alive": staticmethod(alive)})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="learner-metrics", daemon=True)

    def start(self) -> MetricsEndpoint:
        self._thread.start()
        logger.info("learner metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    alive: Callable[[], bool]

    def do_GET(self) -> None:  # http.server calls it by this name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self.alive()
            self._send(
                200 if ok else 503, json.dumps({"status": "ok" if ok else "stopping"}).encode(), "application/json"
            )
        else:
            self._send(404, json.dumps({"error": f"no {path}: try /metrics or /healthz"}).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # http.server's signature
        # One line per scrape would drown the learner's own log.
        logger.debug("%s " + format, self.address_string(), *args)
