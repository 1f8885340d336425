"""The dashboard in a real headless Chromium (Debian's binary, driven by Playwright; no browser
download): a radiologist logs in, sees abnormal studies above normal ones, watches a new study
appear without a reload, walks the worklist with the keyboard, opens a study, toggles the CAM
and changes its opacity, marks it read; an admin reads the console. Nothing is fetched from any
other origin and no Content-Security-Policy violation is reported.

With ../shared/data present the studies are real radiographs scored by the shipped model;
otherwise generated images and a random model. Set CXR_SCREENSHOTS=docs/screenshots to refresh
the README's screenshots.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from dashboard import create_app
from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.queue.dispatch import redis_client
from pipeline.settings import SHIPPED_WEIGHTS
from pipeline.triage.studies import worklist_query
from pipeline.users import create_user
from tests.conftest import PASSWORD, SHARED_DATA, chest_like, dicom_bytes, jpeg_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (.ci/run installs Debian's chromium)"
)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CXR = SHARED_DATA / "cxr"
REAL = [
    CXR / "kaggle-pneumonia/test/PNEUMONIA/person100_bacteria_475.jpeg",
    CXR / "kaggle-pneumonia/test/NORMAL/IM-0001-0001.jpeg",
    CXR / "covid19-radiography/covid19/COVID-10.jpg",
    CXR / "covid19-radiography/normal/Normal-10.jpg",
    CXR / "kaggle-pneumonia/test/NORMAL/IM-0003-0001.jpeg",
    SHARED_DATA / "dicom/chest_dx_nih/nih_cxr14_dx_sc_8bit.dcm",
    SHARED_DATA / "dicom/malformed/MR_truncated.dcm",
]
LATE = CXR / "covid19-radiography/covid19/COVID-100.jpg"
SEVERITY = {"critical": 0, "urgent": 1, "routine": 2, "normal": 3, None: 4}


class System:
    """A database of scored studies, the dashboard serving it, and a way to add more."""

    def __init__(self, settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        self.real = all(p.exists() for p in [*REAL, LATE])
        self.settings = settings.with_(weights=SHIPPED_WEIGHTS) if self.real else settings
        self.tmp = tmp_path
        upgrade(self.settings.db_url)
        self.factory = make_session_factory(make_engine(self.settings.db_url))
        self.classifier = Classifier(self.settings.weights, "cpu", 1)
        with self.factory() as session:
            create_user(session, "rad", PASSWORD, "radiologist")
            create_user(session, "boss", PASSWORD, "admin")
            session.commit()
        self.add(REAL if self.real else self._generated())

    def _generated(self) -> list[Path]:
        folder = self.tmp / "generated"
        folder.mkdir()
        for i in range(4):
            (folder / f"g{i}.jpg").write_bytes(jpeg_bytes(chest_like(seed=20 + i)))
        (folder / "stat.dcm").write_bytes(dicom_bytes(chest_like(seed=30), priority="STAT"))
        return sorted(folder.iterdir())

    def add(self, paths: list[Path], classify: bool = True) -> list[int]:
        """Ingest files (committed, queued); classify them in-process unless told not to."""
        report = ingest_paths(self.factory, paths, Limits())
        ids = [i.image_id for i in report.accepted]
        if classify:
            self.classify(ids)
        return [i.study_id for i in report.accepted]

    def classify(self, image_ids: list[int]) -> None:
        client = redis_client(self.settings.redis_url)
        classify_images(self.factory, client, self.classifier, image_ids)
        client.close()

    def order(self) -> list[tuple[int, str | None]]:
        with self.factory() as session:
            return [(s.id, s.triage_class) for s in session.scalars(worklist_query())]


@pytest.fixture
def system(settings, tmp_path) -> System:  # type: ignore[no-untyped-def]
    return System(settings, tmp_path)


@pytest.fixture
def live_server(system: System) -> Iterator[str]:
    app = create_app({"CXR_SETTINGS": system.settings, "WORKLIST_REFRESH_S": 1})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def browser() -> Iterator:  # type: ignore[type-arg]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


class Page:
    """A page that records every request and every console message."""

    def __init__(self, browser, base: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(viewport={"width": 1440, "height": 900})
        self.page = self.context.new_page()
        self.base, self.tmp = base, tmp_path
        self.requests: list[str] = []
        self.console: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append(m.text))

    def login(self, username: str) -> None:
        self.page.goto(self.base + "/")
        assert "/login" in self.page.url
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.click("button[type=submit]")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.tmp / name), full_page=True)
        target = os.environ.get("CXR_SCREENSHOTS")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(self.tmp / name, Path(target) / name)

    def rows(self) -> list[int]:
        return [
            int(x)
            for x in self.page.eval_on_selector_all(
                "#worklist tbody tr[data-study-id]", "rows => rows.map(r => r.dataset.studyId)"
            )
        ]

    def selected(self) -> int:
        return int(self.page.get_attribute("#worklist tr.selected", "data-study-id"))

    def self_contained(self) -> None:
        foreign = [u for u in self.requests if not u.startswith(self.base)]
        assert foreign == [], foreign
        assert not [m for m in self.console if "Content Security Policy" in m], self.console


def test_radiologist_worklist_live_keyboard_cam_and_read(
    system, live_server, browser, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    ui = Page(browser, live_server, tmp_path)
    page = ui.page
    ui.login("rad")
    page.wait_for_selector("#worklist")
    order = system.order()
    assert ui.rows() == [sid for sid, _ in order]
    ranks = [SEVERITY[cls] for _, cls in order]
    assert ranks == sorted(ranks)  # abnormal (critical, urgent, routine) above normal
    if system.real:
        assert {"normal"} < {cls for _, cls in order} and ranks[0] < SEVERITY["normal"]
        assert page.inner_text(f'tr[data-study-id="{order[0][0]}"] td.waiting').endswith("min")
    ui.shot("worklist.png")

    # A study arriving while the page is open appears without a reload, then gets its score.
    late = LATE if system.real else ui.tmp / "late.jpg"
    if not system.real:
        late.write_bytes(jpeg_bytes(chest_like(seed=99)))
    marker = page.evaluate("() => (window.__same_page = true)")
    (study_id,) = system.add([late], classify=False)
    row = f'#worklist tr[data-study-id="{study_id}"]'
    page.wait_for_selector(row, timeout=15_000)
    assert "queued" in page.inner_text(f"{row} td.status")
    with system.factory() as session:
        from pipeline.models import Image

        system.classify([i.id for i in session.query(Image).filter_by(study_id=study_id)])
    page.wait_for_function(
        f"() => document.querySelector('{row} td.status').textContent.startsWith('done')",
        timeout=15_000,
    )
    assert page.evaluate("() => window.__same_page") is marker is True  # never reloaded
    expected = [sid for sid, _ in system.order()]
    assert ui.rows() == expected

    # Keyboard: j, j selects the second row; Enter opens it; k goes to the previous study.
    page.keyboard.press("j")
    page.keyboard.press("j")
    assert ui.selected() == expected[1]
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/studies/{expected[1]}")
    page.keyboard.press("k")
    page.wait_for_url(f"**/studies/{expected[0]}")
    page.keyboard.press("j")
    page.wait_for_url(f"**/studies/{expected[1]}")

    # The CAM: o shows it, the slider sets its opacity; both survive moving to the next study.
    page.wait_for_selector("#radiograph")
    page.eval_on_selector("#radiograph", "i => i.complete || new Promise(r => i.onload = r)")
    assert page.eval_on_selector("#radiograph", "i => i.naturalWidth") > 0
    assert page.is_hidden("#cam")
    page.keyboard.press("o")
    assert page.is_visible("#cam") and page.is_checked("#cam-toggle")
    page.eval_on_selector("#cam", "i => i.complete || new Promise(r => i.onload = r)")
    assert page.eval_on_selector("#cam", "i => getComputedStyle(i).opacity") == "0.45"
    page.eval_on_selector(
        "#cam-opacity", "s => { s.value = 70; s.dispatchEvent(new Event('input')); }"
    )
    assert page.eval_on_selector("#cam", "i => getComputedStyle(i).opacity") == "0.7"
    assert page.inner_text("#cam-opacity-value") == "70 %"
    box = page.eval_on_selector("#cam", "i => [i.offsetWidth, i.offsetHeight]")
    assert box == page.eval_on_selector("#radiograph", "i => [i.offsetWidth, i.offsetHeight]")
    assert "catches" in page.inner_text("#operating-point") or not system.real
    ui.shot("study.png")

    # r marks it read, stored with who; the worklist shows the tick.
    page.keyboard.press("r")
    page.wait_for_selector("li.review")
    assert page.inner_text("li.review").startswith("read by rad")
    page.keyboard.press("o")
    assert page.is_hidden("#cam")
    page.goto(live_server + "/")
    assert page.inner_text(f'tr[data-study-id="{expected[1]}"] td.read') == "✓"

    page.click("text=Log out")
    page.wait_for_url("**/login")
    page.goto(live_server + "/")
    assert "/login" in page.url
    ui.self_contained()
    ui.context.close()


def test_admin_console_in_the_browser(system, live_server, browser, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ui = Page(browser, live_server, tmp_path)
    page = ui.page
    ui.login("boss")
    page.wait_for_selector("#worklist")
    page.click("#nav-console")
    page.wait_for_selector("#throughput-chart")
    bars = page.eval_on_selector_all("#throughput-chart g.bar", "b => b.map(g => +g.dataset.done)")
    scored = sum(1 for _, cls in system.order() if cls is not None)
    assert len(bars) == 60 and sum(bars) == scored
    assert page.inner_text('[data-tile="workers"] .big') == "0"  # Redis answers; no worker here
    assert "rejected" in page.inner_text("#problems") or not system.real
    ui.shot("admin.png")
    page.click("#nav-audit")
    page.wait_for_selector("#audit")
    assert page.inner_text("#audit tbody tr:first-child td.action") == "login"
    ui.self_contained()
    ui.context.close()


def test_admin_changes_the_policy_in_the_browser(system, live_server, browser, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ui = Page(browser, live_server, tmp_path)
    page = ui.page
    ui.login("boss")
    page.wait_for_selector("#worklist")
    page.click("#nav-policy")
    page.wait_for_selector("#active")
    assert page.get_attribute("#active", "data-version") == "0"
    assert page.inner_text("#max-wait") == "48 h"
    page.fill("#policy-form input[name=max_wait_h]", "24")
    page.fill("#policy-form input[name=reads_per_hour]", "12")
    page.click("#save-policy")  # no reason: refused, nothing saved
    page.wait_for_selector(".flash")
    assert "say why" in page.inner_text(".flash")
    assert page.get_attribute("#active", "data-version") == "0"
    page.fill("#policy-form input[name=max_wait_h]", "24")
    page.fill("#policy-form input[name=reads_per_hour]", "12")
    page.fill("#policy-form input[name=reason]", "night shift: one radiologist")
    page.click("#save-policy")
    page.wait_for_selector('#active[data-version="1"]')
    assert page.inner_text("#max-wait") == "24 h" and page.inner_text("#reads-per-hour") == "12.0"
    assert page.inner_text('#history tr[data-version="1"]').count("night shift") == 1
    page.click("#propose")  # too few reviewed studies here: the page says so
    page.wait_for_selector("#no-proposal")
    assert "at least 20 of each" in page.inner_text("#no-proposal")
    ui.shot("policy.png")
    page.click("#nav-console")
    page.wait_for_selector("#drift")
    assert page.get_attribute("#drift", "data-alarm") == "no"
    page.click("#nav-audit")
    page.wait_for_selector("#audit")
    assert page.inner_text("#audit tbody tr:first-child td.action") == "policy_change"
    ui.self_contained()
    ui.context.close()
