"""Fixtures the results tests share: settings on either database, a real Orthanc, a port posing
as Redis, real sender processes, and studies owed to a destination.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.queue.dispatch import redis_client
from pipeline.settings import Settings
from tests import pacs
from tests.conftest import chest_like, dicom_bytes
from tests.results.support import N_STUDIES, RedisTrap, SenderProcess


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """A test that also asks for ``database_url`` runs on SQLite and on PostgreSQL."""
    if "database_url" in request.fixturenames:
        return settings.with_(database_url=request.getfixturevalue("database_url"))
    return settings


@pytest.fixture
def redis_trap() -> Iterator[RedisTrap]:
    trap = RedisTrap()
    yield trap
    trap.close()


@pytest.fixture
def studies(settings: Settings, database_url: str, tmp_path: Path) -> tuple[Settings, Any]:
    """``N_STUDIES`` DICOM studies ingested and classified (real Redis), on both databases."""
    settings = settings.with_(database_url=database_url)
    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(N_STUDIES):
        (folder / f"s{n:02d}.dcm").write_bytes(dicom_bytes(chest_like(seed=n)))
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, [folder], Limits())
    ids = [i.image_id for i in report.accepted]
    assert len(ids) == N_STUDIES
    result = classify_images(
        factory, redis_client(settings.redis_url), Classifier(settings.weights, "cpu", 1), ids
    )
    assert sorted(result.done) == sorted(ids)
    return settings, factory


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[pacs.OrthancServer]:
    if pacs.missing():
        pytest.skip(pacs.missing() or "")
    server = pacs.OrthancServer(tmp_path / "orthanc").start()
    yield server
    if server.proc is not None:
        server.proc.kill()  # its storage is thrown away: no need for a clean stop
        server.proc.wait()


@pytest.fixture
def sender_factory(tmp_path: Path) -> Iterator[Callable[[Settings], SenderProcess]]:
    started: list[SenderProcess] = []

    def start(settings: Settings) -> SenderProcess:
        started.append(SenderProcess(settings, tmp_path / f"sender-{len(started)}.log"))
        return started[-1]

    yield start
    for sender in started:
        if sender.proc.poll() is None:
            sender.proc.kill()
            sender.proc.wait()
