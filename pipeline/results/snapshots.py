"""What a result object is built from: the snapshot of a study, its films, the model and policy.

A snapshot is JSON kept on the ``result_objects`` row when the object is first made; every
send builds the object again from it (``study_result``), so a re-send is the same object.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.classifier.cam_place import snapshot_fields
from pipeline.models import Image, Prediction, Study, utcnow
from pipeline.results.dicom_objects import SourceImage, StudyResult
from pipeline.states import State
from pipeline.triage import score as triage

PATIENT_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "IssuerOfPatientID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def policy(model: dict[str, Any], temperature: float | None) -> tuple[str, list[str]]:
    """The ranking policy in force: a version string and its parameters in words.

    Today the policy is the weights' thresholds and temperature plus the fixed score bands
    and STAT boost of ``pipeline.triage.score``; its version is a digest of exactly those.
    """
    thresholds = model.get("thresholds") or {}
    doc = {
        "thresholds": thresholds,
        "temperature": temperature,
        "bands": triage.BANDS,
        "stat_boost": triage.STAT_BOOST,
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
    params = [
        f"{name} >= {thresholds[name]:.4f}"
        for name in ("critical", "urgent", "routine")
        if name in thresholds
    ]
    if temperature is not None:
        params.append(f"temperature {temperature:.3f}")
    params.append(f"STAT boost +{triage.STAT_BOOST:g}")
    return f"{model.get('version')}/policy-{digest}", params


@dataclass
class ModelInfo:
    """The model the sender knows: its version, name and ranking policy."""

    version: str
    name: str
    policy_version: str
    policy_parameters: list[str]
    weights: Path | None = None  # the file the settings name: where its CAMs lie on a film


def patient_of(study: Study, header: dict[str, Any]) -> dict[str, str]:
    """The patient and study attributes results carry: the first film's header, then the
    study row's for what the header lacks."""
    patient = {k: str(header[k]) for k in PATIENT_KEYS if header.get(k)}
    for key, value in (
        ("AccessionNumber", study.accession_number),
        ("PatientID", study.patient_id),
        ("PatientName", study.patient_name),
        ("StudyDate", study.study_date),
    ):
        if value and key not in patient:
            patient[key] = value
    return patient


def study_fields(study: Study, header: dict[str, Any]) -> dict[str, Any]:
    """The fields every study snapshot opens with: the study, its patient and the call."""
    return {
        "study_instance_uid": study.study_uid,
        "patient": patient_of(study, header),
        "p_abnormal": float(study.p_abnormal or 0.0),
        "triage_class": study.triage_class,
        "label": study.label,
        "priority": float(study.priority or 0.0),
    }


def latest_prediction(
    session: Session, image_id: int | None, model_version: str | None
) -> Prediction | None:
    """The image's newest prediction by this model version, or None."""
    return session.scalars(
        select(Prediction)
        .where(Prediction.image_id == image_id, Prediction.model_version == model_version)
        .order_by(Prediction.id.desc())
        .limit(1)
    ).first()


def scored_images(session: Session, study: Study) -> list[tuple[Image, Prediction]]:
    """The study's done films, each with its prediction by the study's model."""
    images = session.scalars(
        select(Image)
        .where(Image.study_id == study.id, Image.status == State.DONE)
        .order_by(Image.id)
    )
    out = []
    for img in images:
        pred = latest_prediction(session, img.id, study.model_version)
        if pred is not None:
            out.append((img, pred))
    return out


def study_snapshot(
    session: Session,
    study: Study,
    scored: list[tuple[Image, Prediction]],
    model: ModelInfo,
    sc_uids: dict[int, str],
) -> dict[str, Any]:
    """The snapshot of a study's SR and captures, with the capture UID of each film."""
    known = model.version == study.model_version
    return {
        **study_fields(study, scored[0][0].meta or {}),
        "accession_number": study.accession_number,
        "requested_priority": study.requested_priority,
        "model_version": study.model_version,
        "model_name": model.name,
        "policy_version": model.policy_version if known else "unknown",
        "policy_parameters": model.policy_parameters
        if known
        else [f"ranked by model {study.model_version}, not the one loaded now"],
        "content_datetime": utcnow().replace(microsecond=0, tzinfo=None).isoformat(),
        "images": [
            {
                "image_id": img.id,
                "sop_class_uid": (img.meta or {}).get("SOPClassUID")
                or "1.2.840.10008.5.1.4.1.1.1.1",
                "sop_instance_uid": img.sop_uid,
                "series_instance_uid": img.series_uid,
                "p_abnormal": float(pred.p_abnormal),
                "label": pred.label,
                "sc_uid": sc_uids.get(img.id),
                "view_position": img.view_position,
                **snapshot_fields(session, img, pred, model.weights),
            }
            for img, pred in scored
        ],
    }


def alert_snapshot(study: Study, model: ModelInfo) -> dict[str, Any]:
    """The snapshot of a critical study's alert: the call, no patient name."""
    known = model.version == study.model_version
    return {
        "accession_number": study.accession_number,
        "study_instance_uid": study.study_uid,
        "triage_class": study.triage_class,
        "priority": float(study.priority or 0.0),
        "requested_priority": study.requested_priority,
        "p_abnormal": float(study.p_abnormal or 0.0),
        "model_version": study.model_version,
        "policy_version": model.policy_version if known else "unknown",
        "study_id": study.id,
        "created_at": utcnow().replace(microsecond=0, tzinfo=None).isoformat() + "Z",
    }


def study_result(snapshot: dict[str, Any]) -> StudyResult:
    """A ``StudyResult`` back from the JSON snapshot stored on the object."""

    def box(value: Any) -> tuple[float, float, float, float] | None:
        return (
            (float(value[0]), float(value[1]), float(value[2]), float(value[3])) if value else None
        )

    images = tuple(
        SourceImage(
            i["sop_class_uid"],
            i["sop_instance_uid"],
            i["series_instance_uid"],
            i["p_abnormal"],
            i["label"],
            i.get("sc_uid"),
            i.get("view_position"),
            box(i.get("cam_box")),
            box(i.get("cam_peak")),
            i.get("columns"),
            i.get("rows"),
        )
        for i in snapshot["images"]
    )
    return StudyResult(
        study_instance_uid=snapshot["study_instance_uid"],
        patient=dict(snapshot["patient"]),
        p_abnormal=snapshot["p_abnormal"],
        triage_class=snapshot["triage_class"],
        label=snapshot["label"],
        priority=snapshot["priority"],
        model_version=snapshot["model_version"],
        model_name=snapshot["model_name"],
        policy_version=snapshot["policy_version"],
        policy_parameters=tuple(snapshot["policy_parameters"]),
        content_datetime=datetime.fromisoformat(snapshot["content_datetime"]),
        sr_uid="",
        images=images,
    )
