"""A site whose studies are opened in OHIF by headless Chromium: the bench's and the tests' own.

``populate`` ingests films into the instance store as every source does (the NEMA WG04 chest
CR, its JPEG 2000 twin, a 1024-px baseline JPEG made from the same film), scores them with the
given weights, and adds a radiologist. ``browser`` launches Debian's Chromium (no download)
with WebGL 2 on SwiftShader, which cornerstone needs; ``logged_in`` gives a fresh context (its
own empty cache) logged in as that radiologist, with OHIF's first-run tour marked as seen.

"First rendered image" (``WATCH``): the first of cornerstone's renders
(``CORNERSTONE_IMAGE_RENDERED``) after which the viewport's ``.cornerstone-canvas``, scaled
down to 64 x 64, has a grey-level standard deviation above ``BLANK_SD`` (of 255), timed by
``performance.now()``, which counts from the navigation's start (a poll every 250 ms stands
in should a render send no event; ``__firstImageBy`` says which saw it). A black or uniform canvas does not count: OHIF's rendered events and its
``studyToFirstImage`` timer fire for a viewport that stays black (the RG1 film did, before
``dicomweb_retrieve`` left its zero pixel spacing out of the metadata).
"""

from __future__ import annotations

import base64
import io
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits, decode_bytes
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Instance
from pipeline.settings import Settings
from pipeline.store.instances import InstanceStore

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RG1 = SHARED / "dicom" / "chest_cr_rg1"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
USER, PASSWORD = "viewer-rad", "viewer-pass-1234"
# Headless Chromium has no GPU: ANGLE on SwiftShader gives WebGL 2, which cornerstone needs.
FLAGS = [
    "--no-sandbox",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
VIEWPORT = {"width": 1440, "height": 900}
BLANK_SD = 8.0
# Before any page script: OHIF's tour seen (it would cover the viewport), every CSP violation
# kept, and the first frame with a film in the viewport timed.
WATCH = """
localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
window.__csp = [];
document.addEventListener('securitypolicyviolation', e => window.__csp.push(
  [e.effectiveDirective, e.blockedURI, e.sourceFile].join(' ')));
window.__firstImage = null;
window.__firstImageBy = null;
(() => {
  const probe = document.createElement('canvas');
  probe.width = probe.height = 64;
  const ctx = probe.getContext('2d', {willReadFrequently: true});
  const drawn = () => {
    const canvas = document.querySelector('.cornerstone-canvas');
    if (!canvas || canvas.width === 0 || canvas.height === 0) return false;
    ctx.clearRect(0, 0, 64, 64);
    ctx.drawImage(canvas, 0, 0, 64, 64);
    const d = ctx.getImageData(0, 0, 64, 64).data;
    let s = 0, s2 = 0;
    for (let i = 0; i < d.length; i += 4) {
      const g = (d[i] + d[i + 1] + d[i + 2]) / 3;
      s += g; s2 += g * g;
    }
    const n = d.length / 4, mean = s / n;
    return Math.sqrt(Math.max(0, s2 / n - mean * mean)) > BLANK_SD;
  };
  const check = by => {
    if (window.__firstImage === null && drawn()) {
      window.__firstImage = performance.now();
      window.__firstImageBy = by;
    }
  };
  // After each of cornerstone's renders (capture: the event does not bubble); a slow poll
  // in case a render sends none. Reading the canvas back costs the page's main thread, so
  // not on every animation frame.
  window.__renders = 0;
  window.__renderedImage = null;
  document.addEventListener('CORNERSTONE_IMAGE_RENDERED', e => {
    window.__renders += 1;
    try {
      window.__renderedImage = window.cornerstone.getEnabledElement(e.target).viewport
        .getCurrentImageId();
    } catch (err) { /* not a stack viewport */ }
    check('event');
  }, true);
  const poll = () => {
    check('poll');
    if (window.__firstImage === null) setTimeout(poll, 250);
  };
  setTimeout(poll, 250);
})();
""".replace("BLANK_SD", str(BLANK_SD))
# A viewport's canvas as a PNG, read back exactly as drawn.
CANVAS_PNG = "i => document.querySelectorAll('.cornerstone-canvas')[i].toDataURL('image/png')"


def available() -> str | None:
    """Why the viewer cannot be driven on this machine; None when it can."""
    if CHROMIUM is None:
        return "Chromium not installed (.ci/run installs Debian's chromium)"
    if not (RG1 / "RG1_UNCR.dcm").exists():
        return f"the NEMA WG04 chest CR is not at {RG1} (../shared/data)"
    return None


def jpeg_1024(source: Path, dest: Path) -> Path:
    """The film as the product displays it, 1024 px on its long side, as a baseline JPEG."""
    grey = decode_bytes(source.read_bytes(), source.name).pixels
    image = PILImage.fromarray(grey)
    scale = 1024 / max(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), PILImage.Resampling.LANCZOS
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    image.save(dest, "JPEG", quality=90, progressive=False)
    return dest


def films(folder: Path, j2k: bool = True) -> dict[str, Path]:
    """The CR (and its JPEG 2000 twin: same study and series) and the JPEG made from it."""
    out = {"cr": RG1 / "RG1_UNCR.dcm"}
    if j2k:
        out["cr_j2k"] = RG1 / "RG1_J2KR.dcm"
    out["jpeg"] = jpeg_1024(out["cr"], folder / "rg1-1024.jpg")
    return out


@dataclass
class Site:
    settings: Settings
    factory: sessionmaker[Session]
    studies: dict[str, str]  # film name → the study UID OHIF is opened with


def populate(settings: Settings, paths: dict[str, Path], redis: Any) -> Site:
    """Ingest the films into the store, score them with the settings' weights, add the user."""
    from pipeline.classifier.inference import classify_images
    from pipeline.classifier.network import Classifier
    from pipeline.users import create_user

    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, list(paths.values()), Limits(), store=InstanceStore.of(settings))
    if [i.status for i in report.items] != ["queued"] * len(paths):
        raise RuntimeError(f"ingest refused a film: {[i.reason for i in report.items]}")
    ids = [i.image_id for i in report.items if i.image_id is not None]
    done = classify_images(factory, redis, Classifier(settings.weights_path, "cpu", 1), ids).done
    if sorted(done) != sorted(ids):
        raise RuntimeError(f"scored {done} of {ids}")
    studies = {}
    with factory() as session:
        create_user(session, USER, PASSWORD, "radiologist")
        session.commit()
        for name, item in zip(paths, report.items, strict=True):
            studies[name] = session.scalars(
                select(Instance.study_uid).where(
                    Instance.image_id == item.image_id, Instance.kind.in_(("received", "capture"))
                )
            ).one()
    return Site(settings, factory, studies)


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve a WSGI app from threads of this process on a free loopback port; its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@contextmanager
def served(settings: Settings) -> Iterator[str]:
    """The dashboard on a real loopback port, in threads of this process."""
    from dashboard import create_app

    with serving(create_app({"CXR_SETTINGS": settings})) as base:
        yield base


