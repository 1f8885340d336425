"""Admin pages: how long abnormal and normal studies are waiting in the worklist, live."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, abort, g, jsonify, render_template, request
from flask_login import current_user, login_required

from dashboard import db, monitor
from pipeline.users import user_for_token

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


def admin_api_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """An admin's session or bearer token; 401 without credentials, 403 for other roles."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            user = user_for_token(db(), header[7:].strip())
            if user is None:
                return jsonify(error="invalid or revoked API token"), 401
            g.api_user = user
            role = user.role
        elif current_user.is_authenticated:
            role = current_user.role
        else:
            return jsonify(error="authentication required: log in or send a bearer token"), 401
        if role != "admin":
            return jsonify(error="admin role required"), 403
        return view(*args, **kwargs)

    return wrapped


@bp.route("/admin/waiting")
@admin_required
def waiting() -> Any:
    doc = monitor.waiting_times(db(), datetime.now(UTC))
    return render_template("admin_waiting.html", waiting=doc, refresh_s=REFRESH_S)


@bp.route("/api/admin/waiting")
@admin_api_required
def waiting_json() -> Any:
    return jsonify(monitor.waiting_times(db(), datetime.now(UTC)))
