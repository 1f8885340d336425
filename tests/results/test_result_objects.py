"""The SR and CAM capture are valid DICOM, built the same on every send, with the CAM on the
crop the model read.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from pipeline.classifier.cam_place import place
from pipeline.classifier.registry import preprocess_of
from pipeline.cli.outbox import model_info
from pipeline.imaging.render import box_pixels
from pipeline.models import Image, Prediction
from pipeline.results.destinations import parse_url
from pipeline.results.dicom_objects import SOP_SC, SOP_SR
from pipeline.results.outbox import NOT_DICOM, queue_results
from pipeline.results.payloads import build_payload
from pipeline.settings import Settings
from pipeline.tables_results import ResultObject
from tests.results.support import add_destination, dicom_study, objects, outbox


def test_sr_and_capture_are_valid_dicom_and_the_same_on_every_build(
    populated: Any, settings: Settings, tmp_path: Path
) -> None:
    import highdicom as hd

    add_destination(populated, settings, parse_url("dicom://PACS@127.0.0.1:1"))
    counts = queue_results(populated, model_info(settings))
    assert counts["studies"] == 3  # the DICOM study and the JPEG and PNG ones
    objs = objects(populated)
    skipped = [o for o in objs if o.status == "skipped"]
    assert len(skipped) == 2 and {o.reason for o in skipped} == {NOT_DICOM}
    ready = [o for o in objs if o.status == "ready"]
    assert sorted(o.kind for o in ready) == ["sc", "sr"]
    assert len(outbox(populated)) == 2  # nothing owed for the skipped ones
    study = dicom_study(populated)
    with populated() as session:
        source = session.scalars(select(Image).where(Image.study_id == study.id)).one()
        payloads = {o.kind: build_payload(session, o) for o in ready}
        again = {o.kind: build_payload(session, o) for o in ready}
    assert payloads == again  # a retry sends byte-for-byte the same instance
    sr, sc = dcmread(io.BytesIO(payloads["sr"])), dcmread(io.BytesIO(payloads["sc"]))
    for ds, sop in ((sr, SOP_SR), (sc, SOP_SC)):
        assert ds.SOPClassUID == sop
        assert ds.StudyInstanceUID == study.study_uid
        assert ds.SeriesInstanceUID != source.series_uid
        assert (ds.PatientID, ds.PatientName, ds.AccessionNumber) == (
            "PID-0001",
            "Test^Patient",
            "ACC-0001",
        )
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert {o.uid for o in ready} == {sr.SOPInstanceUID, sc.SOPInstanceUID}
    # highdicom reads the SR back as a TID 1500 report with our values in it
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    assert report.get_evidence() == [
        (study.study_uid, source.series_uid, source.sop_uid, "1.2.840.10008.5.1.4.1.1.1")
    ]
    assert report.content.get_image_measurement_groups() == []  # every group has a region
    groups = report.content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["AI triage: study"]
    # the region is the CAM's strongest cell, on the part of the film the model read
    with populated() as session:
        img = session.get(Image, source.id)
        pred = session.scalars(select(Prediction).where(Prediction.image_id == source.id)).one()
        placed = place(session, img, pred, settings.weights_path)
        method = preprocess_of(session, pred.model_version, settings.weights_path)
    assert method == "resize" and placed.box == (0.0, 1.0, 0.0, 1.0)  # this model: the film
    region = groups[0].roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert (
        region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == source.sop_uid
    )
    r0, r1, c0, c1 = placed.peak
    cols, rows = source.width, source.height
    np.testing.assert_allclose(
        region.value,
        [
            [c0 * cols, r0 * rows],
            [c1 * cols, r0 * rows],
            [c1 * cols, r1 * rows],
            [c0 * cols, r1 * rows],
            [c0 * cols, r0 * rows],
        ],
        atol=1.0,
    )
    b0, b1, a0, a1 = placed.box
    assert b0 - 1e-6 <= r0 < r1 <= b1 + 1e-6 and a0 - 1e-6 <= c0 < c1 <= a1 + 1e-6
    (p_abn,) = [m for m in groups[0].get_measurements() if m.name.meaning == "Abnormal probability"]
    assert p_abn.value == pytest.approx(study.p_abnormal, abs=1e-6)
    evaluations = {e.name.meaning: e.value.meaning for e in groups[0].get_qualitative_evaluations()}
    assert evaluations["Triage class"] == study.triage_class.capitalize()
    assert groups[0].finding_type.meaning == {
        "normal": "Normal",
        "pneumonia": "Pneumonia",
        "covid19": "COVID-19",
    }.get(study.label, study.label)
    texts = {e.value for e in sr.iterall() if e.keyword == "TextValue"}
    assert study.model_version in texts
    assert any(t.startswith(f"policy {study.model_version}/policy-") for t in texts), texts
    assert sc.BurnedInAnnotation == "YES" and sc.pixel_array.shape[2] == 3

    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.sop_uid
    # the Debian validators: no errors (warnings: our private coding scheme, see README)
    for kind, data in payloads.items():
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(data)
        if shutil.which("dciodvfy"):
            out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            lines = (out.stdout + out.stderr).splitlines()
            assert not [ln for ln in lines if ln.startswith("Error")], lines
            # Allowed: our private coding scheme, and DICOMDIR-only attributes (Study ID, Study
            # Time) that are empty because the source study had none (Type 2, copied as is).
            warnings = {
                ln
                for ln in lines
                if ln.startswith("Warning") and "needed to build DICOMDIR" not in ln
            }
            assert warnings <= {
                "Warning - Unrecognized defined term <99CXRTRIAGE> for value 1 "
                "of attribute <Coding Scheme Designator>"
            }, warnings
    if shutil.which("dsrdump"):
        out = subprocess.run(
            ["dsrdump", "-v", str(tmp_path / "sr.dcm")], capture_output=True, text=True
        )
        assert out.returncode == 0 and "E:" not in out.stderr and "W:" not in out.stderr
        assert "Imaging Measurement Report" in out.stdout and "Abnormal probability" in out.stdout


def test_the_cam_lies_on_the_crop_the_model_read(
    settings: Settings, study_folder: Path, tmp_path: Path
) -> None:
    """The shipped model reads a thorax crop: its CAM is drawn on that crop of the film, in
    the capture, the study page's layers and the SR's region, never stretched over the film."""
    from PIL import Image as PILImage

    from pipeline.classifier.inference import classify_images
    from pipeline.classifier.network import Classifier
    from pipeline.db import make_engine, make_session_factory
    from pipeline.imaging.decode import Limits
    from pipeline.imaging.render import WHOLE
    from pipeline.ingest.accept import ingest_paths
    from pipeline.migrate import upgrade
    from pipeline.queue.dispatch import redis_client
    from pipeline.users import create_user
    from tests.conftest import PASSWORD, REPO
    from tests.web import login

    shipped = settings.with_(weights=REPO / "weights" / "cxr-resnet18.pt")
    upgrade(shipped.db_url)
    factory = make_session_factory(make_engine(shipped.db_url))
    report = ingest_paths(factory, [study_folder], Limits())
    ids = [i.image_id for i in report.accepted]
    done = classify_images(
        factory, redis_client(shipped.redis_url), Classifier(shipped.weights, "cpu", 1), ids
    )
    assert sorted(done.done) == sorted(ids)
    with factory() as session:
        create_user(session, "rad", PASSWORD, "radiologist")
        session.commit()
    add_destination(factory, shipped, parse_url("dicom://PACS@127.0.0.1:1"))
    queue_results(factory, model_info(shipped))
    study = dicom_study(factory)
    with factory() as session:
        source = session.scalars(select(Image).where(Image.study_id == study.id)).one()
        pred = session.scalars(select(Prediction).where(Prediction.image_id == source.id)).one()
        placed = place(session, source, pred, shipped.weights_path)
        assert preprocess_of(session, pred.model_version, shipped.weights_path) == "thorax"
        payloads = {
            o.kind: build_payload(session, o)
            for o in session.scalars(select(ResultObject).where(ResultObject.status == "ready"))
        }
    assert placed.box != WHOLE
    b0, b1, a0, a1 = placed.box
    assert 0.0 <= b0 < b1 <= 1.0 and 0.0 <= a0 < a1 <= 1.0 and (b1 - b0) * (a1 - a0) < 0.95
    # the capture: tinted inside the crop, the grey film outside it (below the label band)
    sc = dcmread(io.BytesIO(payloads["sc"]))
    rgb = sc.pixel_array.astype(int)
    h, w = rgb.shape[:2]
    y0, y1, x0, x1 = box_pixels(placed.box, w, h)
    tinted = (rgb.max(axis=2) - rgb.min(axis=2)) > 12
    outside = np.ones((h, w), dtype=bool)
    outside[y0:y1, x0:x1] = False
    outside[: max(18, h // 24) + 2] = False
    assert not tinted[outside].any() and tinted[y0:y1, x0:x1].mean() > 0.05
    # the study page's CAM layer: transparent outside the crop
    from dashboard import create_app

    client = create_app({"CXR_SETTINGS": shipped, "TESTING": True}).test_client()
    assert login(client).status_code == 302
    layer = client.get(f"/images/{source.id}/cam.png")
    assert layer.status_code == 200
    alpha = np.asarray(PILImage.open(io.BytesIO(layer.get_data())))[..., 3]
    lh, lw = alpha.shape
    ly0, ly1, lx0, lx1 = box_pixels(placed.box, lw, lh)
    inside = np.zeros_like(alpha, dtype=bool)
    inside[ly0:ly1, lx0:lx1] = True
    assert alpha[~inside].max() == 0 and alpha[inside].max() > 200
    # the SR's region: the strongest cell, inside the crop, in the film's pixels
    import highdicom as hd

    (group,) = hd.sr.ComprehensiveSR.from_dataset(
        dcmread(io.BytesIO(payloads["sr"]))
    ).content.get_planar_roi_measurement_groups()
    xs, ys = group.roi.value[:, 0] / source.width, group.roi.value[:, 1] / source.height
    r0, r1, c0, c1 = placed.peak
    np.testing.assert_allclose(
        [ys.min(), ys.max(), xs.min(), xs.max()],
        [r0, r1, c0, c1],
        atol=2.0 / min(source.width, source.height),
    )
    assert b0 - 1e-6 <= r0 and r1 <= b1 + 1e-6 and a0 - 1e-6 <= c0 and c1 <= a1 + 1e-6
