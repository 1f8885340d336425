"""The admin console: numbers from plain functions (SQLite and PostgreSQL), the page and its
JSON, requeue through a real worker (once, and only where meaningful), the audit log."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from dashboard import create_app, monitor
from pipeline.classifier.weights import describe_weights
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits, encode_preview
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import AuditEvent, Image, Prediction, Study
from pipeline.queue.dispatch import HEARTBEAT_PREFIX, QUEUES, Dispatcher, redis_client
from pipeline.queue.reconcile import requeue_stuck
from pipeline.queue.rerun import RequeueError, requeue_study
from tests.conftest import chest_like, jpeg_bytes
from tests.web import csrf_from, login

NOW = datetime(2026, 11, 22, 10, 30, 20, tzinfo=UTC)
THRESHOLDS = {"routine": 0.4, "urgent": 0.7, "critical": 0.9}


def add_study(
    session,
    status: str,
    *,
    preview: bytes | None = None,
    reason: str | None = None,  # type: ignore[no-untyped-def]
    done_at: datetime | None = None,
    latency_ms: float | None = None,
) -> Study:
    study = Study(status=status, reason=reason, lane="live", done_at=done_at)
    session.add(study)
    session.flush()
    session.add(
        Image(
            study_id=study.id,
            dedup_key=f"sha256:{uuid.uuid4().hex}",
            kind="jpeg",
            status=status,
            reason=reason,
            preview=preview,
            done_at=done_at,
            latency_ms=latency_ms,
            queued_at=NOW - timedelta(hours=3),
        )
    )
    session.flush()
    return study


def test_console_numbers(database_url, settings) -> None:  # type: ignore[no-untyped-def]
    upgrade(database_url)
    factory = make_session_factory(make_engine(database_url))
    preview = encode_preview(chest_like(64))
    with factory() as session:
        for i in range(10):  # 4 this minute, 6 five minutes ago; latencies 100..1000 ms
            at = NOW if i < 4 else NOW - timedelta(minutes=5)
            add_study(session, "done", done_at=at, latency_ms=100.0 * (i + 1))
        add_study(session, "done", done_at=NOW - timedelta(hours=2), latency_ms=99999.0)
        failed = add_study(
            session,
            "failed",
            preview=preview,
            reason="gave up after 3 attempts",
            done_at=NOW - timedelta(minutes=5),
        )
        rejected = add_study(session, "rejected", reason="corrupt DICOM file")
        session.commit()
    client = redis_client(settings.redis_url)
    client.lpush(QUEUES["live"], "a message")
    client.set(f"{HEARTBEAT_PREFIX}gpu-1", json.dumps({"model": "m", "device": "cuda:0"}), ex=30)
    with factory() as session:
        doc = monitor.console(session, settings, describe_weights(settings), NOW)
    assert doc["queues"] == {"live": 1, "bulk": 0}
    assert [w["name"] for w in doc["workers"]] == ["gpu-1"] and doc["workers"][0][
        "device"
    ] == "cuda:0"
    minutes = doc["throughput"]["per_minute"]
    assert len(minutes) == 60 and minutes[-1]["minute"] == "2026-11-22T10:30:00Z"
    assert (minutes[-1]["done"], minutes[-6]["done"], minutes[-6]["failed"]) == (4, 6, 1)
    assert sum(m["done"] for m in minutes) == doc["throughput"]["last_hour"] == 10
    assert doc["latency"] == {"n": 10, "p50_ms": 500.0, "p95_ms": 1000.0}
    problems = {p["id"]: p for p in doc["problems"]}
    assert set(problems) == {failed.id, rejected.id}
    assert (
        problems[failed.id]["requeueable"] is True and problems[rejected.id]["requeueable"] is False
    )
    assert problems[rejected.id]["reason"] == "corrupt DICOM file"
    assert doc["studies"] == {"done": 11, "failed": 1, "rejected": 1}
    assert doc["database"]["studies"] == 13 and doc["database"]["images"] == 13
    assert doc["store"]["instances"] == 0 and doc["store"]["bytes"] == 0  # ingested without
    assert doc["store"]["limit_bytes"] == int(settings.store_max_gb * 1024**3)
    assert doc["model"]["trained"] is False


def test_requeue_sends_once_when_two_admins_click(database_url, settings) -> None:  # type: ignore[no-untyped-def]
    upgrade(database_url)
    factory = make_session_factory(make_engine(database_url))
    with factory() as session:
        study_id = add_study(
            session,
            "failed",
            preview=encode_preview(chest_like(64)),
            reason="gave up after 3 attempts",
        ).id
        session.commit()
    outcomes: list[object] = []

    def click() -> None:
        client, dispatcher = redis_client(settings.redis_url), Dispatcher(settings.redis_url)
        try:
            outcomes.append(
                requeue_study(
                    factory,
                    client,
                    dispatcher,
                    study_id,
                    input_size=64,
                    ttl_s=60,
                    thresholds=THRESHOLDS,
                )
            )
        except RequeueError as exc:
            outcomes.append(exc)
        finally:
            dispatcher.close()

    threads = [threading.Thread(target=click) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    done = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, RequeueError)]
    assert len(done) == 1 and len(refused) == 1, outcomes
    assert "already in the queue" in str(refused[0])
    assert redis_client(settings.redis_url).llen(QUEUES["live"]) == 1  # one message, not two
    with factory() as session:
        image = session.scalars(select(Image).where(Image.study_id == study_id)).one()
        assert (image.status, image.attempts, image.reason) == ("queued", 0, None)
        assert session.get(Study, study_id).status == "queued"


def test_console_page_and_json_are_for_admins(settings, populated, admin_client) -> None:  # type: ignore[no-untyped-def]
    html = admin_client.get("/admin").get_data(as_text=True)
    assert html.count('<g class="bar"') == 60 and 'id="throughput-chart"' in html
    assert 'data-tile="queue-live"' in html and "Model in use" in html
    assert re.search(r'<tr data-status="done"><th>done</th><td class="num">3</td>', html)
    doc = admin_client.get("/api/admin/overview").get_json()
    assert doc["studies"] == {"done": 3, "rejected": 1} and doc["throughput"]["last_hour"] == 3
    assert doc["latency"]["n"] == 3 and doc["latency"]["p50_ms"] <= doc["latency"]["p95_ms"]
    rad = create_app({"CXR_SETTINGS": settings, "TESTING": True}).test_client()
    login(rad)
    assert rad.get("/admin").status_code == 403
    assert rad.get("/api/admin/overview").status_code == 403
    assert 'id="nav-console"' not in rad.get("/").get_data(as_text=True)


def test_requeue_a_failed_study_through_a_real_worker(
    settings, populated, admin_client, tmp_path, worker_factory
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "late.jpg").write_bytes(jpeg_bytes(chest_like(seed=9)))
    report = ingest_paths(populated, [tmp_path / "late"], Limits())  # queued, never sent
    image_id = report.accepted[0].image_id
    # The reconciler gives up on it (no attempts allowed): failed, with its reason.
    assert (
        requeue_stuck(
            populated,
            redis_client(settings.redis_url),
            Dispatcher(settings.redis_url),
            stuck_after_s=0,
            max_attempts=0,
            input_size=224,
            ttl_s=60,
            thresholds=THRESHOLDS,
        )["failed"]
        == 1
    )
    with populated() as session:
        failed = session.get(Image, image_id).study_id
        rejected = session.scalars(select(Study.id).where(Study.status == "rejected")).one()
        done = session.scalars(select(Study.id).where(Study.status == "done")).first()
    page = admin_client.get("/admin").get_data(as_text=True)
    row = re.search(rf'<tr data-study-id="{failed}".*?</tr>', page, re.S).group(0)
    assert "gave up after 0 attempts" in row and f"/admin/studies/{failed}/requeue" in row
    row = re.search(rf'<tr data-study-id="{rejected}".*?</tr>', page, re.S).group(0)
    assert "requeue" not in row and "fix the file and send it again" in row
    token = csrf_from(page)
    assert admin_client.post(f"/admin/studies/{failed}/requeue").status_code == 400  # no CSRF

    worker_factory(settings)
    response = admin_client.post(f"/admin/studies/{failed}/requeue", data={"csrf_token": token})
    assert response.status_code == 302
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with populated() as session:
            if session.get(Study, failed).status == "done":
                break
        time.sleep(0.3)
    with populated() as session:
        study, image = session.get(Study, failed), session.get(Image, image_id)
        assert (study.status, study.reason, image.status, image.attempts) == (
            "done",
            None,
            "done",
            1,
        )
        n = session.scalar(select(func.count(Prediction.id)).where(Prediction.image_id == image_id))
        assert n == 1
    for sid, words in ((failed, "is done"), (done, "is done"), (rejected, "rejected at ingest")):
        refused = admin_client.post(f"/admin/studies/{sid}/requeue", data={"csrf_token": token})
        assert refused.status_code == 409 and words in refused.get_data(as_text=True)
    with populated() as session:
        assert (
            session.scalar(select(func.count(Prediction.id)).where(Prediction.image_id == image_id))
            == 1
        )
        events = session.execute(
            select(AuditEvent.action, AuditEvent.target)
            .where(AuditEvent.action.like("requeue%"))
            .order_by(AuditEvent.id)
        ).all()
    assert [tuple(e) for e in events] == [
        ("requeue", f"study:{failed}"),
        ("requeue_refused", f"study:{failed}"),
        ("requeue_refused", f"study:{done}"),
        ("requeue_refused", f"study:{rejected}"),
    ]


def test_audit_log_pages_and_filters(settings, populated, admin_client) -> None:  # type: ignore[no-untyped-def]
    with populated() as session:
        for i in range(60):
            session.add(AuditEvent(action="view_study" if i % 2 else "review", target=f"study:{i}"))
        session.commit()
    total = 61  # and the admin's own login
    first = admin_client.get("/admin/audit").get_data(as_text=True)
    shown = [int(i) for i in re.findall(r'data-event-id="(\d+)"', first)]
    assert len(shown) == 50 and shown == sorted(shown, reverse=True) and shown[0] == total
    assert f"({total} events)" in first and 'id="page-next"' in first
    second = admin_client.get("/admin/audit?page=2").get_data(as_text=True)
    assert len(re.findall(r'data-event-id="(\d+)"', second)) == total - 50
    doc = admin_client.get("/api/admin/audit?action=review").get_json()
    assert doc["total"] == 30 and {e["action"] for e in doc["events"]} == {"review"}
    assert "login" in doc["actions"]
    rad = create_app({"CXR_SETTINGS": settings, "TESTING": True}).test_client()
    login(rad)
    assert rad.get("/admin/audit").status_code == 403
    assert rad.get("/api/admin/audit").status_code == 403
