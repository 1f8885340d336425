"""Ground truth from the read: the review rules, the migration of old rows (SQLite and
PostgreSQL), and the viewer's form.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, select, text

from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import AuditEvent, Review, Study
from pipeline.triage.reviews import ReviewError, latest_truths, record_review
from pipeline.users import create_user
from tests.conftest import PASSWORD
from tests.monitoring.scored import add_study
from tests.web import csrf_from, login


def test_a_read_records_the_truth_and_agreement_follows(factory) -> None:  # type: ignore[no-untyped-def]
    with factory() as session:
        rad = create_user(session, "rad", PASSWORD, "radiologist")
        high, low, waiting = (
            add_study(session, 0.8),
            add_study(session, 0.1),
            add_study(session, None),
        )
        r1 = record_review(session, high.id, rad.id, "read", abnormal=True, finding="effusion")
        r2 = record_review(session, low.id, rad.id, "read", abnormal=True)
        r3 = record_review(session, high.id, rad.id, "agree")  # the old button: truth implied
        r4 = record_review(session, low.id, rad.id, "disagree", "missed it")
        r5 = record_review(session, waiting.id, rad.id, "read", abnormal=False)  # not scored yet
        r6 = record_review(session, waiting.id, rad.id, "read")  # "mark read": no truth
        got = [
            (r.action, r.abnormal, r.finding, r.source, r.model_class)
            for r in (r1, r2, r3, r4, r5, r6)
        ]
        assert got == [
            ("agree", True, "effusion", "console", "urgent"),
            ("disagree", True, None, "console", "normal"),
            ("agree", True, None, "console", "urgent"),
            ("disagree", True, None, "console", "normal"),
            ("read", False, None, "console", None),
            ("read", None, None, "console", None),
        ]
        assert r1.model_p == 0.8 and r6.model_p is None
        for bad, why in (
            (dict(action="agree", abnormal=False), "cannot agree"),
            (dict(action="read", abnormal=False, finding="effusion"), "only an abnormal read"),
            (dict(action="read", abnormal=True, finding="gout"), "unknown finding"),
        ):
            with pytest.raises(ReviewError, match=why):
                record_review(session, high.id, rad.id, **bad)  # type: ignore[arg-type]
        session.commit()
        truths = latest_truths(session)
        assert {sid: (t.abnormal, t.finding) for sid, t in truths.items()} == {
            high.id: (True, None),
            low.id: (True, None),
            waiting.id: (False, None),
        }  # the newest truth-bearing review wins; "mark read" does not erase one


def test_migration_gives_old_opinions_the_truth_they_imply(database_url) -> None:  # type: ignore[no-untyped-def]
    upgrade(database_url, "0004_outbox")
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    now = datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, username, password_hash, role, active, "
                "created_at) VALUES (1, 'rad', 'x', 'radiologist', :t, :now)"
            ),
            {"t": True, "now": now},
        )
        for sid, cls in ((1, "urgent"), (2, "normal"), (3, "critical")):
            conn.execute(
                text(
                    "INSERT INTO studies (id, source, lane, status, triage_class, "
                    "p_abnormal, model_version, received_at, updated_at) VALUES "
                    "(:id, 'cli', 'live', 'done', :cls, 0.5, 'm1', :now, :now)"
                ),
                {"id": sid, "cls": cls, "now": now},
            )
        for rid, sid, action in (
            (1, 1, "agree"),
            (2, 1, "disagree"),
            (3, 2, "agree"),
            (4, 2, "disagree"),
            (5, 3, "read"),
        ):
            conn.execute(
                text(
                    "INSERT INTO reviews (id, study_id, user_id, action, created_at) "
                    "VALUES (:id, :sid, 1, :action, :now)"
                ),
                {"id": rid, "sid": sid, "action": action, "now": now},
            )
    engine.dispose()
    upgrade(database_url)
    with make_session_factory(make_engine(database_url))() as session:
        rows = session.scalars(select(Review).order_by(Review.id)).all()
        assert [(r.action, r.abnormal, r.source, r.model_class, r.model_version) for r in rows] == [
            ("agree", True, "console", "urgent", "m1"),
            ("disagree", False, "console", "urgent", "m1"),
            ("agree", False, "console", "normal", "m1"),
            ("disagree", True, "console", "normal", "m1"),
            ("read", None, "console", None, None),
        ]


def test_the_viewer_form_records_a_read_with_a_finding(settings, populated) -> None:  # type: ignore[no-untyped-def]
    client = create_app({"CXR_SETTINGS": settings, "TESTING": True}).test_client()
    login(client)
    with populated() as session:
        done = session.scalars(select(Study).where(Study.status == "done")).first()
        called_abnormal = done.triage_class != "normal"
    page = client.get(f"/studies/{done.id}").get_data(as_text=True)
    assert 'name="truth" value="abnormal"' in page and 'value="pneumothorax"' in page
    token = csrf_from(page)
    url = f"/studies/{done.id}/review"
    resp = client.post(
        url,
        data={
            "action": "read",
            "truth": "abnormal",
            "finding": "pneumothorax",
            "csrf_token": token,
        },
        follow_redirects=True,
    )
    verdict = "agree" if called_abnormal else "disagree"
    assert resp.status_code == 200
    assert f"Recorded: abnormal (pneumothorax); you {verdict} with the AI." in resp.get_data(
        as_text=True
    )
    assert f"{verdict} by rad" in resp.get_data(as_text=True)
    bad = client.post(
        url, data={"action": "read", "truth": "normal", "finding": "effusion", "csrf_token": token}
    )
    assert bad.status_code == 400 and "only an abnormal read" in bad.get_data(as_text=True)
    assert (
        client.post(url, data={"action": "read", "truth": "maybe", "csrf_token": token}).status_code
        == 400
    )
    with populated() as session:
        rows = session.scalars(select(Review)).all()
        assert [(r.action, r.abnormal, r.finding) for r in rows] == [
            (verdict, True, "pneumothorax")
        ]
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "review")).all()
        assert [a.detail for a in audit] == [f"{verdict}; abnormal (pneumothorax)"]
