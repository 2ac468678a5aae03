"""The annotators' page, end to end: a live server on a tiny model, headless Chromium, the bus.

What an annotator does, through what they see: type their name once (or paste their key), read
the guidelines and the answer with its conversation (never whose it is), press `k` for 👎 or
Skip, and the next answer comes; the 👎 is on the bus as an annotator's event for the answer's
user. A key without the annotator role gets the API's 403 and no answer.

Each test signs in as an annotator of its own: each holds their own answer, and the queue offers
the newest first (the default strategy without a canary), which is the one the test just made.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from ingest.events import FeedbackEvent
from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from testkit.waiting import wait_for
from tests.serve.annotate_driver import (
    alert,
    button,
    chat,
    completion,
    conversation,
    open_fresh,
    press,
    settled,
    shown,
    sign_in,
    text_of,
)
from tests.serve.browser import chromium
from tests.serve.conftest import ADMIN, ADMIN_TOKEN
from tests.serve.page_driver import WAIT_S, events
from tests.tiny import TINY_MODEL_ID

ALICE = {"X-User-Id": "alice"}


def _settings(tmp_path_factory, tiny_model_dir, **changes) -> ServeSettings:
    return ServeSettings(
        data_dir=tmp_path_factory.mktemp("annotate") / "data",
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        admin_token=ADMIN_TOKEN,
        default_max_tokens=8,
        annotation_overlap=0.0,  # one annotator per answer: what an annotator is offered is certain
        torch_threads=1,
        **changes,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    with BackgroundServer(_settings(tmp_path_factory, tiny_model_dir)) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def annotator() -> str:
    return f"ann-{uuid.uuid4().hex[:8]}"


def test_the_page_and_its_files_are_served_without_a_token(server):
    page = httpx.get(server.url + "/annotate", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path, kind in (("/static/annotate.js", "text/javascript"), ("/static/annotate.css", "text/css")):
        assert f'"{path}"' in page.text
        asset = httpx.get(server.url + path, timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"] == f"{kind}; charset=utf-8", path
    assert httpx.get(server.url + "/static/annotate.html", timeout=10).status_code == 404  # only the listed files


def test_an_annotator_sees_the_guidelines_and_the_answer_but_not_whose_it_is(browser, server):
    guidelines = f"Judge the last answer only; be kind. ({uuid.uuid4().hex[:6]})"
    put = httpx.put(f"{server.url}/v1/annotations/config", json={"guidelines": guidelines}, headers=ADMIN, timeout=10)
    assert put.status_code == 200, put.text
    response_id, answer = chat(server.url, "What is the capital of France?", ALICE)

    open_fresh(browser, server.url)
    name = annotator()
    sign_in(browser, "name-form", name)
    assert shown(browser) == response_id
    assert text_of(browser, completion(browser)) == answer
    assert conversation(browser) == [("user", "What is the capital of France?")]
    assert browser.find_element("css selector", "[data-testid=guidelines]").text == guidelines
    assert browser.find_element("css selector", "[data-testid=who]").text == f"annotating as {name}"
    assert "alice" not in browser.page_source  # annotators never see whose answer it is
    for label, keys in (("thumbs up", "j 1"), ("thumbs down", "k 2"), ("skip", "s 0")):
        assert button(browser, label).get_attribute("aria-keyshortcuts") == keys

    browser.refresh()  # the name is kept, and the held answer comes back
    assert shown(browser) == response_id
    assert browser.find_element("css selector", "[data-testid=who]").text == f"annotating as {name}"


def test_a_thumbs_down_from_the_keyboard_is_an_annotator_event(browser, server):
    response_id, _ = chat(server.url, "Tell me a joke", ALICE)
    open_fresh(browser, server.url)
    name = annotator()
    sign_in(browser, "name-form", name)
    assert shown(browser) == response_id

    press(browser, "k")
    rated = wait_for(lambda: events(server, FeedbackEvent, response_id), what="the 👎 event", timeout_s=WAIT_S)
    assert [(e.source, e.label, e.rater, e.user, e.response_id) for e in rated] == [
        ("annotator", "undesirable", name, "alice", response_id)
    ]
    # The page moves on: past the labeled answer, to another waiting one or to "nothing waits".
    done = browser.find_element("css selector", "[data-testid=done]")
    wait_for(lambda: done.text == "1 labeled", what="the label counted", timeout_s=WAIT_S)
    region = browser.find_element("css selector", "[data-testid=item]")
    wait_for(lambda: region.get_attribute("data-response-id") != response_id, what="the next answer", timeout_s=WAIT_S)


def test_skip_shows_the_other_answer_and_labels_nothing(browser, server):
    first, _ = chat(server.url, "First question", ALICE)
    second, _ = chat(server.url, "Second question", ALICE)
    open_fresh(browser, server.url)
    sign_in(browser, "name-form", annotator())
    skipped = shown(browser)
    assert skipped in (first, second)

    button(browser, "skip").click()
    other = shown(browser, other_than=skipped)
    assert other == ({first, second} - {skipped}).pop()
    assert events(server, FeedbackEvent, skipped) == []

    browser.refresh()  # the skipped answer never comes back to them; the held one does
    assert shown(browser) == other


def test_nothing_waiting_is_said_and_checked_again(browser, server):
    open_fresh(browser, server.url)
    sign_in(browser, "name-form", annotator())
    # Skip whatever earlier tests left for others, until nothing waits for this annotator.
    for _ in range(20):
        if settled(browser) == "nothing":
            break
        button(browser, "skip").click()
    assert (
        browser.find_element("css selector", "[data-testid=nothing]").text == "Nothing waits for annotation right now."
    )
    response_id, answer = chat(server.url, "One more", ALICE)
    browser.find_element("css selector", "button[data-testid=check-again]").click()
    assert shown(browser) == response_id
    assert text_of(browser, completion(browser)) == answer


def test_only_an_annotator_key_gets_an_answer(browser, tmp_path_factory, tiny_model_dir):
    with BackgroundServer(_settings(tmp_path_factory, tiny_model_dir, auth="api-key")) as server:

        def key(user: str, role: str) -> str:
            issued = httpx.post(f"{server.url}/v1/users/{user}/keys", json={"role": role}, headers=ADMIN, timeout=10)
            assert issued.status_code == 201, issued.text
            return issued.json()["key"]

        response_id, answer = chat(server.url, "Hello from alice", {"Authorization": f"Bearer {key('alice', 'user')}"})
        open_fresh(browser, server.url)
        sign_in(browser, "sign-in", key("kim", "user"))
        message = alert(browser)
        assert "403" in message and "not an annotator" in message, message
        assert not completion(browser).is_displayed()
        assert "Hello from alice" not in browser.page_source and response_id not in browser.page_source

        browser.find_element("css selector", "[data-testid=sign-out]").click()
        sign_in(browser, "sign-in", key("ann", "annotator"))
        assert shown(browser) == response_id
        assert text_of(browser, completion(browser)) == answer
        assert conversation(browser) == [("user", "Hello from alice")]
