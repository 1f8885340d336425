"""The model registry: register, shadow (never touching the worklist), promote under load with
real workers (nothing lost or doubled), rollback; the console and its 403. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select

from dashboard import create_app
from pipeline.classifier import registry
from pipeline.classifier.inference import classify_images
from pipeline.classifier.network import Classifier, build_from_meta, default_meta, save_weights
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import AuditEvent, Image, Prediction, Study
from pipeline.monitoring import shadow as shadow_vs_live
from pipeline.queue.dispatch import redis_client
from pipeline.settings import Settings
from pipeline.tables_registry import ModelVersion, ShadowPrediction
from pipeline.triage.worklist import worklist_page
from pipeline.users import create_user
from tests.conftest import PASSWORD, run_cli
from tests.web import csrf_from, login
from tests.worker.test_worker import exactly_once, make_studies, send, wait_done


@pytest.fixture
def settings(settings: Settings, database_url: str) -> Settings:
    return settings.with_(database_url=database_url, registry_check_s=0.2)


def other_model(path: Path, seed: int) -> Path:
    """A model of the shipped kind with other weights (another version)."""
    torch.manual_seed(seed)
    meta = default_meta()
    model = build_from_meta(meta)
    save_weights(model, meta, path)
    return path


def test_lifecycle_register_shadow_promote_rollback(settings: Settings, tmp_path: Path) -> None:
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    a = other_model(tmp_path / "a.pt", 1)
    b = other_model(tmp_path / "b.pt", 2)
    data = Path(settings.data_dir)
    with factory() as session:
        boss = create_user(session, "boss", PASSWORD, "admin")
        ra = registry.register(session, a, data, boss.id, "first candidate")
        assert ra.status == "candidate" and Path(ra.path).read_bytes() == a.read_bytes()
        assert Path(ra.path).parent == data / "models"
        with pytest.raises(registry.RegistryError, match="already registered"):
            registry.register(session, a, data, boss.id)
        rb = registry.register(session, b, data, boss.id)
        shipped = Path(settings.weights)
        registry.start_shadow(session, ra.version, boss.id, shipped)
        live, shadow = registry.in_force(session)
        assert live is not None and live.note == "shipped with cxr-triage"
        assert shadow is not None and shadow.version == ra.version
        registry.start_shadow(session, rb.version, boss.id, shipped)  # one shadow at a time
        assert session.get(ModelVersion, ra.id).status == "candidate"
        registry.promote(session, rb.version, boss.id, shipped)
        assert live.status == "retired" and rb.status == "live"
        assert registry.in_force(session) == (rb, None)
        with pytest.raises(registry.RegistryError, match="is live"):
            registry.discard(session, rb.version, boss.id)
        registry.promote(session, live.version, boss.id, shipped)  # rollback to the shipped one
        assert registry.in_force(session)[0].version == live.version and rb.status == "retired"
        registry.discard(session, ra.version, boss.id)
        session.commit()
        statuses = {r["version"]: r["status"] for r in registry.listing(session)}
        assert statuses == {ra.version: "retired", rb.version: "retired", live.version: "live"}


def _scored(settings: Settings, folder: Path, shadow: Classifier | None) -> Any:
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    report = ingest_paths(factory, [folder], Limits())
    ids = [i.image_id for i in report.accepted if i.status == "queued"]
    live = Classifier(settings.weights, "cpu", 1)
    client = redis_client(settings.redis_url)
    result = classify_images(factory, client, live, ids, "w", shadow=shadow)
    assert sorted(result.done) == sorted(ids)
    return factory, ids


def test_shadow_scores_without_touching_the_worklist(
    settings: Settings, tmp_path: Path, database_url: str
) -> None:
    folder = make_studies(tmp_path / "films", 8)
    plain = settings.with_(database_url=f"sqlite:///{tmp_path / 'plain.db'}")
    factory_a, _ = _scored(plain, folder, None)
    candidate = Classifier(other_model(tmp_path / "c.pt", 7), "cpu", 1)
    factory_b, ids = _scored(settings, folder, candidate)

    def view(factory: Any) -> list[tuple]:
        with factory() as session:
            page = worklist_page(session, None)
            return [(s.id, s.priority, s.triage_class, s.p_abnormal, s.label) for s in page.studies]

    assert view(factory_a) == view(factory_b)  # the order and every ranked field
    with factory_b() as session:
        shadow = dict(
            session.execute(
                select(ShadowPrediction.image_id, ShadowPrediction.p_abnormal).where(
                    ShadowPrediction.model_version == candidate.version
                )
            ).all()
        )
        live = dict(session.execute(select(Prediction.image_id, Prediction.p_abnormal)).all())
        assert set(shadow) == set(ids) == set(live)
        assert any(abs(shadow[i] - live[i]) > 1e-6 for i in ids)  # another model's opinion
        versions = set(session.scalars(select(Prediction.model_version)))
        assert versions == {Classifier(settings.weights, "cpu", 1).version}
    with factory_a() as session:
        assert session.scalar(select(func.count(ShadowPrediction.id))) == 0
    # The console's comparison: both models on the studies reviewed since the shadow started.
    from pipeline.models import Review
    from pipeline.monitoring.performance import auc

    with factory_b() as session:
        boss = create_user(session, "boss", PASSWORD, "admin")
        row = registry.register(session, tmp_path / "c.pt", Path(settings.data_dir), boss.id)
        registry.start_shadow(session, row.version, boss.id, Path(settings.weights))
        session.commit()
        studies = session.scalars(select(Study).order_by(Study.id)).all()
        truth = {s.id: k % 2 == 0 for k, s in enumerate(studies)}
        session.add_all(
            Review(study_id=sid, user_id=boss.id, action="read", abnormal=t)
            for sid, t in truth.items()
        )
        session.commit()
    with factory_b() as session:  # a fresh session: what the database hands back
        doc = shadow_vs_live.comparison(session, 0.5)
        assert doc is not None and doc["shadow_version"] == row.version
        assert doc["studies"] == len(studies) and doc["abnormal"] == sum(truth.values())
        live_auc = auc([s.p_abnormal for s in studies], [truth[s.id] for s in studies])
        assert doc["live"]["auc"]["auc"] == pytest.approx(live_auc)
        assert doc["shadow"]["auc"]["auc"] is not None
        assert set(doc["shadow"]["routine"]) == {"sensitivity", "specificity"}


def test_promotion_under_load_loses_and_doubles_nothing(
    settings: Settings, tmp_path: Path, worker_factory: Any
) -> None:
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    old = Classifier(settings.weights, "cpu", 1).version
    worker_factory(settings)
    first = send(settings, make_studies(tmp_path / "a", 24))
    with factory() as session:
        boss = create_user(session, "boss", PASSWORD, "admin")
        new = registry.register(
            session, other_model(tmp_path / "n.pt", 3), Path(settings.data_dir), boss.id
        )
        registry.promote(session, new.version, boss.id, Path(settings.weights))
        session.commit()
        version = new.version
    second = send(settings, make_studies(tmp_path / "b", 24, start=100))
    wait_done(factory, first + second, settings)
    exactly_once(factory, first + second)
    with factory() as session:
        by_image = dict(
            session.execute(select(Prediction.image_id, Prediction.model_version)).all()
        )
        studies = session.scalars(select(Study)).all()
    assert set(by_image.values()) <= {old, version}
    time.sleep(0.5)  # the switch is seen between batches: the later films are the new model's
    later = send(settings, make_studies(tmp_path / "c", 4, start=200))
    wait_done(factory, later, settings)
    with factory() as session:
        assert set(
            session.scalars(select(Prediction.model_version).where(Prediction.image_id.in_(later)))
        ) == {version}
        assert {
            s.model_version
            for s in session.scalars(
                select(Study).where(Study.id.in_(select(Image.study_id).where(Image.id.in_(later))))
            )
        } == {version}
    assert all(s.status == "done" for s in studies)


def test_console_and_command(settings: Settings, tmp_path: Path) -> None:
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        create_user(session, "boss", PASSWORD, "admin")
        create_user(session, "rad", PASSWORD, "radiologist")
        session.commit()
    cand = other_model(tmp_path / "cand.pt", 11)
    proc = run_cli(["models", "register", str(cand), "--user", "rad", "--json"], settings)
    assert proc.returncode == 2 and "not an active admin" in json.loads(proc.stdout)["error"]
    proc = run_cli(
        ["models", "register", str(cand), "--user", "boss", "--note", "from 400 reads", "--json"],
        settings,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.strip().splitlines()
    version = json.loads(line)["version"]
    app = create_app({"CXR_SETTINGS": settings, "TESTING": True})
    rad = app.test_client()
    assert login(rad, "rad").status_code == 302
    assert rad.get("/admin/models").status_code == 403
    boss = app.test_client()
    assert login(boss, "boss").status_code == 302
    html = boss.get("/admin/models").get_data(as_text=True)
    assert f'data-version="{version}" data-status="candidate"' in html
    token = csrf_from(html)
    assert rad.post(f"/admin/models/{version}/promote", data={"csrf_token": token}).status_code in (
        400,
        403,
    )
    resp = boss.post(f"/admin/models/{version}/shadow", data={"csrf_token": token})
    assert resp.status_code == 302, resp.get_data(as_text=True)[-2000:]
    page = boss.get(resp.headers["Location"]).get_data(as_text=True)
    assert "is in shadow" in page, page[page.find("<main") :][:1500]
    assert f"{version} in shadow since" in page, page[page.find('id="comparison"') :][:800]
    page = boss.post(
        f"/admin/models/{version}/promote", data={"csrf_token": token}, follow_redirects=True
    ).get_data(as_text=True)
    assert "is live" in page
    doc = boss.get("/api/admin/models").get_json()
    assert {m["version"]: m["status"] for m in doc["models"]}[version] == "live"
    with factory() as session:
        actions = [
            e.action
            for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            if e.action.startswith("model_")
        ]
    assert actions == ["model_register", "model_shadow", "model_promote"]
    proc = run_cli(["models", "list", "--json"], settings)
    assert {m["status"] for m in json.loads(proc.stdout)["models"]} == {"live", "retired"}
