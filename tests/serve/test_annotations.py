"""The annotation API on a live app: who may annotate, what an annotator sees and sends, skips,
overlap and agreement, erasure, run-time config, and every bad input."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from ingest.events import FeedbackEvent
from serve.app import create_app
from testkit.ports import free_port
from tests.serve.conftest import ADMIN, LOCAL, state_of
from tests.serve.test_admin import publish
from tests.serve.test_feedback import feedback_events

ALICE = {"X-User-Id": "alice"}
ANN = {"X-User-Id": "ann", "X-User-Role": "annotator"}
BOB_ANNOTATOR = {"X-User-Id": "bob", "X-User-Role": "annotator"}


def chat(client, user: str, text: str = "Hello") -> str:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
    reply = client.post("/v1/chat/completions", json=body, headers={"X-User-Id": user})
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def take(client, headers=ANN) -> Any:
    """The item the annotator is given (a dict), or None."""
    reply = client.get("/v1/annotations/next", headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["item"]


def label(client, response_id: str, thumb: str, headers=ANN):
    return client.post("/v1/annotations", json={"response_id": response_id, "label": thumb}, headers=headers)


@pytest.fixture
def settings(settings):
    """No overlap, so that each answer has one slot whatever its id draws (overlap: `overlapping`)."""
    return settings.model_copy(update={"annotation_overlap": 0.0})


@pytest.fixture
def overlapping(settings):
    """Every answer to two annotators."""
    with TestClient(create_app(settings.model_copy(update={"annotation_overlap": 1.0})), client=LOCAL) as client:
        yield client


def test_an_annotator_sees_the_answer_without_its_user_and_their_label_is_an_annotator_event(client, state):
    rid = chat(client, "alice", "What is two and two?")
    task = client.get("/v1/annotations/next", headers=ANN).json()
    assert task["guidelines"] == state.settings.annotation_guidelines
    shown = task["item"]
    assert shown["response_id"] == rid and shown["messages"] == [{"role": "user", "content": "What is two and two?"}]
    assert shown["completion"] and "alice" not in str(task)
    assert take(client) == shown  # held: the same answer again, e.g. after a reload

    first = label(client, rid, "down")
    assert first.status_code == 202 and first.json()["status"] == "recorded"
    again = label(client, rid, "down")
    assert again.status_code == 202 and again.json() == {**first.json(), "status": "unchanged"}
    changed = label(client, rid, "up")
    assert changed.status_code == 202 and changed.json()["status"] == "changed"

    events = [e for e in feedback_events(state) if e.response_id == rid]
    assert [(e.source, e.rater, e.user, e.label, e.signal) for e in events] == [
        ("annotator", "ann", "alice", "undesirable", None),
        ("annotator", "ann", "alice", "desirable", None),
    ]
    assert events[0].event_id == first.json()["id"]
    assert take(client) is None  # nothing else waits
    assert 'kto_annotations_total{label="undesirable"} 1.0' in client.get("/metrics").text


def test_only_an_annotator_credential_gets_items(client):
    rid = chat(client, "alice")
    for headers in (ALICE, ADMIN, {}, {"X-User-Id": "eve", "X-User-Role": "admin"}):
        reply = client.get("/v1/annotations/next", headers=headers)
        assert reply.status_code in (401, 403), (headers, reply.text)
        assert "item" not in reply.json()
    assert label(client, rid, "up", ALICE).status_code == 403
    # and an annotator has no admin rights
    assert client.get("/v1/annotations/agreement", headers=ANN).status_code == 401
    assert client.post("/v1/adapters/rollback", json={}, headers=ANN).status_code == 401


def test_an_answer_not_assigned_to_the_annotator_is_refused_and_bad_input_named(client):
    rid = chat(client, "alice")
    refused = label(client, rid, "up")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_assigned"
    assert take(client)["response_id"] == rid
    assert label(client, rid, "up", BOB_ANNOTATOR).status_code == 403  # Ann's, not Bob's
    assert take(client, BOB_ANNOTATOR) is None  # its one slot is taken
    assert label(client, "chatcmpl-nope", "up").status_code == 404
    for body, field in [
        ({"response_id": rid, "label": "sideways"}, "label"),
        ({"response_id": rid}, "label"),
        ({"label": "up"}, "response_id"),
    ]:
        reply = client.post("/v1/annotations", json=body, headers=ANN)
        assert reply.status_code == 422 and reply.json()["error"]["param"] == field
    assert client.post("/v1/annotations/skip", json={"response_id": rid}, headers=BOB_ANNOTATOR).status_code == 403


def test_skip_moves_on_and_the_skipped_answer_goes_to_someone_else(client):
    older, newer = chat(client, "alice", "one"), chat(client, "alice", "two")
    client.put("/v1/annotations/config", json={"strategy": "newest"}, headers=ADMIN)
    assert take(client)["response_id"] == newer
    skipped = client.post("/v1/annotations/skip", json={"response_id": newer}, headers=ANN)
    assert skipped.status_code == 200 and skipped.json()["status"] == "skipped"
    assert take(client)["response_id"] == older
    assert label(client, older, "up").status_code == 202
    assert take(client) is None  # the skipped one never comes back to Ann
    assert take(client, BOB_ANNOTATOR)["response_id"] == newer


def test_two_annotators_on_shared_answers_give_the_agreement_figure(overlapping):
    client = overlapping
    answers = [chat(client, "alice", f"q{n}") for n in range(4)]
    # Ann and Bob agree on three answers out of four.
    for headers, thumbs in ((ANN, "up down up down"), (BOB_ANNOTATOR, "up down up up")):
        for thumb in thumbs.split():
            item = take(client, headers)
            assert item is not None
            assert label(client, item["response_id"], thumb, headers).status_code == 202
    assert take(client, {"X-User-Id": "cat", "X-User-Role": "annotator"}) is None  # two each, no third
    report = client.get("/v1/annotations/agreement", headers=ADMIN).json()
    assert report["overall"]["items"] == 4 and report["overall"]["observed_agreement"] == 0.75
    alpha = report["overall"]["krippendorff_alpha"]
    assert alpha is not None and 0 < alpha < 1
    assert set(report["annotators"]) == {"ann", "bob"} and report["open_items"] == 0
    assert report["annotations"] == 8 and len(answers) == 4
    metrics = client.get("/metrics").text
    assert f'kto_annotation_agreement{{annotator="all"}} {alpha}' in metrics
    assert "kto_annotation_overlap_items 4.0" in metrics


def test_an_erased_users_answers_leave_the_queue(client):
    held = chat(client, "bob", "mine")
    assert take(client)["response_id"] == held
    waiting = chat(client, "bob", "also mine")
    assert client.delete("/v1/users/bob", headers=ADMIN).status_code == 202
    assert label(client, held, "up").status_code == 404
    assert take(client) is None and take(client, BOB_ANNOTATOR) is None
    assert client.get("/v1/annotations/agreement", headers=ADMIN).json()["open_items"] == 0
    assert waiting


def test_an_admin_sets_strategy_and_guidelines_at_run_time(client):
    defaults = client.get("/v1/annotations/config", headers=ADMIN).json()
    assert defaults["strategy"] == "canary" and defaults["overlap"] == 0.0 and defaults["lease_s"] == 900
    changed = client.put(
        "/v1/annotations/config", json={"strategy": "uncertain", "guidelines": "Only facts count."}, headers=ADMIN
    )
    assert changed.status_code == 200 and changed.json()["strategy"] == "uncertain"
    chat(client, "alice")
    assert client.get("/v1/annotations/next", headers=ANN).json()["guidelines"] == "Only facts count."
    bad = client.put("/v1/annotations/config", json={"strategy": "loudest"}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "strategy"
    assert client.put("/v1/annotations/config", json={"strategy": "newest"}, headers=ANN).status_code == 401


def test_uncertain_scores_answers_under_the_serving_adapter(client, state, make_adapter):
    version = publish(state, make_adapter(3)).version
    assert client.post(f"/v1/adapters/{version}/activate", json={}, headers=ADMIN).status_code == 200
    client.put("/v1/annotations/config", json={"strategy": "uncertain"}, headers=ADMIN)
    answers = {chat(client, "alice", f"question {n}") for n in range(5)}
    assert state.hotswap.serving == version
    taken = set()
    while (item := take(client)) is not None:
        taken.add(item["response_id"])
        assert label(client, item["response_id"], "up").status_code == 202
    assert taken == answers
    # Each was scored once under the serving version, and a real adapter moves the log-ratio off 0.
    ratios = [r for (rid, v), r in state.scorer._cache.items() if v == version and rid in answers]
    assert len(ratios) == 5 and any(abs(r) > 1e-6 for r in ratios)


def test_signals_and_annotations_are_feedback_events_of_the_answers_user(client, state):
    rid = chat(client, "alice")
    take(client)
    label(client, rid, "up")
    client.post("/v1/feedback", json={"response_id": rid, "source": "implicit", "signal": "copy"}, headers=ALICE)
    events = [e for e in feedback_events(state) if e.response_id == rid]
    assert all(isinstance(e, FeedbackEvent) and e.user == "alice" for e in events)
    assert [e.labeler for e in events] == ["annotator", "implicit:copy"]


def test_an_unreachable_queue_costs_chat_nothing_and_annotators_are_asked_to_retry(settings):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with TestClient(create_app(settings.model_copy(update={"annotation_url": dead})), client=LOCAL) as client:
        assert chat(client, "alice") and chat(client, "alice")  # the second skips the queue (it just failed)
        assert state_of(client).queue_paused_until > 0
        reply = client.get("/v1/annotations/next", headers=ANN)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "queue_unavailable"
        assert int(reply.headers["Retry-After"]) > 0
        assert client.get("/metrics").status_code == 200  # its gauges are left out, the rest stays
