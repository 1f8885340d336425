"""The live performance computed from the reads: its numbers and splits, the console page, its
JSON and /metrics.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session

from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import Review, Study
from pipeline.monitoring.live import live_performance
from pipeline.monitoring.performance import summarize
from pipeline.triage.score import triage_class
from pipeline.users import create_user
from tests.conftest import PASSWORD
from tests.monitoring.scored import TH, add_study
from tests.web import login


def add_read(
    session: Session, study: Study, user_id: int, abnormal: bool, when: datetime, **fields: Any
) -> None:
    """A read of study by user_id at when, with its truth."""
    session.add(
        Review(
            study_id=study.id,
            user_id=user_id,
            action="read",
            abnormal=abnormal,
            created_at=when,
            **fields,
        )
    )


def seed_reads(session, now: datetime, user_id: int) -> tuple[list[float], list[bool]]:  # type: ignore[no-untyped-def]
    """200 scored studies read in the last 30 days (North CR PA, South DX AP), 5 read 40 days
    ago, 3 read but not scored; returns the 30-day window's scores and truths."""
    rng = np.random.default_rng(1)
    scores, truths = [], []
    for i in range(200):
        abnormal = bool(rng.uniform() < 0.4)
        p = float(np.clip(rng.normal(0.65 if abnormal else 0.35, 0.2), 0.0, 1.0))
        north = i % 2 == 0
        s = add_study(
            session,
            p,
            institution="North" if north else "South",
            modality="CR" if north else "DX",
            view="PA" if north else "AP",
        )
        add_read(
            session,
            s,
            user_id,
            abnormal,
            now - timedelta(days=1 + i % 28),
            source="console" if i % 4 else "ris",
            model_class=s.triage_class,
        )
        scores.append(p)
        truths.append(abnormal)
    for _ in range(5):
        s = add_study(session, 0.95, institution=None)
        add_read(session, s, user_id, False, now - timedelta(days=40), model_class="critical")
    for _ in range(3):
        s = add_study(session, None)
        add_read(session, s, user_id, True, now - timedelta(days=2))
    session.commit()
    return scores, truths


def test_live_performance_numbers_and_splits(factory) -> None:  # type: ignore[no-untyped-def]
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    with factory() as session:
        rad = create_user(session, "rad", PASSWORD, "radiologist")
        scores, truths = seed_reads(session, now, rad.id)
        doc = live_performance(session, TH, now, 30)
        expected = summarize(scores, truths, TH)
        o = doc["overall"]
        assert (o["reviewed"], o["abnormal"], o["unscored"]) == (200, sum(truths), 3)
        assert o["auc"]["auc"] == pytest.approx(expected["auc"]["auc"])
        assert o["auc"]["ci"] == pytest.approx(expected["auc"]["ci"])
        assert 0.75 < o["auc"]["auc"] < 0.95  # separated means 0.65 vs 0.35, sd 0.2
        for name in TH:
            assert o["thresholds"][name] == expected["thresholds"][name]
        top_expected = [
            triage_class(p, TH) in ("urgent", "critical")
            for p, t in zip(scores, truths, strict=True)
            if t
        ]
        assert o["top"]["k"] == sum(top_expected) and o["top"]["n"] == sum(truths)
        assert doc["sources"] == {"console": 153, "ris": 50}
        by = {split: {g["group"]: g["reviewed"] for g in rows} for split, rows in doc["by"].items()}
        assert by == {
            "institution": {"North": 100, "South": 100},
            "modality": {"CR": 100, "DX": 100},
            "view": {"PA": 100, "AP": 100},
        }
        north = next(g for g in doc["by"]["institution"] if g["group"] == "North")
        assert north["unscored"] == 3
        expected_north = summarize(scores[::2], truths[::2], TH)
        assert north["auc"]["auc"] == pytest.approx(expected_north["auc"]["auc"])
        wide = live_performance(session, TH, now, 90)
        assert wide["overall"]["reviewed"] == 205 and wide["overall"]["top"]["n"] == sum(truths)


def test_performance_page_json_and_metrics(settings, database_url) -> None:  # type: ignore[no-untyped-def]
    upgrade(database_url)
    factory = make_session_factory(make_engine(database_url))
    with factory() as session:
        create_user(session, "boss", PASSWORD, "admin")
        rad = create_user(session, "rad", PASSWORD, "radiologist")
        seed_reads(session, datetime.now(UTC), rad.id)
    conf = settings.with_(database_url=database_url)
    admin = create_app({"CXR_SETTINGS": conf, "TESTING": True}).test_client()
    assert login(admin, "boss").status_code == 302
    html = admin.get("/admin/performance?days=30").get_data(as_text=True)
    assert 'id="reviewed">200<' in html and 'id="calibration-chart"' in html
    assert html.count('class="bin"') >= 5 and 'data-threshold="routine"' in html
    assert 'data-group="North" data-reviewed="100"' in html
    assert (
        admin.get("/admin/performance?days=90").get_data(as_text=True).count('id="reviewed">205<')
        == 1
    )
    doc = admin.get("/api/admin/performance?days=7").get_json()
    assert doc["window_days"] == 7 and 0 < doc["overall"]["reviewed"] < 200
    rad_client = create_app({"CXR_SETTINGS": conf, "TESTING": True}).test_client()
    login(rad_client)
    assert rad_client.get("/admin/performance").status_code == 403
    assert rad_client.get("/api/admin/performance").status_code == 403
    metrics = admin.get("/metrics").get_data(as_text=True)
    assert 'cxr_live_reviewed{group="all",split="all",window="30d"} 200.0' in metrics
    assert 'cxr_live_reviewed{group="all",split="all",window="90d"} 205.0' in metrics
    assert 'cxr_live_reviewed{group="North",split="institution",window="30d"} 100.0' in metrics
    line = next(
        m
        for m in metrics.splitlines()
        if m.startswith('cxr_live_auc{group="all",split="all",window="30d"}')
    )
    assert float(line.split()[-1]) == pytest.approx(doc_30(admin)["overall"]["auc"]["auc"])
    assert (
        'cxr_live_sensitivity{group="all",split="all",threshold="urgent",window="30d"}' in metrics
    )


def doc_30(client) -> dict:  # type: ignore[no-untyped-def]
    return client.get("/api/admin/performance?days=30").get_json()  # type: ignore[no-any-return]
