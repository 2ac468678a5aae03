"""The canary in serving: sticky routing of a share of users to the candidate, pause, promote,
roll back over the admin API, and a canary started elsewhere (the learner) followed by polling."""

from __future__ import annotations

import pytest

from registry import in_canary
from testkit.waiting import wait_for
from tests.serve.conftest import ADMIN
from tests.tiny import TINY_MODEL_ID

USERS = [f"user-{i}" for i in range(24)]


def chat(client, who: str | None = None, **extra) -> str:
    """The `model` that answered a chat of `who` (the X-User-Id header; None: anonymous)."""
    headers = {"X-User-Id": who} if who else {}
    reply = client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["model"]


def publish(state, adapter_dir, parent=None) -> str:
    return state.registry.publish(adapter_dir, base_model=TINY_MODEL_ID, parent=parent, metrics={}, lineage={}).version


@pytest.fixture
def versions(client, state, make_adapter):
    """v1 active, v2 published: (v1, v2, the users a 0.5 canary of v2 takes, the others)."""
    v1, v2 = publish(state, make_adapter(1)), publish(state, make_adapter(2))
    assert client.post(f"/v1/adapters/{v1}/activate", headers=ADMIN).status_code == 200
    inside = [u for u in USERS if in_canary(u, v2, 0.5)]
    outside = [u for u in USERS if u not in inside]
    assert inside and outside
    return v1, v2, inside, outside


