"""Local calibration from the site's reviewed studies: the proposal, the command (one JSON line),
and applying or rejecting it on the console (audited). On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from dashboard import create_app
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import AuditEvent, Review, Study, utcnow
from pipeline.monitoring.calibrate import CalibrationError, fit_scale, propose
from pipeline.settings import Settings
from pipeline.triage import policy as pol
from pipeline.triage import score as triage
from pipeline.users import create_user
from tests.conftest import PASSWORD, run_cli
from tests.web import csrf_from, login

MODEL = {"routine": 0.2, "urgent": 0.6, "critical": 0.8}


@pytest.fixture
def settings(settings: Settings, database_url: str) -> Settings:
    return settings.with_(database_url=database_url)


def scored(sid: int, p: float) -> Study:
    """A finished study the model scored p, classed and prioritised by ``MODEL``."""
    return Study(
        id=sid,
        status="done",
        p_abnormal=p,
        triage_class=triage.triage_class(p, MODEL),
        priority=triage.priority_score(p, MODEL),
    )


def seed(settings: Settings, n_abn: int = 60, n_norm: int = 60, waiting: int = 10) -> Any:
    """Reviewed studies whose model p is over-confident (the site's T should be larger)."""
    upgrade(settings.database_url)
    factory = make_session_factory(make_engine(settings.database_url))
    rng = np.random.default_rng(5)
    with factory() as session:
        boss = create_user(session, "boss", PASSWORD, "admin")
        sid = 0
        for abnormal, n in ((True, n_abn), (False, n_norm)):
            for _ in range(n):
                sid += 1
                z = rng.normal(1.0 if abnormal else -1.0, 1.2) * 3.0  # logits 3x too sure
                p = 1 / (1 + math.exp(-z))
                session.add(scored(sid, p))
                session.flush()
                session.add(
                    Review(
                        study_id=sid,
                        user_id=boss.id,
                        action="read",
                        abnormal=abnormal,
                        source="console",
                        created_at=utcnow() - timedelta(days=3),
                    )
                )
        for k in range(waiting):  # waiting for a read, p spread over the range
            sid += 1
            p = (k + 0.5) / waiting
            session.add(scored(sid, p))
        session.commit()
    return factory


def test_fit_scale_recovers_an_overconfident_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2.0, 4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-z))
    p_sure = 1 / (1 + np.exp(-3.0 * z))  # the model's p: logits three times too large
    assert abs(fit_scale(p_sure, y) - 3.0) < 0.3
    assert abs(fit_scale(1 / (1 + np.exp(-z)), y) - 1.0) < 0.15


def test_proposal_from_reads(settings: Settings) -> None:
    factory = seed(settings)
    now = datetime.now(UTC)
    with factory() as session:
        doc = propose(session, now - timedelta(days=30), now, MODEL, 0.95)
        assert (doc["reviewed"], doc["abnormal"], doc["normal"]) == (120, 60, 60)
        assert doc["temperature_scale"] > 1.5  # the model was over-confident
        t = doc["thresholds"]
        assert 0 < t["routine"] < t["urgent"] < t["critical"] < 1
        assert doc["expected"]["routine"]["sensitivity"]["value"] >= 0.95
        assert doc["expected"]["routine"]["sensitivity"]["k"] >= 57
        lo, hi = doc["expected"]["routine"]["specificity"]["ci"]
        assert lo <= doc["expected"]["routine"]["specificity"]["value"] <= hi
        assert doc["current"]["policy_version"] == 0 and doc["current"]["temperature_scale"] == 1
        # The waiting studies that would change class, counted by hand.
        site = pol.Policy(temperature_scale=doc["temperature_scale"])
        waiting = session.scalars(select(Study).where(Study.id > 120)).all()
        moved = sum(triage.triage_class(site.p(s.p_abnormal), t) != s.triage_class for s in waiting)
        assert doc["waiting_changed"] == moved and moved > 0
        assert "calibrated on 120 reviewed studies (60 abnormal)" in doc["reason"]
        with pytest.raises(CalibrationError, match="0 abnormal and 0 normal reviewed studies"):
            propose(session, now - timedelta(days=1), now, MODEL)


