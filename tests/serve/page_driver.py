"""Driving the chat page as a user does (Selenium), and reading what it sent off the server's bus."""

from __future__ import annotations

import uuid

from ingest.events import FeedbackEvent, decode_event

WAIT_S = 30
"""Seconds to wait for anything the page shows."""

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


def finished_answer(page, n: int, *, replacing: str | None = None):
    """The n-th answer, once it has finished streaming (its vote buttons are shown); with
    `replacing`, once it is another answer than the one with that response id."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(driver):
        answers = driver.find_elements(By.CSS_SELECTOR, "[data-testid=answer]")
        if len(answers) < n:
            return False
        answer = answers[n - 1]
        if replacing is not None and answer.get_attribute("data-response-id") == replacing:
            return False
        errors = [e.text for e in answer.find_elements(By.CSS_SELECTOR, "[role=alert]") if e.is_displayed()]
        assert not errors, errors
        return (
            answer if answer.get_attribute("aria-busy") == "false" and vote_buttons(answer)[0].is_displayed() else False
        )

    # An answer the page removes while it is looked at (a regenerate, an edit) is looked up again.
    wait = WebDriverWait(page, WAIT_S, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(done, f"answer {n} never finished")


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


def button(element, name: str):
    """The button inside `element` whose accessible name is `name` (its aria-label)."""
    from selenium.webdriver.common.by import By

    return element.find_element(By.CSS_SELECTOR, f"button[aria-label='{name}']")


def questions(page) -> list:
    """The user's messages on the page, in order."""
    from selenium.webdriver.common.by import By

    return page.find_elements(By.CSS_SELECTOR, "[data-testid=question]")


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
