"""The AI result as DICOM in the instance store, so a viewer shows it beside the films.

For a scored study: one CAM Secondary Capture per scored film, in the study's results series
(``results_dicom.build_sc``: the map blended over the film, labelled "not a diagnosis"), and
the TID 1500 SR (``results_dicom.build_sr``). Where the results already went to a PACS
(``pipeline.results.outbox`` made them), these are the very same objects, with the same UIDs and
snapshot; otherwise their UIDs are derived from the film and the model, so building them
again gives the same instances. Made on the first DICOMweb look at the study, once per model.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.classifier.cam_place import snapshot_fields
from pipeline.imaging.render import cam_array
from pipeline.models import Image, Instance, Prediction, Study
from pipeline.results.dicom_objects import build_sc, series_uid, to_bytes
from pipeline.results.snapshots import study_fields
from pipeline.results.sr import build_sr
from pipeline.states import ObjectState, State
from pipeline.store.instances import InstanceStore, derived_uid, keep
from pipeline.tables_results import ResultObject

log = logging.getLogger(__name__)
SOURCE_KINDS = ("received", "capture")


def _scored(session: Session, study: Study) -> list[tuple[Image, Prediction, Instance]]:
    rows = session.execute(
        select(Image, Prediction, Instance)
        .join(Prediction, Prediction.image_id == Image.id)
        .join(Instance, Instance.image_id == Image.id)
        .where(
            Image.study_id == study.id,
            Image.status == State.DONE,
            Prediction.model_version == study.model_version,
            Instance.kind.in_(SOURCE_KINDS),
        )
        .order_by(Image.id, Prediction.id.desc())
    ).all()
    seen: set[int] = set()
    out = []
    for image, prediction, instance in rows:
        if image.id not in seen:
            seen.add(image.id)
            out.append((image, prediction, instance))
    return out


def _snapshot(
    session: Session,
    study: Study,
    scored: list[tuple[Image, Prediction, Instance]],
    weights: Path | None,
) -> tuple[dict[str, Any], str]:
    """The PACS's snapshot and SR UID where one was made for this model, else a new one."""
    mv = str(study.model_version)
    sent = session.scalars(
        select(ResultObject)
        .where(
            ResultObject.study_id == study.id,
            ResultObject.kind == "sr",
            ResultObject.model_version == mv,
            ResultObject.status == ObjectState.READY,
        )
        .order_by(ResultObject.images.desc(), ResultObject.id.desc())
    ).first()
    if sent is not None and len(sent.snapshot.get("images", ())) == len(scored):
        return sent.snapshot, sent.uid
    when = (study.done_at or study.received_at).replace(microsecond=0, tzinfo=None)
    policy = f"policy {study.policy_version}" if study.policy_version else "the weights' policy"
    snapshot = {
        **study_fields(study, scored[0][0].meta or {}),
        "model_version": mv,
        "model_name": "cxr-triage",
        "policy_version": str(study.policy_version or "weights"),
        "policy_parameters": [f"ranked under {policy}"],
        "content_datetime": when.isoformat(),
        "images": [
            {
                "image_id": image.id,
                "sop_class_uid": inst.sop_class_uid,
                "sop_instance_uid": inst.sop_uid,
                "series_instance_uid": inst.series_uid,
                "p_abnormal": float(pred.p_abnormal),
                "label": pred.label,
                "sc_uid": derived_uid("cam", inst.sop_uid, mv),
                "view_position": image.view_position,
                **snapshot_fields(session, image, pred, weights),
            }
            for image, pred, inst in scored
        ],
    }
    return snapshot, derived_uid("sr", str(study.study_uid), mv, str(len(scored)))


def ensure_results(
    session: Session, store: InstanceStore, study_uid: str, weights: Path | None = None
) -> int:
    """Make the study's CAM captures and SR in the store if they are not there; commit.
    Returns how many instances were added. ``weights``: the settings' file, to tell where its
    CAMs lie on a film (pipeline.classifier.cam_place)."""
    from pipeline.results.snapshots import study_result

    study = session.scalars(select(Study).where(Study.study_uid == study_uid)).first()
    if study is None or study.status != State.DONE or not study.model_version:
        return 0
    mv = study.model_version
    sc_series = series_uid(study_uid, "sc", mv)
    have = set(
        session.scalars(
            select(Instance.image_id).where(
                Instance.study_id == study.id,
                Instance.kind == "cam",
                Instance.series_uid == sc_series,
            )
        )
    )
    scored = _scored(session, study)
    sr_series = series_uid(study_uid, "sr", mv)
    has_sr = session.scalars(
        select(Instance.id).where(Instance.study_id == study.id, Instance.series_uid == sr_series)
    ).first()
    if not scored or (has_sr is not None and all(i.id in have for i, _, _ in scored)):
        return 0
    snapshot, sr_uid = _snapshot(session, study, scored, weights)
    result = study_result(snapshot)
    by_image = {i["image_id"]: i["sc_uid"] for i in snapshot["images"]}
    added = 0
    try:
        for image, pred, _ in scored:
            if image.id in have or image.preview is None:
                continue
            source = next(s for s in result.images if s.sc_uid == by_image.get(image.id))
            cam = np.asarray(cam_array(pred.cam, pred.cam_h, pred.cam_w))
            data = to_bytes(build_sc(result, source, image.preview, cam))
            keep(session, store, study, image.id, "cam", data, study_uid)
            added += 1
        if has_sr is None:
            keep(
                session,
                store,
                study,
                None,
                "sr",
                to_bytes(build_sr(replace(result, sr_uid=sr_uid))),
                study_uid,
            )
            added += 1
        session.commit()
    except IntegrityError:  # another request made them first
        session.rollback()
        return 0
    return added
