"""Machine ingest over HTTP: ``POST /api/studies`` (a form upload) and STOW-RS.

Both take a feed's bearer token only (scope ``ingest``), never a browser session: the views are
exempt from CSRF, so a cookie must not be able to reach them. Bodies are spooled to disk under
``CXR_MAX_REQUEST_MB``; each file is held to ``CXR_MAX_FILE_MB``, and one over it is still
identified by its hash and recorded as a rejected study. Everything goes through the same
persist-then-send path as the CLI (``pipeline.ingest.intake``).
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable
from typing import Any

import pydicom  # imported here, once: request threads importing it at once can see it half made
from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.utils import secure_filename

from dashboard import settings
from dashboard.auth import api_auth_required
from dashboard.uploads import Body, BodyTooLarge, MalformedBody, Part, digest, read, received
from pipeline.imaging.header import header_fields
from pipeline.ingest.intake import STATUS_OUT_OF_RESOURCES, Intake, failure_status
from pipeline.ingest.persist import IngestItem
from pipeline.queue.dispatch import QueueFull
from pipeline.states import State
from pipeline.storage import StorageFull, is_storage_full

bp = Blueprint("ingest_api", __name__)
_intake_lock = threading.Lock()
MAX_FIELD_BYTES = 1024


def intake() -> Intake:
    """The app's intake (one per process, shared by request threads)."""
    ext = current_app.extensions["cxr"]
    with _intake_lock:
        if "intake" not in ext:
            ext["intake"] = Intake(ext["settings"], ext["factory"])
    return ext["intake"]  # type: ignore[no-any-return]


def bearer_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse session cookies: these CSRF-exempt views take a bearer token or nothing."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not request.headers.get("Authorization", "").lower().startswith("bearer "):
            return _error(401, "send a feed account's token: Authorization: Bearer <token>")
        return fn(*args, **kwargs)

    return wrapped


def _error(code: int, reason: str, **extra: Any) -> tuple[Response, int]:
    return jsonify(error=reason, **extra), code


def _multipart(expected: str) -> tuple[str, dict[str, str]]:
    ctype, options = parse_options_header(request.headers.get("Content-Type", ""))
    if ctype.lower() != expected:
        raise _Refused(415, f"send {expected}, not {ctype or 'no Content-Type'}")
    if not options.get("boundary"):
        raise _Refused(400, "the Content-Type has no boundary parameter")
    return options["boundary"], options


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def _storage_full(exc: Exception) -> tuple[Response, int]:
    """507 Insufficient Storage: nothing of the request was stored; send it again later."""
    where = exc.where if isinstance(exc, StorageFull) else "the upload spool"
    response, code = _error(507, str(StorageFull(where)))
    response.headers["Retry-After"] = "60"
    return response, code


def _queue_full(exc: QueueFull) -> tuple[Response, int]:
    """503 Service Unavailable: the work queue is full; nothing was stored; send it again."""
    response, code = _error(503, str(exc))
    response.headers["Retry-After"] = "30"
    return response, code


def _limited_body(boundary: str, related: bool = False) -> Any:
    limit = settings().max_request_mb * 1024 * 1024
    request.max_content_length = limit  # a larger Content-Length is refused unread (413)
    return received(request.stream, boundary, limit, related)


def _refusal(exc: Exception) -> tuple[Response, int]:
    if isinstance(exc, _Refused):
        return _error(exc.code, exc.reason)
    if isinstance(exc, MalformedBody):
        return _error(400, f"malformed multipart body: {exc}")
    limit = settings().max_request_mb
    return _error(413, f"the request body is over the {limit} MB limit")


def _store(
    body: Body, part: Part, filename: str, source: str, meta: dict[str, Any] | None
) -> IngestItem:
    taker = intake()
    if part.size > taker.limits.max_bytes:
        return taker.reject_oversize(digest(body, part), part.size, filename, source)
    return taker.submit(read(body, part), filename, source, meta)


@bp.post("/api/studies")
@bearer_only
@api_auth_required(scope="ingest")
def post_study() -> Any:
    """One file as multipart/form-data field ``file``; other fields are DICOM-keyword metadata."""
    try:
        boundary, _ = _multipart("multipart/form-data")
        with _limited_body(boundary) as (body, parts):
            files = [p for p in parts if p.filename is not None]
            if len(files) != 1 or files[0].name != "file":
                raise _Refused(400, "send exactly one file, in the form field named 'file'")
            fields = {
                p.name: read(body, p, MAX_FIELD_BYTES).decode("utf-8", "replace")
                for p in parts
                if p.filename is None and p.name
            }
            name = secure_filename(files[0].filename or "") or "upload"
            item = _store(body, files[0], name, "http", header_fields(fields))
    except (_Refused, MalformedBody, BodyTooLarge, RequestEntityTooLarge) as exc:
        return _refusal(exc)
    except QueueFull as exc:
        return _queue_full(exc)
    except (StorageFull, OSError) as exc:
        if not is_storage_full(exc):
            raise
        return _storage_full(exc)
    doc = {
        "study_id": item.study_id,
        "image_id": item.image_id,
        "status": item.status,
        "duplicate": item.duplicate,
        "reason": item.reason,
    }
    if item.status == State.REJECTED:
        too_big = item.code == "too_large"
        return jsonify(error=item.reason, **doc), (413 if too_big else 422)
    return jsonify(doc), (200 if item.duplicate else 202)


