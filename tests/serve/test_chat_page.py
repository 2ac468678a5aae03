"""The browser chat page, end to end: a live server on a tiny model, headless Chromium, the bus.

What a user does, through what a user sees: type and press Enter, watch the answer stream in,
press 👎 then 👍 (buttons found by their accessible names), and the feedback events are on the
bus, for that response and that browser's user. Errors (a refused prompt, a refused rating, an
answer failing mid-stream, no network) show in the page. With ``KTO_SCREENSHOT=PATH`` (``make screenshot``), the
conversation is saved there.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingest.events import FeedbackEvent, ResponseEvent
from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from testkit.waiting import wait_for
from tests.serve.browser import chromium
from tests.serve.page_driver import (
    RECORD_LENGTHS,
    WAIT_S,
    broken_publish,
    bubble,
    bubble_text,
    details,
    error_of,
    events,
    finished_answer,
    say,
    vote_buttons,
)
from tests.tiny import TINY_MODEL_ID

ANSWER_TOKENS = 40
STEP_S = 0.03
"""Seconds added to each decoding step: a tiny model decodes a token in about a millisecond, so an
answer would arrive in one network read and "streams token by token" would be untestable."""
SCREENSHOT = os.environ.get("KTO_SCREENSHOT")
"""Where to save the README's picture of the page (``make screenshot``); unset: no picture."""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    # For the picture, the demo model (about 20 s to build): it babbles words, where the random
    # tiny model's tokens are often bytes that are not valid UTF-8 on their own.
    model: dict[str, Any] = {} if SCREENSHOT else {"model": str(tiny_model_dir), "model_id": TINY_MODEL_ID}
    settings = ServeSettings(
        data_dir=tmp_path_factory.mktemp("page") / "data",
        **model,
        default_max_tokens=ANSWER_TOKENS,
        max_prompt_tokens=300,
        torch_threads=1,
    )
    with BackgroundServer(settings) as server:
        embeddings = server.state.loaded.model.get_input_embeddings()
        embeddings.register_forward_pre_hook(lambda *_: time.sleep(STEP_S))  # once per decoding step
        yield server


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture
def page(browser, server):
    browser.get(server.url)
    return browser


