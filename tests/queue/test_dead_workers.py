"""What dead or hung workers claimed is re-sent at once; what they finished is not."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from pipeline.db import make_engine, make_session_factory
from pipeline.models import Image, Prediction
from pipeline.queue.dispatch import redis_client
from tests.conftest import run_cli
from tests.queue.ingested import ingest_offline, wait_all_final

pytestmark = pytest.mark.e2e


def test_expired_claims_are_those_of_workers_without_a_heartbeat_or_restarted_since() -> None:
    """The heartbeat rule alone: a claim is dead when its worker's heartbeat has expired, or
    when the heartbeat under that name comes from a process started after the claim."""
    from datetime import UTC, datetime

    from pipeline.queue.reconcile import expired_claims

    t = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC).timestamp()
    at = datetime.fromtimestamp(t, UTC)
    claims = [
        (1, "alive@h", at),  # its worker beats, and started before the claim
        (2, "gone@h", at),  # no heartbeat: the key expired
        (3, "restarted@h", at),  # the process beating under the name started after the claim
        (4, "legacy@h", at),  # a heartbeat without a start time: alive
    ]
    beats = {"alive@h": t - 60, "gone@h": None, "restarted@h": t + 5, "legacy@h": 0.0}
    assert expired_claims(claims, beats) == [2, 3]
    assert expired_claims(claims, {}) == [1, 2, 3, 4]  # no heartbeat from anyone


def test_what_dead_workers_claimed_is_re_sent_at_once_and_nothing_finished_is(
    settings, study_folder
) -> None:  # type: ignore[no-untyped-def]
    """requeue_dead_workers on a real database and Redis, far inside the stuck timeout: the
    claims of a worker named dead and of one whose heartbeat expired go back to the queue with
    a fresh message; a live worker's claim and a done image stay as they are."""
    from pipeline.models import utcnow
    from pipeline.queue.dispatch import HEARTBEAT_PREFIX
    from pipeline.service.recovery import rescue_dead_workers

    factory = ingest_offline(settings, study_folder)
    with factory() as session:
        images = list(session.scalars(select(Image).where(Image.status == "queued")))
        assert len(images) == 3
        # A final image under the dead worker's name (its work was done) is never touched.
        final = session.scalars(select(Image).where(Image.status == "rejected")).one()
        final.worker = "killed@h"
        now = utcnow()
        for img, (status, worker) in zip(
            images,
            [("processing", "killed@h"), ("processing", "silent@h"), ("processing", "busy@h")],
            strict=True,
        ):
            img.status, img.worker, img.started_at, img.attempts = status, worker, now, 1
        session.commit()
        ids = [i.id for i in images]
    client = redis_client(settings.redis_url)
    client.set(f"{HEARTBEAT_PREFIX}busy@h", json.dumps({"since": time.time() - 60}), ex=15)
    client.set(f"{HEARTBEAT_PREFIX}killed@h", json.dumps({"since": time.time() - 60}), ex=15)
    assert settings.stuck_after_s == 600  # the shipped default: the timeout is not what acts
    # killed@h still beats (its key has not expired yet), but its supervisor saw it exit.
    assert rescue_dead_workers(settings, settings.redis_url, dead=("killed@h",)) == {
        "requeued": 2,
        "failed": 0,
    }
    with factory() as session:
        state = {i.id: (i.status, i.worker) for i in session.scalars(select(Image))}
    assert state == {
        ids[0]: ("queued", None),
        ids[1]: ("queued", None),
        ids[2]: ("processing", "busy@h"),
        final.id: ("rejected", "killed@h"),
    }
    assert client.llen("cxr.live") == 2
    # Sent once: the re-sent images are queued with a message now, not claimed by anyone.
    assert rescue_dead_workers(settings, settings.redis_url)["requeued"] == 0
    client.delete(f"{HEARTBEAT_PREFIX}busy@h")  # busy@h stops beating: now it is dead too
    assert rescue_dead_workers(settings, settings.redis_url)["requeued"] == 1
    assert client.llen("cxr.live") == 3
    client.close()


def test_a_dead_worker_that_had_finished_its_batch_has_nothing_re_sent(
    settings, study_folder, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    """Images a worker finished are done: its death re-sends none of them."""
    from pipeline.service.recovery import rescue_dead_workers

    assert run_cli(["ingest", str(study_folder), "--json"], settings).returncode == 0
    worker = worker_factory(settings)
    factory = make_session_factory(make_engine(settings.db_url))
    assert wait_all_final(factory) == {"done": 3, "rejected": 1}
    with factory() as session:
        names = set(session.scalars(select(Image.worker).where(Image.status == "done")))
    assert len(names) == 1 and None not in names  # each done image names its worker
    worker.stop()
    assert rescue_dead_workers(settings, settings.redis_url, dead=tuple(names)) == {
        "requeued": 0,
        "failed": 0,
    }
    with factory() as session:
        assert session.scalar(select(func.count(Prediction.id))) == 3


def test_a_worker_whose_batch_runs_past_the_hung_timeout_has_its_claims_re_sent(
    settings, study_folder
) -> None:  # type: ignore[no-untyped-def]
    """A worker that still beats, but whose heartbeat says its batch started more than
    CXR_HUNG_AFTER_S ago (a forward pass that never returns), is hung: its claims are re-sent.
    One whose batch started just now keeps its claims."""
    from pipeline.models import utcnow
    from pipeline.queue.dispatch import HEARTBEAT_PREFIX
    from pipeline.service.recovery import rescue_dead_workers

    assert settings.hung_after_s == 30  # the shipped default
    factory = ingest_offline(settings, study_folder)
    with factory() as session:
        images = list(session.scalars(select(Image).where(Image.status == "queued")))
        for img, worker in zip(images, ["stalled@h", "working@h", "idle@h"], strict=True):
            img.status, img.worker, img.started_at, img.attempts = "processing", worker, utcnow(), 1
        session.commit()
        ids = [i.id for i in images]
    client = redis_client(settings.redis_url)
    start = time.time() - 120
    for name, busy in (
        ("stalled@h", time.time() - 31),
        ("working@h", time.time() - 2),
        ("idle@h", None),
    ):
        client.set(
            f"{HEARTBEAT_PREFIX}{name}", json.dumps({"since": start, "busy_since": busy}), ex=15
        )
    assert rescue_dead_workers(settings, settings.redis_url)["requeued"] == 1
    with factory() as session:
        state = {i.id: (i.status, i.worker) for i in session.scalars(select(Image)) if i.id in ids}
    assert state == {
        ids[0]: ("queued", None),
        ids[1]: ("processing", "working@h"),
        ids[2]: ("processing", "idle@h"),
    }
    for name in ("stalled@h", "working@h", "idle@h"):
        client.delete(f"{HEARTBEAT_PREFIX}{name}")
    client.close()
