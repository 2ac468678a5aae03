"""A server per test on a tiny model: in-process (TestClient) or live on a free port (uvicorn)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.settings import ServeSettings
from tests.tiny import TINY_MODEL_ID

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def settings(tmp_path, tiny_model_dir) -> ServeSettings:
    return ServeSettings(data_dir=tmp_path / "data", model=str(tiny_model_dir), model_id=TINY_MODEL_ID,
                         admin_token=ADMIN_TOKEN, registry_poll_s=0.05, default_max_tokens=8)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def state(client):
    return client.app.state.serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread of the test process."""

    def __init__(self, settings: ServeSettings):
        import uvicorn

        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.serve


@pytest.fixture
def live_server(settings):
    with LiveServer(settings) as server:
        yield server
