"""Redis at its maxmemory with noeviction: sources refuse with a retryable error, store nothing,
and take files again once Redis has room."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from pipeline.db import make_engine, make_session_factory
from pipeline.ingest.intake import Intake
from pipeline.migrate import upgrade
from pipeline.models import Image
from pipeline.queue.dispatch import QueueFull
from pipeline.settings import Settings
from tests.conftest import chest_like, dicom_bytes, png_bytes, run_cli


@pytest.fixture
def full_redis(settings: Settings) -> Iterator[redis.Redis]:
    """The test Redis; the test makes it full, and it gets its memory back at the end."""
    client = redis.Redis.from_url(settings.redis_url or "")
    old = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "noeviction")
    try:
        yield client
    finally:
        client.config_set("maxmemory", "0")
        client.config_set("maxmemory-policy", old)
        client.close()


def _fill(client: redis.Redis) -> None:
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) // 2))


def _images(settings: Settings) -> int:
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        return int(session.scalar(select(func.count(Image.id))) or 0)


def test_a_source_is_refused_while_redis_is_full_and_stores_nothing(
    settings: Settings, full_redis: redis.Redis
) -> None:
    upgrade(settings.db_url)
    intake = Intake(settings)
    try:
        first = intake.submit(dicom_bytes(chest_like(seed=61)), "a.dcm", "http")
        assert (first.status, first.duplicate) == ("queued", False)
        _fill(full_redis)
        intake._checked_at = -10.0  # look now rather than within the second
        with pytest.raises(QueueFull, match="maxmemory"):
            intake.submit(dicom_bytes(chest_like(seed=62)), "b.dcm", "http")
        assert _images(settings) == 1  # the refused file was not stored
        full_redis.config_set("maxmemory", "0")
        intake._checked_at = -10.0
        again = intake.submit(dicom_bytes(chest_like(seed=62)), "b.dcm", "http")
        assert (again.status, again.duplicate) == ("queued", False)
        assert _images(settings) == 2
    finally:
        intake.close()


def test_ingest_exits_5_with_one_json_line_while_redis_is_full(
    tmp_path: Path, settings: Settings, full_redis: redis.Redis
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(chest_like(seed=63)))
    _fill(full_redis)
    proc = run_cli(["ingest", str(folder), "--json"], settings)
    assert proc.returncode == 5, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["accepted"] == 0 and "queue (Redis) is full" in doc["error"]
    assert "send it again later" in proc.stderr
    full_redis.config_set("maxmemory", "0")
    proc = run_cli(["ingest", str(folder), "--json"], settings)
    assert proc.returncode == 0 and json.loads(proc.stdout)["accepted"] == 1
