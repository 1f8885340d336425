"""Login, logout, and API authentication (session or bearer token)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import Blueprint, flash, g, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user

from dashboard import db
from pipeline.models import AuditEvent, User
from pipeline.users import authenticate, user_for_token

bp = Blueprint("auth", __name__)


class LoginUser:
    """Flask-Login's view of an account."""

    is_authenticated = True
    is_active = True
    is_anonymous = False

    def __init__(self, user: User) -> None:
        self.id = user.id
        self.username = user.username
        self.role = user.role

    def get_id(self) -> str:
        return str(self.id)


def audit(action: str, target: str | None = None, detail: str | None = None) -> None:
    """Record who did what (committed with the request's session)."""
    user = getattr(g, "api_user", None) or (current_user if current_user.is_authenticated else None)
    db().add(
        AuditEvent(
            user_id=getattr(user, "id", None),
            action=action,
            target=target,
            detail=detail,
            remote_addr=request.remote_addr,
        )
    )
    db().commit()


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        username = request.form.get("username", "")
        user = authenticate(db(), username, request.form.get("password", ""))
        if user is None:
            flash("Wrong username or password.", "error")
            return render_template("login.html"), 401
        login_user(LoginUser(user))
        audit("login")
        target = request.args.get("next", "")
        # Only local paths: never redirect a login to another site.
        if not target.startswith("/") or target.startswith("//"):
            target = url_for("worklist.index")
        return redirect(target)
    return render_template("login.html")


@bp.route("/logout", methods=["POST"])
@login_required
def logout() -> Any:
    audit("logout")
    logout_user()
    return redirect(url_for("auth.login"))


def api_auth_required(view: Callable[..., Any] | None = None, *, role: str | None = None) -> Any:
    """Allow a logged-in session or an ``Authorization: Bearer <token>`` header.

    With ``role``, other roles get 403. Use bare (``@api_auth_required``) or with a role
    (``@api_auth_required(role="admin")``).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            header = request.headers.get("Authorization", "")
            if header.lower().startswith("bearer "):
                user = user_for_token(db(), header[7:].strip())
                if user is None:
                    return jsonify(error="invalid or revoked API token"), 401
                g.api_user = user
                user_role = user.role
            elif current_user.is_authenticated:
                user_role = current_user.role
            else:
                return jsonify(error="authentication required: log in or send a bearer token"), 401
            if role is not None and user_role != role:
                return jsonify(error=f"{role} role required"), 403
            return fn(*args, **kwargs)

        return wrapped

    return decorate(view) if view is not None else decorate
