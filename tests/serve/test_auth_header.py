"""KTO_AUTH=header: identity headers count only from trusted proxies; nobody else can pass as one."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.auth import UnsafeExposure
from tests.serve.conftest import ADMIN, LOCAL, entry_of

HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
OUTSIDER = ("203.0.113.9", 40000)  # TEST-NET-3: never a trusted proxy


def answer(client, headers) -> str:
    reply = client.post("/v1/chat/completions", json=HELLO, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def test_headers_from_outside_are_ignored_and_cannot_rate_anyones_answer(settings):
    with TestClient(create_app(settings), client=LOCAL) as proxy, TestClient(proxy.app, client=OUTSIDER) as outsider:
        alices = answer(proxy, {"X-User-Id": "alice"})
        forged = {"X-User-Id": "alice", "X-OpenWebUI-User-Id": "alice", "X-User-Role": "annotator"}
        me = outsider.get("/v1/me", headers=forged).json()
        assert me == {"user": None, "role": "user", "name": "anonymous", "auth": "header"}
        vote = outsider.post("/v1/feedback", json={"response_id": alices, "label": "down"}, headers=forged)
        assert vote.status_code == 401 and vote.json()["error"]["code"] == "anonymous"
        # chatting is allowed, as anonymous: nobody can rate that answer, not even "alice"
        theirs = answer(outsider, forged)
        assert entry_of(proxy, theirs).user is None
        vote = proxy.post("/v1/feedback", json={"response_id": theirs, "label": "up"}, headers={"X-User-Id": "alice"})
        assert vote.status_code == 403
        assert entry_of(proxy, alices).label is None


def test_forwarded_for_does_not_make_an_outsider_a_proxy(settings):
    with TestClient(create_app(settings), client=OUTSIDER) as outsider:
        spoofed = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "X-User-Id": "alice"}
        assert outsider.get("/v1/me", headers=spoofed).json()["user"] is None


def test_a_trusted_proxy_names_the_user_and_the_client_address(settings):
    proxied = settings.model_copy(update={"rate_limit_chat_address": "2/minute"})
    with TestClient(create_app(proxied), client=LOCAL) as proxy:
        for user in ("u1", "u2"):  # two users behind one client address
            answer(proxy, {"X-User-Id": user, "X-Forwarded-For": "198.51.100.7"})
        # that address used its two; another client behind the same proxy is served
        third = proxy.post(
            "/v1/chat/completions", json=HELLO, headers={"X-User-Id": "u3", "X-Forwarded-For": "198.51.100.7"}
        )
        assert third.status_code == 429
        answer(proxy, {"X-User-Id": "u4", "X-Forwarded-For": "198.51.100.8"})
        # the proxy's own address (no X-Forwarded-For) speaks for many: no address limit on it
        for n in range(3):
            answer(proxy, {"X-User-Id": f"direct{n}"})


def test_a_proxy_may_grant_annotator_but_never_admin(client):
    me = client.get("/v1/me", headers={"X-User-Id": "ann", "X-User-Role": "annotator"}).json()
    assert (me["user"], me["role"]) == ("ann", "annotator")
    refused = client.get("/v1/me", headers={"X-User-Id": "eve", "X-User-Role": "admin"})
    assert refused.status_code == 401 and "X-User-Role" in refused.json()["error"]["message"]
    admin = client.get("/v1/adapters", headers={"X-User-Id": "ann", "X-User-Role": "annotator"})
    assert admin.status_code == 401
    assert client.get("/v1/adapters", headers=ADMIN).status_code == 200


def test_over_real_sockets_an_untrusted_loopback_address_is_anonymous(live_server):
    """127.0.0.2 is this host but not in the default KTO_TRUSTED_PROXIES (127.0.0.1 and ::1)."""
    forged = {"X-User-Id": "alice"}
    outside = httpx.Client(base_url=live_server.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with outside, httpx.Client(base_url=live_server.url) as proxy:
        assert outside.get("/v1/me", headers=forged).json()["user"] is None
        assert proxy.get("/v1/me", headers=forged).json()["user"] == "alice"
        alices = answer(proxy, forged)
        assert (
            outside.post("/v1/feedback", json={"response_id": alices, "label": "down"}, headers=forged).status_code
            == 401
        )


def test_header_mode_refuses_a_public_address_without_named_proxies(settings):
    public = settings.model_copy(update={"host": "0.0.0.0"})
    with pytest.raises(UnsafeExposure, match="KTO_TRUSTED_PROXIES"):
        create_app(public)
    create_app(public.model_copy(update={"allow_header_auth_without_proxy": True}))  # said explicitly
    named = type(settings)(**{**settings.model_dump(), "host": "0.0.0.0", "trusted_proxies": "10.0.0.5"})
    create_app(named)
    create_app(public.model_copy(update={"auth": "api-key"}))  # keys verify themselves


def test_the_openai_clients_placeholder_key_does_not_matter_in_header_mode(client):
    headers = {"Authorization": "Bearer EMPTY", "X-User-Id": "alice"}
    assert client.get("/v1/me", headers=headers).json()["user"] == "alice"
    assert client.get("/v1/adapters", headers=headers).status_code == 401  # but it is no admin token


def test_one_outsider_inventing_a_thousand_ids_gets_no_rating_through(settings):
    with TestClient(create_app(settings), client=LOCAL) as proxy, TestClient(proxy.app, client=OUTSIDER) as outsider:
        targets = [answer(proxy, {"X-User-Id": f"victim{n}"}) for n in range(5)]
        statuses = [
            outsider.post(
                "/v1/feedback",
                json={"response_id": targets[n % len(targets)], "label": "down"},
                headers={"X-User-Id": f"victim{n % len(targets)}", "X-Forwarded-For": "127.0.0.1"},
            ).status_code
            for n in range(1000)
        ]
        assert set(statuses) <= {401, 429} and statuses.count(401) > 0
        assert all(entry_of(proxy, rid).label is None for rid in targets)
