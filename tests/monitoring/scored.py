"""Scored studies for the monitoring tests: the thresholds, and a study with its one image."""

from __future__ import annotations

import uuid

from pipeline.models import Image, Study
from pipeline.triage.score import triage_class

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
