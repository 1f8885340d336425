"""The reporting-queue simulation, the simulate command, and the admin waiting-time page."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from pipeline.classifier.network import DEFAULT_THRESHOLDS
from pipeline.cli.main import build_parser
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import Review, Study, User
from pipeline.settings import Settings
from pipeline.simulation import simulate as sim
from pipeline.triage import score as triage
from pipeline.users import create_user, issue_token

THR = dict(DEFAULT_THRESHOLDS)

# --------------------------------------------------------------------------- hand-computed case


def test_reading_slots_are_evenly_spaced_in_reading_hours() -> None:
    assert sim.reading_slots(1, (8.0, 16.0), 0.0, 80.0).tolist() == [12.0, 36.0, 60.0]
    assert sim.reading_slots(2, (8.0, 18.0), 11.0, 40.0).tolist() == [15.5, 34.5, 39.5]


def test_tiny_case_by_hand() -> None:
    """Four studies, one read a day at noon (slots at 12, 36, 60, 84 h).

    A normal 09:00, B abnormal 10:00, C normal 11:00 on day 0; D abnormal 09:00 on day 1 (33 h).
    FIFO reads A, B, C, D. Priority reads B (critical), D (urgent), then C before A (higher p).
    With a 52 h cap: at 36 h, reading D would leave C to be read at 84 h, past its deadline of
    63 h, so only A or C may be read: C (higher priority); then A must go (deadline 61 h); then D.
    """
    arrivals = np.array([9.0, 10.0, 11.0, 33.0])
    p = np.array([0.1, 0.95, 0.2, 0.8])
    scores = sim.base_scores(p, THR)
    assert scores.tolist() == [6.25, 85.0, 12.5, 62.5]
    slots = sim.reading_slots(1, (8.0, 16.0), 0.0, 24 * 6)

    def waits(discipline: str, cap: float | None = None) -> list[float]:
        return (sim.simulate(arrivals, scores, slots, discipline, cap) - arrivals).tolist()

    assert waits("fifo") == [3.0, 26.0, 49.0, 51.0]
    assert waits("priority") == [75.0, 2.0, 49.0, 3.0]
    assert waits("priority_capped", 52.0) == [51.0, 2.0, 25.0, 51.0]
    # Cap of 50 h: even FIFO misses it (D waits 51 h), and the capped list degrades to FIFO order.
    assert waits("priority_capped", 50.0) == [27.0, 2.0, 49.0, 51.0]

    counted = sim.summarise(np.array(waits("priority")), p >= THR["routine"], ["x"] * 4)
    assert counted["abnormal"] == {
        "n": 2,
        "mean_h": 2.5,
        "median_h": 2.5,
        "p95_h": 2.95,
        "max_h": 3.0,
    }
    assert counted["normal"]["mean_h"] == 62.0 and counted["normal"]["max_h"] == 75.0


def test_ageing_scores_match_triage_priority_score() -> None:
    rng = np.random.default_rng(3)
    p, waited = rng.random(200), rng.random(200) * 60
    expected = [
        triage.priority_score(float(x), THR, None, w * 3600, 48 * 3600)
        for x, w in zip(p, waited, strict=True)
    ]
    got = sim.ageing_scores(sim.base_scores(p, THR), waited, 48.0)
    assert np.allclose(got, expected, atol=0.011)


def test_synthetic_model_has_the_asked_sensitivity_and_specificity() -> None:
    p, abnormal = sim.synthetic_predictions(40_000, 0.3, 0.95, 0.71, 0.4, np.random.default_rng(0))
    flagged = p >= 0.4
    assert abs(abnormal.mean() - 0.3) < 0.01
    assert abs(flagged[abnormal].mean() - 0.95) < 0.01
    assert abs((~flagged[~abnormal]).mean() - 0.71) < 0.01


# --------------------------------------------------------------------------- properties

arrival_lists = st.lists(st.floats(0.0, 24 * 5, allow_nan=False), min_size=1, max_size=40)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, tuple[float, float]]:
    arrivals = np.sort(np.array(draw(arrival_lists)))
    abnormal = np.array(
        draw(st.lists(st.booleans(), min_size=len(arrivals), max_size=len(arrivals)))
    )
    capacity = draw(st.integers(1, 12))
    start = draw(st.integers(0, 20))
    return arrivals, abnormal, capacity, (float(start), float(draw(st.integers(start + 1, 24))))


def _slots(arrivals: np.ndarray, capacity: int, hours: tuple[float, float]) -> np.ndarray:
    return sim.reading_slots(capacity, hours, 0.0, float(arrivals.max()) + 24 * (len(arrivals) + 2))


@settings(max_examples=150, deadline=None)
@given(workloads(), st.data())
def test_perfect_model_never_makes_an_abnormal_study_wait_longer(workload, data) -> None:
    arrivals, abnormal, capacity, hours = workload
    slots = _slots(arrivals, capacity, hours)
    # A perfect model that is also certain: every abnormal study scores the same, so abnormal
    # studies are read in arrival order ahead of every normal one.
    certain = sim.base_scores(abnormal.astype(float), THR)
    fifo = sim.simulate(arrivals, certain, slots, "fifo")
    prio = sim.simulate(arrivals, certain, slots, "priority")
    assert np.all(prio[abnormal] <= fifo[abnormal])
    # A perfect but graded model reorders abnormal studies among themselves: their reads still
    # take the earliest slots, so no slower on the whole (sum) and none past FIFO's last.
    graded_p = np.where(
        abnormal,
        data.draw(st.lists(st.floats(0.45, 1.0), min_size=len(arrivals), max_size=len(arrivals))),
        data.draw(st.lists(st.floats(0.0, 0.35), min_size=len(arrivals), max_size=len(arrivals))),
    )
    graded = sim.simulate(arrivals, sim.base_scores(graded_p, THR), slots, "priority")
    assert np.sort(graded[abnormal]).tolist() == np.sort(prio[abnormal]).tolist()
    assert graded[abnormal].sum() <= fifo[abnormal].sum() + 1e-9


@settings(max_examples=150, deadline=None)
@given(workloads(), st.lists(st.floats(0.0, 1.0), min_size=40, max_size=40), st.floats(0.0, 48.0))
def test_capped_priority_keeps_the_cap_whenever_capacity_allows(workload, ps, slack) -> None:
    arrivals, _, capacity, hours = workload
    scores = sim.base_scores(np.array(ps[: len(arrivals)]), THR)
    slots = _slots(arrivals, capacity, hours)
    fifo_max = float((sim.simulate(arrivals, scores, slots, "fifo") - arrivals).max())
    # Capacity allows a cap iff FIFO (earliest deadline first) meets it; a cap must be > 0, and
    # FIFO can wait 0 h (a study arriving exactly at a reading slot).
    cap = max(fifo_max + slack, 1e-6)
    capped = sim.simulate(arrivals, scores, slots, "priority_capped", cap)
    assert float((capped - arrivals).max()) <= cap + 1e-9
    assert sorted(capped.tolist()) == sorted(sim.simulate(arrivals, scores, slots, "fifo").tolist())


# --------------------------------------------------------------------------- the command


def run_simulate(
    argv: list[str], settings_: Settings, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Run ``cxr-triage simulate ARGV``; return its exit code and output (stdout, then stderr)."""
    args = build_parser().parse_args(["simulate", *argv])
    rc = args.handler(args, settings_)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.fixture
