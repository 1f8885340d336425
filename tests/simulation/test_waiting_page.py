"""The admin waiting-time page: abnormal and normal waits, for administrators only."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import Review, Study, User
from pipeline.settings import Settings
from pipeline.users import create_user, issue_token
from tests.web import login


def session_factory(settings_: Settings):  # type: ignore[no-untyped-def]
    upgrade(settings_.db_url)
    return make_session_factory(make_engine(settings_.db_url))


@pytest.fixture
def waiting_db(bare_settings):  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    factory = session_factory(bare_settings)
    with factory() as session:
        admin = create_user(session, "boss", "admin password 1", "admin")
        create_user(session, "rad", "radiologist pw 1", "radiologist")
        rows = [
            ("critical", "done", 10),
            ("urgent", "done", 4),
            ("normal", "done", 2),
            ("normal", "done", 6),
            (None, "queued", 1),
            (None, "rejected", 30),
        ]
        for cls, status, hours in rows:
            session.add(
                Study(triage_class=cls, status=status, received_at=now - timedelta(hours=hours))
            )
        session.flush()
        reviewed = (
            session.query(Study).filter_by(triage_class="normal").order_by(Study.id).all()[-1]
        )
        session.add(Review(study_id=reviewed.id, user_id=admin.id, action="read"))
        session.commit()
    return factory, now


def test_waiting_times_split_abnormal_normal(waiting_db) -> None:
    from dashboard.monitor_activity import waiting_times

    factory, now = waiting_db
    with factory() as session:
        doc = waiting_times(session, now)
    assert doc["abnormal"] == {"n": 2, "mean_h": 7.0, "max_h": 10.0}
    assert doc["normal"] == {"n": 1, "mean_h": 2.0, "max_h": 2.0}  # the read one is gone
    assert doc["unscored"] == {"n": 1, "mean_h": 1.0, "max_h": 1.0}  # rejected is not waiting
    assert doc["by_class"]["critical"]["max_h"] == 10.0 and doc["by_class"]["routine"]["n"] == 0


def test_admin_waiting_page_needs_the_admin_role(bare_settings, waiting_db) -> None:
    from dashboard import create_app

    factory, _ = waiting_db
    client = create_app({"CXR_SETTINGS": bare_settings, "TESTING": True}).test_client()
    assert client.get("/admin/waiting").status_code == 302
    assert client.get("/api/admin/waiting").status_code == 401
    assert login(client, "rad", "radiologist pw 1").status_code == 302
    assert client.get("/admin/waiting").status_code == 403
    assert client.get("/api/admin/waiting").status_code == 403
    client = create_app({"CXR_SETTINGS": bare_settings, "TESTING": True}).test_client()
    assert login(client, "boss", "admin password 1").status_code == 302
    page = client.get("/admin/waiting")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert re.search(
        r'data-group="abnormal">.*?class="num n">2<.*?class="num mean">7\.0<', html, re.S
    )
    doc = client.get("/api/admin/waiting").get_json()
    assert doc["abnormal"]["n"] == 2 and doc["abnormal"]["max_h"] >= 10.0
    with factory() as session:
        user = session.query(User).filter_by(username="rad").one()
        token = issue_token(session, user)
        session.commit()
    assert (
        client.get("/api/admin/waiting", headers={"Authorization": f"Bearer {token}"}).status_code
        == 403
    )
