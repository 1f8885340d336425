"""Response headers that keep the dashboard self-contained, and request logs without PHI.

The Content-Security-Policy allows scripts, styles, images and requests from this origin only:
hospital networks are often offline, and a page that can load nothing from elsewhere can also
leak nothing to elsewhere. Every asset is vendored in ``dashboard/static``.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, Response

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Study URLs carry search terms (accession numbers, patient ids): never send them on.
    "Referrer-Policy": "no-referrer",
}
_QUERY = re.compile(r"(\"[A-Z]+ [^ ?\"]*)\?[^ \"]*")


class RedactQueryStrings(logging.Filter):
    """Drop query strings from request-log lines: a worklist search may be a patient id."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _QUERY.sub(r"\1?…", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def init_app(app: Flask) -> None:
    """Add the security headers to every response and redact the dev server's request log."""

    @app.after_request
    def _headers(response: Response) -> Response:
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    werkzeug_log = logging.getLogger("werkzeug")
    if not any(isinstance(f, RedactQueryStrings) for f in werkzeug_log.filters):
        werkzeug_log.addFilter(RedactQueryStrings())
