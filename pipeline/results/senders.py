"""Send each outbox object: C-STORE, STOW-RS, HL7 v2 over MLLP, signed webhook.

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
from typing import Any

from pipeline.results.claims import Outcome
from pipeline.results.destinations import decrypt
from pipeline.results.dicom_objects import SOP_SC, SOP_SR
from pipeline.settings import Settings
from pipeline.tables_results import Destination

log = logging.getLogger(__name__)
TIMEOUT_S = 30.0
# C-STORE statuses that mean "stored" (PS3.4 B.2.3: success and the three warnings).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
Report = Callable[[int, Outcome], None]


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
