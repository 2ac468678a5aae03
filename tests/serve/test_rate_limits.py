"""Rate limits per user and per address: 429 with Retry-After, counted, shared by replicas on Redis."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from testkit.ports import free_port
from tests.serve.conftest import ADMIN, LOCAL, state_of

HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def chat(client, user: str) -> int:
    return client.post("/v1/chat/completions", json=HELLO, headers={"X-User-Id": user}).status_code


def limited(client, scope: str, by: str) -> float:
    return state_of(client).metrics.rate_limited.labels(scope=scope, by=by)._value.get()


def test_one_user_over_the_chat_limit_gets_429_while_others_are_served(settings):
    with TestClient(create_app(settings.model_copy(update={"rate_limit_chat": "3/minute"})), client=LOCAL) as c:
        assert [chat(c, "flood") for _ in range(3)] == [200, 200, 200]
        refused = c.post("/v1/chat/completions", json=HELLO, headers={"X-User-Id": "flood"})
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "3 per 1 minute per user" in error["message"]
        assert chat(c, "someone-else") == 200
        assert limited(c, "chat", "user") == 1


def test_a_refusal_is_held_before_it_is_answered(settings):
    """A flood that sends again as soon as it is answered is slowed to the delay's pace."""
    slowed = settings.model_copy(update={"rate_limit_chat": "1/minute", "rate_limit_delay_s": 0.5})
    with TestClient(create_app(slowed), client=LOCAL) as c:
        assert chat(c, "u") == 200
        started = time.monotonic()
        assert chat(c, "u") == 429
        assert time.monotonic() - started >= 0.5


def test_feedback_has_its_own_limit(settings):
    with TestClient(create_app(settings.model_copy(update={"rate_limit_feedback": "2/minute"})), client=LOCAL) as c:
        rid = c.post("/v1/chat/completions", json=HELLO, headers={"X-User-Id": "v"}).json()["id"]
        votes = [
            c.post("/v1/feedback", json={"response_id": rid, "label": label}, headers={"X-User-Id": "v"}).status_code
            for label in ("up", "down", "up")
        ]
        assert votes == [202, 202, 429] and limited(c, "feedback", "user") == 1
        assert chat(c, "v") == 200  # chatting is another budget


def test_wrong_admin_tokens_are_limited_then_even_the_right_one_waits(settings):
    tight = settings.model_copy(update={"rate_limit_auth_failures": "3/minute"})
    with TestClient(create_app(tight), client=LOCAL) as c:
        wrong = {"Authorization": "Bearer guess"}
        assert [c.get("/v1/adapters", headers=wrong).status_code for _ in range(5)] == [401, 401, 401, 429, 429]
        assert c.get("/v1/adapters", headers=ADMIN).status_code == 429
        assert state_of(c).metrics.auth_failures.labels(reason="bad_admin_token")._value.get() == 3


def test_admin_calls_are_limited_per_credential(settings):
    with TestClient(create_app(settings.model_copy(update={"rate_limit_admin": "2/minute"})), client=LOCAL) as c:
        assert [c.get("/v1/adapters", headers=ADMIN).status_code for _ in range(3)] == [200, 200, 429]
        assert limited(c, "admin", "user") == 1


@pytest.mark.redis
def test_replicas_on_redis_share_one_limit(services, settings, tmp_path):
    url = f"{services.registry_url}?prefix=limits-{uuid.uuid4().hex}:"
    shared = {"registry_url": url, "adapter_dir": tmp_path / "adapters", "rate_limit_chat": "4/minute"}
    a_settings, b_settings = (settings.model_copy(update={**shared, "data_dir": tmp_path / n}) for n in "ab")
    with TestClient(create_app(a_settings), client=LOCAL) as a, TestClient(create_app(b_settings), client=LOCAL) as b:
        assert [chat(a, "u"), chat(b, "u"), chat(a, "u"), chat(b, "u")] == [200] * 4
        assert chat(a, "u") == 429 and chat(b, "u") == 429
        assert chat(b, "other") == 200


def test_an_unreachable_limit_store_lets_requests_through_and_says_so(settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(settings.model_copy(update={"rate_limit_url": dead})), client=LOCAL) as c:
        assert [chat(c, "u") for _ in range(2)] == [200, 200]
        assert state_of(c).metrics.rate_limit_errors._value.get() >= 2
