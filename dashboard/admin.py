"""Admin pages: how long abnormal and normal studies are waiting in the worklist, live."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, abort, jsonify, render_template
from flask_login import current_user, login_required

from dashboard import db, monitor
from dashboard.auth import api_auth_required

bp = Blueprint("admin", __name__)
REFRESH_S = 15


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """A logged-in admin only: anonymous users go to the login page, others get 403."""

    @functools.wraps(view)
    @login_required
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if current_user.role != "admin":
            abort(403)
        return view(*args, **kwargs)

    return wrapped


@bp.route("/admin/waiting")
@admin_required
def waiting() -> Any:
    doc = monitor.waiting_times(db(), datetime.now(UTC))
    return render_template("admin_waiting.html", waiting=doc, refresh_s=REFRESH_S)


@bp.route("/api/admin/waiting")
@api_auth_required(role="admin")
def waiting_json() -> Any:
    return jsonify(monitor.waiting_times(db(), datetime.now(UTC)))