def bare_settings(tmp_path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'sim.db'}",
        weights=tmp_path / "absent.pt",
    )


SMALL = ["--days", "4", "--warmup-days", "1", "--volume", "60", "--cap-hours", "30"]


def test_simulate_synthetic_json_and_plot(bare_settings, tmp_path, capsys) -> None:
    png = tmp_path / "delays.png"
    rc, out = run_simulate(
        ["--synthetic", "--json", "--plot", str(png), *SMALL], bare_settings, capsys
    )
    assert rc == 0
    doc = json.loads(out)
    for name in ("fifo", "priority", "priority_capped"):
        for group in ("abnormal", "normal"):
            assert set(doc[name][group]) >= {"mean_h", "median_h", "p95_h", "max_h"}
    assert doc["counted_studies"] == 240 and doc["model"]["groups"] == "ground truth"
    assert doc["priority"]["abnormal"]["mean_h"] < doc["fifo"]["abnormal"]["mean_h"]
    assert doc["fifo_meets_cap"] is True
    assert doc["priority_capped"]["normal"]["max_h"] <= 30.0
    assert PILImage.open(io.BytesIO(png.read_bytes())).size == (1040, 384)
    # The oracle (abnormal first, knowing which are) bounds every order's abnormal mean wait.
    oracle = doc["oracle"]["abnormal"]["mean_h"]
    for name in ("fifo", "priority", "priority_capped", "priority_ageing", "oracle_capped"):
        assert oracle <= doc[name]["abnormal"]["mean_h"] + 1e-9, name
    share = doc["achieved_share"]
    assert set(share) == {"priority", "priority_capped", "priority_ageing"}
    fifo, prio = doc["fifo"]["abnormal"]["mean_h"], doc["priority"]["abnormal"]["mean_h"]
    assert share["priority"] == round((fifo - prio) / (fifo - oracle), 3)
    assert 0.0 < share["priority_capped"] <= share["priority"] <= 1.0


