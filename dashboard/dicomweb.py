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
from typing import Any

from flask import Blueprint, Response, abort, jsonify, request

from dashboard import db, settings
from dashboard.auth import api_auth_required
from dashboard.dicomweb_responses import (
    base,
    check,
    data,
    dicom_json,
    file_chunks,
    immutable,
    instances,
    multipart,
    store,
    url,
)
from pipeline.models import Instance
from pipeline.store import qido, wado

bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")
log = logging.getLogger(__name__)


@bp.errorhandler(400)
@bp.errorhandler(404)
@bp.errorhandler(406)
def _error(exc: Any) -> tuple[Response, int]:
    return jsonify(error=exc.description), exc.code


def _search(fn: Any, allowed: tuple[str, ...], *args: Any) -> Response:
    try:
        query = qido.parse(request.args, allowed)
        return dicom_json(fn(db(), *args, query, base()))
    except qido.BadQuery as exc:
        abort(400, description=str(exc))


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
    return _search(qido.series, SERIES_MATCH, _looked_at(study))


@bp.get("/studies/<study>/instances")
@api_auth_required(scope="read")
def search_study_instances(study: str) -> Response:
    return _search(qido.instances, INSTANCE_MATCH, _looked_at(study), None)


@bp.get("/studies/<study>/series/<series>/instances")
@api_auth_required(scope="read")
def search_instances(study: str, series: str) -> Response:
    check(study, series)
    return _search(qido.instances, INSTANCE_MATCH, study, series)


def _looked_at(study: str) -> str:
    """The study's UID, checked, once the viewer's result objects of the study are made."""
    check(study)
    _results(study)
    return study


def _results(study_uid: str) -> None:
    """The viewer's result objects (CAM captures, the SR) of a study, made on first look."""
    from pipeline.results.viewer_objects import ensure_results

    try:
        ensure_results(db(), store(), study_uid, settings().weights_path)
    except Exception:  # the images stay viewable without them
        db().rollback()
        log.exception("could not make the result objects of a study for the viewer")


# --------------------------------------------------------------------------- WADO-RS


def _retrieve(rows: list[Instance]) -> Response:
    accept = request.headers.get("Accept", "")
    if accept and not any(t in accept for t in ("application/dicom", "*/*", "multipart/related")):
        abort(406, description='instances are sent as multipart/related; type="application/dicom"')
    for row in rows:
        if not store().exists(row.path):
            abort(404, description="an instance's file is no longer in the store")
    parts = [
        (f"application/dicom; transfer-syntax={r.transfer_syntax}", file_chunks(r)) for r in rows
    ]
    response = multipart(parts, "application/dicom")
    if len(rows) == 1:
        return immutable(response, rows[0].sha256)
    response.headers["Cache-Control"] = "no-store"  # a study or series can still grow
    return response


def _level(study: str, series: str | None, sop: str | None) -> list[Instance]:
    if series is None:  # a whole study: its result objects are made on first look
        _looked_at(study)
    return instances(study, series, sop)


@bp.get("/studies/<study>")
@bp.get("/studies/<study>/series/<series>")
@bp.get("/studies/<study>/series/<series>/instances/<sop>")
@api_auth_required(scope="read")
def retrieve(study: str, series: str | None = None, sop: str | None = None) -> Response:
    """WADO-RS: the files of a study, a series or one instance."""
    return _retrieve(_level(study, series, sop))


@bp.get("/studies/<study>/metadata")
@bp.get("/studies/<study>/series/<series>/metadata")
@bp.get("/studies/<study>/series/<series>/instances/<sop>/metadata")
@api_auth_required(scope="read")
def metadata(study: str, series: str | None = None, sop: str | None = None) -> Response:
    """WADO-RS: the DICOM JSON of a study's, a series' or one instance's instances."""
    rows = _level(study, series, sop)
    body = [wado.metadata(data(r), url(r)) for r in rows]
    # "m2": the metadata without non-positive pixel spacings (a browser's cached "m-" differs)
    etag = "m2-" + rows[0].sha256 if len(rows) == 1 else None
    return dicom_json(body, etag=etag)


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
    row = instances(study, series, sop)[0]
    wanted = _frame_numbers(numbers)
    try:
        accept = wado.parse_accept(request.headers.get("Accept"))
        frames, syntax = wado.frames(data(row), wanted, accept)
    except wado.NotAcceptable as exc:
        abort(406, description=str(exc))
    except LookupError as exc:
        abort(404, description=str(exc))
    media = "application/octet-stream"
    parts = [(f"{media}; transfer-syntax={syntax}", iter([f])) for f in frames]
    response = multipart(parts, media)
    response.headers["Vary"] = "Accept"
    return immutable(response, f"f-{row.sha256}-{numbers}-{syntax}")


@bp.get("/studies/<study>/series/<series>/instances/<sop>/bulk/<tag>")
@api_auth_required(scope="read")
def retrieve_bulk(study: str, series: str, sop: str, tag: str) -> Response:
    row = instances(study, series, sop)[0]
    if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
        abort(400, description="a tag is 8 hexadecimal digits")
    try:
        value = wado.bulk(data(row), int(tag, 16))
    except LookupError as exc:
        abort(404, description=str(exc))
    response = multipart([("application/octet-stream", iter([value]))], "application/octet-stream")
    return immutable(response, f"b-{row.sha256}-{tag.upper()}")


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
        body = wado.rendered(data(row), side, media)
    except LookupError as exc:
        abort(404, description=str(exc))
    return immutable(Response(body, mimetype=media), f"r-{row.sha256}-{side}-{media}")


def _first_image(rows: list[Instance]) -> Instance:
    for row in rows:
        if row.rows:
            return row
    abort(404, description="nothing here has pixel data to render")


@bp.get("/studies/<study>/series/<series>/instances/<sop>/rendered")
@api_auth_required(scope="read")
def instance_rendered(study: str, series: str, sop: str) -> Response:
    return _render(instances(study, series, sop)[0], None)


@bp.get("/studies/<study>/series/<series>/instances/<sop>/thumbnail")
@api_auth_required(scope="read")
def instance_thumbnail(study: str, series: str, sop: str) -> Response:
    return _render(instances(study, series, sop)[0], wado.THUMBNAIL_SIDE)


@bp.get("/studies/<study>/series/<series>/thumbnail")
@api_auth_required(scope="read")
def series_thumbnail(study: str, series: str) -> Response:
    return _render(_first_image(instances(study, series)), wado.THUMBNAIL_SIDE)


@bp.get("/studies/<study>/thumbnail")
@api_auth_required(scope="read")
def study_thumbnail(study: str) -> Response:
    return _render(_first_image(instances(study)), wado.THUMBNAIL_SIDE)
