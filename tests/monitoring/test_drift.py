"""Drift: PSI against the reference kept with the weights, the alarm, the worklist banner,
/metrics, and a site making its validated films the reference. On SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from dashboard import create_app
from pipeline.classifier.weights import file_sha256
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import AuditEvent, Image, Prediction, Study, utcnow
from pipeline.monitoring import drift
from pipeline.settings import Settings
from pipeline.users import create_user
from tests.conftest import PASSWORD, chest_like, run_cli
from tests.web import csrf_from, login


def test_psi_of_bins_and_categories() -> None:
    assert drift.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert drift.psi([0.5, 0.5], [0.8, 0.2]) == round(expected, 4)
    # A category the reference never saw counts against its floor of 1e-4.
    assert drift.psi({"jpeg": 1.0}, {"jpeg": 0.5, "dicom:CR": 0.5}) > 2.0
    assert drift.shares([0.05, 0.15, 0.15, 2.0], drift.EDGES["score"])[:2] == [0.25, 0.5]
    assert drift.shares([0.05, 0.15, 0.15, 2.0], drift.EDGES["score"])[-1] == 0.25  # clipped


@pytest.fixture
def settings(settings: Settings, database_url: str, tmp_path: Path) -> Settings:
    weights = tmp_path / "w" / "model.pt"
    weights.parent.mkdir()
    shutil.copy(settings.weights, weights)  # a reference file goes beside it
    return settings.with_(database_url=database_url, weights=weights)


def reference(settings: Settings) -> dict[str, Any]:
    """A reference like the shipped one: JPEG films of 224 px, mid-grey, scores spread."""
    rng = np.random.default_rng(0)
    doc = drift.profile(
        list(rng.uniform(0, 1, 500)),
        list(rng.normal(120, 15, 500)),
        [math.log2(224)] * 500,
        ["jpeg"] * 500,
    )
    ref = {
        "weights_sha256": file_sha256(settings.weights),
        "made": "2026-12-04",
        "n": 500,
        "from": {"test": True},
        "features": {k: v for k, v in doc.items() if k != "n"},
    }
    drift.reference_path(settings.weights).write_text(json.dumps(ref))
    return ref


def add_images(
    session: Any, n: int, kind: str, modality: str | None, side: int, mean: float, start: int = 0
) -> None:
    rng = np.random.default_rng(start)
    study = Study(status="done")
    session.add(study)
    session.flush()
    for i in range(start, start + n):
        img = Image(
            study_id=study.id,
            dedup_key=f"k{i}",
            kind=kind,
            modality=modality,
            width=side,
            height=side,
            status="done",
            done_at=utcnow(),
            meta={"input": {"mean": float(rng.normal(mean, 15)), "std": 40.0}},
        )
        session.add(img)
        session.flush()
        session.add(
            Prediction(
                image_id=img.id,
                model_version="m",
                probabilities={},
                label="x",
                p_abnormal=float(rng.uniform(0, 1)),
                triage_class="routine",
                priority=30.0,
                cam_class="x",
                cam=b"",
                cam_h=0,
                cam_w=0,
                batch_size=1,
                inference_ms=1.0,
            )
        )
    session.commit()


def test_status_alarm_needs_a_major_shift_over_enough_images(settings: Settings) -> None:
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    sha = file_sha256(settings.weights)
    with factory() as session:
        assert drift.status(session, None, utcnow())["note"].startswith("no drift reference")
        ref = reference(settings)
        assert drift.read_reference(settings.weights, sha) == ref
        assert drift.read_reference(settings.weights, "0" * 64) is None  # other weights
        add_images(session, 150, "jpeg", None, 224, 120.0)  # like the reference
        calm = drift.status(session, ref, utcnow())
        assert calm["live_images"] == 150 and calm["alarm"] is False
        assert all(f["level"] != "major" for f in calm["features"].values()), calm["features"]
        add_images(session, 150, "dicom", "CR", 2500, 60.0, start=1000)  # a CR department
        shifted = drift.status(session, ref, utcnow())
        assert shifted["alarm"] is True
        assert set(shifted["shifted"]) == {"intensity", "size", "kind"}
        assert shifted["features"]["score"]["level"] == "stable"
    small = make_session_factory(make_engine(settings.db_url))
    with small() as session:  # under MIN_IMAGES of the shifted films alone: no alarm
        session.query(Prediction).delete()
        session.query(Image).delete()
        session.commit()
        add_images(session, 50, "dicom", "CR", 2500, 60.0)
        few = drift.status(session, ref, utcnow())
        assert few["features"]["kind"]["level"] == "major" and few["alarm"] is False


def test_banner_metrics_console_and_site_reference(settings: Settings) -> None:
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    reference(settings)
    with factory() as session:
        create_user(session, "boss", PASSWORD, "admin")
        create_user(session, "rad", PASSWORD, "radiologist")
        add_images(session, 200, "dicom", "DX", 3000, 70.0)
    app = create_app({"CXR_SETTINGS": settings, "TESTING": True, "DRIFT_CACHE_S": 0})
    rad = app.test_client()
    assert login(rad, "rad").status_code == 302
    page = rad.get("/").get_data(as_text=True)
    assert 'id="drift-banner"' in page and "Scores may not be reliable here" in page
    assert rad.post("/admin/drift/accept").status_code in (400, 403)  # not an admin
    boss = app.test_client()
    assert login(boss, "boss").status_code == 302
    console = boss.get("/admin").get_data(as_text=True)
    assert (
        'id="drift" data-alarm="yes"' in console
        and 'data-feature="kind" data-level="major"' in console
    )
    metrics = boss.get("/metrics").get_data(as_text=True)
    assert "cxr_drift_alarm 1.0" in metrics and 'cxr_drift_psi{feature="size"}' in metrics
    doc = boss.get("/api/admin/drift").get_json()
    assert doc["alarm"] is True and doc["live_images"] == 200
    # The admin validated the model on these films: they become this site's reference.
    page = boss.post(
        "/admin/drift/accept", data={"csrf_token": csrf_from(console)}, follow_redirects=True
    ).get_data(as_text=True)
    assert "The last 200 scored images are now this site" in page
    site = json.loads(drift.site_reference_path(Path(settings.data_dir)).read_text())
    assert site["from"] == {"live": 200, "by": "boss"} and site["features"]["kind"] == {
        "dicom:DX": 1.0
    }
    assert 'data-alarm="no"' in boss.get("/admin").get_data(as_text=True)
    assert 'id="drift-banner"' not in rad.get("/").get_data(as_text=True)
    assert "cxr_drift_alarm 0.0" in boss.get("/metrics").get_data(as_text=True)
    with factory() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "drift_reference"))
        assert "200 scored images" in (event.detail or "")


def test_drift_reference_command(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "films"
    rows = []
    for i in range(12):
        label = "abnormal" if i % 2 else "normal"
        path = root / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        PILImage.fromarray(chest_like(256, i)).save(path)
        rows.append((path.name, label, "test"))
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    proc = run_cli(["drift-reference", str(root / "labels.csv"), "--json"], settings)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.strip().splitlines()
    assert json.loads(line)["n"] == 12
    ref = json.loads(drift.reference_path(settings.weights).read_text())
    assert ref["weights_sha256"] == file_sha256(settings.weights) and ref["n"] == 12
    assert ref["features"]["kind"] == {"png": 1.0}
    assert abs(sum(ref["features"]["score"]) - 1.0) < 1e-4
    assert ref["features"]["size"][drift.EDGES["size"].index(8.0)] == 1.0  # 256 px: log2 8
    proc = run_cli(
        ["drift-reference", str(root / "labels.csv"), "--subset", "val", "--json"], settings
    )
    assert proc.returncode == 2 and "no images in subset 'val'" in json.loads(proc.stdout)["error"]


def test_ingest_records_the_grey_level_drift_reads(settings: Settings, study_folder: Path) -> None:
    from pipeline.imaging.decode import Limits
    from pipeline.ingest.accept import ingest_paths

    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, [study_folder], Limits())
    assert report.accepted
    with factory() as session:
        rows = [(img.status, img.meta) for img in session.scalars(select(Image))]
    metas = [m for status, m in rows if status == "queued"]  # the films the model will score
    assert len(metas) >= 2 and all("input" in m for m in metas), rows
    assert all(0 < m["input"]["mean"] < 255 and m["input"]["std"] > 0 for m in metas)
