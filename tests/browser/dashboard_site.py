"""The dashboard's site for the browser tests: scored studies (real films with ../shared/data),
and a Chromium page that records what it fetched and what it logged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.queue.dispatch import redis_client
from pipeline.settings import SHIPPED_WEIGHTS
from pipeline.triage.worklist import worklist_query
from pipeline.users import create_user
from tests.conftest import PASSWORD, SHARED_DATA, chest_like, dicom_bytes, jpeg_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
