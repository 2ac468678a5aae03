"""POST /v1/feedback: who may rate, idempotence, changed votes, and every bad input."""

from __future__ import annotations

from ingest.events import FeedbackEvent, decode_event

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
        return [decode_event(r.value) for r in consumer.poll(timeout_s=0.5)]
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
    reply = client.post("/v1/feedback", json={"response_id": rid, "label": "down"}, headers={"X-OpenWebUI-User-Id": "carol"})
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


def test_feedback_metric_counts_label_and_version(client):
    rid = answer(client)
    client.post("/v1/feedback", json={"response_id": rid, "label": "down"}, headers=ALICE)
    text = client.get("/metrics").text
    assert 'kto_feedback_total{label="undesirable",version="base"} 1.0' in text
