"""The inference worker under faults: SIGKILL mid-batch, FLUSHALL, poison, batching, lanes."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select, update

from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Batch, Image, Prediction, utcnow
from pipeline.queue.dispatch import Dispatcher, payload_key, redis_client
from pipeline.queue.send import enqueue
from pipeline.service.recovery import reconcile_once
from pipeline.triage.studies import open_image_count
from tests.conftest import chest_like, png_bytes

pytestmark = pytest.mark.e2e


def make_studies(folder: Path, n: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"study-{i:04d}.png").write_bytes(png_bytes(chest_like(size=160, seed=i)))
    return folder


def send(settings, folder: Path, lane: str = "live") -> list[int]:  # type: ignore[no-untyped-def]
    """Ingest a folder and enqueue it, as `cxr-triage ingest` does; return the image ids."""
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, [folder], Limits(), lane=lane)
    ids = [i.image_id for i in report.accepted]
    client, dispatcher = redis_client(settings.redis_url), Dispatcher(settings.redis_url)
    enqueue(factory, client, dispatcher, ids, 224, 3600, lane=lane)
    dispatcher.close()
    client.close()
    return ids


def wait_done(factory, ids: list[int], settings=None, timeout: float = 240) -> None:  # type: ignore[no-untyped-def]
    """Wait until every image is final, running the reconciler as `run` does when given settings."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with factory() as session:
            open_ = open_image_count(session, ids)
        if open_ == 0:
            return
        if settings is not None:
            reconcile_once(settings, settings.redis_url)
        time.sleep(1.0)
    raise TimeoutError(f"{open_} images still open")


