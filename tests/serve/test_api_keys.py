"""KTO_AUTH=api-key: keys issued, listed and revoked by an admin, kept only as hashes, checked on
every request by every replica; the roles they carry."""

from __future__ import annotations

import hashlib
import sqlite3
import time
import uuid

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from testkit.background_server import BackgroundServer
from tests.serve.conftest import ADMIN, LOCAL, entry_of, state_of

HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def issue(client, user: str, role: str = "user", headers=ADMIN) -> str:
    reply = client.post(f"/v1/users/{user}/keys", json={"role": role, "name": "test"}, headers=headers)
    assert reply.status_code == 201, reply.text
    return reply.json()["key"]


@pytest.fixture
def keyed(settings):
    return settings.model_copy(update={"auth": "api-key"})


@pytest.fixture
def kclient(keyed):
    with TestClient(create_app(keyed), client=LOCAL) as client:
        yield client


def test_issue_list_revoke_and_only_hashes_are_kept(kclient, keyed):
    reply = kclient.post("/v1/users/alice/keys", json={"name": "laptop"}, headers=ADMIN)
    assert reply.status_code == 201
    issued = reply.json()
    assert issued["key"].startswith("kto-") and issued["role"] == "user" and issued["created_by"] == "admin"
    listed = kclient.get("/v1/users/alice/keys", headers=ADMIN).json()["keys"]
    assert [(k["id"], k["name"]) for k in listed] == [(issued["id"], "laptop")] and "key" not in listed[0]
    with sqlite3.connect(keyed.data_dir / "registry" / "keys.sqlite3") as db:
        stored = repr(db.execute("SELECT * FROM api_keys").fetchall())
    assert issued["key"] not in stored and hashlib.sha256(issued["key"].encode()).hexdigest() in stored

    assert kclient.get("/v1/me", headers=bearer(issued["key"])).json()["user"] == "alice"
    assert kclient.delete(f"/v1/users/alice/keys/{issued['id']}", headers=ADMIN).status_code == 204
    refused = kclient.get("/v1/me", headers=bearer(issued["key"]))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "bad_key"
    assert kclient.delete(f"/v1/users/alice/keys/{issued['id']}", headers=ADMIN).status_code == 404
    assert kclient.get("/v1/users/alice/keys", headers=ADMIN).json() == {"keys": []}


def test_every_call_needs_a_key_and_a_key_is_its_users_only(kclient):
    missing = kclient.post("/v1/chat/completions", json=HELLO)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert kclient.post("/v1/chat/completions", json=HELLO, headers={"X-User-Id": "alice"}).status_code == 401
    assert kclient.get("/v1/models", headers=bearer("kto-guessed")).status_code == 401
    alice, bob = issue(kclient, "alice"), issue(kclient, "bob")
    reply = kclient.post("/v1/chat/completions", json=HELLO, headers={**bearer(alice), "X-User-Id": "bob"})
    rid = reply.json()["id"]
    vote = kclient.post("/v1/feedback", json={"response_id": rid, "label": "down"}, headers=bearer(bob))
    assert vote.status_code == 403
    # the header names nobody in this mode: bob's key with alice's id is still bob
    vote = kclient.post(
        "/v1/feedback", json={"response_id": rid, "label": "down"}, headers={**bearer(bob), "X-User-Id": "alice"}
    )
    assert vote.status_code == 403
    assert (
        kclient.post("/v1/feedback", json={"response_id": rid, "label": "up"}, headers=bearer(alice)).status_code == 202
    )


def test_roles_user_annotator_admin(kclient):
    user, annotator, admin = issue(kclient, "u"), issue(kclient, "ann", "annotator"), issue(kclient, "ops", "admin")
    for key in (user, annotator):
        refused = kclient.post("/v1/adapters/rollback", json={}, headers=bearer(key))
        assert refused.status_code == 403 and "not an admin" in refused.json()["error"]["message"]
        assert kclient.post("/v1/users/x/keys", json={}, headers=bearer(key)).status_code == 403
    assert kclient.get("/v1/me", headers=bearer(annotator)).json()["role"] == "annotator"
    # an admin key issues keys and acts under its own name in the history
    assert issue(kclient, "carol", headers=bearer(admin))
    assert kclient.get("/v1/users/carol/keys", headers=bearer(admin)).json()["keys"][0]["created_by"] == "ops"
    assert kclient.post("/v1/adapters/rollback", json={"to": "base"}, headers=bearer(admin)).status_code == 200
    assert kclient.get("/v1/adapters/history", headers=ADMIN).json()["history"][-1]["actor"] == "ops"