def test_calibrate_command_prints_one_json_line(settings: Settings) -> None:
    seed(settings, n_abn=30, n_norm=12)
    proc = run_cli(["calibrate", "--json"], settings)
    assert proc.returncode == 2
    (line,) = proc.stdout.strip().splitlines()
    doc = json.loads(line)
    assert doc["ok"] is False and "30 abnormal and 12 normal" in doc["error"]
    assert "at least 20 of each" in doc["error"]
    proc = run_cli(["calibrate", "--since", "yesterday", "--json"], settings)
    assert proc.returncode == 2 and "is not a date" in json.loads(proc.stdout)["error"]


def test_calibrate_command_proposes_and_changes_nothing(settings: Settings) -> None:
    factory = seed(settings)
    proc = run_cli(["calibrate", "--json", "--target-sensitivity", "0.9"], settings)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.strip().splitlines()
    doc = json.loads(line)
    assert doc["ok"] is True and doc["reviewed"] == 120 and doc["target_sensitivity"] == 0.9
    assert doc["expected"]["routine"]["sensitivity"]["value"] >= 0.9
    proc = run_cli(["calibrate"], settings)
    assert proc.returncode == 0 and "waiting studies would change triage class" in proc.stdout
    with factory() as session:
        assert pol.active(session).version == 0  # a proposal only


def test_console_proposes_applies_and_rejects(settings: Settings) -> None:
    factory = seed(settings)
    app = create_app({"CXR_SETTINGS": settings, "TESTING": True})
    client = app.test_client()
    assert login(client, "boss").status_code == 302
    html = client.get("/admin/policy?calibrate=1&target=0.9").get_data(as_text=True)
    assert 'id="proposal" data-reviewed="120"' in html
    token = csrf_from(html)
    page = client.post(
        "/admin/policy/calibration/reject",
        data={"csrf_token": token, "summary": "x", "reason": "too few reads"},
        follow_redirects=True,
    ).get_data(as_text=True)
    assert "Calibration proposal rejected" in page
    # Apply: the form posts exactly the proposed numbers.
    form = {k: v for k, v in _hidden(html, "apply-proposal").items()}
    page = client.post("/admin/policy", data=form, follow_redirects=True).get_data(as_text=True)
    assert "Policy version 1 is in force" in page
    with factory() as session:
        now = pol.active(session)
        assert now.version == 1 and now.temperature_scale > 1.5
        assert now.thresholds is not None and now.reason.startswith("calibrated on 120 reviewed")
        waiting = session.scalars(select(Study).where(Study.id > 120)).all()
        for s in waiting:  # re-ranked under the site's temperature and thresholds
            assert s.triage_class == triage.triage_class(now.p(s.p_abnormal), now.thresholds)
            assert s.policy_version == 1
        actions = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
        assert "calibration_reject" in actions and actions[-1] == "policy_change"
    # The study page says the operating point is the site's (an untrained test model: no numbers).
    study = client.get("/studies/121").get_data(as_text=True)
    assert (
        "this site&#39;s thresholds (policy version 1, on probabilities under its temperature)"
        in study
    )
    # Live performance is read under the policy in force: its thresholds, its temperature.
    perf = client.get("/api/admin/performance?days=30").get_json()
    assert perf["thresholds"] == now.thresholds
    routine = perf["overall"]["thresholds"]["routine"]
    proposed = form_expected(html)
    assert routine["sensitivity"]["value"] == pytest.approx(proposed, abs=5e-4)
    html = client.get("/admin/policy?calibrate=1&since=2999-01-01").get_data(as_text=True)
    assert 'id="no-proposal"' in html and "0 abnormal and 0 normal" in html


def _hidden(html: str, form_id: str) -> dict[str, str]:
    import re

    block = html[html.index(f'id="{form_id}"') :]
    block = block[: block.index("</form>")]
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', block))


def form_expected(html: str) -> float:
    """The proposal's expected routine sensitivity, as the page printed it (percent, 1 dp)."""
    import re

    row = html[html.index('data-threshold="routine"') :]
    return float(re.search(r"<td>([0-9.]+) %", row).group(1)) / 100  # type: ignore[union-attr]