@contextmanager
def browser() -> Iterator[Any]:
    """Headless Chromium, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def logged_in(chromium: Any, base: str, identity: bool = False) -> Any:
    """A fresh context (empty cache) with the radiologist logged in; returns its page.

    ``identity``: the browser asks for every response uncompressed (Accept-Encoding: identity).
    """
    headers = {"Accept-Encoding": "identity"} if identity else {}
    context = chromium.new_context(viewport=VIEWPORT, extra_http_headers=headers)
    context.add_init_script(WATCH)
    page = context.new_page()
    page.goto(base + "/login")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    return page


def viewer_url(base: str, study_uid: str, cpu: bool = False) -> str:
    """The study in OHIF; ``cpu``: its per-session switch to cornerstone's CPU rendering."""
    return f"{base}/ohif/viewer?StudyInstanceUIDs={study_uid}" + (
        "&viewportRendering=cpu" if cpu else ""
    )


def wait_first_image(page: Any, timeout_ms: float = 60_000) -> float:
    """Milliseconds from the navigation's start to the first frame with a film drawn."""
    page.wait_for_function("() => window.__firstImage !== null", timeout=timeout_ms, polling=50)
    return float(page.evaluate("window.__firstImage"))


def viewport_rgb(page: Any, index: int = 0) -> np.ndarray:
    """A viewport canvas as drawn (uint8, rows x columns x 3), the first by default."""
    url = page.evaluate(CANVAS_PNG, index)
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))


def viewport_pixels(page: Any, index: int = 0) -> np.ndarray:
    """A viewport canvas's grey levels (uint8, rows x columns), as drawn."""
    return viewport_rgb(page, index).astype(np.float32).mean(axis=2).round().astype(np.uint8)