def test_revoked_on_one_replica_is_refused_on_the_other_within_a_second(keyed):
    with TestClient(create_app(keyed), client=LOCAL) as a, TestClient(create_app(keyed), client=LOCAL) as b:
        assert_revocation_reaches(a, b)


@pytest.mark.redis
def test_revocation_reaches_every_replica_on_redis(services, keyed, tmp_path):
    url = f"{services.registry_url}?prefix=keys-{uuid.uuid4().hex}:"
    shared = {"registry_url": url, "adapter_dir": tmp_path / "adapters"}
    replicas = [keyed.model_copy(update={**shared, "data_dir": tmp_path / n}) for n in ("a", "b")]
    with TestClient(create_app(replicas[0]), client=LOCAL) as a, TestClient(create_app(replicas[1]), client=LOCAL) as b:
        assert_revocation_reaches(a, b)


def assert_revocation_reaches(a, b) -> None:
    reply = a.post("/v1/users/alice/keys", json={}, headers=ADMIN).json()
    assert b.get("/v1/me", headers=bearer(reply["key"])).json()["user"] == "alice"
    assert a.delete(f"/v1/users/alice/keys/{reply['id']}", headers=ADMIN).status_code == 204
    revoked_at = time.monotonic()
    while b.get("/v1/me", headers=bearer(reply["key"])).status_code != 401:
        assert time.monotonic() - revoked_at < 1.0, "replica B still accepts a key revoked on A"
        time.sleep(0.05)


def test_the_openai_client_works_with_an_api_key(keyed):
    with BackgroundServer(keyed) as server:
        key = issue(httpx.Client(base_url=server.url), "dana")
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key)
        completion = oai.chat.completions.create(
            model="kto-loop", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert next(m.id for m in oai.models.list()) == "kto-loop"
        vote = httpx.post(
            f"{server.url}/v1/feedback", json={"response_id": completion.id, "label": "up"}, headers=bearer(key)
        )
        assert vote.status_code == 202
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="kto-wrong", max_retries=0).models.list()


def test_guessing_keys_is_cut_off_by_the_failure_limit(keyed):
    with TestClient(create_app(keyed.model_copy(update={"rate_limit_auth_failures": "5/minute"})), client=LOCAL) as c:
        good = issue(c, "alice")
        statuses = [c.get("/v1/me", headers=bearer(f"kto-guess{n}")).status_code for n in range(8)]
        assert statuses == [401] * 5 + [429] * 3
        blocked = c.get("/v1/me", headers=bearer(good))  # even the right key, from that address, for now
        assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
        assert state_of(c).metrics.rate_limited.labels(scope="auth_failures", by="address")._value.get() == 4


def test_a_thousand_invented_users_get_no_rating_through(keyed):
    # Answered at once (no delay before a 429, see test_rate_limits): what is counted here is
    # what gets through, and a thousand held refusals would take a quarter of an hour.
    with TestClient(create_app(keyed.model_copy(update={"rate_limit_delay_s": 0})), client=LOCAL) as kclient:
        alice = issue(kclient, "alice")
        rid = kclient.post("/v1/chat/completions", json=HELLO, headers=bearer(alice)).json()["id"]
        statuses = {
            kclient.post(
                "/v1/feedback",
                json={"response_id": rid, "label": "down"},
                headers={"Authorization": f"Bearer kto-{n}", "X-User-Id": f"sock{n}"},
            ).status_code
            for n in range(1000)
        }
        assert statuses == {401, 429}
        assert entry_of(kclient, rid).label is None


def test_keys_answer_409_outside_api_key_mode(client):
    reply = client.post("/v1/users/alice/keys", json={}, headers=ADMIN)
    assert reply.status_code == 409 and "KTO_AUTH=api-key" in reply.json()["error"]["message"]


def test_erasing_a_user_revokes_their_keys(kclient):
    key = issue(kclient, "alice")
    assert kclient.delete("/v1/users/alice", headers=ADMIN).status_code == 202
    assert kclient.get("/v1/me", headers=bearer(key)).status_code == 401
