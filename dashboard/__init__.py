"""The Flask dashboard: worklist, study viewer, JSON API, metrics."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc
from flask import Flask, g, jsonify, request
from flask_login import LoginManager
from flask_wtf import CSRFProtect
from sqlalchemy.orm import Session

from pipeline.db import make_engine, make_session_factory
from pipeline.models import User
from pipeline.settings import Settings
from pipeline.storage import is_storage_full

csrf = CSRFProtect()
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please log in to see the worklist."


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the dashboard; config may carry CXR_SETTINGS (a Settings) and Flask keys."""
    config = dict(config or {})
    settings: Settings = config.pop("CXR_SETTINGS", None) or Settings.from_env()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.effective_secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.production,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=settings.production,
        MAX_CONTENT_LENGTH=settings.max_file_mb * 1024 * 1024,
        WTF_CSRF_TIME_LIMIT=None,
    )
    app.config.update(config)
    engine = make_engine(settings.db_url)
    app.extensions["cxr"] = {
        "settings": settings,
        "engine": engine,
        "factory": make_session_factory(engine),
    }

    csrf.init_app(app)
    login_manager.init_app(app)

    from dashboard import admin, api, auth, request_ids, security, viewer, worklist

    request_ids.init_app(app)  # first: every later hook and view logs under the request's id
    security.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(worklist.bp)
    app.register_blueprint(viewer.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    from dashboard import destinations_admin

    app.register_blueprint(destinations_admin.bp)  # results to PACS, alerts, the outbox
    from dashboard import performance_admin

    app.register_blueprint(performance_admin.bp)  # live performance against the reads
    from dashboard import policy_admin

    app.register_blueprint(policy_admin.bp)  # the versioned triage policy
    from dashboard import drift_view

    app.register_blueprint(drift_view.bp)  # inputs and scores against the reference
    from dashboard import models_admin

    app.register_blueprint(models_admin.bp)  # the model registry: shadow, promote, roll back
    from dashboard import ohif_view

    ohif_view.init_app(app)  # the OHIF viewer at /ohif/, when `cxr-triage ohif install` ran
    csrf.exempt(api.bp)  # token-authenticated machine API; no cookies involved
    from dashboard import ingest_api

    app.register_blueprint(ingest_api.bp)
    csrf.exempt(ingest_api.bp)  # bearer tokens only (ingest_api.bearer_only); no cookies
    from dashboard import dicomweb

    app.register_blueprint(dicomweb.bp)  # QIDO-RS and WADO-RS over the instance store

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    @app.errorhandler(sqlalchemy.exc.InterfaceError)
    def _database_unavailable(exc: sqlalchemy.exc.DBAPIError) -> Any:
        # The database unreachable (a restart, a partition) or its disk full: a sender or a
        # browser is told to come back, not handed a 500 and a traceback in the log per request.
        if is_storage_full(exc):
            code, text = 507, "the disk holding the database is full; try again later"
        else:
            code, text = 503, "the database is unavailable; try again shortly"
        logging.getLogger(__name__).warning(
            "%s %s: %d (%s)", request.method, request.path, code, type(exc.orig).__name__
        )
        if request.path.startswith(("/api/", "/dicomweb/", "/metrics", "/healthz")):
            response = jsonify(error=text)
        else:
            response = app.response_class(text + "\n", mimetype="text/plain")
        response.status_code = code
        response.headers["Retry-After"] = "60" if code == 507 else "5"
        return response

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    return app


def settings() -> Settings:
    """The settings of the current app."""
    from flask import current_app

    return current_app.extensions["cxr"]["settings"]  # type: ignore[no-any-return]


def db() -> Session:
    """The request's database session."""
    from flask import current_app

    if "db" not in g:
        g.db = current_app.extensions["cxr"]["factory"]()
    return g.db  # type: ignore[no-any-return]


@login_manager.user_loader
def _load_user(user_id: str) -> Any:
    from dashboard.auth import LoginUser

    user = db().get(User, int(user_id))
    return LoginUser(user) if user is not None and user.active else None
