"""The dashboard in a real headless Chromium: log in, read the worklist, open a study, toggle CAM."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from dashboard import create_app
from pipeline.studies import worklist_query
from tests.conftest import PASSWORD

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (.ci/run installs Debian's chromium)"
)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture
def live_server(settings, populated) -> Iterator[str]:  # type: ignore[no-untyped-def]
    app = create_app({"CXR_SETTINGS": settings})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def page(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        yield context.new_page()
        context.close()
        browser.close()


def test_radiologist_reads_worklist_and_toggles_cam(live_server, page, populated, tmp_path) -> None:  # type: ignore[no-untyped-def]
    page.goto(live_server + "/")
    assert "/login" in page.url
    page.fill("input[name=username]", "rad")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#worklist")
    shown = [int(x) for x in page.eval_on_selector_all(
        "#worklist tbody tr", "rows => rows.map(r => r.dataset.studyId)")]  # fmt: skip
    with populated() as session:
        expected = [s.id for s in session.scalars(worklist_query())]
    assert shown == expected
    assert page.is_visible("#untrained-banner")
    page.screenshot(path=str(tmp_path / "worklist.png"), full_page=True)

    page.click(f'tr[data-study-id="{expected[0]}"] a')
    page.wait_for_selector(".cam-toggle")
    img = page.locator("figure img").first
    img.evaluate("i => i.complete || new Promise(r => i.onload = r)")
    assert img.evaluate("i => i.naturalWidth") > 0
    plain = img.get_attribute("src")
    page.check(".cam-toggle")
    page.wait_for_function("() => document.querySelector('figure img').src.includes('overlay.png')")
    img.evaluate("i => i.complete || new Promise(r => i.onload = r)")
    assert img.evaluate("i => i.naturalWidth") > 0
    assert img.get_attribute("src") != plain
    page.screenshot(path=str(tmp_path / "study.png"), full_page=True)

    page.click("button[value=read]")
    page.wait_for_selector("li.review")
    assert page.inner_text("li.review").startswith("read by rad")
    page.goto(live_server + "/")
    assert page.inner_text(f'tr[data-study-id="{expected[0]}"] td.read') == "✓"

    page.click("text=Log out")
    page.wait_for_url("**/login")
    page.goto(live_server + "/")
    assert "/login" in page.url
