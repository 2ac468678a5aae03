"""Driving the annotation page as an annotator does (Selenium), and making answers to annotate."""

from __future__ import annotations

import httpx

from tests.serve.page_driver import WAIT_S


def chat(url: str, text: str, headers: dict[str, str]) -> tuple[str, str]:
    """A user's chat through the API: (response id, the answer's text)."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["id"], reply.json()["choices"][0]["message"]["content"]


def open_fresh(page, url: str) -> None:
    """The annotation page with nothing remembered from earlier tests (no name, no key)."""
    # Forgotten on another page of the origin: the annotation page itself, opened with an earlier
    # test's name, would lease the newest answer to that annotator.
    page.get(f"{url}/static/annotate.css")
    page.execute_script("localStorage.clear()")
    page.get(f"{url}/annotate")


def sign_in(page, form_id: str, text: str) -> None:
    """Type into the sign-in form `form_id` (`name-form` or `sign-in`), once it shows, and press Enter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    form = page.find_element(By.ID, form_id)
    WebDriverWait(page, WAIT_S, poll_frequency=0.1).until(lambda _: form.is_displayed(), f"no form {form_id}")
    form.find_element(By.TAG_NAME, "input").send_keys(text, Keys.ENTER)


def shown(page, other_than: str | None = None) -> str:
    """The response id of the answer the page shows, once it shows one (not `other_than`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(driver):
        error = driver.find_element(By.CSS_SELECTOR, "[role=alert]")
        assert not error.is_displayed(), error.text
        region = driver.find_element(By.CSS_SELECTOR, "[data-testid=item]")
        if region.get_attribute("aria-busy") != "false" or not completion(driver).is_displayed():
            return False
        response_id = region.get_attribute("data-response-id")
        return response_id if response_id and response_id != other_than else False

    return WebDriverWait(page, WAIT_S, poll_frequency=0.1).until(ready, "no answer shown")


def settled(page) -> str:
    """What the page shows once no request is under way: "item" (an answer) or "nothing"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(driver):
        if driver.find_element(By.CSS_SELECTOR, "[data-testid=item]").get_attribute("aria-busy") != "false":
            return False
        if driver.find_element(By.CSS_SELECTOR, "[data-testid=nothing]").is_displayed():
            return "nothing"
        return "item" if completion(driver).is_displayed() else False

    return WebDriverWait(page, WAIT_S, poll_frequency=0.1).until(ready, "neither an answer nor nothing shown")


def completion(page):
    from selenium.webdriver.common.by import By

    return page.find_element(By.CSS_SELECTOR, "[data-testid=completion]")


def text_of(page, element) -> str:
    """An element's exact text (WebDriver's .text trims and folds whitespace)."""
    return page.execute_script("return arguments[0].textContent", element)


def conversation(page) -> list[tuple[str, str]]:
    """The conversation shown above the answer: (role, text) per message."""
    from selenium.webdriver.common.by import By

    return [
        (
            text_of(page, m.find_element(By.CSS_SELECTOR, "[data-testid=role]")),
            text_of(page, m.find_element(By.CSS_SELECTOR, "[data-testid=content]")),
        )
        for m in page.find_elements(By.CSS_SELECTOR, "[data-testid=message]")
    ]


def alert(page) -> str:
    """The page's error, once it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = page.find_element(By.CSS_SELECTOR, "[role=alert]")
    WebDriverWait(page, WAIT_S, poll_frequency=0.1).until(lambda _: box.is_displayed(), "no error shown")
    return box.text


def button(page, name: str):
    """One of the judging buttons, by its accessible name: thumbs up, thumbs down, skip."""
    from selenium.webdriver.common.by import By

    return page.find_element(By.CSS_SELECTOR, f"[data-testid=item] button[aria-label='{name}']")


def press(page, key: str) -> None:
    """A key press wherever the focus is, as a person's."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(page).send_keys(key).perform()