def test_a_canary_serves_its_share_of_users_sticky_and_never_the_anonymous(client, versions):
    v1, v2, inside, outside = versions
    reply = client.post("/v1/adapters/canary", json={"version": v2, "share": 0.5, "reason": "try"}, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["active"] == v1 and body["canary"]["version"] == v2 and body["entry"]["action"] == "canary_start"
    for _ in range(2):  # sticky: the same answer every time
        assert {u: chat(client, u) for u in USERS} == {u: v2 if u in inside else v1 for u in USERS}
    assert chat(client) == v1  # anonymous: the active version
    assert chat(client, outside[0], user=inside[0]) == v1  # the verified user, not the body's `user`
    assert chat(client, None, user=inside[0]) == v1  # the body's `user` never identifies: anyone may write it
    assert chat(client, outside[0], model=TINY_MODEL_ID) == TINY_MODEL_ID  # pinning still works
    served = {m["id"]: m for m in client.get("/v1/models", headers={"X-User-Id": inside[0]}).json()["data"]}
    assert served["kto-loop"]["serving"] == v2 and v2 in served
    shown = client.get("/v1/adapters/canary", headers=ADMIN).json()
    assert shown["canary"]["share"] == 0.5 and shown["active"] == v1 and shown["last"]["action"] == "canary_start"


def test_pause_resume_promote(client, versions):
    v1, v2, inside, _outside = versions
    client.post("/v1/adapters/canary", json={"version": v2, "share": 0.5}, headers=ADMIN)
    assert client.post("/v1/adapters/canary/pause", json={"reason": "hold"}, headers=ADMIN).status_code == 200
    assert {chat(client, u) for u in USERS} == {v1}  # nobody goes to a paused candidate
    client.post("/v1/adapters/canary/resume", headers=ADMIN)
    assert chat(client, inside[0]) == v2
    reply = client.post("/v1/adapters/canary/promote", json={"version": v2, "reason": "looks good"}, headers=ADMIN)
    assert reply.status_code == 200 and reply.json()["active"] == v2 and reply.json()["canary"] is None
    assert {chat(client, u) for u in USERS} == {v2}
    history = client.get("/v1/adapters/history", headers=ADMIN).json()["history"]
    assert [(h["action"], h["version"], h["actor"]) for h in history] == [
        ("activate", v1, "admin"),
        ("canary_start", v2, "admin"),
        ("canary_pause", v2, "admin"),
        ("canary_resume", v2, "admin"),
        ("canary_promote", v2, "admin"),
    ]
    back = client.post("/v1/adapters/rollback", headers=ADMIN).json()
    assert back["active"] == v1  # a promotion is undone like an activation


def test_rollback_rejects_the_candidate_and_its_users_return(client, versions):
    v1, v2, inside, _outside = versions
    client.post("/v1/adapters/canary", json={"version": v2, "share": 0.5}, headers=ADMIN)
    assert chat(client, inside[0]) == v2
    reply = client.post("/v1/adapters/canary/rollback", json={"reason": "bad answers"}, headers=ADMIN)
    assert reply.status_code == 200 and reply.json()["entry"]["action"] == "canary_rollback"
    assert {chat(client, u) for u in USERS} == {v1}
    listing = client.get("/v1/adapters", headers=ADMIN).json()
    assert [v["status"] for v in listing["versions"] if v["version"] == v2] == ["rejected"]
    assert client.post(f"/v1/adapters/{v2}/activate", headers=ADMIN).status_code == 409
    shown = client.get("/v1/adapters/canary", headers=ADMIN).json()
    assert shown["canary"] is None and shown["last"]["action"] == "canary_rollback"


def test_canary_errors(client, state, versions, make_adapter):
    v1, v2, _inside, _outside = versions
    assert client.post("/v1/adapters/canary", json={"version": v2, "share": 0.5}).status_code == 401
    for bad in ({"version": v2, "share": 0}, {"version": v2, "share": 1.5}, {"version": v2}):
        assert client.post("/v1/adapters/canary", json=bad, headers=ADMIN).status_code == 422
    assert client.post("/v1/adapters/canary", json={"version": "v9999", "share": 0.5}, headers=ADMIN).status_code == 404
    reply = client.post("/v1/adapters/canary", json={"version": v1, "share": 0.5}, headers=ADMIN)
    assert reply.status_code == 409  # the active version
    for action in ("promote", "rollback", "pause", "resume"):
        reply = client.post(f"/v1/adapters/canary/{action}", headers=ADMIN)
        assert reply.status_code == 409 and reply.json()["error"]["code"] == "no_canary"
    wrong = publish(state, make_adapter(3, base_model="another-model"))
    reply = client.post("/v1/adapters/canary", json={"version": wrong, "share": 0.5}, headers=ADMIN)
    assert reply.status_code == 409 and "another-model" in reply.json()["error"]["message"]
    client.post("/v1/adapters/canary", json={"version": v2, "share": 0.5}, headers=ADMIN)
    v3 = publish(state, make_adapter(4))
    reply = client.post("/v1/adapters/canary", json={"version": v3, "share": 0.5}, headers=ADMIN)
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "canary_running"
    reply = client.post("/v1/adapters/canary/promote", json={"version": v3}, headers=ADMIN)
    assert reply.status_code == 409  # not the running one: nothing happens to v2's canary
    assert client.get("/v1/adapters/canary", headers=ADMIN).json()["canary"]["version"] == v2


def test_a_canary_started_elsewhere_is_followed(client, state, versions, make_adapter):
    """As the learner does it: straight into the registry; the replica's poll loop follows."""
    v1, v2, inside, outside = versions
    state.registry.start_canary(v2, 0.5, actor="learner")
    wait_for(lambda: state.hotswap.canary is not None, what="the replica to follow the canary")
    assert chat(client, inside[0]) == v2 and chat(client, outside[0]) == v1
    state.registry.rollback_canary(v2, actor="canary-controller", reason="worse")
    wait_for(lambda: state.hotswap.canary is None, what="the replica to drop the canary")
    assert chat(client, inside[0]) == v1
    wait_for(lambda: v2 not in state.engine.loaded_versions, what="the candidate to be unloaded")

    broken = publish(state, make_adapter(5, base_model="another-model"))
    state.registry.start_canary(broken, 1.0, actor="learner")  # the registry cannot check the base model
    last = wait_for(
        lambda: (h := state.registry.history()[-1]).action == "canary_rollback" and h,
        what="the replica to refuse the candidate",
    )
    assert last.version == broken and last.actor.startswith("serve:")
    assert state.registry.canary() is None and state.registry.get(broken).status == "rejected"
    assert {chat(client, u) for u in USERS} == {v1}


def test_an_advancing_canary_keeps_its_users_and_serves_the_newest_candidate(client, state, versions, make_adapter):
    """The learner moves its canary on to a version trained from the candidate: the same users
    get the new one, the others stay on the active version, and /v1/models shows it."""
    v1, v2, inside, _outside = versions
    state.registry.start_canary(v2, 0.5, actor="learner")
    wait_for(lambda: state.hotswap.canary is not None, what="the replica to follow the canary")
    v3 = publish(state, make_adapter(6), parent=v2)
    state.registry.advance_canary(v2, v3, actor="learner")
    wait_for(lambda: state.hotswap.canary and state.hotswap.canary.version == v3, what="the replica to advance")
    assert {u: chat(client, u) for u in USERS} == {u: v3 if u in inside else v1 for u in USERS}
    alias = client.get("/v1/models").json()["data"][0]
    assert (alias["active"], alias["canary"], alias["serving"]) == (v1, v3, v1)  # anonymous: the active one
    wait_for(lambda: v2 not in state.engine.loaded_versions, what="the previous candidate to be unloaded")
