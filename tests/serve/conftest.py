"""A server per test on a tiny model: in-process (TestClient) or live on a free port (uvicorn)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

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
