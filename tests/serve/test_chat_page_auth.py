"""The chat page under the two ways a deployment names its users: a trusted proxy's header, and
API keys pasted into the page. Headless Chromium, a live server, the bus."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import httpx
import pytest

from ingest.events import FeedbackEvent, ResponseEvent
from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from testkit.ports import free_port
from testkit.waiting import wait_for
from tests.serve.browser import chromium
from tests.serve.conftest import ADMIN, ADMIN_TOKEN
from tests.serve.page_driver import WAIT_S, error_of, events, finished_answer, say, vote_buttons
from tests.tiny import TINY_MODEL_ID

PROXY_ADDRESS = "127.0.0.3"
"""The proxy connects from here, the one address the server trusts (not the browser's 127.0.0.1)."""


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def _settings(tmp_path_factory, tiny_model_dir, **changes) -> ServeSettings:
    return ServeSettings(
        data_dir=tmp_path_factory.mktemp("page-auth") / "data",
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        admin_token=ADMIN_TOKEN,
        default_max_tokens=6,
        **changes,
    )


def test_the_page_behind_a_trusted_proxy_is_the_proxys_user(browser, tmp_path_factory, tiny_model_dir):
    settings = _settings(tmp_path_factory, tiny_model_dir, trusted_proxies=PROXY_ADDRESS)
    with BackgroundServer(settings) as server, _proxy(server.url, user="pat@example.test") as proxied_url:
        browser.get(proxied_url)
        who = browser.find_element("css selector", "[data-testid=who]")
        wait_for(lambda: who.text == "signed in as pat@example.test", what="the proxy's user shown", timeout_s=WAIT_S)
        say(browser, "Hello")
        answer = finished_answer(browser, 1)
        response_id = answer.get_attribute("data-response-id")
        vote_buttons(answer)[0].click()
        rated = wait_for(lambda: events(server, FeedbackEvent, response_id), what="the 👎 event", timeout_s=WAIT_S)
        assert [(e.label, e.user) for e in rated] == [("undesirable", "pat@example.test")]

        # The same page straight from the server, not through the proxy: the browser's own id is
        # not believed, its answers are anonymous and cannot be rated.
        browser.get(server.url)
        who = browser.find_element("css selector", "[data-testid=who]")
        wait_for(lambda: "anonymous" in who.text, what="anonymous shown", timeout_s=WAIT_S)
        say(browser, "Hello")
        direct = finished_answer(browser, 1)
        assert events(server, ResponseEvent, direct.get_attribute("data-response-id"))[0].user is None
        vote_buttons(direct)[1].click()
        alert = direct.find_element("css selector", "[role=alert]")
        wait_for(alert.is_displayed, what="the refused rating", timeout_s=WAIT_S)
        assert "401" in alert.text and "rating needs a user" in alert.text, alert.text


def test_the_page_with_an_api_key(browser, tmp_path_factory, tiny_model_dir):
    settings = _settings(tmp_path_factory, tiny_model_dir, auth="api-key")
    with BackgroundServer(settings) as server:
        key = httpx.post(f"{server.url}/v1/users/kim/keys", json={}, headers=ADMIN).json()["key"]
        browser.get(server.url)
        browser.execute_script("localStorage.clear()")
        browser.get(server.url)
        form = browser.find_element("id", "sign-in")
        wait_for(form.is_displayed, what="the sign-in form", timeout_s=WAIT_S)

        box = browser.find_element("id", "key")
        box.send_keys("kto-not-a-key\n")
        error = browser.find_element("id", "sign-in-error")
        wait_for(error.is_displayed, what="the wrong key refused", timeout_s=WAIT_S)
        assert "unknown or revoked API key" in error.text

        browser.find_element("id", "key").send_keys(key + "\n")
        who = browser.find_element("css selector", "[data-testid=who]")
        wait_for(lambda: who.text == "signed in as kim", what="signed in", timeout_s=WAIT_S)
        assert not form.is_displayed()
        say(browser, "Hi")
        answer = finished_answer(browser, 1)
        response_id = answer.get_attribute("data-response-id")
        vote_buttons(answer)[1].click()
        rated = wait_for(lambda: events(server, FeedbackEvent, response_id), what="the 👍 event", timeout_s=WAIT_S)
        assert [(e.label, e.user) for e in rated] == [("desirable", "kim")]

        # Revoked while the page is open: the next message fails and the page asks for a key again.
        key_id = httpx.get(f"{server.url}/v1/users/kim/keys", headers=ADMIN).json()["keys"][0]["id"]
        assert httpx.delete(f"{server.url}/v1/users/kim/keys/{key_id}", headers=ADMIN).status_code == 204
        say(browser, "Still there?")
        assert "401" in error_of(browser, 2)
        wait_for(form.is_displayed, what="the sign-in form again", timeout_s=WAIT_S)


@contextlib.contextmanager
def _proxy(upstream: str, *, user: str) -> Iterator[str]:
    """A reverse proxy in front of `upstream`, as an authenticating front end is: it sets
    X-User-Id itself (whatever the browser sent) and X-Forwarded-For, and streams answers back."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, transport=httpx.AsyncHTTPTransport(local_address=PROXY_ADDRESS))
    hop_by_hop = {"host", "connection", "content-length", "transfer-encoding", "x-user-id", "x-forwarded-for"}

    async def forward(request: Request):
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop_by_hop}
        headers |= {"X-User-Id": user, "X-Forwarded-For": request.client.host if request.client else ""}
        outgoing = client.build_request(
            request.method, request.url.path, params=request.query_params, headers=headers, content=await request.body()
        )
        answer = await client.send(outgoing, stream=True)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in hop_by_hop | {"content-encoding"}}
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=kept)

    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the proxy to start", timeout_s=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
