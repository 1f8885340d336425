"""Fixtures: a real Redis, real databases (SQLite, PostgreSQL), a real Celery worker."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings

from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier, create_untrained_weights
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.queue.dispatch import redis_client
from pipeline.service.redis_server import EmbeddedRedis
from pipeline.settings import Settings
from pipeline.users import create_user
from reliability import samples as samples_module

REPO = Path(__file__).resolve().parent.parent

# CI replays the same property-test examples every run (reproducible failures); locally,
# Hypothesis keeps exploring new ones.
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")
SHARED_DATA = REPO.parent / "shared" / "data"
PASSWORD = "correct horse battery"
PG_ADMIN_URL = os.environ.get("CXR_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


# --------------------------------------------------------------------------- services


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A private redis-server for the test session (the same binary the product embeds)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    """A Redis URL with nothing in it; emptied again after the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


def _pg_admin():  # type: ignore[no-untyped-def]
    import psycopg

    url = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    return psycopg.connect(url, autocommit=True, connect_timeout=3)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    try:
        conn = _pg_admin()
    except Exception as exc:  # no server answering: say so in the skip
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, randomly initialised ResNet-18 weights file."""
    return create_untrained_weights(tmp_path_factory.mktemp("weights") / "untrained.pt")


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, weights_file: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'test.db'}",
        redis_url=redis_url,
        weights=weights_file,
        batch_size=4,
        batch_wait_ms=100,
        torch_threads=1,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce these settings in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    return {**env, **settings.as_env(), "PYTHONUNBUFFERED": "1"}


class WorkerProcess:
    """A real Celery worker subprocess running the product's worker command."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        from pipeline.service.supervisor import worker_command

        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            worker_command(settings, f"test-{uuid.uuid4().hex[:6]}"),
            env=settings_env(settings),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("worker exited:\n" + self.log_path.read_text()[-3000:])
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise TimeoutError("worker not ready:\n" + self.log_path.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator:
    workers: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(w)
        w.wait_ready()
        return w

    yield start
    for w in workers:
        w.stop()


def run_cli(
    args: list[str], settings: Settings, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run the installed ``cxr-triage`` entry point as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- images


def chest_like(size: int = 256, seed: int = 0) -> np.ndarray:
    """A synthetic frontal chest (the reliability harness's), 256 px by default."""
    return samples_module.chest_like(size, seed)


jpeg_bytes, png_bytes = samples_module.jpeg_bytes, samples_module.png_bytes


def dicom_bytes(
    arr: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "CR",
    view: str = "PA",
    study_uid: str | None = None,
    sop_uid: str | None = None,
    window: tuple[float, float] | None = None,
    frames: int = 1,
    samples: int = 1,
    pixel_data: bool = True,
    priority: str | None = None,
    bits: int = 12,
) -> bytes:
    """A small but standard-conformant DICOM radiograph written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr8 = chest_like() if arr is None else arr
    values = (arr8.astype(np.uint16) << (bits - 8)).astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = ((1 << bits) - 1 - values).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-0001"
    ds.AccessionNumber = "ACC-0001"
    ds.StudyDate = "20261122"
    ds.Modality = modality
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    if priority:
        ds.RequestedProcedurePriority = priority
    samples_module.set_pixels(ds, values, bits, photometric, samples, frames, pixel_data)
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def study_folder(tmp_path: Path) -> Path:
    """A JPEG, a PNG, a DICOM and a corrupt file: the foundation's end-to-end input."""
    folder = tmp_path / "incoming"
    (folder / "nested").mkdir(parents=True)
    (folder / "a_chest.jpg").write_bytes(jpeg_bytes(chest_like(seed=1)))
    (folder / "nested" / "b_chest.png").write_bytes(png_bytes(chest_like(seed=2)))
    (folder / "c_chest.dcm").write_bytes(dicom_bytes(chest_like(seed=3), priority="STAT"))
    (folder / "d_corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    (folder / "notes.txt").write_text("not an image; ignored when walking a folder")
    return folder


@pytest.fixture
def populated(settings: Settings, study_folder: Path):  # type: ignore[no-untyped-def]
    """A database with the four foundation studies classified (in-process, real Redis)."""
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, [study_folder], Limits())
    clf = Classifier(settings.weights, "cpu", 1)
    client = redis_client(settings.redis_url)
    ids = [i.image_id for i in report.accepted]
    result = classify_images(factory, client, clf, ids)
    assert sorted(result.done) == sorted(ids)
    with factory() as session:
        create_user(session, "rad", PASSWORD, "radiologist")
        session.commit()
    return factory
