"""The real OHIF build in headless Chromium: behind login, from this origin only, by the review."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.viewer_site import (
    FLAGS,  # Chromium as the viewer bench runs it (WebGL 2, no GPU)
    serving,
)
from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Study
from pipeline.users import create_user
from pipeline.viewer import ohif
from tests.conftest import PASSWORD, REPO, chest_like, dicom_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Where `make install` put it: CXR_OHIF_DIR, else the data dir's (./var by default).
_DATA_DIR = Path(os.environ.get("CXR_DATA_DIR") or REPO / "var")
REAL_BUILD = Path(os.environ.get("CXR_OHIF_DIR") or _DATA_DIR / "ohif" / ohif.VERSION)
VIOLATIONS = """window.__csp = [];
document.addEventListener('securitypolicyviolation', e => window.__csp.push(
  [e.effectiveDirective, e.blockedURI, e.sourceFile].join(' ')));"""


@pytest.fixture
def ohif_server(settings, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The dashboard with the real build, a radiologist, and one DICOM study (not scored)."""
    if CHROMIUM is None:
        pytest.skip("Chromium not installed (.ci/run installs Debian's chromium)")
    if not ohif.installed(REAL_BUILD):
        pytest.skip(f"OHIF {ohif.VERSION} not installed at {REAL_BUILD}: `make install` does it")
    live = settings.with_(ohif_dir=str(REAL_BUILD))
    upgrade(live.db_url)
    factory = make_session_factory(make_engine(live.db_url))
    with factory() as session:
        create_user(session, "rad", PASSWORD, "radiologist")
        session.commit()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "chest.dcm").write_bytes(dicom_bytes(chest_like(seed=40)))
    (item,) = ingest_paths(factory, [tmp_path / "in"], Limits()).accepted
    with factory() as session:
        uid = session.get(Study, item.study_id).study_uid
    with serving(create_app({"CXR_SETTINGS": live})) as base:
        yield base, f"{item.study_id}:{uid}"


def test_ohif_loads_behind_login_from_this_origin_only(ohif_server) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    base, study = ohif_server
    study_id, uid = study.split(":")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        context.add_init_script(VIOLATIONS)
        page = context.new_page()
        requests, console, bad = [], [], []
        page.on("request", lambda r: requests.append(r))
        page.on("console", lambda m: console.append(m.text))
        page.on(
            "response",
            lambda r: (
                bad.append(f"{r.status} {r.url}") if r.status >= 400 and "/ohif/" in r.url else None
            ),
        )

        # Logged out, /ohif/ sends the browser to log in, and the login brings it back.
        page.goto(base + "/ohif/")
        assert page.url == base + "/login?next=%2Fohif%2F"
        page.fill("input[name=username]", "rad")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Study List", timeout=60_000)
        assert page.url == base + "/ohif/"
        assert page.evaluate("() => !!document.createElement('canvas').getContext('webgl2')")
        assert page.evaluate("window.__csp") == []

        # The study list asked our QIDO-RS, with the session cookie, for JSON.
        qido = [r for r in requests if r.url.startswith(base + "/dicomweb/studies?")]
        assert qido, [r.url for r in requests]
        assert "application/dicom+json" in qido[0].headers["accept"]
        assert "session=" in qido[0].all_headers().get("cookie", "")

        # The worklist's keys still work beside the new column: j selects, Enter opens the
        # study page; there, v opens the study in the viewer with the review panel beside it,
        # and the viewer asks QIDO for it.
        page.goto(base + "/")
        assert page.inner_text(f'tr[data-study-id="{study_id}"] td.open-viewer') == "Open in viewer"
        page.keyboard.press("j")
        page.keyboard.press("Enter")
        page.wait_for_url(f"{base}/studies/{study_id}")
        link = page.get_attribute("#open-in-viewer", "href")
        assert link == f"/studies/{study_id}?view=ohif"
        page.keyboard.press("v")
        page.wait_for_url(f"{base}{link}")
        direct = f"/ohif/viewer?StudyInstanceUIDs={uid}"
        assert page.get_attribute("#ohif-frame", "src") == direct
        assert page.get_attribute("#viewer-full", "href") == direct
        page.wait_for_function(
            "() => { const d = document.getElementById('ohif-frame')"
            ".contentDocument; const r = d && d.getElementById('root');"
            " return !!r && r.childElementCount > 0; }",
            timeout=60_000,
        )
        page.wait_for_timeout(3000)
        asked = [r.url for r in requests if r.url.startswith(base + "/dicomweb/")]
        assert any(f"StudyInstanceUID={uid}" in u for u in asked), asked
        assert page.evaluate("window.__csp") == []
        assert any("CornerstoneRender: using GPU rendering" in m for m in console), console
        # In the viewer its own keys apply; Esc comes back to the review panel, r marks read.
        box = page.locator("#ohif-frame").bounding_box()
        assert box is not None and box["width"] > 600 and box["height"] > 500
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        assert page.evaluate("document.activeElement.id") == "ohif-frame"
        page.keyboard.press("Escape")
        assert page.evaluate("document.activeElement.id") == "mark-read"
        page.keyboard.press("r")
        page.wait_for_selector("#reviews li.review")
        assert page.url == f"{base}/studies/{study_id}?view=ohif"
        assert page.inner_text("#reviews li.review").startswith("read by rad")

        foreign = [r.url for r in requests if not r.url.startswith(base)]
        assert foreign == [] and bad == []
        assert not [m for m in console if "Content Security Policy" in m], console
        context.close()
        browser.close()