# --------------------------------------------------------------------------- STOW-RS

SOP_CLASS, SOP_INSTANCE, FAILURE_REASON = "00081150", "00081155", "00081197"
REFERENCED_SEQ, FAILED_SEQ = "00081199", "00081198"


def _uids(data: bytes) -> tuple[str | None, str | None]:
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            force=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
        return _text(ds.get("SOPClassUID")), _text(ds.get("SOPInstanceUID"))
    except Exception:
        return None, None


def _text(value: Any) -> str | None:
    return str(value) if value else None


def _instance(sop_class: str | None, sop_uid: str | None, status: int | None = None) -> dict:
    item: dict[str, Any] = {}
    if sop_class:
        item[SOP_CLASS] = {"vr": "UI", "Value": [sop_class]}
    if sop_uid:
        item[SOP_INSTANCE] = {"vr": "UI", "Value": [sop_uid]}
    if status is not None:
        item[FAILURE_REASON] = {"vr": "US", "Value": [status]}
    return item


def _stow_part(
    body: Body, number: int, part: Part, sop_uid: str | None
) -> tuple[bool, str | None, str | None]:
    """Store one STOW part; (stored, reason, rejection code). A duplicate counts as stored."""
    if part.content_type not in ("", "application/dicom"):
        return False, f"part {number} is {part.content_type}, not application/dicom", None
    item = _store(body, part, f"{sop_uid or f'stow-{number}'}.dcm", "stow", None)
    return item.status != State.REJECTED, item.reason, item.code


@bp.post("/dicomweb/studies")
@bearer_only
@api_auth_required(scope="ingest")
def stow() -> Any:
    """STOW-RS (PS3.18 10.5): multipart/related; type="application/dicom"."""
    referenced: list[dict] = []
    failed: list[dict] = []
    warnings: list[str] = []
    try:
        boundary, options = _multipart("multipart/related")
        if options.get("type", "application/dicom").lower() != "application/dicom":
            raise _Refused(415, "only application/dicom parts are accepted (no bulk data form)")
        with _limited_body(boundary, related=True) as (body, parts):
            if not parts:
                raise _Refused(400, "the request holds no DICOM instances")
            full: StorageFull | None = None
            for number, part in enumerate(parts, 1):
                sop_class, sop_uid = _uids(read(body, part, 1 << 16))
                if full is not None:  # the disk filled on an earlier part: not tried
                    failed.append(_instance(sop_class, sop_uid, STATUS_OUT_OF_RESOURCES))
                    continue
                try:
                    stored, reason, code = _stow_part(body, number, part, sop_uid)
                except QueueFull as exc:
                    if not referenced:
                        return _queue_full(exc)
                    full = StorageFull("the work queue")  # later parts: not tried
                    failed.append(_instance(sop_class, sop_uid, STATUS_OUT_OF_RESOURCES))
                    warnings.append(f"part {number} and later: {exc}")
                    continue
                except StorageFull as exc:
                    full = exc
                    failed.append(_instance(sop_class, sop_uid, STATUS_OUT_OF_RESOURCES))
                    warnings.append(f"part {number} and later: {exc}")
                    continue
                if stored:
                    referenced.append(_instance(sop_class, sop_uid))
                    continue
                failed.append(_instance(sop_class, sop_uid, failure_status(code)))
                warnings.append(f"part {number}: {reason}")
            if full is not None and not referenced:
                return _storage_full(full)
    except (_Refused, MalformedBody, BodyTooLarge, RequestEntityTooLarge) as exc:
        return _refusal(exc)
    except OSError as exc:
        if not is_storage_full(exc):
            raise
        return _storage_full(exc)
    doc: dict[str, Any] = {}
    if referenced:
        doc[REFERENCED_SEQ] = {"vr": "SQ", "Value": referenced}
    if failed:
        doc[FAILED_SEQ] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if referenced else 409)
    response = jsonify(doc)
    response.status_code = status
    response.mimetype = "application/dicom+json"
    for text in warnings[:20]:  # the reasons in words, for people reading the sender's log
        safe = text.encode("ascii", "replace").decode().replace('"', "'")
        response.headers.add("Warning", f'299 cxr-triage "{safe}"')
    return response
