"""Admin: erasing a user (DELETE /v1/users/{user}) and what a version page counts (served)."""

from __future__ import annotations

from ingest.events import ErasureEvent, decode_event
from tests.serve.conftest import ADMIN
from tests.serve.test_admin import publish

ALICE = {"X-User-Id": "alice"}
BOB = {"X-User-Id": "bob"}


def chat(client, headers, model=None) -> str:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **({"model": model} if model else {})}
    reply = client.post("/v1/chat/completions", json=body, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def rate(client, response_id, label, headers):
    return client.post("/v1/feedback", json={"response_id": response_id, "label": label}, headers=headers)


def test_erasing_a_user_removes_their_ledger_entries_and_tells_the_learner(client, state):
    alices = [chat(client, ALICE) for _ in range(2)]
    bobs = chat(client, BOB)
    assert rate(client, alices[0], "down", ALICE).status_code == 202

    reply = client.delete("/v1/users/alice", params={"reason": "request #12"}, headers=ADMIN)
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert (body["user"], body["status"], body["ledger_entries_removed"]) == ("alice", "accepted", 2)

    # Her answers can no longer be rated or audited; Bob's can.
    assert rate(client, alices[1], "up", ALICE).status_code == 404
    assert client.get(f"/v1/responses/{alices[0]}/version", headers=ADMIN).status_code == 404
    assert rate(client, bobs, "up", BOB).status_code == 202

    consumer = state.bus.consumer("test-erasure-reader", [state.topics.erasures])
    try:
        [event] = [decode_event(r.value) for r in consumer.poll(timeout_s=0.5)]
    finally:
        consumer.close()
    assert isinstance(event, ErasureEvent)
    assert (event.event_id, event.user, event.actor, event.reason) == (
        body["request_id"],
        "alice",
        "admin",
        "request #12",
    )


def test_any_user_id_can_be_erased(client):
    odd = {"X-User-Id": "team/ann 7"}
    answer = chat(client, odd)
    reply = client.delete("/v1/users/team%2Fann%207", headers=ADMIN)
    assert reply.status_code == 202 and reply.json()["user"] == "team/ann 7"
    assert rate(client, answer, "up", odd).status_code == 404


def test_erasure_is_admin_only_and_checks_its_input(client):
    assert client.delete("/v1/users/alice").status_code == 401
    too_long = client.delete("/v1/users/" + "x" * 300, headers=ADMIN)
    assert too_long.status_code == 422 and "user" in too_long.json()["error"]["message"]
    empty = client.delete("/v1/users/", headers=ADMIN)
    assert empty.status_code == 422 and "user" in empty.json()["error"]["message"]


def test_a_version_page_counts_the_responses_it_served_and_their_votes(client, state, make_adapter):
    v1 = publish(state, make_adapter(1)).version
    client.post(f"/v1/adapters/{v1}/activate", headers=ADMIN)
    ids = [chat(client, ALICE) for _ in range(3)]
    chat(client, BOB, model=state.settings.base_model_id)  # the base model's, not v1's
    rate(client, ids[0], "up", ALICE)
    rate(client, ids[1], "down", ALICE)
    rate(client, ids[1], "up", ALICE)  # a changed vote counts once, with its latest label
    page = client.get(f"/v1/adapters/{v1}", headers=ADMIN).json()
    assert page["served"] == {"responses": 3, "desirable": 2, "undesirable": 0, "desirable_rate": 1.0}
