"""Fixtures the browser tests share: the system, the dashboard on a port, Chromium, and pages
logged in at the worklist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.viewer_site import serving
from dashboard import create_app
from tests.browser.dashboard_site import CHROMIUM, FLAGS, Page, System


@pytest.fixture
def system(settings, tmp_path) -> System:  # type: ignore[no-untyped-def]
    return System(settings, tmp_path)


@pytest.fixture
def live_server(system: System) -> Iterator[str]:
    with serving(create_app({"CXR_SETTINGS": system.settings, "WORKLIST_REFRESH_S": 1})) as base:
        yield base


@pytest.fixture
def browser() -> Iterator:  # type: ignore[type-arg]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_as(live_server: str, browser: Any, tmp_path: Path) -> Iterator[Callable[[str], Page]]:
    """Log a user in on a new page and wait for the worklist; the pages close after the test."""
    pages: list[Page] = []

    def open_page(username: str) -> Page:
        ui = Page(browser, live_server, tmp_path)
        pages.append(ui)
        ui.login(username)
        ui.page.wait_for_selector("#worklist")
        return ui

    yield open_page
    for ui in pages:
        ui.context.close()
