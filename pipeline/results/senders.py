"""Build each outbox object and send it: C-STORE, STOW-RS, HL7 v2 over MLLP, signed webhook.

Every transport reports per object: ok, a transient error (the destination is down or
busy: retry with backoff) or a rejection (it answered and said no). The caller records the
outcome of each object as soon as it is known, so a crash re-sends at most the object in
flight, and that as the same instance.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.imaging.render import cam_array
from pipeline.models import Destination, Image, Prediction, ResultObject
from pipeline.results.destinations import decrypt
from pipeline.results.dicom_objects import (
    SOP_SC,
    SOP_SR,
    SourceImage,
    StudyResult,
    build_sc,
    build_sr,
    to_bytes,
)
from pipeline.results.outbox import Outcome
from pipeline.settings import Settings

log = logging.getLogger(__name__)
TIMEOUT_S = 30.0
# C-STORE statuses that mean "stored" (PS3.4 B.2.3: success and the three warnings).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
Report = Callable[[int, Outcome], None]


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


def build_payload(session: Session, obj: ResultObject) -> bytes:
    """The bytes of one object: the same on every call for the same row."""
    if obj.kind == "alert":
        return json.dumps(alert_document(obj), sort_keys=True).encode()
    result = study_result(obj.snapshot)
    if obj.kind == "sr":
        from dataclasses import replace

        return to_bytes(build_sr(replace(result, sr_uid=obj.uid)))
    image = next(i for i in result.images if i.sc_uid == obj.uid)
    img = session.get(Image, obj.image_id)
    pred = session.scalars(
        select(Prediction)
        .where(Prediction.image_id == obj.image_id, Prediction.model_version == obj.model_version)
        .order_by(Prediction.id.desc())
        .limit(1)
    ).first()
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


# --------------------------------------------------------------------------- transports


def send_dicom(
    settings: Settings, dest: Destination, items: list[tuple[int, bytes]], report: Report
) -> None:
    """C-STORE each object over one association; an association failure fails them all."""
    import io

    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=settings.dicom_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.connection_timeout = 10
    for sop in (SOP_SR, SOP_SC):
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(
        dest.host or "", int(dest.port or 104), ae_title=dest.ae_title or "ANY-SCP"
    )
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted or unreachable"
        for item_id, _ in items:
            report(
                item_id,
                Outcome(False, f"association with {dest.ae_title}@{dest.host}:{dest.port} {why}"),
            )
        return
    try:
        for n, (item_id, data) in enumerate(items):
            if not assoc.is_established:
                for rest_id, _ in items[n:]:
                    report(rest_id, Outcome(False, "association ended before the send"))
                return
            status = assoc.send_c_store(dcmread(io.BytesIO(data)))
            code = getattr(status, "Status", None)
            if code is None:  # no answer: timeout or abort
                report(item_id, Outcome(False, "no C-STORE response (timeout or abort)"))
            elif int(code) in STORED:
                report(item_id, Outcome(True))
            else:
                comment = getattr(status, "ErrorComment", "") or ""
                report(
                    item_id,
                    Outcome(
                        False,
                        f"C-STORE status 0x{int(code):04X} {comment}".strip(),
                        transient=(int(code) & 0xFF00) == 0xA700,
                    ),
                )
    finally:
        if assoc.is_established:
            assoc.release()


def _http_headers(settings: Settings, dest: Destination) -> dict[str, str]:
    secret = decrypt(settings, dest.secret)
    if dest.auth == "bearer" and secret:
        return {"Authorization": f"Bearer {secret}"}
    if dest.auth == "basic":
        pair = f"{dest.username or ''}:{secret or ''}".encode()
        return {"Authorization": "Basic " + b64encode(pair).decode()}
    return {}


def _http_outcome(exc: Exception) -> Outcome:
    if isinstance(exc, urllib.error.HTTPError):
        code = exc.code
        # 408/429/5xx: busy or down; 401/403: credentials being fixed; the rest: refused.
        transient = code in (401, 403, 408, 429) or code >= 500
        return Outcome(False, f"HTTP {code} {exc.reason}", transient=transient)
    return Outcome(False, f"{type(exc).__name__}: {exc}")


def send_stow(
    settings: Settings, dest: Destination, study_uid: str, item_id: int, data: bytes, report: Report
) -> None:
    """STOW-RS one object to ``{url}/studies/{study}``; a FailedSOPSequence is a rejection."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        **_http_headers(settings, dest),
    }
    req = urllib.request.Request(
        f"{dest.url}/studies/{study_uid}", data=body, method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            answer = resp.read()
            code = resp.status
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        report(item_id, _http_outcome(exc))
        return
    failed = _failed_sops(answer)
    if code == 200 and not failed:
        report(item_id, Outcome(True))
    else:
        report(
            item_id,
            Outcome(False, f"STOW-RS {code}: failed {failed or 'unknown'}", transient=False),
        )


def _failed_sops(answer: bytes) -> list[str]:
    try:
        doc = json.loads(answer or b"{}")
    except ValueError:
        return []
    seq = (doc.get("00081198") or {}).get("Value") or []
    return [str((i.get("00081197") or {}).get("Value", ["?"])[0]) for i in seq]


def send_webhook(
    settings: Settings, dest: Destination, item_id: int, data: bytes, report: Report
) -> None:
    """POST the alert JSON with ``X-CXR-Signature: sha256=HMAC(key, body)``."""
    headers = {"Content-Type": "application/json"}
    key = decrypt(settings, dest.secret) if dest.auth == "hmac" else None
    if key:
        digest = hmac.new(key.encode(), data, hashlib.sha256).hexdigest()
        headers["X-CXR-Signature"] = f"sha256={digest}"
    headers["X-CXR-Event-Id"] = json.loads(data)["id"]
    req = urllib.request.Request(dest.url or "", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            resp.read()
        report(item_id, Outcome(True))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        report(item_id, _http_outcome(exc))


def send_mllp(dest: Destination, item_id: int, message: str, report: Report) -> None:
    """Send the ORU^R01 over MLLP (python-hl7) and read the ACK: AA/CA is delivered."""
    try:
        ack = asyncio.run(_mllp_exchange(dest.host or "", int(dest.port or 0), message))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        report(item_id, Outcome(False, f"MLLP {type(exc).__name__}: {exc}"))
        return
    code = str(ack.segment("MSA")[1]) if ack is not None else ""
    if code in ("AA", "CA"):
        report(item_id, Outcome(True))
    else:
        report(item_id, Outcome(False, f"HL7 ACK {code or 'missing'}", transient=code != "AR"))


async def _mllp_exchange(host: str, port: int, message: str) -> Any:
    import hl7
    from hl7.mllp import open_hl7_connection

    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port), TIMEOUT_S)
    try:
        writer.writemessage(hl7.parse(message))
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), TIMEOUT_S)
    finally:
        writer.close()
