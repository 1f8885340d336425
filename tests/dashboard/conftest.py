"""Fixtures the dashboard's tests share: an administrator logged in to the test client."""

from __future__ import annotations

import pytest

from dashboard import create_app
from pipeline.users import create_user
from tests.conftest import PASSWORD
from tests.web import login


@pytest.fixture
def admin_client(settings, populated):  # type: ignore[no-untyped-def]
    """A test client logged in as ``boss``, an administrator added to the populated database."""
    with populated() as session:
        create_user(session, "boss", PASSWORD, "admin")
        session.commit()
    client = create_app({"CXR_SETTINGS": settings, "TESTING": True}).test_client()
    assert login(client, "boss").status_code == 302
    return client
