"""Admin: where results go (PACS nodes, DICOMweb, alert receivers), their outbox state, resend.

Every change is audited; a secret typed here is stored encrypted and never shown again.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from sqlalchemy import select

from dashboard import db, settings
from dashboard.admin import admin_required
from dashboard.auth import api_auth_required, audit
from pipeline.results import claims, console
from pipeline.results.destinations import (
    KINDS,
    DestinationError,
    Spec,
    apply,
    check_ae,
    check_http,
    describe,
)
from pipeline.tables_results import Destination, OutboxItem

bp = Blueprint("destinations", __name__)


def _doc() -> dict[str, Any]:
    states = console.destination_states(db())
    for state in states:
        state["items"] = console.recent_items(db(), state["id"])
    return {"destinations": states}


@bp.route("/admin/destinations")
@admin_required
def page() -> Any:
    return render_template("admin_destinations.html", doc=_doc(), kinds=KINDS)


@bp.route("/api/admin/destinations")
@api_auth_required(scope="admin")
def as_json() -> Any:
    return jsonify(_doc())


def _spec(form: Any) -> Spec:
    kind = form.get("kind", "")
    if kind not in KINDS:
        raise DestinationError(f"kind must be one of {', '.join(KINDS)}")
    name = (form.get("name") or "").strip()
    if not name or len(name) > 120:
        raise DestinationError("a name of 1 to 120 characters is needed")
    spec = Spec(kind, name, want_sr=bool(form.get("want_sr")), want_sc=bool(form.get("want_sc")))
    if kind in ("dicom", "mllp"):
        spec.host = (form.get("host") or "").strip()
        port = (form.get("port") or "").strip()
        if not spec.host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DestinationError("a host and a port from 1 to 65535 are needed")
        spec.port = int(port)
        if kind == "dicom":
            spec.ae_title = check_ae(form.get("ae_title") or "")
    else:
        spec.url = check_http(form.get("url") or "")
    auth = form.get("auth") or "none"
    allowed = {"dicomweb": ("none", "bearer", "basic"), "webhook": ("none", "hmac")}
    if auth not in allowed.get(kind, ("none",)):
        raise DestinationError(f"authentication {auth!r} does not apply to {kind}")
    spec.auth, spec.username = auth, (form.get("username") or "").strip() or None
    spec.secret = form.get("secret") or None
    if auth != "none" and not spec.secret:
        raise DestinationError("the token, password or signing key is needed")
    if kind in ("dicom", "dicomweb") and not (spec.want_sr or spec.want_sc):
        raise DestinationError("choose SR, the CAM captures, or both")
    return spec


@bp.route("/admin/destinations", methods=["POST"])
@admin_required
def add() -> Any:
    try:
        spec = _spec(request.form)
    except DestinationError as exc:
        flash(f"Destination not added: {exc}")
        return redirect(url_for("destinations.page"))
    if db().scalar(select(Destination.id).where(Destination.name == spec.name)) is not None:
        flash(f"Destination not added: the name {spec.name!r} is taken")
        return redirect(url_for("destinations.page"))
    row = apply(settings(), Destination(source="console", enabled=True), spec)
    db().add(row)
    db().flush()
    info = describe(row)
    audit(
        "destination_add",
        target=f"destination:{row.id}",
        detail=f"{info['kind']} {info['where']} objects {','.join(info['objects'])} "
        f"auth {info['auth']}",
    )
    flash(f"Destination {spec.name} added: results of studies finished from now on go there.")
    return redirect(url_for("destinations.page"))


def _row(dest_id: int) -> Destination:
    row = db().get(Destination, dest_id)
    if row is None:
        abort(404)
    return row


@bp.route("/admin/destinations/<int:dest_id>/toggle", methods=["POST"])
@admin_required
def toggle(dest_id: int) -> Any:
    row = _row(dest_id)
    row.enabled = not row.enabled
    audit(
        "destination_" + ("enable" if row.enabled else "disable"), target=f"destination:{dest_id}"
    )
    return redirect(url_for("destinations.page"))


@bp.route("/admin/destinations/<int:dest_id>/retry", methods=["POST"])
@admin_required
def retry(dest_id: int) -> Any:
    _row(dest_id)
    n = claims.retry_now(db(), dest_id)
    audit("destination_retry", target=f"destination:{dest_id}", detail=f"{n} items due now")
    flash(f"{n} waiting item(s) will be sent on the next pass.")
    return redirect(url_for("destinations.page"))


@bp.route("/admin/outbox/<int:item_id>/resend", methods=["POST"])
@admin_required
def resend(item_id: int) -> Any:
    item = db().get(OutboxItem, item_id)
    if item is None:
        abort(404)
    moved = claims.resend(db(), item_id)
    audit(
        "outbox_resend",
        target=f"outbox:{item_id}",
        detail=f"destination {item.destination_id}; {'queued' if moved else 'in flight'}",
    )
    flash(
        f"Item {item_id} "
        + ("queued to be sent again (the same instance)." if moved else "is being sent right now.")
    )
    return redirect(url_for("destinations.page"))
