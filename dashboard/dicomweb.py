"""DICOMweb's read side at ``/dicomweb``: QIDO-RS search and WADO-RS retrieval.

What OHIF (and any DICOMweb client) reads the instance store through. The same accounts as
the rest of the dashboard: a radiologist's or admin's session, or a token whose role may read;
anonymous requests get 401, a feed token (send only) 403. A UID in a path is checked to be a
UID before anything is looked up, and files are found through their rows only, so no path
reaches outside the store. Instances never change once stored: their responses carry an ETag
and may be cached by the reader's browser (``private``: they hold patient data).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Blueprint, Response, abort, jsonify, request
from sqlalchemy import select

from dashboard import db, settings
from dashboard.auth import api_auth_required
from pipeline.models import Instance
from pipeline.store import qido, wado
from pipeline.store.instances import InstanceStore, valid_uid

bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")
log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
IMMUTABLE = "private, max-age=86400, immutable"
CHUNK = 1 << 20


def _store() -> InstanceStore:
    return InstanceStore.of(settings())


def _base() -> str:
    return request.host_url.rstrip("/") + "/dicomweb"


def _check(*uids: str | None) -> None:
    for uid in uids:
        if uid is not None and not valid_uid(uid):
            abort(400, description="a UID is digits and dots, at most 64 characters")


@bp.errorhandler(400)
@bp.errorhandler(404)
@bp.errorhandler(406)
def _error(exc: Any) -> tuple[Response, int]:
    return jsonify(error=exc.description), exc.code


def _json(body: Any, cache: bool = False, etag: str | None = None) -> Response:
    import json

    response = Response(json.dumps(body), mimetype=DICOM_JSON)
    if etag:
        response.set_etag(etag)
        response.headers["Cache-Control"] = IMMUTABLE
        response.make_conditional(request)  # in place
        return response
    response.headers["Cache-Control"] = "no-store"
    return response


def _search(fn: Any, allowed: tuple[str, ...], *args: Any) -> Response:
    try:
        query = qido.parse(request.args, allowed)
        return _json(fn(db(), *args, query, _base()))
    except qido.BadQuery as exc:
        abort(400, description=str(exc))


def _instances(study: str, series: str | None = None, sop: str | None = None) -> list[Instance]:
    _check(study, series, sop)
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


def _data(row: Instance) -> bytes:
    try:
        with _store().open(row.path) as fh:
            return fh.read()
    except FileNotFoundError:
        abort(404, description="the instance's file is no longer in the store")


def _url(row: Instance) -> str:
    return f"{_base()}/studies/{row.study_uid}/series/{row.series_uid}/instances/{row.sop_uid}"


# --------------------------------------------------------------------------- QIDO-RS

SERIES_MATCH = (*qido.SERIES_KEYS, "StudyInstanceUID")
INSTANCE_MATCH = (*qido.INSTANCE_KEYS, "SeriesInstanceUID")


@bp.get("/studies")
@api_auth_required(scope="read")
def search_studies() -> Response:
    return _search(qido.studies, qido.STUDY_KEYS)


@bp.get("/series")
@api_auth_required(scope="read")
def search_all_series() -> Response:
    return _search(qido.series, SERIES_MATCH, None)


@bp.get("/studies/<study>/series")
@api_auth_required(scope="read")
def search_series(study: str) -> Response:
    _check(study)
    _results(study)
    return _search(qido.series, SERIES_MATCH, study)


@bp.get("/studies/<study>/instances")
@api_auth_required(scope="read")
def search_study_instances(study: str) -> Response:
    _check(study)
    _results(study)
    return _search(qido.instances, INSTANCE_MATCH, study, None)


@bp.get("/studies/<study>/series/<series>/instances")
@api_auth_required(scope="read")
def search_instances(study: str, series: str) -> Response:
    _check(study, series)
    return _search(qido.instances, INSTANCE_MATCH, study, series)


def _results(study_uid: str) -> None:
    """The viewer's result objects (CAM captures, the SR) of a study, made on first look."""
    from pipeline.store.viewer_objects import ensure_results

    try:
        ensure_results(db(), _store(), study_uid, settings().weights_path)
    except Exception:  # the images stay viewable without them
        db().rollback()
        log.exception("could not make the result objects of a study for the viewer")


# --------------------------------------------------------------------------- WADO-RS


def _multipart(parts: Iterable[tuple[str, Iterator[bytes]]], media: str) -> Response:
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


def _file_chunks(row: Instance) -> Iterator[bytes]:
    with _store().open(row.path) as fh:
        yield from iter(lambda: fh.read(CHUNK), b"")


def _retrieve(rows: list[Instance]) -> Response:
    accept = request.headers.get("Accept", "")
    if accept and not any(t in accept for t in ("application/dicom", "*/*", "multipart/related")):
        abort(406, description='instances are sent as multipart/related; type="application/dicom"')
    for row in rows:
        if not _store().exists(row.path):
            abort(404, description="an instance's file is no longer in the store")
    parts = [
        (f"application/dicom; transfer-syntax={r.transfer_syntax}", _file_chunks(r)) for r in rows
    ]
    response = _multipart(parts, "application/dicom")
    if len(rows) == 1:
        response.set_etag(rows[0].sha256)
        response.headers["Cache-Control"] = IMMUTABLE
        response.make_conditional(request)  # in place
        return response
    response.headers["Cache-Control"] = "no-store"  # a study or series can still grow
    return response


