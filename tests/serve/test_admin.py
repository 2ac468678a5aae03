"""The admin API: auth, versions with lineage, activate, roll back, history; hot-swap follows."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from testkit.waiting import wait_for
from tests.serve.conftest import ADMIN, LOCAL
from tests.tiny import TINY_MODEL_ID

HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


def publish(state, adapter_dir, parent=None, **metrics):
    return state.registry.publish(
        adapter_dir, base_model=TINY_MODEL_ID, parent=parent, metrics=metrics, lineage={"events": ["e1", "e2"]}
    )


def test_admin_needs_the_token(client):
    assert client.get("/v1/adapters").status_code == 401
    assert client.get("/v1/adapters", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/adapters", headers={"Authorization": "Basic x"}).status_code == 401
    assert client.get("/v1/adapters", headers=ADMIN).status_code == 200


def test_admin_is_off_without_a_token(settings):
    settings.admin_token = None
    with TestClient(create_app(settings), client=LOCAL) as client:
        reply = client.get("/v1/adapters", headers=ADMIN)
        assert reply.status_code == 403 and "KTO_ADMIN_TOKEN" in reply.json()["error"]["message"]


def test_list_activate_rollback_history(client, state, make_adapter):
    v1 = publish(state, make_adapter(1), loss=0.5).version
    v2 = publish(state, make_adapter(2), parent=v1).version
    listing = client.get("/v1/adapters", headers=ADMIN).json()
    assert listing["active"] is None
    assert [(v["version"], v["parent"], v["status"]) for v in listing["versions"]] == [
        (v1, None, "ready"),
        (v2, v1, "ready"),
    ]
    assert listing["versions"][0]["metrics"] == {"loss": 0.5} and listing["versions"][0]["lineage"] == {
        "events": ["e1", "e2"]
    }

    reply = client.post(f"/v1/adapters/{v1}/activate", json={"reason": "try it"}, headers=ADMIN)
    assert reply.status_code == 200 and reply.json()["serving"] == v1
    assert client.post("/v1/chat/completions", json=HELLO).json()["model"] == v1
    client.post(f"/v1/adapters/{v2}/activate", headers=ADMIN)
    assert client.post("/v1/chat/completions", json=HELLO).json()["model"] == v2

    back = client.post("/v1/adapters/rollback", json={}, headers=ADMIN).json()
    assert back["active"] == v1 and back["serving"] == v1
    back = client.post("/v1/adapters/rollback", headers=ADMIN).json()
    assert back["active"] is None
    assert client.post("/v1/chat/completions", json=HELLO).json()["model"] == TINY_MODEL_ID
    to = client.post("/v1/adapters/rollback", json={"to": v2, "reason": "v2 was fine"}, headers=ADMIN).json()
    assert to["serving"] == v2

    history = client.get("/v1/adapters/history", headers=ADMIN).json()["history"]
    assert [(h["action"], h["version"]) for h in history] == [
        ("activate", v1),
        ("activate", v2),
        ("rollback", v1),
        ("rollback", None),
        ("rollback", v2),
    ]
    assert history[0]["reason"] == "try it" and history[0]["actor"] == "admin" and history[0]["at"] > 0


def test_pinning_a_version_or_the_base_by_model_name(client, state, make_adapter):
    v1 = publish(state, make_adapter(1)).version
    client.post(f"/v1/adapters/{v1}/activate", headers=ADMIN)
    assert client.post("/v1/chat/completions", json={**HELLO, "model": TINY_MODEL_ID}).json()["model"] == TINY_MODEL_ID
    assert client.post("/v1/chat/completions", json={**HELLO, "model": v1}).json()["model"] == v1
    assert v1 in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_unknown_version_404_and_incompatible_409(client, state, make_adapter):
    assert client.post("/v1/adapters/v9999/activate", headers=ADMIN).status_code == 404
    wrong_base = publish(state, make_adapter(3, base_model="some-other-model")).version
    reply = client.post(f"/v1/adapters/{wrong_base}/activate", headers=ADMIN)
    assert reply.status_code == 409 and "some-other-model" in reply.json()["error"]["message"]
    listing = client.get("/v1/adapters", headers=ADMIN).json()
    assert listing["active"] is None
    [info] = [v for v in listing["versions"] if v["version"] == wrong_base]
    assert info["status"] == "rejected" and info["rejected_reason"]


def test_bad_version_published_as_active_is_refused_and_serving_stays(client, state, make_adapter):
    """A learner (or anyone) moving the pointer to a broken version cannot take serving down."""
    good = publish(state, make_adapter(1)).version
    client.post(f"/v1/adapters/{good}/activate", headers=ADMIN)
    bad = publish(state, make_adapter(4, r=4, target_modules=("q_proj", "v_proj"), base_model="elsewhere")).version
    state.registry.activate(bad, actor="learner", reason="auto")
    wait_for(lambda: state.registry.active() == good, what="the pointer back at what was serving", timeout_s=5)
    assert state.hotswap.serving == good
    assert state.registry.get(bad).status == "rejected"
    assert client.post("/v1/chat/completions", json=HELLO).json()["model"] == good
    assert 'kto_adapter_swap_failures_total{reason="verification"} 1.0' in client.get("/metrics").text


def test_new_version_picked_up_without_admin_call(client, state, make_adapter):
    """A version activated straight in the registry (as the learner does) is served within a second."""
    v1 = publish(state, make_adapter(1)).version
    state.registry.activate(v1, actor="learner", reason="auto")
    wait_for(
        lambda: client.post("/v1/chat/completions", json=HELLO).json()["model"] == v1,
        what="the new version served",
        timeout_s=5,
        interval_s=0.02,
    )


@pytest.mark.parametrize("path", ["/v1/adapters/v1/activate", "/v1/adapters/rollback"])
def test_admin_bad_bodies(client, path):
    reply = client.post(path, json={"reason": 5}, headers=ADMIN)
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "reason"


# ---- audit: GET /v1/responses/{id}/version ----

ALICE = {"X-User-Id": "alice"}


def test_audit_tells_which_version_answered_and_how_it_was_rated(client, state, make_adapter):
    base_id = client.post("/v1/chat/completions", json=HELLO, headers=ALICE).json()["id"]
    v1 = publish(state, make_adapter(1)).version
    client.post(f"/v1/adapters/{v1}/activate", headers=ADMIN)
    reply = client.post("/v1/chat/completions", json=HELLO, headers=ALICE).json()
    assert reply["model"] == v1
    assert (
        client.post("/v1/feedback", json={"response_id": reply["id"], "label": "down"}, headers=ALICE).status_code
        == 202
    )

    audit = client.get(f"/v1/responses/{reply['id']}/version", headers=ADMIN)
    assert audit.status_code == 200
    assert audit.json() == {
        "response_id": reply["id"],
        "version": v1,
        "base_model": TINY_MODEL_ID,
        "user": "alice",
        "label": "undesirable",
    }
    before = client.get(f"/v1/responses/{base_id}/version", headers=ADMIN).json()
    assert before["version"] is None and before["label"] is None  # the base model, not rated


def test_audit_is_admin_only_and_404s_unknown_ids(client):
    rid = client.post("/v1/chat/completions", json=HELLO, headers=ALICE).json()["id"]
    assert client.get(f"/v1/responses/{rid}/version").status_code == 401
    assert client.get(f"/v1/responses/{rid}/version", headers={"Authorization": "Bearer wrong"}).status_code == 401
    missing = client.get("/v1/responses/chatcmpl-nope/version", headers=ADMIN)
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "response_id" and "chatcmpl-nope" in missing.json()["error"]["message"]


def test_audit_is_forbidden_without_an_admin_token(settings):
    settings.admin_token = None
    with TestClient(create_app(settings), client=LOCAL) as client:
        assert client.get("/v1/responses/x/version", headers=ADMIN).status_code == 403


def test_audit_answers_503_while_the_ledger_is_unreachable(client, state, monkeypatch):
    from serve.ledger import LedgerUnavailable

    def away(response_id):
        raise LedgerUnavailable("redis is down")

    monkeypatch.setattr(state.ledger, "lookup", away)
    reply = client.get("/v1/responses/x/version", headers=ADMIN)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "ledger_unavailable"


def test_a_version_page_shows_its_lineage_children_and_history(client, state, make_adapter):
    v1 = publish(state, make_adapter(1), loss=0.5).version
    v2 = publish(state, make_adapter(2), parent=v1).version
    client.post(f"/v1/adapters/{v1}/activate", json={"reason": "try it"}, headers=ADMIN)
    client.post(f"/v1/adapters/{v2}/activate", headers=ADMIN)
    page = client.get(f"/v1/adapters/{v1}", headers=ADMIN).json()
    assert (page["version"], page["parent"], page["children"]) == (v1, None, [v2])
    assert page["metrics"] == {"loss": 0.5} and page["lineage"] == {"events": ["e1", "e2"]}
    assert [(h["action"], h["version"], h["previous"], h["reason"]) for h in page["history"]] == [
        ("activate", v1, None, "try it"),
        ("activate", v2, v1, ""),
    ]
    assert client.get(f"/v1/adapters/{v2}", headers=ADMIN).json()["children"] == []
    missing = client.get("/v1/adapters/v9999", headers=ADMIN)
    assert missing.status_code == 404 and "v9999" in missing.json()["error"]["message"]
    assert client.get(f"/v1/adapters/{v1}").status_code == 401
