"""The attributes QIDO-RS answers with for each study, series or instance, as PS3.18 JSON."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import Image, Instance, Study

# Study attributes read from the header of the study's first image, not from its row.
FROM_HEADER = (
    "StudyTime",
    "StudyDescription",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "ReferringPhysicianName",
)


def to_json(values: dict[str, Any], include: set[str], always: tuple[str, ...]) -> dict[str, Any]:
    """The values always returned and those asked for (``includefield``), as PS3.18 JSON."""
    from pydicom.dataset import Dataset

    if "all" not in include:
        values = {k: v for k, v in values.items() if k in always or k in include}
    ds = Dataset()
    for key, value in values.items():
        if value is not None and value != "":
            setattr(ds, key, value)
    return ds.to_json_dict()  # type: ignore[no-any-return]


def study_values(session: Session, rows: list[Study], base: str) -> list[dict[str, Any]]:
    """Each study's attributes: its row, its series and instance counts, its first header."""
    ids = [s.id for s in rows]
    counts = {
        r.study_id: (r.series, r.instances)
        for r in session.execute(
            select(
                Instance.study_id,
                func.count(func.distinct(Instance.series_uid)).label("series"),
                func.count(Instance.id).label("instances"),
            )
            .where(Instance.study_id.in_(ids))
            .group_by(Instance.study_id)
        )
    }
    modalities: dict[int, set[str]] = {}
    for study_id, modality in session.execute(
        select(Instance.study_id, Instance.modality).where(Instance.study_id.in_(ids)).distinct()
    ):
        if modality:
            modalities.setdefault(study_id, set()).add(modality)
    headers = _first_headers(session, ids)
    return [
        {
            "StudyInstanceUID": s.study_uid,
            "PatientID": s.patient_id,
            "PatientName": s.patient_name,
            "AccessionNumber": s.accession_number,
            "StudyDate": s.study_date,
            "ModalitiesInStudy": sorted(modalities.get(s.id, ())),
            "NumberOfStudyRelatedSeries": counts.get(s.id, (0, 0))[0],
            "NumberOfStudyRelatedInstances": counts.get(s.id, (0, 0))[1],
            "RetrieveURL": f"{base}/studies/{s.study_uid}",
            **{k: headers.get(s.id, {}).get(k) for k in FROM_HEADER},
        }
        for s in rows
    ]


def _first_headers(session: Session, study_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The header of each study's first image (the attributes its row does not hold)."""
    first = select(func.min(Image.id)).where(Image.study_id.in_(study_ids)).group_by(Image.study_id)
    return {
        sid: meta or {}
        for sid, meta in session.execute(
            select(Image.study_id, Image.meta).where(Image.id.in_(first))
        )
    }


def series_values(row: Any, base: str) -> dict[str, Any]:
    """A series' attributes from its grouped row (study, series, modality, number, text, n)."""
    st, se, modality, number, description, n = row
    return {
        "StudyInstanceUID": st,
        "SeriesInstanceUID": se,
        "Modality": modality,
        "SeriesNumber": number,
        "SeriesDescription": description,
        "NumberOfSeriesRelatedInstances": n,
        "RetrieveURL": f"{base}/studies/{st}/series/{se}",
    }


def instance_values(i: Instance, base: str) -> dict[str, Any]:
    """An instance's attributes from its row."""
    return {
        "StudyInstanceUID": i.study_uid,
        "SeriesInstanceUID": i.series_uid,
        "SOPInstanceUID": i.sop_uid,
        "SOPClassUID": i.sop_class_uid,
        "Modality": i.modality,
        "InstanceNumber": i.instance_number,
        "Rows": i.rows,
        "Columns": i.columns,
        "NumberOfFrames": i.frames,
        "RetrieveURL": f"{base}/studies/{i.study_uid}/series/{i.series_uid}/instances/{i.sop_uid}",
    }
