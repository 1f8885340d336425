"""Ingest rules: lateral views, study grouping, header-only files, duplicates within a study."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import func, select, text

from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.ingest.persist import persist_file
from pipeline.ingest.transactions import ingest_many
from pipeline.migrate import upgrade
from pipeline.models import Image, Study
from pipeline.queue.dispatch import redis_client
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


def test_chunk_conflicting_with_a_concurrent_ingest_keeps_every_file(
    postgres_url, tmp_path
) -> None:
    """Another process commits a file of our chunk while our chunk is in flight (PostgreSQL
    blocks our insert on the unique key until then): our chunk falls back to one transaction
    per file, the shared file is a duplicate of theirs, and the others are ours."""
    upgrade(postgres_url)
    factory = make_session_factory(make_engine(postgres_url))
    shared = dicom_bytes(chest_like(seed=1))
    ours = [dicom_bytes(chest_like(seed=s)) for s in (2, 3)]
    theirs = factory()
    their_item = persist_file(theirs, shared, "shared.dcm", Limits(), source="other")
    result: dict[str, list] = {}
    worker = threading.Thread(
        target=lambda: result.setdefault(
            "items",
            ingest_many(
                factory, [(ours[0], "a.dcm"), (shared, "shared.dcm"), (ours[1], "b.dcm")], Limits()
            ),
        )
    )
    worker.start()
    # Commit theirs only once our chunk is blocked on their uncommitted unique key.
    deadline = time.monotonic() + 30
    while not _waiting_on_a_lock(postgres_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _waiting_on_a_lock(postgres_url), "our chunk never reached the conflicting insert"
    theirs.commit()
    theirs.close()
    worker.join(30)
    items = result["items"]
    assert [(i.path, i.status, i.duplicate) for i in items] == [
        ("a.dcm", "queued", False),
        ("shared.dcm", "queued", True),
        ("b.dcm", "queued", False),
    ]
    assert items[1].study_id == their_item.study_id
    with factory() as session:
        assert len(session.scalars(select(Image)).all()) == 3
        assert sorted(s.source for s in session.scalars(select(Study))) == ["cli", "cli", "other"]


def _waiting_on_a_lock(url: str) -> bool:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )
                ).scalar()
            )
    finally:
        engine.dispose()


def test_header_control_characters_and_long_values_never_fail_a_chunk(database_url) -> None:
    """NUL bytes, escape sequences and over-long values in a header (PostgreSQL refuses NUL in
    text and enforces lengths): the file is stored with clean values, its chunk-mates too."""
    from reliability.samples import dicom_bytes as raw_dicom

    upgrade(database_url)
    factory = make_session_factory(make_engine(database_url))
    bad = raw_dicom(
        chest_like(seed=5),
        ("Bad^Header", "P1"),
        raw_elements={
            0x00100010: ("PN", b"DOE^JANE\x00\x1b[31m\x01"),
            0x00080050: ("SH", b"ACC\x00\x1b[31m"),
            0x00100020: ("LO", b"P" * 300),
        },
    )
    files = [
        (dicom_bytes(chest_like(seed=4)), "a.dcm"),
        (bad, "bad\x00\x07.dcm"),
        (dicom_bytes(chest_like(seed=6)), "c.dcm"),
    ]
    items = ingest_many(factory, files, Limits())
    assert [i.status for i in items] == ["queued", "queued", "queued"]
    with factory() as session:
        study = session.get(Study, items[1].study_id)
        image = session.get(Image, items[1].image_id)
        assert study is not None and image is not None
        assert (study.accession_number, study.patient_name) == ("ACC[31m", "DOE^JANE[31m")
        assert study.patient_id == "P" * 64  # LO: at most 64 characters
        assert image.filename == "bad.dcm"
        assert image.meta["AccessionNumber"] == "ACC[31m"
        assert session.scalar(select(func.count(Image.id))) == 3


def _statements(engine, action):  # type: ignore[no-untyped-def]
    """Run action(); return the SQL statements it sent, in order."""
    from sqlalchemy import event

    seen: list[str] = []

    def record(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return seen


def test_a_chunk_costs_the_same_statements_for_two_files_as_for_twelve(database_url) -> None:
    """Dedup and study lookup are one query each for the lot, and the INSERTs are multi-row
    where the database can return ids in order (PostgreSQL); every file gets its own rows."""
    upgrade(database_url)
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    two = [(dicom_bytes(chest_like(seed=s)), f"{s}.dcm") for s in range(10, 12)]
    twelve = [(dicom_bytes(chest_like(seed=s)), f"{s}.dcm") for s in range(20, 32)]
    few = _statements(engine, lambda: ingest_many(factory, two, Limits()))
    many = _statements(engine, lambda: ingest_many(factory, twelve, Limits()))
    assert [s for s in many if s != "INSERT"] == [s for s in few if s != "INSERT"]
    assert few.count("SELECT") == many.count("SELECT") == 2  # dedup keys, study UIDs
    if database_url.startswith("postgresql"):
        assert few.count("INSERT") == many.count("INSERT") == 2  # studies, then images
    else:
        # SQLite cannot tie new rowids to parameter order: SQLAlchemy inserts row by row.
        assert (few.count("INSERT"), many.count("INSERT")) == (4, 24)
    with factory() as session:
        assert session.scalar(select(func.count(Image.id))) == 14
        assert session.scalar(select(func.count(Study.id))) == 14


def test_a_chunk_with_a_repeated_file_and_a_shared_study(database_url) -> None:
    """In one chunk: the same file twice is one image and a duplicate of it; two films of one
    StudyInstanceUID share one study; a file stored before is a duplicate of the stored one."""
    upgrade(database_url)
    factory = make_session_factory(make_engine(database_url))
    uid = generate_uid()
    stored = dicom_bytes(chest_like(seed=40))
    [before] = ingest_many(factory, [(stored, "before.dcm")], Limits())
    again = dicom_bytes(chest_like(seed=41))
    files = [
        (again, "a.dcm"),
        (dicom_bytes(chest_like(seed=42), study_uid=uid), "pa1.dcm"),
        (again, "a-copy.dcm"),
        (dicom_bytes(chest_like(seed=43), study_uid=uid), "pa2.dcm"),
        (stored, "before-copy.dcm"),
        (b"not an image", "junk.dcm"),
        (b"not an image", "junk-copy.dcm"),
    ]
    items = ingest_many(factory, files, Limits())
    assert [(i.path, i.status, i.duplicate) for i in items] == [
        ("a.dcm", "queued", False),
        ("pa1.dcm", "queued", False),
        ("a-copy.dcm", "queued", True),
        ("pa2.dcm", "queued", False),
        ("before-copy.dcm", "queued", True),
        ("junk.dcm", "rejected", False),
        ("junk-copy.dcm", "rejected", True),
    ]
    assert (items[2].image_id, items[2].study_id) == (items[0].image_id, items[0].study_id)
    assert items[1].study_id == items[3].study_id and items[1].image_id != items[3].image_id
    assert (items[4].image_id, items[4].study_id) == (before.image_id, before.study_id)
    assert items[6].image_id == items[5].image_id
    assert len({i.study_id for i in items}) == 4  # a, the shared study, before, junk
    with factory() as session:
        assert session.scalar(select(func.count(Image.id))) == 5  # before, a, pa1, pa2, junk
        shared = session.scalars(select(Study).where(Study.study_uid == uid)).one()
        assert shared.status == "queued"
        assert session.scalar(select(func.count(Image.id)).where(Image.study_id == shared.id)) == 2
