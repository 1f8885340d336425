"""Login, logout, and API authentication (session or bearer token)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required, login_user, logout_user

from dashboard import db
from dashboard.ratelimit import (
    FAILED,
    MAX_FAILURES,
    SUCCEEDED,
    WINDOW_S,
    login_target,
    retry_after_s,
)
from pipeline.models import AuditEvent, User, utcnow
from pipeline.triage.studies import format_wait
from pipeline.users import authenticate, has_scope, user_for_token

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
        username = request.form.get("username", "")[:80]
        wait = retry_after_s(
            db(),
            username,
            request.remote_addr,
            utcnow(),
            current_app.config.get("LOGIN_MAX_FAILURES", MAX_FAILURES),
            current_app.config.get("LOGIN_WINDOW_S", WINDOW_S),
        )
        if wait is not None:
            flash(
                f"Too many failed logins for {username} from this address. "
                f"Try again in {format_wait(wait + 59)}.",
                "error",
            )
            response = make_response(render_template("login.html"), 429)
            response.headers["Retry-After"] = str(wait)
            return response
        user = authenticate(db(), username, request.form.get("password", ""))
        if user is None:
            audit(FAILED, target=login_target(username))
            flash("Wrong username or password.", "error")
            return render_template("login.html"), 401
        login_user(LoginUser(user))
        audit(SUCCEEDED, target=login_target(username))
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


def api_auth_required(view: Callable[..., Any] | None = None, *, scope: str = "read") -> Any:
    """Allow a logged-in session or an ``Authorization: Bearer <token>`` header with ``scope``.

    No credentials: 401. Credentials whose role lacks the scope (a feed token reading the
    worklist, a radiologist reading admin JSON): 403. Use bare (``@api_auth_required``, scope
    ``read``) or with a scope (``@api_auth_required(scope="admin")``).
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
            if not has_scope(user_role, scope):
                return jsonify(error=f"this account's role ({user_role}) may not {scope}"), 403
            return fn(*args, **kwargs)

        wrapped.required_scope = scope  # type: ignore[attr-defined]
        return wrapped

    return decorate(view) if view is not None else decorate
