"""Files in → Redis → a real Celery worker → ResNet + CAM → SQL → worklist, on both databases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from pipeline.db import make_engine, make_session_factory
from pipeline.models import Image, Prediction, Study
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_folder_to_worklist(database_url, settings, study_folder, worker_factory) -> None:
    settings = settings.with_(database_url=database_url)
    assert run_cli(["db", "upgrade"], settings).returncode == 0
    worker = worker_factory(settings)

    proc = run_cli(["ingest", str(study_folder), "--wait", "--json"], settings)
    assert proc.returncode == 0, proc.stderr[-3000:] + worker.output()[-3000:]
    doc = json.loads(proc.stdout)
    assert set(doc) == {"accepted", "duplicates", "rejected", "done", "failed", "studies"}
    assert (doc["accepted"], doc["duplicates"], doc["done"], doc["failed"]) == (3, 0, 3, 0)
    assert len(doc["rejected"]) == 1
    assert doc["rejected"][0]["path"].endswith("d_corrupt.dcm")
    assert "DICOM" in doc["rejected"][0]["reason"]
    by_name = {Path(s["path"]).name: s for s in doc["studies"]}
    assert set(by_name) == {"a_chest.jpg", "b_chest.png", "c_chest.dcm", "d_corrupt.dcm"}
    for name in ("a_chest.jpg", "b_chest.png", "c_chest.dcm"):
        s = by_name[name]
        assert s["status"] == "done"
        assert s["label"] in ("normal", "pneumonia", "covid19")
        assert 0.0 <= s["p_abnormal"] <= 1.0
        assert 0.0 <= s["priority"] <= 100.0
    assert by_name["d_corrupt.dcm"]["status"] == "rejected"
    assert by_name["d_corrupt.dcm"]["priority"] is None
    # The DICOM asked for STAT: its priority carries the boost over an equal unboosted score.
    assert by_name["c_chest.dcm"]["priority"] >= 20.0

    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        preds = session.scalars(select(Prediction)).all()
        assert len(preds) == 3
        for p in preds:
            cam = np.frombuffer(p.cam, dtype=np.float16).reshape(p.cam_h, p.cam_w)
            assert (p.cam_h, p.cam_w) == (7, 7)
            assert np.isfinite(cam).all() and float(np.abs(cam).max()) > 0
            assert abs(sum(p.probabilities.values()) - 1.0) < 1e-3
            assert p.model_version.startswith("resnet18-")
        rejected = session.scalars(select(Study).where(Study.status == "rejected")).one()
        assert rejected.reason and "DICOM" in rejected.reason

    wl = run_cli(["worklist", "--json"], settings)
    assert wl.returncode == 0, wl.stderr
    studies = json.loads(wl.stdout)["studies"]
    scored = [s["priority"] for s in studies if s["priority"] is not None]
    assert len(scored) == 3
    assert scored == sorted(scored, reverse=True)
    assert studies[-1]["status"] == "rejected"  # unscored studies come last
    assert {"id", "status", "label", "p_abnormal", "priority", "received_at"} <= set(studies[0])

    again = run_cli(["ingest", str(study_folder), "--wait", "--json"], settings)
    assert again.returncode == 0, again.stderr
    doc2 = json.loads(again.stdout)
    assert (doc2["accepted"], doc2["duplicates"], doc2["rejected"]) == (0, 4, [])
    assert {s["id"] for s in doc2["studies"]} == {s["id"] for s in doc["studies"]}
    with factory() as session:
        assert session.scalar(select(func.count(Prediction.id))) == 3
        assert session.scalar(select(func.count(Image.id))) == 4
        assert session.scalar(select(func.count(Study.id))) == 4
