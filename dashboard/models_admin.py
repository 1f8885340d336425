"""Admin: the model registry (pipeline.classifier.registry): shadow, compare, promote, discard, roll back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, flash, jsonify, redirect, render_template, url_for
from flask_login import current_user

from dashboard import db, settings
from dashboard.admin import admin_required
from dashboard.auth import api_auth_required, audit
from pipeline.classifier import registry
from pipeline.classifier.weights import describe_weights, ensure_weights
from pipeline.monitoring import shadow as shadow_vs_live
from pipeline.triage.policy import active

bp = Blueprint("models", __name__)


def _doc() -> dict[str, Any]:
    model = describe_weights(settings())
    policy = active(db())
    routine = policy.thresholds_for(model.get("thresholds") or {}).get("routine")
    return {
        "models": registry.listing(db()),
        "shipped": model["version"],
        "comparison": shadow_vs_live.comparison(db(), routine, policy.temperature_scale),
        "policy_version": policy.version,
    }


@bp.route("/admin/models")
@admin_required
def page() -> Any:
    return render_template("admin_models.html", doc=_doc())


@bp.route("/api/admin/models")
@api_auth_required(scope="admin")
def as_json() -> Any:
    return jsonify(_doc())


def _act(action: str, version: str) -> Any:
    shipped = Path(ensure_weights(settings()))
    try:
        if action == "shadow":
            registry.start_shadow(db(), version, current_user.id, shipped)
            words = "is in shadow: new studies are scored by it too; the worklist is unchanged"
        elif action == "promote":
            registry.promote(db(), version, current_user.id, shipped)
            words = "is live: workers switch to it between batches"
        else:
            registry.discard(db(), version, current_user.id)
            words = "is retired"
    except registry.RegistryError as exc:
        db().rollback()
        flash(f"Not done: {exc}")
        return redirect(url_for("models.page"))
    audit(f"model_{action}", target=f"model:{version}"[:80])
    flash(f"{version} {words}.")
    return redirect(url_for("models.page"))


@bp.route("/admin/models/<version>/shadow", methods=["POST"])
@admin_required
def shadow(version: str) -> Any:
    return _act("shadow", version)


@bp.route("/admin/models/<version>/promote", methods=["POST"])
@admin_required
def promote(version: str) -> Any:
    return _act("promote", version)


@bp.route("/admin/models/<version>/discard", methods=["POST"])
@admin_required
def discard(version: str) -> Any:
    return _act("discard", version)
