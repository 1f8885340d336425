"""The versioned triage policy: saved with a reason, audited, rolled back; the live worklist reads
in the reading order under its maximum wait; each study records the version it was ranked under.
On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import AuditEvent, PolicyVersion, Review, Study, utcnow
from pipeline.settings import Settings
from pipeline.triage import policy as pol
from pipeline.triage.studies import worklist_document
from pipeline.triage.worklist import neighbour_ids, worklist_page
from pipeline.users import create_user
from tests.conftest import PASSWORD
from tests.web import csrf_from, login

MODEL = {"routine": 0.2, "urgent": 0.6, "critical": 0.8}


@pytest.fixture
def settings(settings: Settings, database_url: str) -> Settings:
    return settings.with_(database_url=database_url)


@pytest.fixture
def factory(settings: Settings) -> Any:
    upgrade(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


def add(session: Any, sid: int, p: float, waited_h: float, status: str = "done") -> Study:
    from pipeline.triage import score as triage

    study = Study(
        id=sid,
        status=status,
        p_abnormal=p if status == "done" else None,
        triage_class=triage.triage_class(p, MODEL) if status == "done" else None,
        priority=triage.priority_score(p, MODEL) if status == "done" else None,
        received_at=utcnow() - timedelta(hours=waited_h),
    )
    session.add(study)
    return study


def test_versions_reasons_rerank_and_rollback(factory: Any) -> None:
    with factory() as session:
        user = create_user(session, "boss", PASSWORD, "admin")
        add(session, 1, 0.5, 1.0)  # routine under the model's thresholds
        add(session, 2, 0.9, 1.0)  # critical
        add(session, 3, 0.3, 1.0)
        session.flush()
        session.add(Review(study_id=3, user_id=user.id, action="read"))  # read: not re-ranked
        session.commit()
        assert pol.active(session).version == 0 and pol.active(session).max_wait_h == 48.0
        with pytest.raises(pol.PolicyError, match="say why"):
            pol.save(session, pol.Policy().body(), user.id, " ", MODEL)
        bad = {
            **pol.Policy().body(),
            "thresholds": {"routine": 0.7, "urgent": 0.6, "critical": 0.9},
        }
        with pytest.raises(pol.PolicyError, match="thresholds must rise"):
            pol.save(session, bad, user.id, "typo", MODEL)
        with pytest.raises(pol.PolicyError, match="reads per hour must be from 1 to 1000"):
            pol.save(session, {**pol.Policy().body(), "reads_per_hour": 0}, user.id, "x", MODEL)
        site = {
            **pol.Policy().body(),
            "stat_boost": 10,
            "thresholds": {"routine": 0.3, "urgent": 0.45, "critical": 0.95},
        }
        assert pol.preview(session, site, MODEL) == 2  # 1: routine -> urgent, 2: critical -> urgent
        v1, moved = pol.save(session, site, user.id, "calibrated on 400 local reads", MODEL)
        session.commit()
        assert (v1.version, moved) == (1, 2)
        s1, s2, s3 = (session.get(Study, i) for i in (1, 2, 3))
        assert (s1.triage_class, s2.triage_class, s3.triage_class) == (
            "urgent",
            "urgent",
            "routine",
        )
        assert s1.policy_version == 1 and s3.policy_version is None
        v2, moved = pol.rollback(session, 0, user.id, "too many urgent", MODEL)
        session.commit()
        assert (v2.version, moved) == (2, 2) and v2.thresholds is None
        assert v2.reason == "back to version 0: too many urgent"
        assert session.get(Study, 1).triage_class == "routine"
        assert [p.version for p in pol.history(session)] == [2, 1, 0]
        assert pol.history(session)[1].created_by == "boss"
        with pytest.raises(pol.PolicyError, match="no policy version 7"):
            pol.rollback(session, 7, user.id, "x", MODEL)


def test_live_worklist_reads_an_old_study_in_time_and_marks_it_due(factory: Any) -> None:
    with factory() as session:
        user = create_user(session, "rad", PASSWORD, "radiologist")
        add(session, 1, 0.05, 47.9)  # normal, 6 minutes (less the test's own time) before 48 h
        add(session, 2, 0.95, 0.2)
        add(session, 3, 0.9, 0.1)
        add(session, 4, 0.85, 0.05)
        add(session, 5, 0.99, 2.0)
        add(session, 6, 0.5, 0.0, status="processing")
        session.flush()
        session.add(Review(study_id=5, user_id=user.id, action="read"))
        session.commit()
        page = worklist_page(session, None)
        # A read every 3 minutes (20 an hour): the old normal film goes second, just in time,
        # ahead of two critical ones; then the reviewed study, then the one not yet scored.
        assert [s.id for s in page.studies] == [2, 1, 3, 4, 5, 6]
        assert page.due == {1} and page.policy_version == 0
        first = worklist_page(session, 2, 0)
        second = worklist_page(session, 3, 2)
        assert [s.id for s in first.studies] == [2, 1] and first.due == {1}
        assert [s.id for s in second.studies] == [3, 4, 5] and second.due == frozenset()
        study = {s.id: s for s in page.studies}
        assert neighbour_ids(session, study[1]) == (2, 3)
        assert neighbour_ids(session, study[2]) == (None, 1)
        assert neighbour_ids(session, study[4]) == (3, 5)  # the last waiting, then the rest
        assert neighbour_ids(session, study[5]) == (4, 6)
        assert neighbour_ids(session, study[6]) == (5, None)
        doc = worklist_document(session, {"version": "v", "trained": True}, 10)
        assert [(d["id"], d["due"]) for d in doc["studies"]][:2] == [(2, False), (1, True)]
        assert doc["policy_version"] == 0
        # A slower department: 6 reads an hour leaves no time, so the old film goes first.
        slow, _ = pol.save(
            session,
            {**pol.Policy().body(), "reads_per_hour": 6},
            user.id,
            "two radiologists off",
            MODEL,
        )
        session.commit()
        assert [s.id for s in worklist_page(session, None).studies][:2] == [1, 2]
        # No maximum wait: priority alone, reviewed studies among the rest.
        pol.save(session, {**pol.Policy().body(), "max_wait_h": 0}, user.id, "no cap", MODEL)
        session.commit()
        off = worklist_page(session, None)
        assert [s.id for s in off.studies] == [5, 2, 3, 4, 1, 6] and off.due == frozenset()


def test_console_saves_audits_and_rolls_back(settings: Settings, factory: Any) -> None:
    with factory() as session:
        create_user(session, "boss", PASSWORD, "admin")
        create_user(session, "rad", PASSWORD, "radiologist")
        session.commit()
    app = create_app({"CXR_SETTINGS": settings, "TESTING": True})
    rad = app.test_client()
    assert login(rad, "rad").status_code == 302
    assert rad.get("/admin/policy").status_code == 403
    assert app.test_client().get("/api/admin/policy").status_code == 401
    client = app.test_client()
    assert login(client, "boss").status_code == 302
    html = client.get("/admin/policy").get_data(as_text=True)
    assert 'id="active" data-version="0"' in html and "built-in default" in html
    form = {
        "csrf_token": csrf_from(html),
        "thresholds": "own",
        "t_routine": "0.3",
        "t_urgent": "0.6",
        "t_critical": "0.9",
        "stat_boost": "15",
        "max_wait_h": "24",
        "reads_per_hour": "30",
        "reason": "",
    }
    page = client.post("/admin/policy", data=form, follow_redirects=True).get_data(as_text=True)
    assert "Policy not saved: say why" in page
    form["reason"] = "site thresholds from the first month's reads"
    page = client.post("/admin/policy", data=form, follow_redirects=True).get_data(as_text=True)
    assert "Policy version 1 is in force" in page and 'data-version="1"' in page
    doc = client.get("/api/admin/policy").get_json()
    assert doc["active"]["thresholds"] == {"routine": 0.3, "urgent": 0.6, "critical": 0.9}
    assert doc["active"]["max_wait_h"] == 24.0 and doc["active"]["created_by"] == "boss"
    assert [h["version"] for h in doc["history"]] == [1, 0]
    token = csrf_from(page)
    page = client.post(
        "/admin/policy/0/rollback", data={"csrf_token": token}, follow_redirects=True
    ).get_data(as_text=True)
    assert "The rules of version 0 are in force again as version 2" in page
    with factory() as session:
        rows = session.scalars(select(PolicyVersion).order_by(PolicyVersion.version)).all()
        assert [r.version for r in rows] == [1, 2]
        events = [
            (e.action, e.target)
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.action.like("policy%")).order_by(AuditEvent.id)
            )
        ]
        assert events == [("policy_change", "policy:v1"), ("policy_rollback", "policy:v2")]
        detail = session.scalar(select(AuditEvent.detail).where(AuditEvent.target == "policy:v1"))
        assert "site thresholds from the first month" in (detail or "")


def test_an_overdue_backlog_is_read_oldest_first_page_by_page(factory: Any) -> None:
    with factory() as session:
        for i in range(1, 3001):  # 3,000 films, all past 48 h, the newest the most abnormal
            add(session, i, 0.05 + 0.9 * i / 3000, 100.0 - i / 100)
        session.commit()
        first = worklist_page(session, 50, 0)
        assert [s.id for s in first.studies] == list(range(1, 51))  # oldest first
        assert first.due == set(range(1, 51))  # each read ahead of a higher priority
        deep = worklist_page(session, 50, 2950)
        assert [s.id for s in deep.studies] == list(range(2951, 3001))
        assert 3000 not in deep.due  # the last one is also the highest priority left