def exactly_once(factory, ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    with factory() as session:
        statuses = dict(
            session.execute(select(Image.id, Image.status).where(Image.id.in_(ids))).all()
        )
        per_image = dict(
            session.execute(
                select(Prediction.image_id, func.count(Prediction.id))
                .where(Prediction.image_id.in_(ids))
                .group_by(Prediction.image_id)
            ).all()
        )
    assert set(statuses.values()) == {"done"}, statuses
    assert per_image == {i: 1 for i in ids}


def test_sigkill_mid_batch_every_study_done_exactly_once(
    settings, tmp_path, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    settings = settings.with_(batch_size=8, batch_wait_ms=200, stuck_after_s=3)
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    ids = send(settings, make_studies(tmp_path / "in", 24))
    worker = worker_factory(settings)
    in_flight: list[int] = []
    deadline = time.monotonic() + 120
    while not in_flight and time.monotonic() < deadline:
        with factory() as session:
            in_flight = list(session.scalars(select(Image.id).where(Image.status == "processing")))
        time.sleep(0.01)
    assert in_flight, "never saw a batch in flight"
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)

    worker_factory(settings)
    wait_done(factory, ids, settings)
    exactly_once(factory, ids)
    with factory() as session:
        attempts = dict(
            session.execute(select(Image.id, Image.attempts).where(Image.id.in_(in_flight))).all()
        )
    assert max(attempts.values()) >= 2, attempts  # the killed batch really ran again


def test_flushall_during_a_run_loses_nothing(settings, tmp_path, worker_factory) -> None:  # type: ignore[no-untyped-def]
    settings = settings.with_(batch_size=4, batch_wait_ms=100, stuck_after_s=2)
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    worker_factory(settings)
    ids = send(settings, make_studies(tmp_path / "in", 30))
    while True:
        with factory() as session:
            if session.scalar(select(func.count(Image.id)).where(Image.status == "done")):
                break
        time.sleep(0.05)
    client = redis.Redis.from_url(settings.redis_url)
    client.flushall()
    client.close()
    wait_done(factory, ids, settings)
    exactly_once(factory, ids)


def test_poison_item_fails_alone(settings, tmp_path, worker_factory) -> None:  # type: ignore[no-untyped-def]
    settings = settings.with_(batch_size=8, batch_wait_ms=300)
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    ids = send(settings, make_studies(tmp_path / "in", 4))
    poison = ids[1]
    # Its model input is gone from Redis and its stored image is garbage.
    with factory() as session:
        session.execute(update(Image).where(Image.id == poison).values(preview=b"not an image"))
        session.commit()
    client = redis.Redis.from_url(settings.redis_url)
    client.delete(payload_key(poison))
    client.close()
    worker_factory(settings)
    wait_done(factory, ids)
    with factory() as session:
        images = {img.id: img for img in session.scalars(select(Image).where(Image.id.in_(ids)))}
        batches = session.scalars(select(Batch)).all()
    assert images[poison].status == "failed"
    assert images[poison].reason == "stored image cannot be decoded (UnidentifiedImageError)"
    assert [images[i].status for i in ids if i != poison] == ["done"] * 3
    assert [(b.size, b.done, b.failed) for b in batches] == [(3, 3, 1)]


def test_ten_studies_sent_together_make_one_batch(settings, tmp_path, worker_factory) -> None:  # type: ignore[no-untyped-def]
    settings = settings.with_(batch_size=16, batch_wait_ms=200)
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    folder = make_studies(tmp_path / "in", 10)
    worker_factory(settings)
    ids = send(settings, folder)
    wait_done(factory, ids)
    with factory() as session:
        sizes = list(
            session.scalars(select(Prediction.batch_size).where(Prediction.image_id.in_(ids)))
        )
        batches = [b.size for b in session.scalars(select(Batch))]
    assert sizes == [10] * 10
    assert batches == [10]


def test_live_study_waits_behind_at_most_one_batch_of_backfill(
    settings, tmp_path, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    settings = settings.with_(batch_size=4, batch_wait_ms=100)
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    worker_factory(settings)
    bulk = send(settings, make_studies(tmp_path / "bulk", 40), lane="bulk")
    while True:  # the backfill is under way
        with factory() as session:
            if session.scalar(select(func.count(Image.id)).where(Image.status == "done")) >= 4:
                break
        time.sleep(0.02)
    report = ingest_paths(factory, [make_studies(tmp_path / "live", 1, start=100)], Limits())
    live = [report.accepted[0].image_id]
    client, dispatcher = redis_client(settings.redis_url), Dispatcher(settings.redis_url)
    sent = utcnow()
    enqueue(factory, client, dispatcher, live, 224, 3600, lane="live")
    dispatcher.close()
    client.close()
    wait_done(factory, bulk + live)

    def aware(d):  # type: ignore[no-untyped-def]
        return d.replace(tzinfo=UTC) if d.tzinfo is None else d

    with factory() as session:
        done_at = {i: aware(d) for i, d in session.execute(select(Image.id, Image.done_at)).all()}
        batch_times = [aware(t) for t in session.scalars(select(Batch.created_at))]
        sizes = list(session.scalars(select(Batch.size)))
    # celery-batches flushes everything it holds: the prefetch limit is what caps a batch.
    assert max(sizes) <= settings.batch_size, sizes
    done = done_at[live[0]]
    # Batches written after the live study was sent but before the one that carried it.
    ahead = sum(1 for t in batch_times if sent < t < done)
    still_waiting_after = sum(1 for i in bulk if done_at[i] > done)
    # At most the batch in flight when it arrived, though most of the backfill was still queued.
    assert ahead <= 1, f"{ahead} batches of backfill were read before the live study's batch"
    assert still_waiting_after >= 20


def test_database_outage_is_retried_with_backoff(
    postgres_url, settings, tmp_path, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    from reliability.tcp_proxy import TcpProxy

    upgrade(postgres_url)
    proxy = TcpProxy(("127.0.0.1", 5432)).up()
    through_proxy = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    worker_settings = settings.with_(database_url=through_proxy, batch_size=4, batch_wait_ms=100)
    worker = worker_factory(worker_settings)
    proxy.down()  # the worker can no longer reach the database
    direct = settings.with_(database_url=postgres_url)
    factory = make_session_factory(make_engine(postgres_url))
    ids = send(direct, make_studies(tmp_path / "in", 4))
    deadline = time.monotonic() + 60
    while "re-sent with backoff" not in worker.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "re-sent with backoff" in worker.output()
    with factory() as session:
        assert session.scalar(select(func.count(Image.id)).where(Image.status == "done")) == 0
    proxy.up()  # the database is back on the same address
    wait_done(factory, ids, timeout=120)
    exactly_once(factory, ids)
    proxy.down()
