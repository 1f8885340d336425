"""Access: the login rate limit (counted in the database, so every gunicorn worker agrees),
cookie flags, and the headers that keep pages self-contained."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from dashboard import create_app
from dashboard.ratelimit import retry_after_s
from dashboard.security import CSP
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.models import AuditEvent, utcnow
from pipeline.users import create_user
from tests.conftest import PASSWORD
from tests.web import login


def test_five_failed_logins_then_429_with_retry_after(settings, database_url) -> None:  # type: ignore[no-untyped-def]
    upgrade(database_url)
    factory = make_session_factory(make_engine(database_url))
    with factory() as session:
        create_user(session, "rad", PASSWORD, "radiologist")
        create_user(session, "other", PASSWORD, "radiologist")
        session.commit()
    app = create_app({"CXR_SETTINGS": settings.with_(database_url=database_url), "TESTING": True})
    client = app.test_client()
    # A success resets the count: 4 failures, a login, 4 more failures are all let through.
    assert [login(client, "rad", "wrong").status_code for _ in range(4)] == [401] * 4
    assert login(client, "rad").status_code == 302
    client = app.test_client()
    assert [login(client, "rad", "wrong").status_code for _ in range(4)] == [401] * 4
    assert login(client, "rad", "wrong").status_code == 401  # the fifth failure
    blocked = login(client, "rad")  # even the right password now waits
    assert blocked.status_code == 429
    assert 0 < int(blocked.headers["Retry-After"]) <= 300
    assert "Too many failed logins" in blocked.get_data(as_text=True)
    assert client.get("/").status_code == 302  # not logged in
    # Another account from the same address is not blocked.
    assert login(client, "other").status_code == 302
    with factory() as session:
        failures = session.scalar(
            select(func.count(AuditEvent.id)).where(AuditEvent.action == "login_failed")
        )
        assert failures == 9
        now = utcnow()
        assert retry_after_s(session, "rad", "127.0.0.1", now) is not None
        assert retry_after_s(session, "rad", "127.0.0.1", now + timedelta(seconds=301)) is None
        assert retry_after_s(session, "rad", "10.0.0.9", now) is None  # per address


def test_cookie_flags_follow_the_https_setting(settings, populated) -> None:  # type: ignore[no-untyped-def]
    secure = settings.with_(production=True, secret_key="k" * 32)
    for conf, want_secure in ((settings, False), (secure, True)):
        client = create_app({"CXR_SETTINGS": conf}).test_client()
        response = login(client)
        assert response.status_code == 302
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert ("Secure" in cookie) is want_secure


def test_pages_forbid_anything_from_elsewhere(settings, populated) -> None:  # type: ignore[no-untyped-def]
    client = create_app({"CXR_SETTINGS": settings, "TESTING": True}).test_client()
    login(client)
    for path in ("/login", "/", "/studies/1", "/api/worklist", "/healthz"):
        headers = client.get(path).headers
        assert headers["Content-Security-Policy"] == CSP, path
        assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'self'" in CSP and "script-src 'self'" in CSP and "unsafe" not in CSP
    html = client.get("/studies/1").get_data(as_text=True) + client.get("/").get_data(as_text=True)
    assert "<script>" not in html and "style=" not in html  # nothing inline: the CSP allows none
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    assert client.get("/static/app.js").status_code == 200
