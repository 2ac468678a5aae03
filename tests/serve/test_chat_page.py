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

from ingest.events import FeedbackEvent, ResponseEvent, decode_event
from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from testkit.waiting import wait_for
from tests.serve.browser import chromium
from tests.tiny import TINY_MODEL_ID

ANSWER_TOKENS = 40
STEP_S = 0.03
"""Seconds added to each decoding step: a tiny model decodes a token in about a millisecond, so an
answer would arrive in one network read and "streams token by token" would be untestable."""
WAIT_S = 30
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


# --- helpers -----------------------------------------------------------------------------------

# Records the latest answer's text length (per answer) at every change the page makes to the
# conversation: a page that showed the answer only at the end would record one length.
RECORD_LENGTHS = """
window.recordedLengths = {};
const log = document.getElementById('messages');
new MutationObserver(() => {
  const answers = log.querySelectorAll('[data-testid=answer-text]');
  const last = answers.length - 1;
  if (last >= 0) (window.recordedLengths[last] ??= []).push(answers[last].textContent.length);
}).observe(log, {childList: true, subtree: true, characterData: true});
"""


def say(page, text: str) -> None:
    """Type `text` into the message box and press Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)


def finished_answer(page, n: int):
    """The n-th answer, once it has finished streaming (its vote buttons are shown)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(driver):
        answers = driver.find_elements(By.CSS_SELECTOR, "[data-testid=answer]")
        if len(answers) < n:
            return False
        answer = answers[n - 1]
        errors = [e.text for e in answer.find_elements(By.CSS_SELECTOR, "[role=alert]") if e.is_displayed()]
        assert not errors, errors
        return (
            answer if answer.get_attribute("aria-busy") == "false" and vote_buttons(answer)[0].is_displayed() else False
        )

    return WebDriverWait(page, WAIT_S, poll_frequency=0.1).until(done, f"answer {n} never finished")


def error_of(page, n: int) -> str:
    """The error shown in place of the n-th answer, once it shows; the answer has no vote buttons."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(driver):
        answers = driver.find_elements(By.CSS_SELECTOR, "[data-testid=answer]")
        alert = answers[n - 1].find_element(By.CSS_SELECTOR, "[role=alert]") if len(answers) >= n else None
        return alert if alert is not None and alert.is_displayed() else False

    alert = WebDriverWait(page, WAIT_S, poll_frequency=0.1).until(shown, f"answer {n} showed no error")
    assert not vote_buttons(page.find_elements(By.CSS_SELECTOR, "[data-testid=answer]")[n - 1])[0].is_displayed()
    return alert.text


def broken_publish(*args, **kwargs):
    raise OSError("disk full (simulated)")


def bubble(answer):
    from selenium.webdriver.common.by import By

    return answer.find_element(By.CSS_SELECTOR, "[data-testid=answer-text]")


def bubble_text(page, answer) -> str:
    """The answer's exact text (WebDriver's .text trims and folds whitespace)."""
    return page.execute_script("return arguments[0].textContent", bubble(answer))


def vote_buttons(answer):
    """(👎, 👍), found by their accessible labels."""
    from selenium.webdriver.common.by import By

    return (
        answer.find_element(By.CSS_SELECTOR, "button[aria-label='thumbs down']"),
        answer.find_element(By.CSS_SELECTOR, "button[aria-label='thumbs up']"),
    )


def details(answer) -> dict[str, str]:
    """What the answer's "details" toggle holds (its textContent: it need not be open)."""
    from selenium.webdriver.common.by import By

    terms = answer.find_elements(By.CSS_SELECTOR, "details dt")
    values = answer.find_elements(By.CSS_SELECTOR, "details dd")
    return {t.get_attribute("textContent"): v.get_attribute("textContent") for t, v in zip(terms, values)}


def events(server, kind, response_id: str, at_least: int = 1) -> list:
    """The events of `kind` about `response_id` on the server's bus, in order; [] until `at_least`."""
    state = server.state
    topic = state.topics.feedback if kind is FeedbackEvent else state.topics.responses
    consumer = state.bus.consumer(f"page-test-{uuid.uuid4().hex}", [topic])  # a new group reads from the start
    try:
        found = []
        while records := consumer.poll(timeout_s=0.2):
            found += [
                e
                for e in map(decode_event, (r.value for r in records))
                if isinstance(e, kind) and e.response_id == response_id
            ]
    finally:
        consumer.close()
    return found if len(found) >= at_least else []
