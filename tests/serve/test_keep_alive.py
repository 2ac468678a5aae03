"""Idle connections: the server keeps them longer than clients do, so that the client closes first."""

from __future__ import annotations

import http.client
import time

from testkit.background_server import BackgroundServer


def test_an_idle_connection_outlives_a_clients_keep_alive(settings) -> None:
    # httpx (and so the openai client) drops an idle connection after 5 s; uvicorn's own default
    # is also 5 s, so a request sent as both expire was reset (seen once in 1,500 chats).
    assert settings.keep_alive_s > 5
    with BackgroundServer(settings) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b'{"status":"ok"}'
            sock = conn.sock
            time.sleep(6)  # idle longer than 5 s
            conn.request("GET", "/healthz")  # on the same socket: a closed one would fail here
            assert conn.getresponse().read() == b'{"status":"ok"}' and conn.sock is sock
        finally:
            conn.close()
