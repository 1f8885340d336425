"""The console's destinations page: add (audited, secret never shown back), per-destination
state and last error, retry and resend buttons, the outbox in /metrics."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from dashboard import create_app
from pipeline.cli.outbox import Sender
from pipeline.db import session_scope
from pipeline.models import AuditEvent, utcnow
from pipeline.settings import Settings
from pipeline.tables_results import Destination, OutboxItem
from tests.pacs import free_port
from tests.web import csrf_from, login


@pytest.fixture
def settings(settings: Settings, database_url: str) -> Settings:
    """Every test here runs on SQLite and on PostgreSQL."""
    return settings.with_(database_url=database_url)


def test_add_destination_send_fail_then_resend(
    settings: Settings, populated: Any, admin_client: Any
) -> None:
    client = admin_client
    page = client.get("/admin/destinations").get_data(as_text=True)
    token = csrf_from(page)
    dead_port = free_port()  # nothing listens: the PACS is down
    form = {
        "csrf_token": token,
        "name": "main PACS",
        "kind": "dicomweb",
        "url": f"http://127.0.0.1:{dead_port}/dicom-web",
        "auth": "bearer",
        "secret": "s3cret-token",
        "want_sr": "1",
        "want_sc": "1",
    }
    assert client.post("/admin/destinations", data=form).status_code == 302
    bad = {**form, "name": "x", "url": "ftp://nowhere"}
    client.post("/admin/destinations", data=bad)
    with session_scope(populated) as session:
        (row,) = session.scalars(select(Destination)).all()  # the bad one was refused
        assert row.auth == "bearer" and "s3cret" not in (row.secret or "")
        row.created_at = utcnow() - timedelta(days=1)  # before the studies finished
        events = [e.action for e in session.scalars(select(AuditEvent))]
        assert "destination_add" in events
    sender = Sender(settings)
    assert sender.once()["sent"] == {"pending": 2}
    sender.close()
    html = client.get("/admin/destinations").get_data(as_text=True)
    assert 'data-state="failing"' in html and "URLError" in html and "s3cret" not in html
    assert "waiting 2" in html
    doc = client.get("/api/admin/destinations").get_json()
    (dest,) = doc["destinations"]
    assert dest["counts"] == {"pending": 2, "sending": 0, "sent": 0, "failed": 0}
    assert "secret" not in dest and len(dest["items"]) == 2
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'cxr_outbox_items{destination="main PACS",status="pending"} 2.0' in metrics
    assert 'cxr_destination_up{destination="main PACS"} 0.0' in metrics
    item_id = dest["items"][0]["id"]
    with session_scope(populated) as session:
        before = session.get(OutboxItem, item_id).next_attempt_at
    assert (
        client.post(f"/admin/outbox/{item_id}/resend", data={"csrf_token": token}).status_code
        == 302
    )
    assert (
        client.post(
            f"/admin/destinations/{dest['id']}/retry", data={"csrf_token": token}
        ).status_code
        == 302
    )
    with session_scope(populated) as session:
        item = session.get(OutboxItem, item_id)
        assert item.status == "pending" and item.next_attempt_at <= before
        actions = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert actions[-2:] == ["outbox_resend", "destination_retry"]
    rad = create_app({"CXR_SETTINGS": settings, "TESTING": True}).test_client()
    login(rad)
    assert rad.get("/admin/destinations").status_code == 403
    assert rad.get("/api/admin/destinations").status_code == 403
