"""Ground truth from the RIS: importing labels refuses a file with any bad row, and the
``labels import`` command.
"""

from __future__ import annotations

import json

from sqlalchemy import select

from pipeline.models import AuditEvent, Review, Study
from pipeline.monitoring.labels import import_labels
from pipeline.users import create_user
from tests.conftest import PASSWORD, run_cli
from tests.monitoring.scored import add_study


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
