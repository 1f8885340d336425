"""Drift on the dashboard: the status the console, /metrics and the worklist banner show.

``drift_state()`` computes ``pipeline.monitoring.drift.status`` for the weights in use at most once every
``DRIFT_CACHE_S`` seconds per process (the worklist page refreshes every few seconds). An admin
can make the recent films this site's reference once the model has been validated on them.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, flash, jsonify, redirect, url_for
from flask_login import current_user

from dashboard import db, settings
from dashboard.admin import admin_required
from dashboard.auth import api_auth_required, audit
from pipeline.classifier.weights import describe_weights, ensure_weights
from pipeline.monitoring import drift

bp = Blueprint("drift", __name__)
CACHE_S = 60.0
_cache: dict[str, tuple[float, dict[str, Any]]] = {}
_lock = threading.Lock()


def drift_state(fresh: bool = False) -> dict[str, Any]:
    s = settings()
    model = describe_weights(s)
    key = f"{s.db_url}|{model['sha256']}"
    ttl = float(current_app.config.get("DRIFT_CACHE_S", CACHE_S))
    with _lock:
        hit = _cache.get(key)
        if hit and not fresh and time.monotonic() - hit[0] < ttl:
            return hit[1]
    reference = drift.read_reference(ensure_weights(s), model["sha256"], Path(s.data_dir))
    doc = drift.status(db(), reference, datetime.now(UTC))
    with _lock:
        _cache[key] = (time.monotonic(), doc)
    return doc


@bp.route("/api/admin/drift")
@api_auth_required(scope="admin")
def as_json() -> Any:
    return jsonify(drift_state(fresh=True))


@bp.route("/admin/drift/accept", methods=["POST"])
@admin_required
def accept() -> Any:
    s = settings()
    sha = describe_weights(s)["sha256"]
    try:
        doc = drift.write_site_reference(
            db(), Path(s.data_dir), sha, datetime.now(UTC), current_user.username
        )
    except ValueError as exc:
        flash(f"Reference not changed: {exc}")
        return redirect(url_for("admin.console"))
    audit(
        "drift_reference",
        target=f"weights:{sha[:12]}",
        detail=f"the last {doc['n']} scored images are this site's drift reference",
    )
    drift_state(fresh=True)
    flash(f"The last {doc['n']} scored images are now this site's drift reference.")
    return redirect(url_for("admin.console"))
