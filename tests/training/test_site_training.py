"""``cxr-triage train --from-db``: a candidate fine-tuned on the site's reviewed studies, from
their stored previews, split by patient; the model in use is untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image as PILImage

from pipeline.classifier.weights import file_sha256, read_meta
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Image, Review, Study
from pipeline.settings import Settings
from pipeline.training.site_data import SiteDataError, export_reviewed
from pipeline.users import create_user
from tests.conftest import PASSWORD, chest_like, run_cli


def reviewed_site(settings: Settings, tmp_path: Path, n: int) -> None:
    """n studies of one film each, ingested; marked done with a read recording the truth."""
    folder = tmp_path / "films"
    folder.mkdir()
    for i in range(n):
        PILImage.fromarray(chest_like(128, i)).save(folder / f"f{i:03d}.png")
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    ingest_paths(factory, [folder], Limits())
    with factory() as session:
        user = create_user(session, "boss", PASSWORD, "admin")
        for img in session.query(Image).all():  # the worker's result, without running it
            img.status = "done"
            i = int(Path(img.filename or "").stem[1:])
            study = session.get(Study, img.study_id)
            study.status, study.patient_id = "done", f"P{i // 2}"  # two films a patient
            session.add(
                Review(study_id=study.id, user_id=user.id, action="read", abnormal=i % 2 == 1)
            )
        session.commit()


def test_export_needs_enough_of_each(settings: Settings, tmp_path: Path) -> None:
    reviewed_site(settings, tmp_path, 10)
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session, pytest.raises(SiteDataError, match="5 abnormal and 5 normal"):
        export_reviewed(session, tmp_path / "out")
    proc = run_cli(["train", "--from-db", "--out", str(tmp_path / "c.pt")], settings)
    assert proc.returncode == 2 and "at least 20 of each" in proc.stderr


def test_train_from_db_writes_a_candidate(settings: Settings, tmp_path: Path) -> None:
    reviewed_site(settings, tmp_path, 48)
    factory = make_session_factory(make_engine(settings.db_url))
    with factory() as session:
        table, counts = export_reviewed(session, tmp_path / "out")
    assert counts == {"normal": 24, "abnormal": 24}
    lines = table.read_text().splitlines()
    assert lines[0] == "path,label,patient_id,finding" and len(lines) == 49
    assert all((table.parent / line.split(",")[0]).is_file() for line in lines[1:])
    before = file_sha256(settings.weights)
    out = tmp_path / "candidate.pt"
    proc = run_cli(
        [
            "train",
            "--from-db",
            "--epochs",
            "1",
            "--epoch-size",
            "16",
            "--input-size",
            "32",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ],
        settings,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing live changed" in proc.stdout
    assert file_sha256(settings.weights) == before  # the model in use is untouched
    meta = read_meta(out)
    sources = meta["training_data"]["sources"]
    assert list(sources) == ["site"]
    split = sources["site"]
    assert sum(sum(v.values()) for v in split.values()) == 48
    assert "test" in split  # a patient-grouped part held out of training
    assert meta["training_data"]["config"]["init"] == str(settings.weights)
