"""The OHIF viewer at ``/ohif/``, behind login, from the build ``cxr-triage ohif install`` made.

Every path under ``/ohif/`` needs a logged-in session (a logged-out browser is sent to the login
page, which brings it back). A file of the build is served as it is or as rewritten for this
base (dashboard.ohif_app); ``app-config.js`` is ours; any other path without a file extension is
one of the app's own routes (``/ohif/viewer?StudyInstanceUIDs=…``, the study list) and gets
index.html. Hashed bundles are cached for a year, everything else revalidated. A browser that
accepts gzip gets the build's precompressed ``.gz`` sibling (pipeline.viewer.static_gzip), or a
rewritten file gzipped once in memory; every compressible file varies on Accept-Encoding. Responses carry
the viewer's own Content-Security-Policy, the rest of the dashboard keeps its strict one. With
no build installed, every ``/ohif/`` path answers a page that says how to install it.
"""

from __future__ import annotations

import mimetypes
import os
import re
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    g,
    render_template,
    request,
    send_file,
    url_for,
)
from flask_login import login_required
from werkzeug.security import safe_join

from dashboard import ohif_app, settings
from pipeline.viewer import ohif, static_gzip

bp = Blueprint("ohif", __name__, url_prefix="/ohif")
IMMUTABLE = "private, max-age=31536000, immutable"
REVALIDATE = "private, no-cache"
# Names webpack gave a content hash: a new build gives new names, so they never change.
HASHED = re.compile(r"(?:^|/)(?:[\w-]+\.bundle\.[0-9a-f]{16}\.js|[0-9a-f]{16}\.(?:wasm|woff2))$")
TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".map": "application/json",
    ".woff2": "font/woff2",
    ".svg": "image/svg+xml",
    ".html": "text/html",
    ".ico": "image/x-icon",
    ".webapp": "application/json",
}


def _base() -> str:
    return url_for("ohif.serve", path="")


def _mimetype(name: str) -> str:
    suffix = os.path.splitext(name)[1].lower()
    return TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def _viewer(response: Response, cache: str = REVALIDATE) -> Response:
    worker = response.mimetype == "text/javascript"  # in case the script is a worker's
    policy = ohif_app.csp(ohif.dicomweb_root(settings()), worker=worker)
    response.headers["Content-Security-Policy"] = policy
    response.headers["X-Frame-Options"] = "SAMEORIGIN"  # framed by the study page only
    response.headers["Cache-Control"] = cache
    return response


def _accepts_gzip() -> bool:
    return request.accept_encodings.quality("gzip") > 0


def _encoded(response: Response, gzip: bool, varies: bool) -> Response:
    if gzip:
        response.headers["Content-Encoding"] = "gzip"
    if varies:
        response.vary.add("Accept-Encoding")
    return response


def _bytes(data: bytes, name: str, etag: str, cache: str = REVALIDATE) -> Response:
    response = Response(data, mimetype=_mimetype(name))
    response.set_etag(etag)
    response.make_conditional(request)  # in place
    return _viewer(response, cache)


def _page(root: str) -> ohif_app.Page:
    path = os.path.join(root, "index.html")
    return ohif_app.index_page(path, os.stat(path).st_mtime_ns, _base())


def _file(path: str, name: str) -> Response:
    """A file of the build: gzip-encoded for a browser that accepts it, where that pays."""
    stat = os.stat(path)
    cache = IMMUTABLE if HASHED.search(name) else REVALIDATE
    varies = static_gzip.compressible(Path(path))
    gzip = varies and _accepts_gzip()
    changed = ohif_app.rewritten(path, stat.st_mtime_ns, stat.st_size, _base())
    if changed is not None:
        data, tag = ohif_app.gzipped(changed[1], changed[0]) if gzip else changed
        return _encoded(_bytes(data, name, tag, cache), gzip, varies)
    packed = static_gzip.fresh_sibling(Path(path)) if gzip else None
    response = send_file(packed or path, mimetype=_mimetype(name), conditional=True, etag=True)
    return _encoded(_viewer(response, cache), packed is not None, varies)


@bp.route("/", defaults={"path": ""})
@bp.route("/<path:path>")
@login_required
def serve(path: str) -> Any:
    root = ohif.viewer_dir(settings())
    if not ohif.installed(root):
        return render_template("ohif_missing.html", root=root, version=ohif.VERSION), 404
    if path == "app-config.js":
        js = ohif_app.app_config_js(ohif.dicomweb_root(settings()), _base())
        return _bytes(js.encode(), path, ohif_app.etag(js.encode()))
    parts = path.split("/")
    if any(p.startswith(".") for p in parts if p):
        abort(404)  # the install stamp, and anything else hidden
    page = _page(str(root))
    for i, script in enumerate(page.scripts):
        if path == ohif_app.BOOT.format(i):
            return _bytes(script, path, ohif_app.etag(script))
    found = safe_join(str(root), path) if path not in ("", "index.html") else None
    if found is not None and os.path.isfile(found):
        return _file(found, path)
    if path in ("", "index.html") or "." not in parts[-1]:
        # index.html, or a route of the app itself: the app reads the URL and renders it
        return _bytes(page.html, "index.html", page.etag)
    abort(404)


def available() -> bool:
    """Whether the viewer is installed (looked up once per request)."""
    if "ohif_available" not in g:
        g.ohif_available = ohif.installed(ohif.viewer_dir(settings()))
    return bool(g.ohif_available)


def study_url(study_uid: str | None) -> str | None:
    """Where the viewer opens this study; None without a study UID or an installed viewer."""
    if not study_uid or not available():
        return None
    return url_for("ohif.serve", path="viewer", StudyInstanceUIDs=study_uid)


def init_app(app: Flask) -> None:
    """Register the viewer; templates get ``viewer_available()`` and ``viewer_url(uid)``."""
    ohif.dicomweb_root(app.extensions["cxr"]["settings"])  # a bad URL fails at start
    app.register_blueprint(bp)
    app.jinja_env.globals.update(viewer_available=available, viewer_url=study_url)
