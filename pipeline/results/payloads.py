"""The bytes of each outbox object: the SR or a CAM capture as DICOM, an alert as JSON or HL7 v2.

Built from the object's snapshot on every call, so a re-send is the same object.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from pipeline.imaging.render import cam_array
from pipeline.models import Image
from pipeline.results.dicom_objects import build_sc, to_bytes
from pipeline.results.snapshots import latest_prediction, study_result
from pipeline.results.sr import build_sr
from pipeline.tables_results import ResultObject


def build_payload(session: Session, obj: ResultObject) -> bytes:
    """The bytes of one object: the same on every call for the same row."""
    if obj.kind == "alert":
        return json.dumps(alert_document(obj), sort_keys=True).encode()
    result = study_result(obj.snapshot)
    if obj.kind == "sr":
        return to_bytes(build_sr(replace(result, sr_uid=obj.uid)))
    image = next(i for i in result.images if i.sc_uid == obj.uid)
    img = session.get(Image, obj.image_id)
    pred = latest_prediction(session, obj.image_id, obj.model_version)
    if img is None or img.preview is None or pred is None:
        raise LookupError(f"image {obj.image_id} has no stored preview or CAM to capture")
    cam = cam_array(pred.cam, pred.cam_h, pred.cam_w)
    return to_bytes(build_sc(result, image, img.preview, np.asarray(cam)))


def alert_document(obj: ResultObject) -> dict[str, Any]:
    """A critical alert: accession number, priority and the model's call; no patient name,
    no image data."""
    s = obj.snapshot
    return {
        "event": "cxr-triage.critical",
        "id": obj.uid,
        "accession_number": s.get("accession_number"),
        "study_instance_uid": s.get("study_instance_uid"),
        "triage_class": s.get("triage_class"),
        "priority": s.get("priority"),
        "requested_priority": s.get("requested_priority"),
        "p_abnormal": round(float(s.get("p_abnormal") or 0.0), 4),
        "model_version": s.get("model_version"),
        "policy_version": s.get("policy_version"),
        "created_at": s.get("created_at"),
        "note": "AI triage - not a diagnosis",
    }


def _hl7_text(value: Any) -> str:
    """A value safe inside an HL7 field (the delimiters escaped, no line breaks)."""
    text = "" if value is None else str(value)
    for ch, esc in (
        ("\\", "\\E\\"),
        ("|", "\\F\\"),
        ("^", "\\S\\"),
        ("&", "\\T\\"),
        ("~", "\\R\\"),
    ):
        text = text.replace(ch, esc)
    return text.replace("\r", " ").replace("\n", " ")


def oru_message(obj: ResultObject, sending_facility: str = "CXRTRIAGE") -> str:
    """An HL7 v2.5.1 ORU^R01 for a critical study: OBR keyed on the accession number, OBX
    with the triage class, priority score and probability; no PID (no patient name)."""
    doc = alert_document(obj)
    stamp = (doc.get("created_at") or "").replace("-", "").replace(":", "").replace("T", "")
    stamp = stamp.rstrip("Z")[:14]
    control = hashlib.sha256(obj.uid.encode()).hexdigest()[:20]  # the same on every retry
    acc = _hl7_text(doc["accession_number"])
    segments = [
        f"MSH|^~\\&|CXRTRIAGE|{_hl7_text(sending_facility)}|||{stamp}||ORU^R01^ORU_R01|"
        f"{control}|P|2.5.1",
        f"OBR|1|{acc}|{acc}|CXRAI^Chest radiograph AI triage^L|S||{stamp}|||||||||||||||"
        f"{stamp}||CR|P",
        f"OBX|1|CWE|TRIAGE^Triage class^L||{_hl7_text(doc['triage_class'])}||||||P",
        f"OBX|2|NM|PRIO^Triage priority score^L||{doc['priority']}||||||P",
        f"OBX|3|NM|PABN^Abnormal probability^L||{doc['p_abnormal']}||||||P",
        f"OBX|4|ST|MODEL^Model and policy^L||{_hl7_text(doc['policy_version'])}||||||P",
        "OBX|5|ST|NOTE^Note^L||AI triage - not a diagnosis||||||P",
    ]
    return "\r".join(segments) + "\r"
