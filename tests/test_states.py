"""The state and role enums are the strings the database holds: equal, hashed, serialised and
bound to SQL as those strings, so no stored value and no document changed."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select, text

from pipeline import models
from pipeline.classifier import registry
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import SCOPES, Image, Study
from pipeline.states import (
    ACTIVE_STATES,
    ALL_STATES,
    FINAL_STATES,
    MODEL_STATUSES,
    PERSON_ROLES,
    ROLES,
    ModelStatus,
    ObjectState,
    OutboxState,
    Role,
    State,
)
from pipeline.tables_registry import ModelVersion
from pipeline.triage import filters
from tests.conftest import REPO, chest_like, dicom_bytes

# Every state a row may hold, as the database stores it, in lifecycle order.
STORED_STATES = ("received", "queued", "processing", "done", "failed", "rejected", "skipped")


def _factory(url: str):  # type: ignore[no-untyped-def]
    upgrade(url)
    return make_session_factory(make_engine(url))


def test_values_are_the_stored_strings() -> None:
    assert [s.value for s in State] == list(STORED_STATES)
    assert [r.value for r in Role] == ["radiologist", "admin", "feed", "monitor"]
    assert [s.value for s in ObjectState] == ["ready", "skipped"]
    assert [s.value for s in OutboxState] == ["pending", "sending", "sent", "failed"]
    assert [s.value for s in ModelStatus] == ["candidate", "shadow", "live", "retired"]
    assert State("queued") is State.QUEUED
    assert Role("admin") is Role.ADMIN
    assert OutboxState("failed") is OutboxState.FAILED
    assert ModelStatus("live") is ModelStatus.LIVE


def test_tuples_keep_their_contents_and_order() -> None:
    assert FINAL_STATES == ("done", "failed", "rejected", "skipped")
    assert ACTIVE_STATES == ("received", "queued", "processing")
    assert ALL_STATES == STORED_STATES
    assert ROLES == ("radiologist", "admin", "feed", "monitor")
    assert PERSON_ROLES == ("radiologist", "admin")
    assert MODEL_STATUSES == ("candidate", "shadow", "live", "retired")
    assert filters.STATUSES == ALL_STATES and registry.STATUSES == MODEL_STATUSES
    # The names other modules import from pipeline.models are the same objects.
    assert models.FINAL_STATES is FINAL_STATES and models.ACTIVE_STATES is ACTIVE_STATES
    assert models.ROLES is ROLES and models.PERSON_ROLES is PERSON_ROLES


def test_members_behave_as_their_strings() -> None:
    assert json.dumps(State.DONE) == '"done"'
    assert json.dumps({State.DONE: [Role.ADMIN]}, indent=1) == '{\n "done": [\n  "admin"\n ]\n}'
    assert json.dumps({OutboxState.SENT: 1}) == '{"sent": 1}'
    assert f"{State.QUEUED}" == str(State.QUEUED) == "queued"
    record = logging.LogRecord("x", logging.INFO, "", 0, "study %s %s", (1, State.QUEUED), None)
    assert record.getMessage() == "study 1 queued"  # as the log lines print it
    assert isinstance(State.DONE, str) and State.DONE == "done" and "done" == State.DONE
    assert hash(State.DONE) == hash("done")
    keyed: dict[str, int] = {State.DONE: 1}
    assert keyed.get("done") == 1 and "done" in {State.DONE}
    assert "failed" in FINAL_STATES and "queued" not in FINAL_STATES
    assert ", ".join(ROLES) == "radiologist, admin, feed, monitor"
    assert SCOPES["admin"] == SCOPES[Role.ADMIN] and "ingest" in SCOPES["feed"]


def test_an_ingest_stores_the_plain_strings(tmp_path: Path) -> None:
    factory = _factory(f"sqlite:///{tmp_path / 'ingest.db'}")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "pa.dcm").write_bytes(dicom_bytes(chest_like(seed=1)))
    (tmp_path / "in" / "lat.dcm").write_bytes(dicom_bytes(chest_like(seed=2), view="LL"))
    (tmp_path / "in" / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    report = ingest_paths(factory, [tmp_path / "in"], Limits())
    assert sorted(i.status for i in report.items) == ["queued", "rejected", "skipped"]
    with factory() as session:
        raw = session.execute(text("SELECT status FROM images ORDER BY id")).scalars().all()
        raw_studies = session.execute(text("SELECT status FROM studies")).scalars().all()
    assert all(type(v) is str for v in [*raw, *raw_studies])
    assert sorted(raw) == ["queued", "rejected", "skipped"]
    assert set(raw_studies) <= set(ALL_STATES)
    assert {State(v) for v in raw} == {State.QUEUED, State.REJECTED, State.SKIPPED}


def test_a_filter_on_a_member_finds_rows_stored_as_strings(database_url: str) -> None:
    factory = _factory(database_url)
    with factory() as session:
        study = Study(status="queued")  # plain strings, as rows written before the enums
        session.add(study)
        session.flush()
        study_id = study.id
        for n, status in enumerate(("queued", "done", "failed")):
            session.add(
                Image(study_id=study_id, dedup_key=f"sha256:{n}", kind="dicom", status=status)
            )
        session.commit()
    with factory() as session:
        found = session.scalars(select(Image).where(Image.status == State.QUEUED)).all()
        assert [i.dedup_key for i in found] == ["sha256:0"]
        final = session.scalars(select(Image.dedup_key).where(Image.status.in_(FINAL_STATES)))
        assert sorted(final) == ["sha256:1", "sha256:2"]
        # A member written through the ORM is stored as its value, not its name.
        session.add(ModelVersion(version="v1", sha256="0" * 64, path="/x", status=ModelStatus.LIVE))
        img = found[0]
        img.status = State.PROCESSING
        session.commit()
    with factory() as session:
        assert session.execute(text("SELECT status FROM model_versions")).scalar() == "live"
        stored = session.execute(text("SELECT status FROM images WHERE dedup_key = 'sha256:0'"))
        assert stored.scalar() == "processing"
    with factory() as session:  # a column default is stored as its value too
        session.add(Image(study_id=study_id, dedup_key="sha256:3", kind="dicom"))
        session.commit()
        assert (
            session.execute(text("SELECT status FROM images WHERE dedup_key = 'sha256:3'")).scalar()
            == "received"
        )


def test_the_states_module_imports_only_the_standard_library() -> None:
    probe = (
        "import sys; import pipeline.states; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for heavy in ("torch", "flask", "celery", "sqlalchemy", "redis", "numpy"):
        assert heavy not in out
