"""The chat page's implicit signals, end to end: a live server on a tiny model, headless Chromium,
the bus.

What a user does with an answer besides a thumb (ingest.signals): ↻ regenerate the latest answer,
copy an answer (its button, or Ctrl+C on a selection inside it), edit a question and send it again.
Each test does it through the buttons' accessible names and finds the feedback event on the bus:
source ``implicit``, the signal, the answer the act was about (its id as the page's details show
it) and the browser's user; and the next request no longer carries a replaced turn.
"""

from __future__ import annotations

import pytest

from ingest.events import FeedbackEvent, ResponseEvent
from serve.settings import ServeSettings
from testkit.background_server import BackgroundServer
from testkit.waiting import wait_for
from tests.serve.browser import chromium
from tests.serve.page_driver import (
    WAIT_S,
    bubble,
    bubble_text,
    button,
    details,
    events,
    finished_answer,
    questions,
    say,
    vote_buttons,
)
from tests.tiny import TINY_MODEL_ID


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    settings = ServeSettings(
        data_dir=tmp_path_factory.mktemp("page-signals") / "data",
        model=str(tiny_model_dir),
        model_id=TINY_MODEL_ID,
        default_max_tokens=8,
        torch_threads=1,
    )
    with BackgroundServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture
def page(browser, server):
    browser.get(server.url)
    return browser


def _user(page) -> str:
    user = page.execute_script("return localStorage.getItem('kto-loop-user')")
    assert user
    return user


def _signals(server, response_id: str, at_least: int = 1) -> list[tuple]:
    """(source, signal, label, user) of each feedback event on `response_id`, once there are `at_least`."""
    found = wait_for(
        lambda: events(server, FeedbackEvent, response_id, at_least=at_least),
        what=f"{at_least} feedback event(s) on {response_id}",
        timeout_s=WAIT_S,
    )
    return [(e.source, e.signal, e.label, e.user) for e in found]


def _clipboard(page, api: str = "navigator.clipboard") -> str:
    """What is on the clipboard (the test needs the clipboardReadWrite permission)."""
    return page.execute_async_script(
        f"const done = arguments[arguments.length - 1];"
        f"{api}.readText().then(done, (err) => done(`unreadable: ${{err}}`))"
    )


def _asked(server, answer) -> list[tuple[str, str]]:
    """The conversation the server was sent for `answer` (its response event's messages)."""
    response_id = details(answer)["response id"]
    found = wait_for(lambda: events(server, ResponseEvent, response_id), what="the response event", timeout_s=WAIT_S)
    return [(m.role, m.content) for m in found[0].messages]


def test_regenerate_replaces_the_latest_answer_and_says_it_was_not_wanted(page, server):
    user = _user(page)
    say(page, "Hello there")
    first = finished_answer(page, 1)
    assert button(first, "regenerate answer").is_displayed()  # the latest answer
    say(page, "Tell me more")
    second = finished_answer(page, 2)
    assert not button(first, "regenerate answer").is_displayed()  # only the latest answer has ↻
    replaced = details(second)["response id"]

    button(second, "regenerate answer").click()
    new = finished_answer(page, 2, replacing=replaced)
    assert _signals(server, replaced) == [("implicit", "regenerate", "undesirable", user)]
    # The question was asked again, once, and the replaced answer is neither shown nor sent.
    assert [q.find_element("css selector", ".bubble").text for q in questions(page)] == ["Hello there", "Tell me more"]
    assert len(page.find_elements("css selector", "[data-testid=answer]")) == 2
    assert _asked(server, new) == [
        ("user", "Hello there"),
        ("assistant", bubble_text(page, first)),
        ("user", "Tell me more"),
    ]
    assert button(new, "regenerate answer").is_displayed()


