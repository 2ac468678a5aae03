"""Headless Chromium for the chat page's tests: Debian's `chromium` and `chromium-driver`, driven by
Selenium from PyPI.

The browser comes from ``deploy/services/services.py``'s ``ensure_chromium`` (apt-get, when root and
missing). When it cannot be had, the browser tests are skipped with the reason, except under CI
(``CI=true``), where that fails them. Selenium is always given the driver's path, so Selenium
Manager never tries to download a browser or a driver.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from tests.services import _services_module, _unavailable

WINDOW = (1000, 720)
"""Window size in CSS pixels: what the README screenshot shows."""


@functools.cache
def _binaries() -> tuple[str, str] | str:
    try:
        return _services_module().ensure_chromium()
    except SystemExit as exc:
        return f"Chromium (Debian's chromium and chromium-driver) is not available: {exc}"


def chromium() -> Iterator:
    """Body of a fixture: a headless Chrome WebDriver, quit at teardown (or skip / fail under CI)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = _binaries()
    if isinstance(found, str):
        _unavailable(found)
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--lang=en-US",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and every Chromium process it started