def test_a_perfect_model_delivers_all_the_oracle_can(bare_settings, capsys) -> None:
    scenario = sim.Scenario(days=4, warmup_days=1, volume=60, capacity=60, cap_h=30.0)
    p = np.array([0.95, 0.05] * 50)
    truth = p > 0.5
    doc, _ = sim.run_experiment(scenario, p, truth, THR)
    assert doc["oracle"]["abnormal"] == doc["priority"]["abnormal"]
    assert doc["oracle_capped"]["abnormal"] == doc["priority_capped"]["abnormal"]
    assert doc["achieved_share"]["priority"] == 1.0
    rc, out = run_simulate(["--synthetic", *SMALL], bare_settings, capsys)
    assert rc == 0 and "oracle_capped" in out and "% of the oracle's cut" in out


def test_simulate_reads_an_evaluate_predictions_file(bare_settings, tmp_path, capsys) -> None:
    csv = tmp_path / "preds.csv"
    rows = ["path,label,abnormal,p_abnormal,predicted"]
    rows += [f"a{i}.jpg,pneumonia,1,{0.5 + i / 40:.3f},pneumonia" for i in range(20)]
    rows += [f"n{i}.jpg,normal,0,{i / 50:.3f},normal" for i in range(19)] + [
        "nx.jpg,normal,0,0.9,pneumonia"
    ]
    csv.write_text("\n".join(rows) + "\n")
    rc, out = run_simulate(["--predictions", str(csv), "--json", *SMALL], bare_settings, capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["model"]["source"] == "predictions" and doc["model"]["pool_size"] == 40
    assert doc["sensitivity"] == 1.0 and 0.85 < doc["specificity"] < 1.0
    rc, out = run_simulate(
        ["--predictions", str(csv), "--prevalence", "0.1", "--json", *SMALL], bare_settings, capsys
    )
    assert abs(json.loads(out)["prevalence"] - 0.1) < 0.05
    (tmp_path / "bad.csv").write_text("path,p\nx,1\n")
    rc, out = run_simulate(["--predictions", str(tmp_path / "bad.csv")], bare_settings, capsys)
    assert rc == 2 and "missing columns abnormal, p_abnormal" in out


def test_simulate_from_db_groups_by_prediction_or_joined_labels(
    bare_settings, tmp_path, capsys
) -> None:
    rc, out = run_simulate(["--from-db"], bare_settings, capsys)
    assert rc == 2 and "no scored studies" in out
    factory = session_factory(bare_settings)
    with factory() as session:
        for i, p in enumerate([0.05, 0.2, 0.6, 0.95]):
            session.add(Study(accession_number=f"ACC{i}", status="done", p_abnormal=p))
        session.commit()
    rc, out = run_simulate(["--from-db", "--json", *SMALL], bare_settings, capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["model"]["groups"].startswith("predicted class")
    assert doc["sensitivity"] is None and abs(doc["prevalence"] - 0.5) < 0.15
    labels = tmp_path / "labels.csv"
    labels.write_text("accession_number,abnormal\nACC0,0\nACC1,1\nACC2,1\nACC3,1\n")
    rc, out = run_simulate(
        ["--from-db", "--labels", str(labels), "--json", *SMALL], bare_settings, capsys
    )
    doc = json.loads(out)
    assert doc["model"]["groups"] == "ground truth" and 0.6 < doc["sensitivity"] < 0.75


def test_simulate_table_output(bare_settings, capsys) -> None:
    rc, out = run_simulate(SMALL, bare_settings, capsys)
    assert rc == 0
    assert re.search(r"^fifo\s+\|", out, re.M) and re.search(r"^priority_capped\s+\|", out, re.M)
    assert "sensitivity 0.9" in out and "groups: ground truth" in out


# --------------------------------------------------------------------------- admin page


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
    from dashboard.monitor import waiting_times

    factory, now = waiting_db
    with factory() as session:
        doc = waiting_times(session, now)
    assert doc["abnormal"] == {"n": 2, "mean_h": 7.0, "max_h": 10.0}
    assert doc["normal"] == {"n": 1, "mean_h": 2.0, "max_h": 2.0}  # the read one is gone
    assert doc["unscored"] == {"n": 1, "mean_h": 1.0, "max_h": 1.0}  # rejected is not waiting
    assert doc["by_class"]["critical"]["max_h"] == 10.0 and doc["by_class"]["routine"]["n"] == 0


def test_admin_waiting_page_needs_the_admin_role(bare_settings, waiting_db) -> None:
    from dashboard import create_app

    def login(client, username: str, password: str):  # type: ignore[no-untyped-def]
        html = client.get("/login").get_data(as_text=True)
        token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]
        form = {"username": username, "password": password, "csrf_token": token}
        return client.post("/login", data=form)

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
