"""Admin: the site's triage policy (pipeline.triage.policy): the one in force, its history, changes.

Every save is a new version with a reason, audited; rollback saves an earlier version's rules as
a new one. The page shows how many waiting studies a change would move to another triage class
before it is saved (``preview``), and how many it moved once saved.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user

from dashboard import db, settings
from dashboard.admin import admin_required
from dashboard.auth import api_auth_required, audit
from pipeline.classifier.weights import describe_weights
from pipeline.triage import policy as pol

bp = Blueprint("policy", __name__)


def _model_thresholds() -> dict[str, float]:
    return dict(describe_weights(settings()).get("thresholds") or {})


def _doc() -> dict[str, Any]:
    return {
        "active": pol.active(db()).as_dict(),
        "model_thresholds": _model_thresholds(),
        "history": [p.as_dict() for p in pol.history(db())],
    }


def _proposal() -> tuple[dict[str, Any] | None, str | None]:
    """The calibration proposal asked for with ?calibrate=1&since=&target=, or why there is none."""
    from datetime import UTC, datetime, timedelta

    from pipeline.monitoring.calibrate import CalibrationError, propose

    if not request.args.get("calibrate"):
        return None, None
    try:
        since_text = request.args.get("since") or ""
        since = (
            datetime.strptime(since_text, "%Y-%m-%d").replace(tzinfo=UTC)
            if since_text
            else datetime.now(UTC) - timedelta(days=90)
        )
        target = float(request.args.get("target") or 0.95)
        return propose(db(), since, datetime.now(UTC), _model_thresholds(), target), None
    except ValueError as exc:  # CalibrationError is one
        return None, str(exc) if isinstance(
            exc, CalibrationError
        ) else f"not a date or number: {exc}"


@bp.route("/admin/policy")
@admin_required
def page() -> Any:
    proposal, why_not = _proposal()
    return render_template("admin_policy.html", doc=_doc(), proposal=proposal, why_not=why_not)


@bp.route("/admin/policy/calibration/reject", methods=["POST"])
@admin_required
def reject() -> Any:
    detail = request.form.get("summary", "")[:400]
    audit(
        "calibration_reject",
        target="policy",
        detail=f"{detail}; why: {request.form.get('reason', '').strip()[:200]}",
    )
    flash("Calibration proposal rejected; the policy in force is unchanged.")
    return redirect(url_for("policy.page"))


@bp.route("/api/admin/policy")
@api_auth_required(scope="admin")
def as_json() -> Any:
    return jsonify(_doc())


def _body(form: Any) -> dict[str, Any]:
    own = form.get("thresholds") == "own"
    thresholds = (
        {k: form.get(f"t_{k}", "") for k in ("routine", "urgent", "critical")} if own else None
    )
    return {
        "thresholds": thresholds,
        "stat_boost": form.get("stat_boost", ""),
        "max_wait_h": form.get("max_wait_h", ""),
        "reads_per_hour": form.get("reads_per_hour", ""),
        "temperature_scale": form.get("temperature_scale", "1"),
    }


def _describe(p: pol.Policy) -> str:
    t = p.thresholds or "the model's"
    return (
        f"thresholds {t}; STAT boost {p.stat_boost:g}; maximum wait {p.max_wait_h:g} h; "
        f"{p.reads_per_hour:g} reads/h; temperature x{p.temperature_scale:g}"
    )


def _studies(n: int) -> str:
    return f"{n} waiting stud{'y' if n == 1 else 'ies'}"


def _in_force(action: str, new: Any, detail: str, message: str) -> Any:
    """Audit a policy version that came into force, tell the admin, and go back to the page."""
    audit(action, target=f"policy:v{new.version}", detail=detail)
    flash(message)
    return redirect(url_for("policy.page"))


def _refused(what: str, exc: Exception) -> Any:
    db().rollback()
    flash(f"{what}: {exc}")
    return redirect(url_for("policy.page"))


@bp.route("/admin/policy", methods=["POST"])
@admin_required
def save() -> Any:
    body = _body(request.form)
    try:
        if request.form.get("preview"):
            moved = pol.preview(db(), body, _model_thresholds())
            flash(f"Not saved. Under these rules {_studies(moved)} would change triage class.")
            return redirect(url_for("policy.page"))
        new, moved = pol.save(
            db(), body, current_user.id, request.form.get("reason", ""), _model_thresholds()
        )
    except pol.PolicyError as exc:
        return _refused("Policy not saved", exc)
    return _in_force(
        "policy_change",
        new,
        f"{_describe(new)}; reason: {new.reason}; {moved} waiting re-classed",
        f"Policy version {new.version} is in force; {_studies(moved)} changed triage class.",
    )


@bp.route("/admin/policy/<int:version>/rollback", methods=["POST"])
@admin_required
def rollback(version: int) -> Any:
    try:
        new, moved = pol.rollback(
            db(),
            version,
            current_user.id,
            request.form.get("reason", "") or "rollback",
            _model_thresholds(),
        )
    except pol.PolicyError as exc:
        return _refused("Policy not rolled back", exc)
    return _in_force(
        "policy_rollback",
        new,
        f"rules of version {version}: {_describe(new)}; {moved} waiting re-classed",
        f"The rules of version {version} are in force again as version {new.version}.",
    )