@bp.get("/studies/<study>")
@api_auth_required(scope="read")
def retrieve_study(study: str) -> Response:
    _check(study)
    _results(study)
    return _retrieve(_instances(study))


@bp.get("/studies/<study>/series/<series>")
@api_auth_required(scope="read")
def retrieve_series(study: str, series: str) -> Response:
    return _retrieve(_instances(study, series))


@bp.get("/studies/<study>/series/<series>/instances/<sop>")
@api_auth_required(scope="read")
def retrieve_instance(study: str, series: str, sop: str) -> Response:
    return _retrieve(_instances(study, series, sop))


def _metadata(rows: list[Instance]) -> Response:
    body = [wado.metadata(_data(r), _url(r)) for r in rows]
    # "m2": the metadata without non-positive pixel spacings (a browser's cached "m-" differs)
    etag = "m2-" + rows[0].sha256 if len(rows) == 1 else None
    return _json(body, etag=etag)


@bp.get("/studies/<study>/metadata")
@api_auth_required(scope="read")
def study_metadata(study: str) -> Response:
    _check(study)
    _results(study)
    return _metadata(_instances(study))


@bp.get("/studies/<study>/series/<series>/metadata")
@api_auth_required(scope="read")
def series_metadata(study: str, series: str) -> Response:
    return _metadata(_instances(study, series))


@bp.get("/studies/<study>/series/<series>/instances/<sop>/metadata")
@api_auth_required(scope="read")
def instance_metadata(study: str, series: str, sop: str) -> Response:
    return _metadata(_instances(study, series, sop))


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        abort(400, description="frames are 1-based numbers separated by commas")
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > 1000:
        abort(400, description="frames are 1-based numbers separated by commas")
    return numbers


@bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<numbers>")
@api_auth_required(scope="read")
def retrieve_frames(study: str, series: str, sop: str, numbers: str) -> Response:
    row = _instances(study, series, sop)[0]
    wanted = _frame_numbers(numbers)
    try:
        accept = wado.parse_accept(request.headers.get("Accept"))
        frames, syntax = wado.frames(_data(row), wanted, accept)
    except wado.NotAcceptable as exc:
        abort(406, description=str(exc))
    except LookupError as exc:
        abort(404, description=str(exc))
    media = "application/octet-stream"
    parts = [(f"{media}; transfer-syntax={syntax}", iter([f])) for f in frames]
    response = _multipart(parts, media)
    response.set_etag(f"f-{row.sha256}-{numbers}-{syntax}")
    response.headers["Cache-Control"] = IMMUTABLE
    response.headers["Vary"] = "Accept"
    response.make_conditional(request)  # in place
    return response


@bp.get("/studies/<study>/series/<series>/instances/<sop>/bulk/<tag>")
@api_auth_required(scope="read")
def retrieve_bulk(study: str, series: str, sop: str, tag: str) -> Response:
    row = _instances(study, series, sop)[0]
    if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
        abort(400, description="a tag is 8 hexadecimal digits")
    try:
        value = wado.bulk(_data(row), int(tag, 16))
    except LookupError as exc:
        abort(404, description=str(exc))
    response = _multipart([("application/octet-stream", iter([value]))], "application/octet-stream")
    response.set_etag(f"b-{row.sha256}-{tag.upper()}")
    response.headers["Cache-Control"] = IMMUTABLE
    response.make_conditional(request)  # in place
    return response


def _render(row: Instance, side: int | None) -> Response:
    media = "image/png" if "image/png" in request.headers.get("Accept", "") else "image/jpeg"
    viewport = request.args.get("viewport")
    if viewport:
        try:
            side = max(int(v) for v in viewport.split(",")[:2])
        except ValueError:
            abort(400, description="viewport is width,height in pixels")
        side = min(max(side, 16), 4096)
    try:
        body = wado.rendered(_data(row), side, media)
    except LookupError as exc:
        abort(404, description=str(exc))
    response = Response(body, mimetype=media)
    response.set_etag(f"r-{row.sha256}-{side}-{media}")
    response.headers["Cache-Control"] = IMMUTABLE
    response.make_conditional(request)  # in place
    return response


def _first_image(rows: list[Instance]) -> Instance:
    for row in rows:
        if row.rows:
            return row
    abort(404, description="nothing here has pixel data to render")


@bp.get("/studies/<study>/series/<series>/instances/<sop>/rendered")
@api_auth_required(scope="read")
def instance_rendered(study: str, series: str, sop: str) -> Response:
    return _render(_instances(study, series, sop)[0], None)


@bp.get("/studies/<study>/series/<series>/instances/<sop>/thumbnail")
@api_auth_required(scope="read")
def instance_thumbnail(study: str, series: str, sop: str) -> Response:
    return _render(_instances(study, series, sop)[0], wado.THUMBNAIL_SIDE)


@bp.get("/studies/<study>/series/<series>/thumbnail")
@api_auth_required(scope="read")
def series_thumbnail(study: str, series: str) -> Response:
    return _render(_first_image(_instances(study, series)), wado.THUMBNAIL_SIDE)


@bp.get("/studies/<study>/thumbnail")
@api_auth_required(scope="read")
def study_thumbnail(study: str) -> Response:
    return _render(_first_image(_instances(study)), wado.THUMBNAIL_SIDE)
