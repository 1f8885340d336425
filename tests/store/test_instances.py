"""The instance store: what was received is kept as received, and the store stays bounded
without ever losing a study that still waits for a read.

Retention and the size limit are run on a real database (SQLite and PostgreSQL); the full
disk is a real 4 MB tmpfs under the store (skipped where mounting is not allowed).
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from dashboard.monitor import instance_store
from pipeline.db import make_engine, make_session_factory, session_scope
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Image, Instance, Review, Study, User, utcnow
from pipeline.settings import Settings
from pipeline.storage import StorageFull
from pipeline.store.capture import capture
from pipeline.store.dicom_file import describe
from pipeline.store.instances import InstanceStore, valid_uid
from pipeline.store.retention import expire, store_state
from reliability.smalldisk import SmallDisk
from tests.conftest import chest_like, dicom_bytes, jpeg_bytes, png_bytes


def _ingest(
    settings: Settings, folder: Path, names: dict[str, bytes], store: InstanceStore | None = None
) -> list[int]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in names.items():
        (folder / name).write_bytes(data)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(
        factory, [folder / n for n in names], Limits(), store=store or InstanceStore.of(settings)
    )
    return [i.study_id for i in report.items]


def _store_settings(database_url: str, tmp_path: Path, **kw: object) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, redis_url=None, **kw)  # type: ignore[arg-type]
    upgrade(settings.db_url)
    return settings


def test_uids_are_checked() -> None:
    assert valid_uid("1.2.840.10008.1.2.1")
    for bad in ("", "1.2.", ".1", "1..2", "1.02", "1.2.a", "1/2", "../1", "1." + "2" * 63):
        assert not valid_uid(bad), bad


def test_received_bytes_are_kept_and_captures_made(database_url: str, tmp_path: Path) -> None:
    settings = _store_settings(database_url, tmp_path)
    dicom = dicom_bytes(chest_like(seed=1))
    jpeg, png = jpeg_bytes(chest_like(seed=2)), png_bytes(chest_like(seed=3))
    _ingest(settings, tmp_path / "in", {"a.dcm": dicom, "b.jpg": jpeg, "c.png": png})
    store = InstanceStore.of(settings)
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        rows = {r.kind + ":" + r.transfer_syntax: r for r in session.scalars(select(Instance))}
        studies = {s.id: s for s in session.scalars(select(Study))}
        assert sorted(rows) == [
            "capture:1.2.840.10008.1.2.1",
            "capture:1.2.840.10008.1.2.4.50",
            "received:1.2.840.10008.1.2.1",
        ]
        received = rows["received:1.2.840.10008.1.2.1"]
        with store.open(received.path) as fh:
            assert fh.read() == dicom
        for row in rows.values():
            assert row.study_uid == studies[row.study_id].study_uid  # JPEG studies got a UID
            assert (row.rows, row.columns) == (256, 256)
        with store.open(rows["capture:1.2.840.10008.1.2.4.50"].path) as fh:
            ds = pydicom.dcmread(fh)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert (
            ds.PatientID == ""
            and ds.StudyInstanceUID == rows["capture:1.2.840.10008.1.2.4.50"].study_uid
        )
    # the same files again: duplicates, nothing new in the store
    _ingest(settings, tmp_path / "again", {"a.dcm": dicom, "b.jpg": jpeg})
    with factory() as session:
        assert session.scalar(select(func.count(Instance.id))) == 3
        shown = instance_store(session, settings)  # the admin console's card
        assert shown["instances"] == 3 and shown["studies"] == 3
        assert shown["bytes"] == sum(store.size_of(r.path) for r in rows.values())
        assert shown["unread_bytes"] == shown["bytes"] and "root" not in shown


def test_a_bare_dataset_gets_a_part10_header_with_its_bytes_untouched() -> None:
    whole = dicom_bytes(chest_like(seed=4))
    ds = pydicom.dcmread(io.BytesIO(whole))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=False, little_endian=True)
    bare = buf.getvalue()[buf.getvalue().index(b"\x08\x00") :]  # no preamble, no meta
    described, data = describe(bare)
    assert data.endswith(bare) and data[128:132] == b"DICM"
    assert described.sop_uid == ds.SOPInstanceUID
    assert pydicom.dcmread(io.BytesIO(data)).pixel_array.shape == (256, 256)


def test_a_16_bit_png_keeps_its_bits() -> None:
    import numpy as np
    from PIL import Image as PILImage

    values = (chest_like(seed=5).astype(np.uint16) * 200).astype(np.uint16)
    buf = io.BytesIO()
    PILImage.fromarray(values).save(buf, "PNG")
    data = capture(buf.getvalue(), "png", {"study_uid": "1.2.3.4"}, {}, "sha256:x")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.BitsStored == 16 and np.array_equal(ds.pixel_array, values)


def _read(settings: Settings, study_id: int) -> None:
    factory = make_session_factory(make_engine(settings.db_url))
    with session_scope(factory) as session:
        user = session.scalars(select(User)).first()
        if user is None:
            user = User(username="rad", password_hash="x", role="radiologist")
            session.add(user)
            session.flush()
        session.add(Review(study_id=study_id, user_id=user.id, action="read"))


def _age(settings: Settings, study_id: int, days: float) -> None:
    factory = make_session_factory(make_engine(settings.db_url))
    with session_scope(factory) as session:
        study = session.get(Study, study_id)
        assert study is not None
        study.received_at = utcnow() - timedelta(days=days)


def test_retention_never_removes_an_unread_study(database_url: str, tmp_path: Path) -> None:
    settings = _store_settings(database_url, tmp_path, store_retention_days=30)
    films = {f"{n}.dcm": dicom_bytes(chest_like(seed=10 + n)) for n in range(4)}
    ids = _ingest(settings, tmp_path / "in", films)
    old_read, old_unread, new_read, new_unread = ids
    for study_id in (old_read, old_unread):
        _age(settings, study_id, 45)
    for study_id in (old_read, new_read):
        _read(settings, study_id)
    store = InstanceStore.of(settings)
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        gone_path = session.scalars(
            select(Instance.path).where(Instance.study_id == old_read)
        ).one()
    counts = expire(factory, store, settings)
    assert counts["studies"] == 1 and counts["instances"] == 1
    with factory() as session:
        kept = set(session.scalars(select(Instance.study_id)))
        assert kept == {old_unread, new_read, new_unread}
        assert session.get(Study, old_read) is not None  # the triage record stays
        for row in session.scalars(select(Instance)):
            assert store.exists(row.path)
    assert not store.exists(gone_path)


def test_size_limit_expires_oldest_read_then_refuses(database_url: str, tmp_path: Path) -> None:
    one = len(dicom_bytes(chest_like(seed=20)))
    limit_gb = (2.5 * one) / 1024**3  # room for two films and a half
    settings = _store_settings(database_url, tmp_path, store_max_gb=limit_gb)
    ids = _ingest(
        settings,
        tmp_path / "a",
        {"a.dcm": dicom_bytes(chest_like(seed=20)), "b.dcm": dicom_bytes(chest_like(seed=21))},
    )
    store = InstanceStore.of(settings)
    _ingest(settings, tmp_path / "c", {"c.dcm": dicom_bytes(chest_like(seed=22))}, store)
    _age(settings, ids[0], 3)
    _age(settings, ids[1], 2)
    _read(settings, ids[1])  # the newer of the two old ones is read; the oldest is not
    factory = make_session_factory(make_engine(settings.db_url))
    counts = expire(factory, store, settings)
    assert counts["studies"] == 1  # the read one, though the unread one is older
    with factory() as session:
        assert ids[1] not in set(session.scalars(select(Instance.study_id)))
        state = store_state(session, store)
        held = sum(store.size_of(p) for p in session.scalars(select(Instance.path)))
    assert state["instances"] == 2 and state["bytes"] == held
    _ingest(settings, tmp_path / "d", {"d.dcm": dicom_bytes(chest_like(seed=23))}, store)
    with factory() as session:
        studies_before = session.scalar(select(func.count(Study.id)))
    with pytest.raises(StorageFull, match="instance store .* still wait for a read"):
        _ingest(
            settings,
            tmp_path / "e",
            {"e.dcm": dicom_bytes(chest_like(seed=24))},
            InstanceStore.of(settings),
        )
    with factory() as session:
        assert session.scalar(select(func.count(Study.id))) == studies_before  # nothing stored
        assert session.scalar(select(func.count(Instance.id))) == 3
    assert expire(factory, store, settings)["studies"] == 0  # all unread: nothing to take


def test_a_full_disk_refuses_new_studies_and_loses_nothing(
    tmp_path: Path, small_disk: SmallDisk
) -> None:
    disk = small_disk
    settings = _store_settings(
        f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, store_dir=disk.path / "store"
    )
    first = dicom_bytes(chest_like(seed=30))
    _ingest(settings, tmp_path / "a", {"a.dcm": first})
    disk.fill()
    with pytest.raises(StorageFull, match="the instance store is full"):
        _ingest(settings, tmp_path / "b", {"b.dcm": dicom_bytes(chest_like(seed=31))})
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        assert session.scalar(select(func.count(Image.id))) == 1  # the refused one: no row
        row = session.scalars(select(Instance)).one()
    store = InstanceStore.of(settings)
    with store.open(row.path) as fh:
        assert fh.read() == first
    assert not list((disk.path / "store").rglob("*.tmp"))
    disk.release()
    _ingest(settings, tmp_path / "b", {"b.dcm": dicom_bytes(chest_like(seed=31))})
    with factory() as session:
        assert session.scalar(select(func.count(Instance.id))) == 2
