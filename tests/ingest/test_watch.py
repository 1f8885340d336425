"""The watched folder: settle detection, moves, reasons, name collisions, sidecars, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.db import make_engine, make_session_factory
from pipeline.ingest.intake import Intake
from pipeline.ingest.watch import FolderWatcher
from pipeline.migrate import upgrade
from pipeline.models import Image, Study
from pipeline.queue.dispatch import payload_key, redis_client
from tests.conftest import REPO, chest_like, dicom_bytes, jpeg_bytes, png_bytes, settings_env


@pytest.fixture
def watcher(settings, tmp_path: Path) -> FolderWatcher:
    upgrade(settings.db_url)
    folder = tmp_path / "inbox"
    folder.mkdir()
    return FolderWatcher(folder, Intake(settings), settle_s=5.0)


def _studies(settings) -> list[Study]:  # type: ignore[no-untyped-def]
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        return list(session.scalars(select(Study).order_by(Study.id)))


def test_a_file_growing_in_pieces_is_not_read_until_it_holds_still(watcher, settings) -> None:
    data = dicom_bytes()
    target = watcher.folder / "slow.dcm"
    clock = 0.0
    # Each piece lands 4 s after the last (clock injected): always inside the 5 s settle time.
    for start in range(0, len(data), len(data) // 6):
        with open(target, "ab") as fh:
            fh.write(data[start : start + len(data) // 6])
        assert watcher.ready(now=clock) == []
        last, clock = clock, clock + 4.0
    assert target.read_bytes() == data
    assert watcher.ready(now=last + 4.9) == []  # still inside the settle time of the last piece
    assert watcher.ready(now=last + 5.0) == [target]
    assert _studies(settings) == []  # nothing was read while it grew


def test_accepted_rejected_and_duplicate_files_are_moved_with_reasons(watcher, settings) -> None:
    folder = watcher.folder
    original = dicom_bytes(chest_like(seed=1))
    (folder / "a.dcm").write_bytes(original)
    (folder / "broken.png").write_bytes(png_bytes(chest_like(seed=2))[:300])
    assert watcher.ready(now=0) == []  # first sight: the settle time starts now
    settled = watcher.ready(now=10)
    assert sorted(p.name for p in settled) == ["a.dcm", "broken.png"]
    for path in settled:
        watcher.process(path)
    assert [p.name for p in folder.iterdir() if p.is_file()] == []
    assert (folder / "processed" / "a.dcm").read_bytes() == original
    reason = (folder / "rejected" / "broken.png.reason.txt").read_text()
    assert reason.startswith("the PNG data is truncated or corrupt")
    studies = _studies(settings)
    assert [(s.source, s.status) for s in studies] == [("watch", "queued"), ("watch", "rejected")]
    assert studies[1].reason == reason.strip()
    # The worker's input was sent to Redis after the commit.
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        image_id = session.scalars(select(Image.id).where(Image.study_id == studies[0].id)).one()
    assert redis_client(settings.redis_url).exists(payload_key(image_id)) == 1

    # The same content again under the same name: a duplicate of study 1, stored under a new name.
    (folder / "a.dcm").write_bytes(original)
    item = watcher.process(folder / "a.dcm")
    assert (item.duplicate, item.study_id) == (True, studies[0].id)
    assert sorted(p.name for p in (folder / "processed").iterdir()) == ["a-1.dcm", "a.dcm"]
    assert len(_studies(settings)) == 2


def test_a_sidecar_gives_a_jpeg_its_header_and_travels_with_it(watcher, settings) -> None:
    folder = watcher.folder
    (folder / "lat.jpg").write_bytes(jpeg_bytes(chest_like(seed=3)))
    (folder / "lat.jpg.json").write_text(
        json.dumps({"AccessionNumber": "ACC-77", "ViewPosition": "LL", "Unknown": "x"})
    )
    (folder / "bad.jpg").write_bytes(jpeg_bytes(chest_like(seed=4)))
    (folder / "bad.json").write_text("{not json")
    assert sorted(p.name for p in watcher.candidates()) == ["bad.jpg", "lat.jpg"]
    watcher.ready(now=0)
    for path in watcher.ready(now=10):
        watcher.process(path)
    assert sorted(p.name for p in (folder / "processed").iterdir()) == ["lat.jpg", "lat.jpg.json"]
    assert sorted(p.name for p in (folder / "rejected").iterdir()) == [
        "bad.jpg",
        "bad.jpg.json",
        "bad.jpg.reason.txt",
    ]
    by_status = {s.status: s for s in _studies(settings)}
    assert by_status["skipped"].accession_number == "ACC-77"
    assert by_status["skipped"].reason == "lateral view (LL): the model reads frontal films"
    assert by_status["rejected"].reason.startswith("its sidecar bad.json is not readable JSON")


def test_watch_command_ingests_a_file_written_slowly_by_another_process(
    settings, tmp_path: Path
) -> None:
    upgrade(settings.db_url)
    folder = tmp_path / "drop"
    folder.mkdir()
    env = settings_env(settings.with_(watch_settle_ms=1500))
    watch = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "watch", str(folder)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    data = dicom_bytes(chest_like(seed=9))
    writer = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(folder / "slow.dcm")],
        stdin=subprocess.PIPE,
    )
    try:
        assert writer.stdin is not None
        writer.stdin.write(data)
        writer.stdin.close()
        while writer.poll() is None:
            # While the writer is still at it the file stays where it is, unread.
            assert not list(folder.glob("*/slow.dcm"))
            assert _studies(settings) == []
            time.sleep(0.1)
        assert writer.returncode == 0
        deadline = time.monotonic() + 60
        while not (folder / "processed" / "slow.dcm").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (folder / "processed" / "slow.dcm").read_bytes() == data
        [study] = _studies(settings)
        assert (study.source, study.status) == ("watch", "queued")
    finally:
        watch.terminate()
        out = watch.communicate(timeout=20)[0].decode()
    assert "watching" in out


# Writes stdin to the file in 8 pieces, 0.3 s apart (well inside the 1.5 s settle time).
_SLOW_WRITER = """
import sys, time
data = sys.stdin.buffer.read()
step = len(data) // 8 + 1
with open(sys.argv[1], "wb") as fh:
    for i in range(0, len(data), step):
        fh.write(data[i:i + step]); fh.flush(); time.sleep(0.3)
"""
