"""The dashboard as tests reach it: the app on changed settings, a form's CSRF token, a login."""

from __future__ import annotations

import re
from typing import Any

from tests.conftest import PASSWORD


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the form"
    return match.group(1)


def login(client, username="rad", password=PASSWORD):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}
    )


def app_for(settings: Any, **changes: Any) -> Any:
    """The dashboard in testing mode, on ``settings`` with ``changes`` applied."""
    from dashboard import create_app

    return create_app({"CXR_SETTINGS": settings.with_(**changes), "TESTING": True})
