"""Ingest rules: lateral views, study grouping, header-only files, duplicates within a study."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select

from pipeline.classifier import Classifier
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging import Limits
from pipeline.inference import classify_images
from pipeline.ingest import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Image, Study
from pipeline.queue import redis_client
from tests.conftest import chest_like, dicom_bytes


def _factory(settings):  # type: ignore[no-untyped-def]
    upgrade(settings.db_url)
    return make_session_factory(make_engine(settings.db_url))


def test_lateral_only_study_is_final_at_once(settings, tmp_path: Path) -> None:
    factory = _factory(settings)
    (tmp_path / "lat.dcm").write_bytes(dicom_bytes(view="LL"))
    report = ingest_paths(factory, [tmp_path / "lat.dcm"], Limits())
    assert [i.status for i in report.items] == ["skipped"]
    with factory() as session:
        study = session.scalars(select(Study)).one()
        assert study.status == "skipped"
        assert "lateral view (LL)" in (study.reason or "")
        assert study.done_at is not None


def test_frontal_and_lateral_share_a_study_scored_on_the_frontal(settings, tmp_path: Path) -> None:
    factory = _factory(settings)
    uid = generate_uid()
    (tmp_path / "pa.dcm").write_bytes(dicom_bytes(chest_like(seed=4), study_uid=uid, view="PA"))
    (tmp_path / "lat.dcm").write_bytes(dicom_bytes(chest_like(seed=5), study_uid=uid, view="LL"))
    report = ingest_paths(factory, [tmp_path], Limits())
    assert sorted(i.status for i in report.items) == ["queued", "skipped"]
    assert len({i.study_id for i in report.items}) == 1
    with factory() as session:
        assert session.scalars(select(Study)).one().status == "queued"
    queued = [i.image_id for i in report.items if i.status == "queued"]
    clf = Classifier(settings.weights, "cpu", 1)
    classify_images(factory, redis_client(settings.redis_url), clf, queued)
    with factory() as session:
        study = session.scalars(select(Study)).one()
        images = {img.view_position: img for img in session.scalars(select(Image))}
        assert study.status == "done" and study.priority is not None
        assert images["PA"].status == "done" and images["LL"].status == "skipped"
        assert images["LL"].predictions == []


def test_header_without_pixel_data_is_rejected_with_a_plain_reason(settings, tmp_path) -> None:
    factory = _factory(settings)
    (tmp_path / "hdr.dcm").write_bytes(dicom_bytes(pixel_data=False))
    report = ingest_paths(factory, [tmp_path / "hdr.dcm"], Limits())
    assert report.items[0].status == "rejected"
    assert report.items[0].reason == "no pixel data: the CR header arrived without its image"


def test_oversize_file_is_recorded_with_its_reason_and_deduplicated(settings, tmp_path) -> None:
    factory = _factory(settings)
    (tmp_path / "big.dcm").write_bytes(dicom_bytes())
    limits = Limits(max_bytes=1000)
    first = ingest_paths(factory, [tmp_path / "big.dcm"], limits)
    assert [(i.status, i.duplicate) for i in first.items] == [("rejected", False)]
    assert first.items[0].reason.endswith("over the 0 MB limit")
    assert first.items[0].reason.startswith("the file is 0.1 MB")
    with factory() as session:
        study = session.scalars(select(Study)).one()
        assert (study.status, study.reason) == ("rejected", first.items[0].reason)
    again = ingest_paths(factory, [tmp_path / "big.dcm"], limits)
    assert [(i.study_id, i.duplicate) for i in again.items] == [(study.id, True)]
    with factory() as session:
        assert len(session.scalars(select(Study)).all()) == 1
