"""What the DICOMweb views share: instance rows found by UID, and their JSON and multipart replies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Response, abort, request
from sqlalchemy import select

from dashboard import db, settings
from pipeline.models import Instance
from pipeline.store.instances import InstanceStore, valid_uid

DICOM_JSON = "application/dicom+json"
IMMUTABLE = "private, max-age=86400, immutable"
CHUNK = 1 << 20


def store() -> InstanceStore:
    """The instance store of the app's settings."""
    return InstanceStore.of(settings())


def base() -> str:
    """The DICOMweb root URL as the client reached it."""
    return request.host_url.rstrip("/") + "/dicomweb"


def check(*uids: str | None) -> None:
    """Refuse (400) anything in a UID's place that is not a UID."""
    for uid in uids:
        if uid is not None and not valid_uid(uid):
            abort(400, description="a UID is digits and dots, at most 64 characters")


def immutable(response: Response, etag: str) -> Response:
    """Tag a response that never changes, and answer 304 to a reader that has it."""
    response.set_etag(etag)
    response.headers["Cache-Control"] = IMMUTABLE
    response.make_conditional(request)  # in place
    return response


def dicom_json(body: Any, etag: str | None = None) -> Response:
    """A DICOM JSON reply: cacheable when it has an ETag, else never stored."""
    response = Response(json.dumps(body), mimetype=DICOM_JSON)
    if etag:
        return immutable(response, etag)
    response.headers["Cache-Control"] = "no-store"
    return response


def multipart(parts: Iterable[tuple[str, Iterator[bytes]]], media: str) -> Response:
    """A streamed multipart/related reply of (Content-Type, chunks) parts."""
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for content_type, chunks in parts:
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            yield from chunks
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    response = Response(body(), status=200)
    response.headers["Content-Type"] = f'multipart/related; type="{media}"; boundary={boundary}'
    return response


def instances(study: str, series: str | None = None, sop: str | None = None) -> list[Instance]:
    """The stored instances of a study, series or instance, in viewing order; 404 if none."""
    check(study, series, sop)
    stmt = select(Instance).where(Instance.study_uid == study)
    if series is not None:
        stmt = stmt.where(Instance.series_uid == series)
    if sop is not None:
        stmt = stmt.where(Instance.sop_uid == sop)
    rows = list(
        db().scalars(
            stmt.order_by(
                Instance.series_number, Instance.series_uid, Instance.instance_number, Instance.id
            )
        )
    )
    if not rows:
        abort(404, description="no such study, series or instance in the store")
    return rows


def data(row: Instance) -> bytes:
    """An instance's file, whole; 404 if it left the store."""
    try:
        with store().open(row.path) as fh:
            return fh.read()
    except FileNotFoundError:
        abort(404, description="the instance's file is no longer in the store")


def file_chunks(row: Instance) -> Iterator[bytes]:
    """An instance's file, in chunks."""
    with store().open(row.path) as fh:
        yield from iter(lambda: fh.read(CHUNK), b"")


def url(row: Instance) -> str:
    """The WADO-RS URL of one instance."""
    return f"{base()}/studies/{row.study_uid}/series/{row.series_uid}/instances/{row.sop_uid}"
