"""OHIF showing our studies, in a real headless Chromium: pixels, not just pages.

The NEMA WG04 chest CR (1955 x 1841, 15-bit, MONOCHROME1) and its JPEG 2000 twin, and a
1024-px JPEG study made from the same film, are ingested into the instance store, scored by the
shipped model and served on a real port. A radiologist opens the CR in OHIF: the viewport draws
the film (a real spread of grey levels, the header's window), a left drag (the Window/Level
tool, OHIF's default) changes its window and its pixels, the JPEG 2000 twin draws the same
pixels, and the study panel lists the CAM capture (in colour) and the SR; opened, the SR's
regions (the CAM's strongest cell) are drawn on the films they name; then the JPEG study.
Nothing is fetched from another origin, no request fails and no CSP violation is reported.

Set CXR_SCREENSHOTS=docs/screenshots to refresh ohif-worklist.png, ohif-cr.png, ohif-cam.png,
ohif-sr.png.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import viewer_site as site
from pipeline.queue.dispatch import redis_client
from pipeline.settings import SHIPPED_WEIGHTS
from pipeline.viewer import ohif
from tests.viewer.test_ohif_real_build import REAL_BUILD

WHY_NOT = site.available() or (
    None
    if ohif.installed(REAL_BUILD)
    else f"OHIF {ohif.VERSION} not installed at {REAL_BUILD}: `make install`"
)
needs_viewer = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
UNCR_SOP = "1.3.6.1.4.1.5962.1.1.9.1.1.20040826185059.5457"
J2K_SOP = "1.3.6.1.4.1.5962.1.1.9.1.2.20040826185059.5457"
DEFAULT = "window.cornerstone.getRenderingEngine('OHIFCornerstoneRenderingEngine')?.getViewport('default')"
VIEWPORT = (
    f"() => ({{image: {DEFAULT}.getCurrentImageId(), voi: {DEFAULT}.getProperties().voiRange}})"
)
ACTIVE_TOOL = """() => window.cornerstoneTools.ToolGroupManager
  .getToolGroupForViewport('default', 'OHIFCornerstoneRenderingEngine')
  .getActivePrimaryMouseButtonTool()"""
DISPLAY_SETS = """() => window.services.displaySetService.getActiveDisplaySets().map(d => ({
  uid: d.displaySetInstanceUID, series: d.SeriesNumber, modality: d.Modality,
  description: d.SeriesDescription || '', sop: d.instances?.[0]?.SOPInstanceUID || null}))"""
TWO_UP = (
    "() => window.commandsManager.runCommand('setViewportGridLayout', {numRows: 1, numCols: 2})"
)
TWO_FRAMES = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
SR_REGIONS = """() => (window.cornerstoneTools.annotation.state.getAllAnnotations() || [])
  .filter(a => a.metadata?.toolName === 'DICOMSRDisplay')
  .map(a => ({sop: (a.metadata.referencedImageId.match(/instances\\/([0-9.]+)/) || [])[1],
              points: a.data?.handles?.points?.length, label: String(a.data?.label || '')}))"""
THUMBNAILS = """() => [...document.querySelectorAll('[data-cy=study-browser-thumbnail]')].map(t => ({
  series: t.dataset.series, text: t.innerText, image: t.querySelector('img')?.src || null}))"""


# --------------------------------------------------------------------------- the browser


class Watched:
    """A logged-in page whose requests, failed responses and console errors are kept."""

    def __init__(self, chromium: Any, base: str, built: site.Site) -> None:
        self.base, self.studies = base, built.studies
        self.page = site.logged_in(chromium, base)
        self.requests: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        context = self.page.context
        context.on("request", lambda r: self.requests.append(r.url))
        context.on("requestfailed", lambda r: self.failed.append(f"{r.failure} {r.url}"))
        context.on(
            "response",
            lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None,
        )
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(f"{m.text} {m.location.get('url')}")
                if m.type == "error"
                else None
            ),
        )

    def open(self, study_uid: str) -> float:
        self.page.goto(site.viewer_url(self.base, study_uid))
        return site.wait_first_image(self.page)

    def shot(self, name: str) -> None:
        target = os.environ.get("CXR_SCREENSHOTS")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(target) / name))

    def assert_clean(self) -> None:
        assert self.page.evaluate("window.__csp") == []
        assert [u for u in self.requests if not u.startswith(self.base + "/")] == []
        assert self.failed == []
        assert self.errors == []


@pytest.fixture
def served(settings, tmp_path: Path) -> Iterator[tuple[str, site.Site]]:  # type: ignore[no-untyped-def]
    weights = SHIPPED_WEIGHTS if SHIPPED_WEIGHTS.exists() else settings.weights
    live = settings.with_(ohif_dir=str(REAL_BUILD), weights=weights)
    client = redis_client(live.redis_url)
    built = site.populate(live, site.films(tmp_path / "films"), client)
    client.close()
    with site.served(live) as base:
        yield base, built


@pytest.fixture
def chromium() -> Iterator[Any]:
    with site.browser() as browser:
        yield browser


@pytest.fixture
def seen(served: tuple[str, site.Site], chromium: Any) -> Watched:
    """A radiologist logged in to the served site, in Chromium, watched."""
    base, built = served
    return Watched(chromium, base, built)


def _spread(grey: np.ndarray) -> tuple[float, float, float, int]:
    """Standard deviation, 5th and 95th percentiles, and the number of grey levels used."""
    p5, p95 = np.percentile(grey, [5, 95])
    return float(grey.std()), float(p5), float(p95), len(np.unique(grey))


def _colour(rgb: np.ndarray) -> float:
    """How far from grey: the mean of each pixel's largest channel difference."""
    wide = rgb.astype(np.int16)
    return float((wide.max(axis=2) - wide.min(axis=2)).mean())


