"""A server whose data directory fills up: 507 `disk_full` on every write, before generating when
it can, /readyz 503 until space is freed, nothing acknowledged lost, never a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ingest.events import FeedbackEvent, ResponseEvent, decode_event
from serve.app import create_app
from tests.serve.conftest import ADMIN, LOCAL
from tests.tiny import TINY_MODEL_ID
from tests.tmpfs import MiB, fill, small_disk

ALICE = {"X-User-Id": "alice"}
ANN = {"X-User-Id": "ann", "X-User-Role": "annotator"}
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
TRIES = 60
"""Writes tried on a full disk before one must fail: SQLite may still fit a few in its WAL's slack."""


@pytest.fixture
def disk(tmp_path):
    with small_disk(tmp_path / "data", 32 * MiB) as path:
        yield path


def up(client: TestClient, label: str = "up", rid: str | None = None):
    rid = rid or chat(client).json()["id"]
    return client.post("/v1/feedback", json={"response_id": rid, "label": label}, headers=ALICE)


def chat(client: TestClient, **body):
    return client.post("/v1/chat/completions", json={**HELLO, **body}, headers=ALICE)


def assert_disk_full(reply: httpx.Response | Any) -> None:
    assert reply.status_code == 507, reply.text
    error = reply.json()["error"]
    assert error["code"] == "disk_full" and "disk is full" in error["message"], error
    assert int(reply.headers["Retry-After"]) > 0


def sample(client: TestClient, name: str) -> float:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == name)


def test_under_the_reserve_writes_are_refused_before_generating_and_readyz_says_so(settings, disk):
    settings.data_dir = disk
    with TestClient(create_app(settings), client=LOCAL) as client:
        rated = chat(client).json()["id"]
        assert up(client, rid=rated).status_code == 202
        waiting = chat(client).json()["id"]
        annotated = client.get("/v1/annotations/next", headers=ANN).json()["item"]["response_id"]
        prompt_tokens = sample(client, "kto_prompt_tokens_total")
        ballast = fill(disk)

        assert_disk_full(chat(client))
        assert_disk_full(chat(client, stream=True))
        assert sample(client, "kto_prompt_tokens_total") == prompt_tokens  # nothing was generated
        assert_disk_full(up(client, rid=waiting))
        assert_disk_full(
            client.post(
                "/v1/feedback", json={"response_id": waiting, "source": "implicit", "signal": "copy"}, headers=ALICE
            )
        )
        assert_disk_full(client.post("/v1/annotations", json={"response_id": annotated, "label": "up"}, headers=ANN))
        repeated = up(client, rid=rated)  # a vote already recorded writes nothing: still answered
        assert repeated.status_code == 202 and repeated.json()["status"] == "unchanged"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["disk"] is False
        (space,) = ready.json()["disk"]
        assert space["path"] == str(disk) and space["free_bytes"] < space["reserve_bytes"]
        assert sample(client, "kto_disk_free_bytes") < sample(client, "kto_disk_reserve_bytes")

        ballast.unlink()
        assert client.get("/readyz").status_code == 200
        assert chat(client).status_code == 200
        assert up(client, rid=waiting).status_code == 202


def test_a_disk_that_fills_under_a_write_is_a_507_and_nothing_acknowledged_is_lost(settings, disk, make_adapter):
    settings.data_dir, settings.disk_reserve_mb = disk, 0  # no reserve: the writes themselves meet the full disk
    statuses: list[int] = []
    answered: set[str] = set()
    rated: set[str] = set()
    with TestClient(create_app(settings), client=LOCAL) as client:
        state = client.app.state.serve  # type: ignore[attr-defined]
        versions = [
            state.registry.publish(make_adapter(seed), base_model=TINY_MODEL_ID, parent=None, metrics={}, lineage={})
            for seed in (1, 2)
        ]
        to_rate = [chat(client).json()["id"] for _ in range(TRIES)]
        answered |= set(to_rate)
        ballast = fill(disk)

        def until_refused(send) -> httpx.Response:
            for i in range(TRIES):
                reply = send(i)
                statuses.append(reply.status_code)
                if reply.status_code != 507:
                    assert reply.status_code < 300, reply.text
                    continue
                return reply
            raise AssertionError(f"no write refused in {TRIES} tries on a full disk")

        def plain(i: int) -> httpx.Response:
            reply = chat(client)
            if reply.status_code == 200:
                answered.add(reply.json()["id"])
            return reply

        def vote(i: int) -> httpx.Response:
            reply = up(client, rid=to_rate[i])
            if reply.status_code == 202:
                rated.add(reply.json()["id"])
            return reply

        assert_disk_full(until_refused(plain))
        assert_disk_full(until_refused(vote))
        activate = lambda i: client.post(f"/v1/adapters/{versions[i % 2].version}/activate", headers=ADMIN)
        assert_disk_full(until_refused(activate))
        for _ in range(TRIES):  # streamed: the answer is out already, so the refusal is its last chunk
            with client.stream("POST", "/v1/chat/completions", json={**HELLO, "stream": True}, headers=ALICE) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            if "error" in chunks[-1]:
                assert chunks[-1]["error"]["code"] == "disk_full", chunks[-1]
                break
            answered.add(chunks[0]["id"])
        else:
            raise AssertionError(f"no streamed answer refused in {TRIES} tries on a full disk")
        assert 500 not in statuses

        ballast.unlink()
        consumer = state.bus.consumer("check", [state.topics.responses, state.topics.feedback])
        events = [decode_event(r.value) for r in consumer.poll(timeout_s=1.0, max_records=100_000)]
        consumer.close()
    assert answered <= {e.response_id for e in events if isinstance(e, ResponseEvent)}
    assert rated <= {e.event_id for e in events if isinstance(e, FeedbackEvent)}


def test_the_api_document_lists_507_on_every_write(client):
    paths = client.get("/openapi.json").json()["paths"]
    writes = {
        ("/v1/chat/completions", "post"),
        ("/v1/feedback", "post"),
        ("/v1/annotations", "post"),
        ("/v1/annotations/next", "get"),
        ("/v1/annotations/skip", "post"),
        ("/v1/annotations/config", "put"),
        ("/v1/adapters/{version}/activate", "post"),
        ("/v1/adapters/rollback", "post"),
        ("/v1/adapters/canary", "post"),
        ("/v1/adapters/canary/promote", "post"),
        ("/v1/rules", "put"),
        ("/v1/users/{user}/keys", "post"),
        ("/v1/users/{user}/keys/{key_id}", "delete"),
        ("/v1/users/{user}", "delete"),
    }
    assert {(p, m) for p, m in writes if "507" not in paths[p][m]["responses"]} == set()
    assert "507" not in paths["/v1/models"]["get"]["responses"]  # reads do not write
