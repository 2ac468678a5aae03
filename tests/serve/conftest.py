"""A server per test on a tiny model: in-process (TestClient) or live on a free port (uvicorn)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ingest.events import decode_event
from serve.app import create_app
from serve.deps import ServeState
from serve.ledger import LedgerEntry
from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from tests.serve.ledger_fixtures import ledger, ledger_store, spawn_voter  # noqa: F401 (fixtures)
from tests.tiny import TINY_MODEL_ID

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LOCAL = ("127.0.0.1", 50000)
"""The in-process client's address: a local caller, whose identity headers the default trusts."""


@pytest.fixture
def settings(tmp_path, tiny_model_dir) -> ServeSettings:
    return ServeSettings(
        data_dir=tmp_path / "data",
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        admin_token=ADMIN_TOKEN,
        registry_poll_s=0.05,
        default_max_tokens=8,
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), client=LOCAL) as client:
        yield client


def state_of(client: TestClient) -> ServeState:
    """The ServeState behind an in-process client."""
    app: Any = client.app
    return app.state.serve


def read_topic(state, topic: str) -> list:
    """Every event on `topic` of the in-process server's bus, decoded."""
    consumer = state.bus.consumer(f"test-reader-{topic}", [topic])
    try:
        return [decode_event(r.value) for r in consumer.poll(timeout_s=0.5)]
    finally:
        consumer.close()


def sse_events(text: str) -> list:
    """The JSON chunks of a streamed reply, which must end with [DONE]."""
    lines = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def entry_of(client: TestClient, response_id: str) -> LedgerEntry:
    """The ledger's entry for a response the client's server answered."""
    found = state_of(client).ledger.lookup(response_id)
    assert found is not None, f"no ledger entry for {response_id}"
    return found


@pytest.fixture
def state(client):
    return client.app.state.serve


@pytest.fixture
def live_server(settings):
    with BackgroundServer(settings) as server:
        yield server
