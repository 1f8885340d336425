"""A full disk under the database, for real: SQLite on a small tmpfs filled to its last byte.

The kernel answers ENOSPC and SQLite says "database or disk is full"; every ingest path must
refuse with its protocol's error (HTTP 507, DICOM 0xA700, ``ingest`` exit 4 with a message),
store nothing of the refused file, and accept again once space returns. Mounting needs root
(CAP_SYS_ADMIN); without it these tests are skipped, and the reliability suite's disk-full row
says it could not mount.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.ingest.intake import Intake, limits_of
from pipeline.ingest.scp import handle_store
from pipeline.ingest.transactions import ingest_bytes
from pipeline.migrate import upgrade
from pipeline.models import Image, Study
from pipeline.settings import Settings
from pipeline.storage import StorageFull, is_storage_full
from pipeline.users import create_user, issue_token
from reliability.smalldisk import SmallDisk
from tests.conftest import chest_like, dicom_bytes, run_cli


@pytest.fixture
def full_disk(
    tmp_path: Path, settings: Settings, small_disk: SmallDisk
) -> Iterator[tuple[Settings, SmallDisk, str]]:
    """Settings whose SQLite database lives on a 4 MB tmpfs; the disk, and a feed token."""
    # The database's disk: the instance store's full disk is tests/store/test_instances.py's.
    on_disk = settings.with_(
        database_url=f"sqlite:///{small_disk.path / 'cxr.db'}",
        data_dir=small_disk.path / "data",
        redis_url=None,
        store_dir=tmp_path / "store",
    )
    upgrade(on_disk.db_url)
    factory = make_session_factory(make_engine(on_disk.db_url))
    with factory() as session:
        token = issue_token(session, create_user(session, "pacs", None, "feed"))
        session.commit()
    # Yielded, not returned: the engine (and its pooled connection to the database) stays open
    # until the test ends, as a running system's would.
    yield on_disk, small_disk, token


def _counts(settings: Settings) -> tuple[int, int]:
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        return (
            int(session.scalar(select(func.count(Study.id))) or 0),
            int(session.scalar(select(func.count(Image.id))) or 0),
        )


def _form(filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n"
    ).encode() + data
    return body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_ingest_refuses_with_storage_full_and_stores_nothing_then_accepts(full_disk) -> None:  # type: ignore[no-untyped-def]
    settings, disk, _ = full_disk
    factory = make_session_factory(make_engine(settings.db_url))
    limits = limits_of(settings)
    first = ingest_bytes(factory, dicom_bytes(chest_like(seed=1)), "a.dcm", limits)
    assert first.status == "queued"
    assert disk.fill() == 0
    with pytest.raises(StorageFull) as caught:
        for n in range(2, 40):  # SQLite may fit a few rows in pages it already has
            ingest_bytes(factory, dicom_bytes(chest_like(seed=n)), f"{n}.dcm", limits)
    assert is_storage_full(caught.value.__cause__)
    assert "disk holding the database is full" in str(caught.value)
    studies, images = _counts(settings)
    assert studies == images  # no study without its image
    disk.release()
    again = ingest_bytes(factory, dicom_bytes(chest_like(seed=99)), "z.dcm", limits)
    assert again.status == "queued" and not again.duplicate
    assert _counts(settings) == (studies + 1, images + 1)


def test_http_answers_507_and_c_store_0xa700_on_a_full_disk(full_disk) -> None:  # type: ignore[no-untyped-def]
    settings, disk, token = full_disk
    client = create_app({"CXR_SETTINGS": settings, "TESTING": True}).test_client()
    intake = Intake(settings)
    disk.fill()
    # Fill SQLite's spare pages too: until a write is refused, an upload may still fit.
    codes = []
    for n in range(40):
        body, ctype = _form(f"{n}.dcm", dicom_bytes(chest_like(seed=100 + n)))
        resp = client.post(
            "/api/studies",
            data=body,
            headers={"Content-Type": ctype, "Authorization": f"Bearer {token}"},
        )
        codes.append(resp.status_code)
        if resp.status_code == 507:
            assert "full" in resp.get_json()["error"] and resp.headers["Retry-After"] == "60"
            break
    assert codes[-1] == 507 and set(codes[:-1]) <= {202}, codes
    before = _counts(settings)
    data = dicom_bytes(chest_like(seed=300))
    event = SimpleNamespace(
        encoded_dataset=lambda include_meta=True: data,
        request=SimpleNamespace(AffectedSOPInstanceUID="1.2.3.4"),
    )
    status = handle_store(event, intake)
    assert status.Status == 0xA700 and "disk full" in status.ErrorComment
    assert _counts(settings) == before
    disk.release()
    assert handle_store(event, intake).Status == 0x0000
    assert _counts(settings) == (before[0] + 1, before[1] + 1)


def test_cli_ingest_exits_4_with_a_message_and_one_json_line(full_disk, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, disk, _ = full_disk
    folder = tmp_path / "in"
    folder.mkdir()
    for n in range(40):
        (folder / f"{n:02d}.dcm").write_bytes(dicom_bytes(chest_like(seed=500 + n)))
    disk.fill()
    proc = run_cli(["ingest", "--json", str(folder)], settings)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "disk holding the database is full" in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert "full" in doc["error"]
    studies, images = _counts(settings)
    assert doc["accepted"] == images == studies  # what it says it stored, and nothing else
    disk.release()
    proc = run_cli(["ingest", "--json", str(folder)], settings)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["accepted"] + doc["duplicates"] == 40 and doc["duplicates"] == images


def test_an_unreachable_database_is_503_with_retry_after_not_500(settings: Settings) -> None:
    """The dashboard cut off from its database (a partition): come back later, no traceback."""
    unreachable = settings.with_(database_url="postgresql://postgres@127.0.0.1:1/none")
    client = create_app({"CXR_SETTINGS": unreachable, "TESTING": True}).test_client()
    body, ctype = _form("a.dcm", dicom_bytes(chest_like(seed=7)))
    resp = client.post(
        "/api/studies",
        data=body,
        headers={"Content-Type": ctype, "Authorization": "Bearer not-checked-without-a-database"},
    )
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert "database is unavailable" in resp.get_json()["error"]
