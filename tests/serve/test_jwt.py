"""KTO_AUTH=jwt: tokens are believed only with a good signature, issuer, audience and expiry."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serve.app import create_app
from tests.serve.conftest import LOCAL, entry_of

SECRET = "a-shared-secret-of-at-least-32-bytes!"
ISSUER, AUDIENCE = "https://id.example.test", "kto-loop"
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def claims(**changes) -> dict:
    return {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300, **changes}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def jwt_settings(settings):
    return settings.model_copy(
        update={"auth": "jwt", "jwt_secret": SecretStr(SECRET), "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}
    )


@pytest.fixture
def jclient(jwt_settings):
    with TestClient(create_app(jwt_settings), client=LOCAL) as client:
        yield client


def test_a_good_token_names_the_user_and_its_roles(jclient):
    me = jclient.get("/v1/me", headers=bearer(jwt.encode(claims(), SECRET))).json()
    assert (me["user"], me["role"], me["auth"]) == ("alice", "user", "jwt")
    admin = jwt.encode(claims(sub="ops", roles=["admin"]), SECRET)
    assert jclient.post("/v1/adapters/rollback", json={"to": "base"}, headers=bearer(admin)).status_code == 200
    assert jclient.get("/v1/adapters/history", headers=bearer(admin)).json()["history"][-1]["actor"] == "ops"
    annotator = jwt.encode(claims(sub="ann", roles="annotator"), SECRET)
    assert jclient.post("/v1/adapters/rollback", json={}, headers=bearer(annotator)).status_code == 403


@pytest.mark.parametrize(
    "why, token",
    [
        ("wrong key", lambda: jwt.encode(claims(), "another-secret-that-is-32-bytes-long")),
        ("alg none", lambda: jwt.encode(claims(), "", algorithm="none")),
        ("wrong audience", lambda: jwt.encode(claims(aud="someone-else"), SECRET)),
        ("wrong issuer", lambda: jwt.encode(claims(iss="https://evil.test"), SECRET)),
        ("expired", lambda: jwt.encode(claims(exp=int(time.time()) - 120), SECRET)),
        ("no expiry", lambda: jwt.encode({k: v for k, v in claims().items() if k != "exp"}, SECRET)),
        ("tampered", lambda: _tampered(jwt.encode(claims(sub="bob"), SECRET), sub="alice")),
        ("missing", lambda: ""),
    ],
)
def test_a_bad_token_is_refused(jclient, why, token):
    alices = jclient.post("/v1/chat/completions", json=HELLO, headers=bearer(jwt.encode(claims(), SECRET))).json()["id"]
    headers = bearer(token()) if token() else {"X-User-Id": "alice"}
    assert jclient.get("/v1/me", headers=headers).status_code == 401, why
    vote = jclient.post("/v1/feedback", json={"response_id": alices, "label": "down"}, headers=headers)
    assert vote.status_code == 401, why
    assert jclient.app.state.serve.ledger.lookup(alices).label is None


def _tampered(token: str, **changes) -> str:
    """The token with its payload rewritten and the old signature kept."""
    head, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged = base64.urlsafe_b64encode(json.dumps({**body, **changes}).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{signature}"


def test_rs256_from_a_jwks_file_and_url(settings, tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwks = json.dumps({"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]})
    (tmp_path / "jwks.json").write_text(jwks)
    token = jwt.encode(claims(sub="rita"), private, algorithm="RS256", headers={"kid": "k1"})
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(sub="rita"), other, algorithm="RS256", headers={"kid": "k1"})
    hs_with_public_key = jwt.encode(claims(sub="rita"), SECRET, algorithm="HS256", headers={"kid": "k1"})

    with _serving(jwks) as url:
        for source in (str(tmp_path / "jwks.json"), url):
            update = {"auth": "jwt", "jwt_jwks": source, "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}
            with TestClient(create_app(settings.model_copy(update=update)), client=LOCAL) as client:
                assert client.get("/v1/me", headers=bearer(token)).json()["user"] == "rita", source
                assert client.get("/v1/me", headers=bearer(forged)).status_code == 401, source
                assert client.get("/v1/me", headers=bearer(hs_with_public_key)).status_code == 401, source


class _serving:
    """A JWKS on a local HTTP server, as an identity provider publishes it."""

    def __init__(self, body: str):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


def test_jwt_mode_needs_issuer_audience_and_a_key(settings):
    from serve.settings import ServeSettings

    with pytest.raises(ValueError, match="KTO_JWT_ISSUER, KTO_JWT_AUDIENCE, KTO_JWT_SECRET or KTO_JWT_JWKS"):
        ServeSettings(auth="jwt", data_dir=settings.data_dir)
    with pytest.raises(ValueError, match="never accepted"):
        ServeSettings(auth="jwt", jwt_secret=SECRET, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_algorithms="none")


def test_a_thousand_invented_users_get_no_rating_through(jwt_settings):
    # No delay before a 429 here (test_rate_limits has it): a thousand held refusals take too long.
    with TestClient(create_app(jwt_settings.model_copy(update={"rate_limit_delay_s": 0})), client=LOCAL) as jclient:
        _no_rating_through(jclient)


def _no_rating_through(jclient) -> None:
    alices = jclient.post("/v1/chat/completions", json=HELLO, headers=bearer(jwt.encode(claims(), SECRET))).json()["id"]
    forger = "a-secret-the-forger-made-up-32-bytes!"
    statuses = {
        jclient.post(
            "/v1/feedback",
            json={"response_id": alices, "label": "down"},
            headers=bearer(jwt.encode(claims(sub=f"sock{n}" if n else "alice"), forger)),
        ).status_code
        for n in range(1000)
    }
    assert statuses == {401, 429}
    assert entry_of(jclient, alices).label is None
