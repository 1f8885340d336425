"""Every request has an id: sent back, taken from a well-formed X-Request-ID, carried by the
log lines the request causes."""

from __future__ import annotations

import io
import logging
import re

from pipeline.migrate import upgrade
from pipeline.service.logs import CONTEXT, use_format
from tests.web import app_for


def _app(settings):  # type: ignore[no-untyped-def]
    upgrade(settings.db_url)
    app = app_for(settings)

    @app.route("/_context")  # a test-only view: what a log line logged here would carry
    def _context() -> str:
        logging.getLogger("dashboard.test").warning("inside the request")
        return CONTEXT.get()

    return app


def test_a_response_carries_a_new_id_and_a_well_formed_one_is_kept(settings) -> None:  # type: ignore[no-untyped-def]
    client = _app(settings).test_client()
    first, second = client.get("/healthz"), client.get("/healthz")
    ids = [r.headers["X-Request-ID"] for r in (first, second)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    kept = client.get("/healthz", headers={"X-Request-ID": "proxy-7f3a9c01"})
    assert kept.headers["X-Request-ID"] == "proxy-7f3a9c01"
    for bad in ("short", "has space 12345", "x" * 65, 'quote"12345678'):
        made = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert made != bad and re.fullmatch(r"[0-9a-f]{32}", made)


def test_log_lines_of_a_request_carry_its_id_and_none_after(settings) -> None:  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    use_format([handler])
    logger = logging.getLogger("dashboard.test")
    logger.addHandler(handler)
    try:
        client = _app(settings).test_client()
        answer = client.get("/_context", headers={"X-Request-ID": "abc12345-req"})
        assert answer.get_data(as_text=True) == "request abc12345-req"
        assert CONTEXT.get() == "-"  # reset when the request ended
        logger.warning("after the request")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [line.split(" dashboard.test ")[1] for line in lines] == [
        "[request abc12345-req]: inside the request",
        "[-]: after the request",
    ]
