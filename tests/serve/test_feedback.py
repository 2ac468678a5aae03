"""POST /v1/feedback: who may rate, idempotence, changed votes, and every bad input."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from ingest.events import FeedbackEvent, decode_event
from serve.app import create_app
from testkit.ports import free_port
from tests.serve.conftest import LOCAL

ALICE = {"X-User-Id": "alice"}
BOB = {"X-User-Id": "bob"}
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def answer(client, headers=ALICE) -> str:
    reply = client.post("/v1/chat/completions", json=HELLO, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def feedback_events(state) -> list[FeedbackEvent]:
    consumer = state.bus.consumer("test-feedback-reader", [state.topics.feedback])
    try:
        events: list[FeedbackEvent] = []
        for r in consumer.poll(timeout_s=0.5):
            event = decode_event(r.value)
            assert isinstance(event, FeedbackEvent)  # read from the feedback topic
            events.append(event)
        return events
    finally:
        consumer.close()


def test_vote_is_durable_then_repeat_is_noop_then_change_replaces(client, state):
    rid = answer(client)
    first = client.post("/v1/feedback", json={"response_id": rid, "label": "up", "comment": "nice"}, headers=ALICE)
    assert first.status_code == 202 and first.json()["status"] == "recorded"
    again = client.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=ALICE)
    assert again.status_code == 202 and again.json() == {**first.json(), "status": "unchanged"}
    changed = client.post("/v1/feedback", json={"response_id": rid, "label": "down"}, headers=ALICE)
    assert changed.status_code == 202 and changed.json()["status"] == "changed"

    events = [e for e in feedback_events(state) if e.response_id == rid]
    assert [(e.label, e.user) for e in events] == [("desirable", "alice"), ("undesirable", "alice")]
    assert events[0].event_id == first.json()["id"] and events[1].event_id == changed.json()["id"]
    assert events[0].comment == "nice"


def test_openwebui_header_is_an_identity_too(client):
    rid = answer(client, {"X-OpenWebUI-User-Id": "carol"})
    reply = client.post(
        "/v1/feedback", json={"response_id": rid, "label": "down"}, headers={"X-OpenWebUI-User-Id": "carol"}
    )
    assert reply.status_code == 202


def test_only_the_receiver_may_rate(client):
    rid = answer(client)
    reply = client.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=BOB)
    assert reply.status_code == 403 and reply.json()["error"]["message"]


def test_anonymous_cannot_rate(client):
    rid = answer(client, headers={})
    assert client.post("/v1/feedback", json={"response_id": rid, "label": "up"}).status_code == 401
    # and an anonymous answer cannot be claimed by anyone
    assert client.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=ALICE).status_code == 403


def test_unknown_response_is_404(client):
    reply = client.post("/v1/feedback", json={"response_id": "chatcmpl-nope", "label": "up"}, headers=ALICE)
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "response_id"


def test_bad_bodies_name_the_field(client):
    rid = answer(client)
    cases = [
        ({"response_id": rid, "label": "sideways"}, "label"),
        ({"response_id": rid}, "label"),
        ({"label": "up"}, "response_id"),
        ({"response_id": rid, "label": "up", "comment": "x" * 5000}, "comment"),
        ({"response_id": 12, "label": "up"}, "response_id"),
    ]
    for body, field in cases:  # (a lone surrogate cannot be written by httpx's json=, see below)
        reply = client.post("/v1/feedback", json=body, headers=ALICE)
        assert reply.status_code == 422, (body, reply.text)
        assert reply.json()["error"]["param"] == field
    raw = b'{"response_id": "%s", "label": "up", "comment": "\\udc00"}' % rid.encode()
    reply = client.post("/v1/feedback", content=raw, headers={**ALICE, "Content-Type": "application/json"})
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "comment"


def test_an_implicit_signal_is_an_event_with_the_label_it_implies_and_leaves_the_vote_alone(client, state):
    rid = answer(client)
    thumb = client.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=ALICE)
    sent = []
    for signal in ("copy", "regenerate", "edit", "copy"):
        reply = client.post(
            "/v1/feedback", json={"response_id": rid, "source": "implicit", "signal": signal}, headers=ALICE
        )
        assert reply.status_code == 202, reply.text
        body = reply.json()
        assert (body["source"], body["signal"], body["status"]) == ("implicit", signal, "recorded")
        sent.append(body["id"])
    events = [e for e in feedback_events(state) if e.response_id == rid]
    assert [(e.source, e.signal, e.label, e.user) for e in events] == [
        ("human", None, "desirable", "alice"),
        ("implicit", "copy", "desirable", "alice"),
        ("implicit", "regenerate", "undesirable", "alice"),
        ("implicit", "edit", "undesirable", "alice"),
        ("implicit", "copy", "desirable", "alice"),
    ]
    assert [e.event_id for e in events[1:]] == sent
    # The thumb is still the vote: repeating it changes nothing (the learner lets it win too).
    again = client.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=ALICE).json()
    assert (again["status"], again["id"]) == ("unchanged", thumb.json()["id"])
    text = client.get("/metrics").text
    assert 'kto_implicit_signals_total{signal="copy"} 2.0' in text
    assert 'kto_implicit_signals_total{signal="edit"} 1.0' in text


def test_signals_follow_the_rules_of_ratings_and_bad_ones_are_named(client):
    rid = answer(client)
    copy = {"response_id": rid, "source": "implicit", "signal": "copy"}
    assert client.post("/v1/feedback", json=copy, headers=BOB).status_code == 403  # not Bob's answer
    assert client.post("/v1/feedback", json=copy).status_code == 401  # anonymous
    cases = [
        ({**copy, "signal": "screenshot"}, "signal", "'screenshot'"),
        ({"response_id": rid, "source": "implicit"}, "signal", "copy, edit, regenerate"),
        ({**copy, "label": "up"}, "label", "implies"),
        ({"response_id": rid, "label": "up", "signal": "copy"}, "signal", "implicit"),
        ({**copy, "source": "annotator"}, "source", ""),  # annotations have their own endpoint
    ]
    for body, field, named in cases:
        reply = client.post("/v1/feedback", json=body, headers=ALICE)
        assert reply.status_code == 422, (body, reply.text)
        error = reply.json()["error"]
        assert error["param"] == field and named in error["message"], error


def test_feedback_metric_counts_label_and_version(client):
    rid = answer(client)
    client.post("/v1/feedback", json={"response_id": rid, "label": "down"}, headers=ALICE)
    text = client.get("/metrics").text
    assert 'kto_feedback_total{label="undesirable",version="base"} 1.0' in text


@pytest.mark.redis
def test_a_rating_may_reach_another_replica_and_racing_votes_lose_nothing(settings, services, tmp_path):
    # Two replicas: their own data dirs, one bus file, one ledger on Redis (as the registry's would be).
    bus_url = f"sqlite:///{tmp_path / 'shared-bus.sqlite3'}"
    replicas = [
        settings.model_copy(
            update={"data_dir": tmp_path / name, "bus_url": bus_url, "ledger_url": services.registry_url}
        )
        for name in ("a", "b")
    ]
    app_a = create_app(replicas[0])
    with TestClient(app_a, client=LOCAL) as a, TestClient(create_app(replicas[1]), client=LOCAL) as b:
        rid = answer(a)
        assert (
            b.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=ALICE).json()["status"]
            == "recorded"
        )
        assert (
            a.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=ALICE).json()["status"]
            == "unchanged"
        )
        assert b.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=BOB).status_code == 403

        # Opposite votes on one response at once, one per replica: the ledger serialises them.
        rids = [answer(a) for _ in range(8)]
        statuses: dict[str, list[str]] = {r: [] for r in rids}
        barrier = threading.Barrier(2)

        def vote(client, label):
            for r in rids:
                barrier.wait(timeout=60)
                reply = client.post("/v1/feedback", json={"response_id": r, "label": label}, headers=ALICE)
                assert reply.status_code == 202, reply.text
                statuses[r].append(reply.json()["status"])

        threads = [threading.Thread(target=vote, args=(client, label)) for client, label in ((a, "up"), (b, "down"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        events = feedback_events(app_a.state.serve)
    for r in rids:
        assert sorted(statuses[r]) == ["changed", "recorded"]  # exactly one first vote, none lost
        assert len([e for e in events if e.response_id == r]) == 2  # both on the bus; the latest wins


def test_the_ledger_follows_the_registry_to_redis_unless_set(tmp_path):
    from serve.settings import ServeSettings

    embedded = ServeSettings(data_dir=tmp_path)
    assert embedded.resolved_ledger_url() == f"sqlite:///{tmp_path.resolve() / 'ledger.sqlite3'}"
    shared = ServeSettings(data_dir=tmp_path, registry_url="redis://cache:6379/2")
    assert shared.resolved_ledger_url() == "redis://cache:6379/2"  # replicas must share it
    chosen = ServeSettings(data_dir=tmp_path, registry_url="redis://cache:6379/2", ledger_url="redis://other:6379/0")
    assert chosen.resolved_ledger_url() == "redis://other:6379/0"


def test_an_unreachable_ledger_still_answers_chat_and_asks_raters_to_retry(settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with TestClient(create_app(settings.model_copy(update={"ledger_url": dead})), client=LOCAL) as client:
        answer = client.post("/v1/chat/completions", json=HELLO, headers=ALICE)
        assert answer.status_code == 200  # its ledger entry waits in the backlog
        for response_id in (answer.json()["id"], "chatcmpl-x"):
            reply = client.post("/v1/feedback", json={"response_id": response_id, "label": "up"}, headers=ALICE)
            assert reply.status_code == 503 and int(reply.headers["Retry-After"]) > 0
            assert reply.json()["error"]["code"] == "ledger_unavailable"
        assert "kto_ledger_backlog 1.0" in client.get("/metrics").text
