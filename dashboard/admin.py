"""Admin pages: the console (queues, throughput, latency, workers, problems, model, counts),
requeueing a failed study, the audit log, and live waiting times.

Every number comes from a plain function in ``dashboard.monitor`` or ``dashboard.monitor_activity``
returning a dict; the same dicts are served as JSON under ``/api/admin/``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from dashboard import db, monitor, monitor_activity, settings
from dashboard.auth import api_auth_required, audit
from dashboard.charts import throughput_svg
from dashboard.words import model_summary
from pipeline.classifier.weights import describe_weights
from pipeline.queue.connections import queue_connections
from pipeline.queue.locate import resolve_redis_url
from pipeline.queue.rerun import RequeueError, requeue_study
from pipeline.states import Role

bp = Blueprint("admin", __name__)
REFRESH_S = 15
AUDIT_PAGE = 50


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """A logged-in admin only: anonymous users go to the login page, others get 403."""

    @functools.wraps(view)
    @login_required
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if current_user.role != Role.ADMIN:
            abort(403)
        return view(*args, **kwargs)

    wrapped.required_role = Role.ADMIN  # type: ignore[attr-defined]
    return wrapped


def _console() -> dict[str, Any]:
    return monitor.console(db(), settings(), describe_weights(settings()), datetime.now(UTC))


@bp.route("/admin")
@admin_required
def console() -> Any:
    from dashboard.drift_view import drift_state

    doc = _console()
    model = describe_weights(settings())
    return render_template(
        "admin_console.html",
        doc=doc,
        model=model,
        refresh_s=REFRESH_S,
        drift=drift_state(),
        model_summary=model_summary(model),
        chart=throughput_svg(doc["throughput"]["per_minute"]),
    )


@bp.route("/admin/panel")
@admin_required
def console_panel() -> Any:
    """The console's live part alone, fetched by the page every few seconds."""
    doc = _console()
    return render_template(
        "_admin_panel.html", doc=doc, chart=throughput_svg(doc["throughput"]["per_minute"])
    )


@bp.route("/api/admin/overview")
@api_auth_required(scope="admin")
def overview_json() -> Any:
    return jsonify(_console())


@bp.route("/admin/studies/<int:study_id>/requeue", methods=["POST"])
@admin_required
def requeue(study_id: int) -> Any:
    model = describe_weights(settings())
    url = resolve_redis_url(settings())
    # No Redis reachable: the study is marked queued and the reconciler sends it later.
    queue = queue_connections(url) if url else nullcontext((None, None))
    try:
        with queue as (client, dispatcher):
            result = requeue_study(
                _factory(),
                client,
                dispatcher,
                study_id,
                input_size=model["input_size"],
                ttl_s=settings().payload_ttl_s,
                thresholds=model["thresholds"],
                preprocess=model["preprocess"],
            )
    except RequeueError as exc:
        audit("requeue_refused", target=f"study:{study_id}", detail=str(exc))
        return render_template("error.html", message=str(exc)), 409
    images = ",".join(str(i) for i in result["image_ids"])
    audit("requeue", target=f"study:{study_id}", detail=f"images {images}; sent {result['sent']}")
    if result["sent"]:
        flash(
            f"Study {study_id} requeued: {result['sent']} image(s) sent to the {result['lane']} lane."
        )
    else:
        flash(
            f"Study {study_id} marked queued; the queue is unreachable, so the reconciler "
            "will send it when Redis is back."
        )
    return redirect(url_for("admin.console"))


def _factory() -> Any:
    from flask import current_app

    return current_app.extensions["cxr"]["factory"]


@bp.route("/admin/audit")
@admin_required
def audit_log() -> Any:
    page = max(1, request.args.get("page", 1, type=int) or 1)
    action = request.args.get("action") or None
    doc = monitor_activity.audit_log(db(), page, AUDIT_PAGE, action)
    return render_template("admin_audit.html", doc=doc)


@bp.route("/api/admin/audit")
@api_auth_required(scope="admin")
def audit_json() -> Any:
    page = max(1, request.args.get("page", 1, type=int) or 1)
    return jsonify(
        monitor_activity.audit_log(db(), page, AUDIT_PAGE, request.args.get("action") or None)
    )


@bp.route("/admin/waiting")
@admin_required
def waiting() -> Any:
    doc = monitor_activity.waiting_times(db(), datetime.now(UTC))
    return render_template("admin_waiting.html", waiting=doc, refresh_s=REFRESH_S)


@bp.route("/api/admin/waiting")
@api_auth_required(scope="admin")
def waiting_json() -> Any:
    return jsonify(monitor_activity.waiting_times(db(), datetime.now(UTC)))
