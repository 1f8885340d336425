"""The dashboard through Flask's test client: login, worklist order, study viewer, API, CSRF."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from dashboard import create_app
from pipeline.models import AuditEvent, Image, User
from pipeline.triage.worklist import worklist_query
from pipeline.users import UserError, create_user, issue_token
from tests.conftest import PASSWORD
from tests.web import csrf_from, login


@pytest.fixture
def client(settings, populated):
    app = create_app({"CXR_SETTINGS": settings, "TESTING": True})
    return app.test_client()


def test_everything_but_health_needs_authentication(client) -> None:
    assert client.get("/").status_code == 302
    assert client.get("/studies/1").status_code == 302
    assert client.get("/images/1/preview.jpg").status_code == 302
    assert client.get("/api/worklist").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_login_rejects_bad_password_and_missing_csrf(client) -> None:
    assert login(client, password="wrong password").status_code == 401
    no_csrf = client.post("/login", data={"username": "rad", "password": PASSWORD})
    assert no_csrf.status_code == 400
    assert client.get("/").status_code == 302


def test_worklist_page_is_in_priority_order_and_flags_untrained_model(client, populated) -> None:
    assert login(client).status_code == 302
    html = client.get("/").get_data(as_text=True)
    shown = [int(i) for i in re.findall(r'data-study-id="(\d+)"', html)]
    with populated() as session:
        expected = [s.id for s in session.scalars(worklist_query())]
    assert shown == expected and len(shown) == 4
    assert "Untrained model" in html
    assert "rejected" in html and "corrupt DICOM" in html


def test_study_page_image_overlay_and_audit(client, populated) -> None:
    login(client)
    with populated() as session:
        image = session.scalars(select(Image).where(Image.kind == "dicom")).one()
    page = client.get(f"/studies/{image.study_id}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert f"/images/{image.id}/cam.png" in html and "PID-0001" in html
    # The DICOM header fields are shown to the logged-in radiologist, tag by tag.
    assert re.search(r'data-tag="Modality"><th>Modality</th><td>CR</td>', html)
    assert re.search(r'data-tag="RequestedProcedurePriority"><th>[^<]+</th><td>STAT</td>', html)
    assert "This model is untrained" in html
    preview = client.get(f"/images/{image.id}/preview.jpg")
    assert preview.mimetype == "image/jpeg"
    base = PILImage.open(io.BytesIO(preview.data))
    overlay = client.get(f"/images/{image.id}/overlay.png")
    assert overlay.mimetype == "image/png"
    over = PILImage.open(io.BytesIO(overlay.data))
    assert over.size == base.size and over.mode == "RGB"
    rgb = np.asarray(over, dtype=int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 5  # colour was blended in
    cam = PILImage.open(io.BytesIO(client.get(f"/images/{image.id}/cam.png").data))
    assert cam.size == base.size and cam.mode == "RGBA"
    alpha = np.asarray(cam)[..., 3]
    assert alpha.max() == 255 and alpha.min() < 64  # opaque where it looked, clear elsewhere
    # CSS opacity a over the image gives the server-side blend at alpha a (rounding aside).
    heat = np.asarray(cam, dtype=float)
    grey = np.asarray(base.convert("L"), dtype=float)[..., None]
    w = 0.45 * heat[..., 3:] / 255
    blended = grey * (1 - w) + heat[..., :3] * w
    assert np.abs(blended - np.asarray(over, dtype=float)).mean() < 3
    with populated() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "view_study")).all()
        assert [e.target for e in events] == [f"study:{image.study_id}"]


def test_api_worklist_with_token_matches_order(client, populated) -> None:
    with populated() as session:
        user = session.scalars(select(User).where(User.username == "rad")).one()
        token = issue_token(session, user)
        session.commit()
        expected = [s.id for s in session.scalars(worklist_query())]
    bad = client.get("/api/worklist", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    doc = client.get("/api/worklist", headers={"Authorization": f"Bearer {token}"}).get_json()
    assert [s["id"] for s in doc["studies"]] == expected
    assert doc["model"]["trained"] is False
    first = doc["studies"][0]
    assert {"id", "status", "label", "p_abnormal", "priority", "received_at"} <= set(first)
    assert "patient_name" not in first
    # A radiologist's token reads the worklist, not the metrics; a monitoring token the reverse.
    assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 403
    with populated() as session:
        monitor_token = issue_token(session, create_user(session, "prom", None, "monitor"))
        session.commit()
    as_monitor = {"Authorization": f"Bearer {monitor_token}"}
    assert client.get("/api/worklist", headers=as_monitor).status_code == 403
    metrics = client.get("/metrics", headers=as_monitor)
    text = metrics.get_data(as_text=True)
    assert 'cxr_studies{status="done"} 3.0' in text
    assert 'cxr_studies{status="rejected"} 1.0' in text
    assert 'cxr_queue_depth{lane="live"} 0.0' in text
    assert "cxr_workers_alive 0.0" in text  # no worker heartbeat in this test
    assert "cxr_batch_size_count 1.0" in text  # the fixture classified one batch of 3
    assert 'cxr_batch_size_bucket{le="2.0"} 0.0' in text
    assert 'cxr_batch_size_bucket{le="4.0"} 1.0' in text
    assert "cxr_batch_size_sum 3.0" in text
    assert "cxr_inference_seconds_count 1.0" in text
    assert "cxr_end_to_end_seconds_count 3.0" in text


def test_feed_token_sends_studies_only_and_machine_accounts_cannot_log_in(
    client, populated
) -> None:
    with populated() as session:
        feed = create_user(session, "modality-1", None, "feed")
        token = issue_token(session, feed)
        session.commit()
        with pytest.raises(UserError, match="token only"):
            create_user(session, "modality-2", "a password", "feed")
    as_feed = {"Authorization": f"Bearer {token}"}
    for url in ("/api/worklist", "/api/monitor", "/metrics", "/api/admin/waiting"):
        response = client.get(url, headers=as_feed)
        assert response.status_code == 403, url
        assert "feed" in response.get_json()["error"]
    page = client.get("/login").get_data(as_text=True)
    response = client.post(
        "/login", data={"username": "modality-1", "password": "", "csrf_token": csrf_from(page)}
    )
    assert response.status_code == 401


def test_review_actions_are_recorded_with_who_and_when(client, populated) -> None:
    from pipeline.models import Review, Study

    login(client)
    with populated() as session:
        done = session.scalars(select(Study).where(Study.status == "done")).first()
        rejected = session.scalars(select(Study).where(Study.status == "rejected")).one()
    page = client.get(f"/studies/{done.id}").get_data(as_text=True)
    token = csrf_from(page)
    url = f"/studies/{done.id}/review"
    assert client.post(url, data={"action": "read"}).status_code == 400  # no CSRF token
    resp = client.post(
        url, data={"action": "disagree", "comment": "  consolidation is old  ", "csrf_token": token}
    )
    assert resp.status_code == 302
    assert client.post(url, data={"action": "delete", "csrf_token": token}).status_code == 400
    bad = client.post(
        f"/studies/{rejected.id}/review", data={"action": "agree", "csrf_token": token}
    )
    assert bad.status_code == 400 and "only a classified study" in bad.get_data(as_text=True)
    with populated() as session:
        reviews = session.scalars(select(Review)).all()
        assert [(r.study_id, r.action, r.comment) for r in reviews] == [
            (done.id, "disagree", "consolidation is old")
        ]
        user = session.scalars(select(User).where(User.username == "rad")).one()
        assert reviews[0].user_id == user.id and reviews[0].created_at is not None
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "review")).all()
        assert [(a.target, a.detail) for a in audit] == [(f"study:{done.id}", "disagree")]
    html = client.get(f"/studies/{done.id}").get_data(as_text=True)
    assert "disagree by rad" in html and "consolidation is old" in html
    worklist = client.get("/").get_data(as_text=True)
    row = re.search(rf'data-study-id="{done.id}".*?</tr>', worklist, re.S).group(0)
    assert '<td class="read">✓</td>' in row


def test_operating_point_in_words_from_the_weights_metadata(settings) -> None:
    from dashboard.words import operating_point
    from pipeline.classifier.weights import describe_weights
    from pipeline.settings import SHIPPED_WEIGHTS

    shipped = operating_point(describe_weights(settings.with_(weights=SHIPPED_WEIGHTS)))
    assert shipped["headline"] == (
        "Flags a film as abnormal when the model's probability of an abnormal finding is at "
        "least 0.17; urgent from 0.80 and critical from 0.91."
    )
    assert shipped["sentences"] == [
        "On the paediatric test set (624 films never used in training) that catches 98 of 100 "
        "abnormal films and clears 68 of 100 normal ones.",
        "On the adult hold-out set (1,006 films never used in training) that catches 93 of 100 "
        "abnormal films and clears 35 of 100 normal ones.",
        "On the NIH hold-out set (137 films never used in training) that catches 93 of 100 "
        "abnormal films and clears 10 of 100 normal ones.",
        "Trained without a source and tried on it, as a new department would meet it, it ranks "
        "an abnormal film above a normal one 69 times in 100 on average, 66 in 100 on the "
        "hardest source.",
    ]
    untrained = operating_point(describe_weights(settings))
    assert "untrained" in untrained["headline"] and untrained["sentences"] == []


def test_study_with_several_images_shows_thumbnails(client, populated, settings, tmp_path) -> None:
    from pydicom.uid import generate_uid

    from pipeline.classifier.inference import classify_images
    from pipeline.classifier.network import Classifier
    from pipeline.imaging.decode import Limits
    from pipeline.ingest.accept import ingest_paths
    from pipeline.queue.dispatch import redis_client
    from tests.conftest import chest_like, dicom_bytes

    uid, folder = generate_uid(), tmp_path / "two"
    folder.mkdir()
    (folder / "pa.dcm").write_bytes(dicom_bytes(chest_like(seed=7), study_uid=uid))
    (folder / "lat.dcm").write_bytes(dicom_bytes(chest_like(seed=8), study_uid=uid, view="LL"))
    report = ingest_paths(populated, [folder], Limits())
    by_name = {i.path.rsplit("/", 1)[-1]: i for i in report.items}
    pa, lat = by_name["pa.dcm"], by_name["lat.dcm"]
    assert pa.study_id == lat.study_id and lat.status == "skipped"
    classify_images(
        populated,
        redis_client(settings.redis_url),
        Classifier(settings.weights, "cpu", 1),
        [pa.image_id],
    )
    login(client)
    html = client.get(f"/studies/{pa.study_id}").get_data(as_text=True)
    thumbs = re.findall(r'class="thumb( current)?" data-image-id="(\d+)"', html)
    # In image order (lat.dcm was read first); the classified frontal one is shown.
    assert thumbs == [("", str(lat.image_id)), (" current", str(pa.image_id))]
    assert f"/images/{pa.image_id}/cam.png" in html and 'id="cam-toggle"' in html
    other = client.get(f"/studies/{pa.study_id}?image={lat.image_id}").get_data(as_text=True)
    assert re.search(r'data-tag="ViewPosition"><th>ViewPosition</th><td>LL</td>', other)
    assert 'id="cam-toggle"' not in other  # a skipped lateral has no CAM
    assert re.findall(r'class="thumb( current)?" data-image-id="(\d+)"', other)[0] == (
        " current",
        str(lat.image_id),
    )
