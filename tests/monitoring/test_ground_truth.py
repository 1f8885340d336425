"""Ground truth from the read and from the RIS, and the live performance computed from it:
the review rules and the migration of old rows (SQLite and PostgreSQL), the viewer's form, the
``labels import`` command, the console page, its JSON and /metrics."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import create_engine, select, text

from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import AuditEvent, Image, Review, Study
from pipeline.monitoring.labels import import_labels
from pipeline.monitoring.live import live_performance
from pipeline.monitoring.performance import summarize
from pipeline.monitoring.reviews import ReviewError, latest_truths, record_review
from pipeline.triage.score import triage_class
from pipeline.users import create_user
from tests.conftest import PASSWORD, run_cli
from tests.dashboard.test_dashboard import csrf_from, login

TH = {"routine": 0.4, "urgent": 0.7, "critical": 0.9}


def add_study(
    session,
    p: float | None,
    *,
    accession: str | None = None,  # type: ignore[no-untyped-def]
    institution: str | None = "North",
    modality: str = "CR",
    view: str = "PA",
) -> Study:
    study = Study(
        status="done" if p is not None else "queued",
        p_abnormal=p,
        triage_class=None if p is None else triage_class(p, TH),
        accession_number=accession,
        lane="live",
    )
    session.add(study)
    session.flush()
    meta = {"InstitutionName": institution} if institution else {}
    session.add(
        Image(
            study_id=study.id,
            dedup_key=f"sha256:{uuid.uuid4().hex}",
            kind="dicom",
            status=study.status,
            modality=modality,
            view_position=view,
            meta=meta,
        )
    )
    session.flush()
    return study


@pytest.fixture
def factory(database_url):  # type: ignore[no-untyped-def]
    upgrade(database_url)
    return make_session_factory(make_engine(database_url))


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


def test_import_refuses_a_file_with_any_bad_row(factory) -> None:  # type: ignore[no-untyped-def]
    with factory() as session:
        admin = create_user(session, "boss", PASSWORD, "admin")
        add_study(session, 0.8, accession="A1")
        add_study(session, 0.1, accession="A2")
        add_study(session, 0.5, accession="TWICE")
        add_study(session, 0.6, accession="TWICE")
        session.commit()
        bad = (
            b"Accession_Number,Abnormal,Finding\r\n"
            b"A1,yes,effusion\r\nNOPE,1,\r\nTWICE,0,\r\nA2,maybe,\r\n"
            b"A2,no,effusion\r\nA1,1,gout\r\n,1,\r\n\r\nA2,normal\r\n"
        )
        report = import_labels(session, bad, admin.id)
        assert [(e.row, e.error.split(";")[0].split(" (")[0]) for e in report.errors] == [
            (3, "no study has this accession number"),
            (4, "this accession number matches 2 studies"),
            (5, "abnormal must be 1/0, yes/no, true/false or abnormal/normal, not 'maybe'"),
            (6, "a normal outcome cannot name a finding"),
            (7, "unknown finding 'gout'"),
            (8, "no accession number"),
        ]
        assert report.imported == 0 and report.rows == 8
        session.rollback()
        assert session.scalar(select(Review.id)) is None
        good = b"accession_number,abnormal,finding\nA1,true,Mass/Nodule\nA2,0,\n"
        report = import_labels(session, good, admin.id)
        session.commit()
        assert (report.imported, report.unchanged, report.abnormal) == (2, 0, 1)
        rows = session.scalars(select(Review).order_by(Review.id)).all()
        assert [
            (r.action, r.source, r.abnormal, r.finding, r.user_id, r.model_class) for r in rows
        ] == [
            ("import", "ris", True, "mass_nodule", admin.id, "urgent"),
            ("import", "ris", False, None, admin.id, "normal"),
        ]
        again = import_labels(session, good, admin.id)
        assert (again.imported, again.unchanged) == (0, 2)


def test_labels_import_command(settings, populated, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with populated() as session:
        create_user(session, "boss", PASSWORD, "admin")
        studies = session.scalars(select(Study).order_by(Study.id)).all()
        for i, s in enumerate(studies):
            s.accession_number = f"RIS-{i}"
        session.commit()
    bad = tmp_path / "bad.csv"
    bad.write_text("accession_number,abnormal\nRIS-0,1\nRIS-9,0\n")
    result = run_cli(["labels", "import", str(bad), "--user", "boss"], settings)
    assert result.returncode == 1
    assert "bad.csv: row 3: no study has this accession number" in result.stderr
    assert "nothing imported: 1 bad row(s) of 2" in result.stderr and "RIS-9" not in result.stderr
    good = tmp_path / "good.csv"
    good.write_text("accession_number,abnormal,finding\nRIS-0,1,cardiomegaly\nRIS-1,no,\n")
    result = run_cli(["labels", "import", str(good), "--user", "boss", "--json"], settings)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert (doc["ok"], doc["imported"], doc["abnormal"], doc["rows"]) == (True, 2, 1, 2)
    refused = run_cli(["labels", "import", str(good), "--user", "rad", "--json"], settings)
    assert refused.returncode == 2 and len(refused.stdout.splitlines()) == 1
    assert "not an active admin account" in json.loads(refused.stdout)["error"]
    with populated() as session:
        rows = session.scalars(select(Review).order_by(Review.id)).all()
        assert [(r.source, r.abnormal, r.finding) for r in rows] == [
            ("ris", True, "cardiomegaly"),
            ("ris", False, None),
        ]
        audit = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "labels_import").order_by(AuditEvent.id)
        ).all()
        assert [a.detail.split(";")[0] for a in audit] == [
            "refused: 1 bad row(s) of 2",
            "2 imported (1 abnormal), 0 unchanged of 2",
        ]
        assert all(a.target in ("file:bad.csv", "file:good.csv") for a in audit)


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
        session.add(
            Review(
                study_id=s.id,
                user_id=user_id,
                action="read",
                abnormal=abnormal,
                source="console" if i % 4 else "ris",
                model_class=s.triage_class,
                created_at=now - timedelta(days=1 + i % 28),
            )
        )
        scores.append(p)
        truths.append(abnormal)
    for _ in range(5):
        s = add_study(session, 0.95, institution=None)
        session.add(
            Review(
                study_id=s.id,
                user_id=user_id,
                action="read",
                abnormal=False,
                model_class="critical",
                created_at=now - timedelta(days=40),
            )
        )
    for _ in range(3):
        s = add_study(session, None)
        session.add(
            Review(
                study_id=s.id,
                user_id=user_id,
                action="read",
                abnormal=True,
                created_at=now - timedelta(days=2),
            )
        )
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