def _thumbnail_colour(data_url: str) -> float:
    from base64 import b64decode

    from PIL import Image

    image = Image.open(io.BytesIO(b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    return _colour(np.asarray(image))


def _overlay(page: Any) -> str:
    return re.sub(r"\s+", " ", page.inner_text("[data-cy=viewport-overlay-bottom-left]")).strip()


@needs_viewer
def test_the_cr_renders_window_level_changes_it_and_the_ai_series_are_listed(
    seen: Watched,
) -> None:
    page = seen.page
    # The worklist offers the viewer for the CR's study.
    link = page.locator("td.open-viewer a").first
    assert link.inner_text() == "Open in viewer" and link.is_visible()
    seen.shot("ohif-worklist.png")

    seen.open(seen.studies["cr"])
    page.wait_for_function(f"() => !!{DEFAULT}?.getProperties().voiRange")  # set after the draw
    state = page.evaluate(VIEWPORT)
    assert UNCR_SOP in state["image"]
    # The header's window (centre 15000, width 30000) as a linear VOI, shown in the overlay.
    assert state["voi"] == {"lower": 0, "upper": 29999}
    assert _overlay(page) == "W: 30000 L: 15000"
    before = site.viewport_pixels(page)
    sd, p5, p95, levels = _spread(before)
    assert sd > 40 and p5 < 40 and p95 > 180 and levels > 150, (sd, p5, p95, levels)
    page.wait_for_function(  # every thumbnail drawn: the two films, the CAM capture
        "() => [...document.querySelectorAll('[data-cy=study-browser-thumbnail] img')]"
        ".filter(i => i.naturalWidth > 0).length === 3"
    )
    seen.shot("ohif-cr.png")

    # The left button is OHIF's Window/Level: dragging left narrows the window.
    assert page.evaluate(ACTIVE_TOOL) == "WindowLevel"
    box = page.locator(".viewport-element").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 300, y + 40, steps=12)
    page.mouse.up()
    page.evaluate(TWO_FRAMES)
    voi = page.evaluate(VIEWPORT)["voi"]
    width, centre = voi["upper"] - voi["lower"] + 1, (voi["upper"] + voi["lower"] + 1) / 2
    assert width < 30000 * 0.8 and centre != 15000, voi
    assert _overlay(page) == f"W: {round(width)} L: {round(centre)}"
    after = site.viewport_pixels(page)
    assert after.shape == before.shape
    assert np.abs(after.astype(np.int16) - before).mean() > 8
    assert after.std() > before.std() + 5  # a narrower window: more contrast

    # The study panel: both films, the CAM capture (in colour: the heat map), the SR.
    sets = page.evaluate(DISPLAY_SETS)
    series = sorted((s["series"], s["modality"], s["description"]) for s in sets)
    assert series == [
        (1, "CR", ""),
        (1, "CR", ""),
        (9901, "SR", "AI triage - not a diagnosis"),
        (9902, "OT", "AI triage - not a diagnosis"),
    ]
    thumbs = {t["series"]: t for t in page.evaluate(THUMBNAILS) if t["series"] != "1"}
    assert list(thumbs) == ["9902"] and "AI triage - not a diagnosis" in thumbs["9902"]["text"]
    films = [t for t in page.evaluate(THUMBNAILS) if t["series"] == "1"]
    assert _thumbnail_colour(thumbs["9902"]["image"]) > 4  # the heat map: colour where it looked
    assert max(_thumbnail_colour(t["image"]) for t in films) < 1  # the films are grey
    sr = re.sub(r"\s+", " ", page.inner_text("[data-cy=study-browser-thumbnail-no-image]"))
    assert sr.strip() == "SR AI triage - not a diagnosis S:9901 1"

    # The JPEG 2000 twin, decoded in the browser, draws the same pixels (it is lossless).
    twin = next(s for s in sets if s["sop"] == J2K_SOP)
    page.dblclick(f"#thumbnail-{twin['uid']}")
    page.wait_for_function(f"() => (window.__renderedImage || '').includes('{J2K_SOP}')")
    page.evaluate(TWO_FRAMES)
    assert page.evaluate(VIEWPORT)["voi"] == {"lower": 0, "upper": 29999}
    assert np.abs(site.viewport_pixels(page).astype(np.int16) - before).mean() < 1.0

    # The film and its CAM capture side by side, as a radiologist would put them: the 1 x 2
    # layout, then each viewport clicked and a thumbnail double-clicked into it.
    film = next(s for s in sets if s["sop"] == UNCR_SOP)
    cam = next(s for s in sets if s["series"] == 9902)
    page.evaluate(TWO_UP)
    page.wait_for_function("() => document.querySelectorAll('.cornerstone-canvas').length === 2")
    for index, shown, sop in ((0, film, UNCR_SOP), (1, cam, None)):
        renders = page.evaluate("window.__renders")
        page.locator(".viewport-element").nth(index).click()
        page.dblclick(f"#thumbnail-{shown['uid']}")
        page.wait_for_function(
            f"() => window.__renders > {renders}"
            f" && (window.__renderedImage || '').includes('{sop or '/series/'}')"
        )
    page.wait_for_function("() => window.__renders > 0")
    page.evaluate(
        "() => window.services.cineService.setIsCineEnabled(false)"
    )  # its bar hides the film
    page.wait_for_timeout(500)
    left, right = site.viewport_rgb(page, 0), site.viewport_rgb(page, 1)
    assert _colour(left) < 1 and _colour(right) > 5, (_colour(left), _colour(right))
    assert _spread(left.mean(axis=2))[0] > 40 and _spread(right.mean(axis=2))[0] > 40
    seen.shot("ohif-cam.png")

    # The SR opened: OHIF draws each group's region (the CAM's strongest cell) on the film it
    # names, labelled with the abnormal probability: the study's group on the top-scoring
    # film, each film's on its own.
    page.dblclick("[data-cy=study-browser-thumbnail-no-image]")
    page.wait_for_function(f"() => ({SR_REGIONS})().length === 3")
    regions = page.evaluate(SR_REGIONS)
    sops = [r["sop"] for r in regions]
    assert len(sops) == 3 and set(sops) == {UNCR_SOP, J2K_SOP}
    assert all(r["points"] == 5 for r in regions), regions  # a closed rectangle
    p_abnormal = {round(float(r["label"].split()[0]), 2) for r in regions}
    assert len(p_abnormal) == 1 and 0.0 <= p_abnormal.pop() <= 1.0  # the same film twice
    assert "Something went wrong" not in page.inner_text("body")
    seen.shot("ohif-sr.png")
    seen.assert_clean()


@needs_viewer
def test_the_jpeg_study_renders_as_its_secondary_capture(seen: Watched) -> None:
    seen.open(seen.studies["jpeg"])
    page = seen.page
    grey = site.viewport_pixels(page)
    sd, p5, p95, levels = _spread(grey)
    assert sd > 40 and p5 < 40 and p95 > 180 and levels > 150, (sd, p5, p95, levels)
    sets = page.evaluate(DISPLAY_SETS)
    assert sorted((s["series"], s["modality"]) for s in sets) == [
        (9900, "OT"),
        (9901, "SR"),
        (9902, "OT"),
    ]
    shown = page.evaluate(VIEWPORT)["image"]
    capture = next(s for s in sets if s["series"] == 9900)
    assert capture["sop"] in shown and capture["description"] == "JPEG as received"
    seen.assert_clean()
