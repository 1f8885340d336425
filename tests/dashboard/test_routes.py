"""Every route in the app's URL map, walked as anonymous, radiologist, admin, feed and monitor.

Nothing here lists the routes by hand except the public ones: a route added without an access
check fails this test. Conventions it enforces:
- HTML pages: anonymous -> 302 to /login; ``/admin...`` pages need ``admin_required`` (403 for a
  radiologist).
- JSON/API (``/api/...``, ``/metrics``, ``/dicomweb/...``) must use ``api_auth_required``:
  anonymous -> 401; a role without the scope -> 403 (radiologists have read and review only;
  ``/api/admin/...`` must ask for the admin scope); feed tokens may only ingest, monitor tokens
  only read metrics.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select
from werkzeug.routing import IntegerConverter, Rule

from dashboard import create_app
from pipeline.models import SCOPES, User
from pipeline.users import create_user, issue_token
from tests.conftest import PASSWORD
from tests.web import csrf_from, login

PUBLIC = {"static", "auth.login", "api.healthz"}
API_PREFIXES = ("/api/", "/metrics", "/dicomweb/")
ADMIN_PREFIXES = ("/admin", "/api/admin/")


def url_for_rule(app: Any, rule: Rule) -> str:
    values = {}
    for name, converter in rule._converters.items():
        values[name] = 1 if isinstance(converter, IntegerConverter) else "1"
    if rule.endpoint == "static":
        values["filename"] = "style.css"
    return app.url_map.bind("localhost").build(rule.endpoint, values)


def routes(app: Any) -> list[tuple[str, str, str, Any]]:
    out = []
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append(
                (rule.endpoint, method, url_for_rule(app, rule), app.view_functions[rule.endpoint])
            )
    return sorted(out, key=lambda r: (r[2] == "/logout", r[2], r[1]))  # logout last


def is_api(url: str) -> bool:
    return url.startswith(API_PREFIXES)


def admin_only(view: Any) -> bool:
    return getattr(view, "required_role", None) == "admin" or getattr(
        view, "required_scope", None
    ) not in (None, *SCOPES["radiologist"])


@pytest.fixture
def app(settings, populated):  # type: ignore[no-untyped-def]
    with populated() as session:
        create_user(session, "boss", PASSWORD, "admin")
        tokens = {
            role: issue_token(session, create_user(session, f"{role}-1", None, role))
            for role in ("feed", "monitor")
        }
        # People may hold tokens too (`cxr-triage users token NAME`); API routes that take a
        # token only (the CSRF-exempt ingest endpoints) are walked with them.
        for name, role in (("rad", "radiologist"), ("boss", "admin")):
            tokens[role] = issue_token(
                session, session.scalars(select(User).where(User.username == name)).one()
            )
        session.commit()
    application = create_app({"CXR_SETTINGS": settings, "TESTING": True})
    application.config["TOKENS"] = tokens
    return application


def call(client: Any, method: str, url: str, headers: dict[str, str] | None = None) -> Any:
    token = csrf_from(client.get("/login").get_data(as_text=True))
    headers = {"X-CSRFToken": token, **(headers or {})}
    if method == "GET":
        return client.get(url, headers=headers)
    return client.open(url, method=method, data={"csrf_token": token}, headers=headers)


def test_the_walk_covers_every_kind_of_route(app) -> None:  # type: ignore[no-untyped-def]
    urls = {url for _, _, url, _ in routes(app)}
    assert {
        "/",
        "/studies/1",
        "/admin",
        "/api/worklist",
        "/api/admin/overview",
        "/metrics",
        "/admin/studies/1/requeue",
        "/admin/audit",
        "/worklist/rows",
    } <= urls


def test_conventions_every_route_declares_its_check(app) -> None:  # type: ignore[no-untyped-def]
    for endpoint, _method, url, view in routes(app):
        if endpoint in PUBLIC:
            continue
        if is_api(url):
            assert getattr(view, "required_scope", None), f"{url}: use @api_auth_required"
        if url.startswith(ADMIN_PREFIXES):
            assert admin_only(view), f"{url}: an admin URL must be admin-only"


def test_anonymous_gets_login_or_401(app) -> None:  # type: ignore[no-untyped-def]
    for endpoint, method, url, _view in routes(app):
        response = call(app.test_client(), method, url)
        if endpoint in PUBLIC:
            # /login answers (a POST without credentials is a failed login, 401).
            assert response.status_code == (200 if method == "GET" else 401), (method, url)
        elif is_api(url):
            assert response.status_code == 401, (method, url, response.status_code)
            assert response.get_json()["error"], (method, url)  # says why, in JSON
        else:
            assert response.status_code == 302, (method, url, response.status_code)
            assert re.match(r"^/login\?next=", response.headers["Location"]), (method, url)


@pytest.mark.parametrize("role", ["radiologist", "admin"])
def test_people_get_what_their_role_allows(app, role) -> None:  # type: ignore[no-untyped-def]
    username = "rad" if role == "radiologist" else "boss"
    bearer = {"Authorization": f"Bearer {app.config['TOKENS'][role]}"}
    for endpoint, method, url, view in routes(app):
        if endpoint in PUBLIC:
            continue
        client = app.test_client()
        assert login(client, username).status_code == 302
        by_session = call(client, method, url)
        by_token = call(app.test_client(), method, url, bearer) if is_api(url) else None
        code = (by_token or by_session).status_code
        if role == "radiologist" and (admin_only(view) or url.startswith(ADMIN_PREFIXES)):
            assert code == 403, (role, method, url, code)
            assert by_session.status_code in (401, 403), (role, method, url)
        else:
            assert code not in (401, 403), (role, method, url, code)
            if endpoint != "auth.logout":  # logging out lands on /login by design
                assert "/login" not in (by_token or by_session).headers.get("Location", ""), url


@pytest.mark.parametrize("role", ["feed", "monitor"])
def test_machine_tokens_reach_only_their_scope(app, role) -> None:  # type: ignore[no-untyped-def]
    bearer = {"Authorization": f"Bearer {app.config['TOKENS'][role]}"}
    for endpoint, method, url, view in routes(app):
        if endpoint in PUBLIC:
            continue
        response = call(app.test_client(), method, url, bearer)
        scope = getattr(view, "required_scope", None)
        if scope is None:  # HTML: a token is not a session
            assert response.status_code == 302, (role, method, url, response.status_code)
        elif scope in SCOPES[role]:
            assert response.status_code not in (401, 403), (role, method, url)
        else:
            assert response.status_code == 403, (role, method, url, response.status_code)


def test_the_walk_catches_a_route_without_a_check(app) -> None:  # type: ignore[no-untyped-def]

    app.add_url_rule("/forgot", "forgot", lambda: "open to all")
    with pytest.raises(AssertionError, match="/forgot"):
        test_anonymous_gets_login_or_401(app)


def test_the_walk_catches_an_admin_page_open_to_radiologists(app) -> None:  # type: ignore[no-untyped-def]
    from flask_login import login_required

    app.add_url_rule("/admin/forgot", "admin_forgot", login_required(lambda: "admins only?"))
    with pytest.raises(AssertionError, match="/admin/forgot"):
        test_conventions_every_route_declares_its_check(app)
    with pytest.raises(AssertionError, match="/admin/forgot"):
        test_people_get_what_their_role_allows(app, "radiologist")