def test_copying_an_answer_counts_once_and_a_thumb_still_counts(page, server):
    # Reading the clipboard back needs the permission; writing it, the page has by default.
    page.execute_cdp_cmd("Browser.grantPermissions", {"origin": server.url, "permissions": ["clipboardReadWrite"]})
    user = _user(page)
    say(page, "Hello there")
    answer = finished_answer(page, 1)
    response_id = details(answer)["response id"]
    copy = button(answer, "copy answer")
    copy.click()
    text = bubble_text(page, answer)
    wait_for(lambda: _clipboard(page) == text, what="the answer on the clipboard", timeout_s=WAIT_S)
    assert _signals(server, response_id) == [("implicit", "copy", "desirable", user)]
    copy.click()  # copying it again sends nothing more
    # A thumb afterwards: once its event is on the bus, a second copy event would be too.
    _down, up = vote_buttons(answer)
    up.click()
    wait_for(lambda: up.get_attribute("aria-pressed") == "true", what="👍 shown as chosen", timeout_s=WAIT_S)
    assert _signals(server, response_id, at_least=2) == [
        ("implicit", "copy", "desirable", user),
        ("human", None, "desirable", user),
    ]


def test_without_the_clipboard_api_the_copy_button_still_copies(page, server):
    page.execute_cdp_cmd("Browser.grantPermissions", {"origin": server.url, "permissions": ["clipboardReadWrite"]})
    user = _user(page)
    # As on plain http off localhost, where browsers have no navigator.clipboard; the test keeps
    # it as window.clipboard, to read what was copied.
    page.execute_script(
        "window.clipboard = navigator.clipboard; Object.defineProperty(navigator, 'clipboard', {value: undefined});"
        "return window.clipboard.writeText('')"  # not what an earlier test copied
    )
    say(page, "Hello there")
    answer = finished_answer(page, 1)
    button(answer, "copy answer").click()  # selects the text and copies it the old way
    text = bubble_text(page, answer)
    # Chromium's copy of a selection drops NULs and turns no-break spaces into spaces (and the random
    # tiny model emits any byte); the clipboard API copies the text exactly.
    copied = text.replace("\x00", "").replace("\xa0", " ")
    wait_for(
        lambda: _clipboard(page, "window.clipboard") == copied, what="the answer on the clipboard", timeout_s=WAIT_S
    )
    assert page.execute_script("return getSelection().toString()") == text
    assert _signals(server, details(answer)["response id"]) == [("implicit", "copy", "desirable", user)]


def test_ctrl_c_on_a_selection_inside_an_answer_counts_as_copying_it(page, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    user = _user(page)
    say(page, "Hello there")
    first = finished_answer(page, 1)
    say(page, "Tell me more")
    second = finished_answer(page, 2)
    # Select the first answer's text, as a user dragging over it does, and press Ctrl+C.
    page.execute_script("getSelection().selectAllChildren(arguments[0])", bubble(first))
    ActionChains(page).key_down(Keys.CONTROL).send_keys("c").key_up(Keys.CONTROL).perform()
    assert _signals(server, details(first)["response id"]) == [("implicit", "copy", "desirable", user)]
    assert not events(server, FeedbackEvent, details(second)["response id"])


def test_editing_a_question_replaces_that_turn_and_what_followed(page, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    user = _user(page)
    say(page, "Hello there")
    first = finished_answer(page, 1)
    say(page, "Tell me more")
    second = finished_answer(page, 2)
    say(page, "And then?")
    finished_answer(page, 3)
    edited = details(second)["response id"]
    box = page.find_element(By.ID, "prompt")

    # Escape cancels an edit: the box is emptied, nothing is marked as being edited.
    button(questions(page)[2], "edit message").click()
    assert box.get_attribute("value") == "And then?"
    box.send_keys(Keys.ESCAPE)
    wait_for(
        lambda: not page.find_element(By.ID, "editing").is_displayed(), what="the edit cancelled", timeout_s=WAIT_S
    )
    assert box.get_attribute("value") == ""

    # Edit the second question: it comes back in the box; sending the new text replaces that turn.
    button(questions(page)[1], "edit message").click()
    assert box.get_attribute("value") == "Tell me more"
    assert page.find_element(By.ID, "editing").is_displayed()
    box.clear()
    say(page, "Tell me less")
    new = finished_answer(page, 2, replacing=edited)
    assert _signals(server, edited) == [("implicit", "edit", "undesirable", user)]
    assert [q.find_element(By.CSS_SELECTOR, ".bubble").text for q in questions(page)] == ["Hello there", "Tell me less"]
    assert len(page.find_elements(By.CSS_SELECTOR, "[data-testid=answer]")) == 2
    assert _asked(server, new) == [
        ("user", "Hello there"),
        ("assistant", bubble_text(page, first)),
        ("user", "Tell me less"),
    ]
    assert not page.find_element(By.ID, "editing").is_displayed()
