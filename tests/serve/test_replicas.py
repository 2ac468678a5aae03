"""Serve replicas on one Redis registry: every replica follows the active pointer, whichever
replica (or the learner) moved it, and keeps serving while Redis is away.

Replicas poll only every POLL_S (far longer than the 2 s they must converge in), so converging
in time is the pub/sub wake-up's doing; the pointer stays the truth they re-read when woken.
The response ledger is the default for a Redis registry: the same Redis, so a rating may go to
either replica, and chat must outlive that Redis going away too.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from registry import open_registry
from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from testkit.waiting import wait_for
from tests.serve.conftest import ADMIN, ADMIN_TOKEN
from tests.services import PrivateRedis
from tests.tiny import TINY_MODEL_ID

pytestmark = pytest.mark.redis

POLL_S = 30.0
CONVERGE_S = 2.0
USER = {"X-User-Id": "ann"}
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


def _settings(tmp_path: Path, tiny_model_dir: Path, name: str, registry_url: str) -> ServeSettings:
    # Each replica has its own data_dir (its bus); registry, adapter files and ledger are shared.
    return ServeSettings(
        data_dir=tmp_path / name,
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        admin_token=ADMIN_TOKEN,
        default_max_tokens=8,
        replica=name,
        registry_poll_s=POLL_S,
        registry_url=registry_url,
        adapter_dir=tmp_path / "shared-adapters",
    )


def _serving(server: BackgroundServer) -> str:
    """What a new request gets on this replica, as /v1/models reports it."""
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    return models[0]["serving"]


def _seconds_to_converge(replicas: list[BackgroundServer], expected: str, since: float) -> float:
    """Seconds from `since` until every replica serves `expected` (polled; fails after 15 s)."""
    pending = list(replicas)

    def converged() -> bool:
        pending[:] = [r for r in pending if _serving(r) != expected]
        return not pending

    names = [r.state.settings.replica for r in replicas]
    wait_for(converged, what=f"{names} serving {expected}", timeout_s=since + 15.0 - time.monotonic(), interval_s=0.02)
    return time.monotonic() - since


def _publish(server: BackgroundServer, adapter_dir: Path) -> str:
    return server.state.registry.publish(
        adapter_dir, base_model=TINY_MODEL_ID, parent=None, metrics={}, lineage={}
    ).version


def _chat(server: BackgroundServer) -> dict:
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=HELLO, headers=USER, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _chat_model(server: BackgroundServer) -> str:
    return _chat(server)["model"]


def _rate(server: BackgroundServer, response_id: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/feedback", json={"response_id": response_id, "label": "up"}, headers=USER, timeout=30
    )


def test_two_replicas_converge_on_activate_and_rollback(services, tmp_path, tiny_model_dir, make_adapter):
    url = f"{services.registry_url}?prefix=replicas:{uuid.uuid4().hex}:"
    with (
        BackgroundServer(_settings(tmp_path, tiny_model_dir, "replica-a", url)) as a,
        BackgroundServer(_settings(tmp_path, tiny_model_dir, "replica-b", url)) as b,
    ):
        v1, v2 = _publish(a, make_adapter(1)), _publish(b, make_adapter(2))
        took = {}
        for step, (replica, path, expected) in {
            "activate v1 on A": (a, f"/v1/adapters/{v1}/activate", v1),
            "activate v2 on A": (a, f"/v1/adapters/{v2}/activate", v2),
            "roll back on B": (b, "/v1/adapters/rollback", v1),
            "roll back on B to the base": (b, "/v1/adapters/rollback", TINY_MODEL_ID),
        }.items():
            reply = httpx.post(f"{replica.url}{path}", headers=ADMIN, json={}, timeout=30)
            assert reply.status_code == 200, reply.text
            took[step] = _seconds_to_converge([a, b], expected, since=time.monotonic())
        assert max(took.values()) <= CONVERGE_S, took
        assert _chat_model(a) == _chat_model(b) == TINY_MODEL_ID
        answered_by_a = _chat(a)["id"]
        assert _rate(b, answered_by_a).status_code == 202  # the ledger is shared
        history = httpx.get(f"{b.url}/v1/adapters/history", headers=ADMIN, timeout=10).json()
        assert [(h["action"], h["version"], h["actor"]) for h in history["history"]] == [
            ("activate", v1, "admin"),
            ("activate", v2, "admin"),
            ("rollback", v1, "admin"),
            ("rollback", None, "admin"),
        ]


def test_replica_keeps_serving_through_a_redis_restart(tmp_path, tiny_model_dir, make_adapter):
    redis_server = PrivateRedis(tmp_path / "redis")
    url = f"{redis_server.url}?prefix=restart:"
    learner = None
    try:
        with BackgroundServer(_settings(tmp_path, tiny_model_dir, "replica-a", url)) as a:
            v1, v2 = _publish(a, make_adapter(1)), _publish(a, make_adapter(2))
            reply = httpx.post(f"{a.url}/v1/adapters/{v1}/activate", headers=ADMIN, timeout=30)
            assert reply.status_code == 200 and reply.json()["serving"] == v1

            redis_server.stop()
            during = [_chat(a) for _ in range(3)]  # chat needs neither registry nor ledger: same version, no 5xx
            assert {answer["model"] for answer in during} == {v1}
            unreachable = _rate(a, during[0]["id"])  # its ledger entry is still waiting: "try again"
            assert unreachable.status_code == 503 and "retry-after" in unreachable.headers
            ready = httpx.get(f"{a.url}/readyz", timeout=10)  # degraded, still taking chat
            assert ready.status_code == 200 and ready.json()["checks"]["registry"] is False
            assert _serving(a) == v1

            redis_server.start()
            # Another client (the learner, another replica) moves the pointer meanwhile.
            learner = open_registry(url, a.state.settings.adapter_dir)
            learner.activate(v2, actor="learner", reason="gate passed")
            took = _seconds_to_converge([a], v2, since=time.monotonic())
            assert took <= 3.0, f"reconverged only after {took:.1f} s"
            assert _chat_model(a) == v2
            # 503 until the ledger backlog is written
            rated = wait_for(
                lambda: (r := _rate(a, during[0]["id"])).status_code != 503 and r,
                what="answers from the outage to become ratable",
                timeout_s=10,
            )
            assert isinstance(rated, httpx.Response)  # wait_for returns only what is truthy
            assert rated.status_code == 202, rated.text
            assert all(_rate(a, answer["id"]).status_code == 202 for answer in during[1:])
            assert httpx.get(f"{a.url}/readyz", timeout=10).json()["checks"]["registry"] is True
    finally:
        if learner is not None:
            learner.close()
        redis_server.stop()
