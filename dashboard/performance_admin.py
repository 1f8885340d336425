"""Admin: live performance of the model against the ground truth recorded in a window.

The numbers come from ``pipeline.monitoring.live`` (one plain function returning a dict); the
same document is served as JSON under ``/api/admin/performance``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, jsonify, render_template, request

from dashboard import db, settings
from dashboard.admin import admin_required
from dashboard.auth import api_auth_required
from dashboard.charts import reliability_svg
from pipeline.classifier.weights import describe_weights
from pipeline.monitoring.live import DEFAULT_DAYS, SPLITS, WINDOWS_DAYS, live_performance
from pipeline.triage.reviews import FINDINGS

bp = Blueprint("performance", __name__)


def _days() -> int:
    days = request.args.get("days", DEFAULT_DAYS, type=int)
    return days if days in WINDOWS_DAYS else DEFAULT_DAYS


def _doc() -> dict[str, Any]:
    model = describe_weights(settings())
    return live_performance(db(), model.get("thresholds"), datetime.now(UTC), _days())


@bp.route("/admin/performance")
@admin_required
def page() -> Any:
    doc = _doc()
    return render_template(
        "admin_performance.html",
        doc=doc,
        windows=WINDOWS_DAYS,
        splits=SPLITS,
        findings=FINDINGS,
        chart=reliability_svg(doc["overall"]["calibration"]),
    )


@bp.route("/api/admin/performance")
@api_auth_required(scope="admin")
def performance_json() -> Any:
    return jsonify(_doc())
