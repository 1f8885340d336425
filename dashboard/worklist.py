"""The radiologist's worklist: filters, search, pagination, and rows that refresh themselves.

Filtering, search and order live in ``pipeline.triage.studies`` (shared with ``GET /api/worklist``);
this module only renders. ``/worklist/rows`` returns the table body alone, which the page's
script fetches every few seconds so new studies appear without a reload.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, render_template, request
from flask_login import login_required

from dashboard import db, settings
from pipeline.classifier.weights import describe_weights
from pipeline.triage.filters import STATUSES, TRIAGE_FILTERS, FilterError, WorklistFilter
from pipeline.triage.reviews import reviewed_study_ids
from pipeline.triage.studies import format_wait, waiting_seconds
from pipeline.triage.worklist import worklist_count, worklist_page

bp = Blueprint("worklist", __name__)
PAGE_SIZE = 50
REFRESH_S = 10


def model_info() -> dict[str, Any]:
    return describe_weights(settings())


def _page_size() -> int:
    return int(current_app.config.get("WORKLIST_PAGE_SIZE", PAGE_SIZE))


def _rows(filters: WorklistFilter, page: int) -> dict[str, Any]:
    """Everything the table body needs for one page."""
    size = _page_size()
    listed = worklist_page(db(), size, (page - 1) * size, filters)
    studies = listed.studies
    total = worklist_count(db(), filters)
    reviewed = reviewed_study_ids(db(), [s.id for s in studies])
    waits = {s.id: format_wait(waiting_seconds(s)) for s in studies if s.id not in reviewed}
    return {
        "studies": studies,
        "reviewed": reviewed,
        "waits": waits,
        "total": total,
        "due": listed.due,
        "page": page,
        "pages": max(1, -(-total // size)),
        "filters": filters,
    }


def _parse() -> tuple[WorklistFilter, int, str | None]:
    page = max(1, request.args.get("page", 1, type=int) or 1)
    try:
        return WorklistFilter.from_args(request.args), page, None
    except FilterError as exc:
        return WorklistFilter(), page, str(exc)


@bp.route("/")
@login_required
def index() -> Any:
    filters, page, error = _parse()
    context = _rows(filters, page)
    from dashboard.drift_view import drift_state

    refresh = current_app.config.get("WORKLIST_REFRESH_S", REFRESH_S)
    html = render_template(
        "worklist.html",
        model=model_info(),
        error=error,
        refresh_s=refresh,
        drift=drift_state(),
        statuses=STATUSES,
        triage_filters=TRIAGE_FILTERS,
        **context,
    )
    return html, 400 if error else 200


@bp.route("/worklist/rows")
@login_required
def rows() -> Any:
    filters, page, error = _parse()
    if error:
        return error, 400
    context = _rows(filters, page)
    html = render_template("_worklist_rows.html", **context)
    return html, 200, {"X-Total-Count": str(context["total"]), "Cache-Control": "no-store"}