def test_the_page_and_its_files_are_served_without_a_token(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path, kind in (("/static/chat.js", "text/javascript"), ("/static/chat.css", "text/css")):
        assert f'"{path}"' in page.text
        asset = httpx.get(server.url + path, timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"] == f"{kind}; charset=utf-8", path
        assert asset.content
    missing = httpx.get(server.url + "/static/../app.py", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(server.url + "/static/index.html", timeout=10).status_code == 404  # only the listed files


def test_a_user_chats_streams_and_rates_in_the_browser(page, server):
    from selenium.webdriver.common.by import By

    user = page.execute_script("return localStorage.getItem('kto-loop-user')")
    assert user and len(user) >= 32
    page.execute_script(RECORD_LENGTHS)
    # Multi-turn: the second request must carry the first exchange.
    say(page, "Hello there")
    first = finished_answer(page, 1)
    say(page, "Tell me more")
    answer = finished_answer(page, 2)
    # Streamed: the page showed each answer growing, piece by piece, up to its final text. (Either
    # answer will do: a random tiny model may, rarely, end one after a token or two.)
    seen = page.execute_script("return window.recordedLengths")
    grown = {}
    for i, a in enumerate((first, answer)):
        distinct = sorted(set(n for n in seen.get(str(i), []) if n > 0))
        assert not distinct or distinct[-1] == page.execute_script("return arguments[0].textContent.length", bubble(a))
        grown[i] = len(distinct)
    assert max(grown.values()) >= 5, f"no answer arrived in pieces: distinct lengths seen {grown}, {seen}"

    response_id = details(answer)["response id"]
    assert response_id.startswith("chatcmpl-") and details(answer)["version"] == server.state.settings.base_model_id
    asked = wait_for(lambda: events(server, ResponseEvent, response_id), what="the response event", timeout_s=WAIT_S)
    assert [(m.role, m.content) for m in asked[0].messages] == [
        ("user", "Hello there"),
        ("assistant", bubble_text(page, first)),
        ("user", "Tell me more"),
    ]
    assert asked[0].user == user

    down, up = vote_buttons(answer)
    assert (down.accessible_name, up.accessible_name) == ("thumbs down", "thumbs up")
    down.click()
    wait_for(lambda: down.get_attribute("aria-pressed") == "true", what="👎 shown as chosen", timeout_s=WAIT_S)
    assert up.get_attribute("aria-pressed") == "false"
    rated = wait_for(lambda: events(server, FeedbackEvent, response_id), what="the 👎 feedback event", timeout_s=WAIT_S)
    assert [(e.label, e.user) for e in rated] == [("undesirable", user)]

    up.click()  # changing the vote is recorded too
    wait_for(lambda: up.get_attribute("aria-pressed") == "true", what="👍 shown as chosen", timeout_s=WAIT_S)
    assert down.get_attribute("aria-pressed") == "false"
    rated = wait_for(
        lambda: events(server, FeedbackEvent, response_id, at_least=2), what="the 👍 feedback event", timeout_s=WAIT_S
    )
    assert [(e.label, e.user) for e in rated] == [("undesirable", user), ("desirable", user)]
    assert not answer.find_element(By.CSS_SELECTOR, "[role=alert]").is_displayed()

    if SCREENSHOT:
        answer.find_element(By.TAG_NAME, "summary").click()  # show what "details" holds
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        assert page.save_screenshot(SCREENSHOT), SCREENSHOT

    page.refresh()  # the same browser keeps its user
    assert page.execute_script("return localStorage.getItem('kto-loop-user')") == user


def test_errors_are_shown_in_the_conversation(page, server, monkeypatch):
    from selenium.webdriver.common.by import By

    say(page, "Hi")
    answer = finished_answer(page, 1)
    # A rating from another user is refused (403): the page says so next to the answer.
    user = page.execute_script("return localStorage.getItem('kto-loop-user')")
    page.execute_script("localStorage.setItem('kto-loop-user', arguments[0])", f"someone-else-{uuid.uuid4()}")
    _down, up = vote_buttons(answer)
    up.click()
    alert = answer.find_element(By.CSS_SELECTOR, "[role=alert]")
    wait_for(alert.is_displayed, what="the rating's error", timeout_s=WAIT_S)
    assert "not saved" in alert.text and "only the user who received" in alert.text, alert.text
    assert up.get_attribute("aria-pressed") == "false"
    page.execute_script("localStorage.setItem('kto-loop-user', arguments[0])", user)

    # A prompt over KTO_MAX_PROMPT_TOKENS (400 context_length_exceeded): the error, no vote buttons,
    # and the text back in the box to edit.
    long_text = "far too long " * 300
    box = page.find_element(By.ID, "prompt")
    page.execute_script("arguments[0].value = arguments[1]", box, long_text)  # typing it would take long
    say(page, "")
    message = error_of(page, 2)
    assert "400" in message and "the limit is 300" in message, message
    assert box.get_attribute("value") == long_text.strip()
    # The refused turn is not in the history: the next message goes through.
    box.clear()
    say(page, "Shorter")
    finished_answer(page, 3)

    # An answer that fails while streaming (its event cannot be written: an SSE error chunk).
    with monkeypatch.context() as patch:
        patch.setattr(server.state.bus, "publish", broken_publish)
        say(page, "Once more")
        assert "could not be recorded" in error_of(page, 4)
    assert box.get_attribute("value") == "Once more"
    # The network is gone: the page says it could not reach the server.
    box.clear()
    page.set_network_conditions(offline=True, latency=0, download_throughput=-1, upload_throughput=-1)
    try:
        say(page, "Anyone there?")
        assert "Could not reach the server" in error_of(page, 5)
    finally:
        page.delete_network_conditions()
