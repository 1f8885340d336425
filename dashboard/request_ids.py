"""Every request gets an id: taken from a well-formed ``X-Request-ID`` (a proxy's), else made
here; it is sent back in the response's ``X-Request-ID``, written in the access log, and
carried by every log line the request causes (``[request <id>]``, ``pipeline.service.logs``)."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Flask, g, request

from pipeline.service.logs import CONTEXT, configure

HEADER = "X-Request-ID"
WELL_FORMED = re.compile(r"^[A-Za-z0-9._-]{8,64}$")  # no spaces, quotes or control characters


def request_id() -> str:
    """The current request's id."""
    return str(g.request_id)


def init_app(app: Flask) -> None:
    if not logging.getLogger().handlers:  # under gunicorn: no one configured the root logger
        configure()

    @app.before_request
    def _take_id() -> None:
        given = request.headers.get(HEADER, "")
        g.request_id = given if WELL_FORMED.match(given) else uuid.uuid4().hex
        g.log_token = CONTEXT.set(f"request {g.request_id}")

    @app.after_request
    def _send_id(response: Any) -> Any:
        if "request_id" in g:
            response.headers[HEADER] = g.request_id
        return response

    @app.teardown_request
    def _forget_id(_exc: BaseException | None) -> None:
        token = g.pop("log_token", None)
        if token is not None:
            CONTEXT.reset(token)
