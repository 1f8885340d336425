"""What the prebuilt OHIF app needs changed to run at ``/ohif/`` of this dashboard.

The npm build assumes it is served at ``/``: index.html says ``window.PUBLIC_URL="/"`` and links
``/app.bundle….js``; webpack's runtime in the bundles and workers loads its chunks from
``__webpack_require__.p = "/"``; the stylesheet's font is ``url(/….woff2)``. These are rewritten
as they are served (the unpacked build stays byte for byte what the checksum vouched for). Its
two inline scripts become files of their own, so the page needs no ``'unsafe-inline'``, and its
service-worker bootstrap is left out. ``app_config_js`` is the only app-config.js ever served:
one DICOMweb data source, ours or the site's PACS.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

# (file suffix, text as built for "/", the same for BASE): applied to every served file.
REWRITES: tuple[tuple[str, str, str], ...] = (
    (".js", '__webpack_require__.p = "/";', '__webpack_require__.p = "BASE";'),
    (".js", "browserImportFunction('/", "browserImportFunction('BASE"),
    (".css", "url(/", "url(BASE"),
    (".json", '"/assets/', '"BASEassets/'),
)
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
ROOT_ATTR = re.compile(r'\b(src|href)="/(?!/)')
SERVICE_WORKER = re.compile(r"<script[^>]*init-service-worker\.js[^>]*></script>")
BOOT = "_cxr/inline-{}.js"  # where an inline script of index.html is served from


def etag(data: bytes) -> str:
    """A strong validator for bytes served from memory."""
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True)
class Page:
    """index.html rewritten for a base, and its former inline scripts."""

    html: bytes
    scripts: tuple[bytes, ...]
    etag: str


def rewrite_index(html: str, base: str) -> Page:
    """index.html for an app served at ``base`` (``/ohif/``): its URLs and inline scripts."""
    scripts: list[bytes] = []

    def external(match: re.Match[str]) -> str:
        body = match.group(1).replace(
            'window.PUBLIC_URL="/"', f"window.PUBLIC_URL={json.dumps(base)}"
        )
        scripts.append(body.encode())
        return f'<script src="{base}{BOOT.format(len(scripts) - 1)}"></script>'

    text = SERVICE_WORKER.sub("", html)
    text = ROOT_ATTR.sub(lambda m: f'{m.group(1)}="{base}', text)
    text = INLINE_SCRIPT.sub(external, text)
    data = text.encode()
    return Page(data, tuple(scripts), etag(data))


@lru_cache(maxsize=8)
def index_page(path: str, mtime_ns: int, base: str) -> Page:
    """The rewritten index.html, read once per build and base."""
    return rewrite_index(Path(path).read_text(encoding="utf-8"), base)


def rewrite_asset(name: str, data: bytes, base: str) -> bytes | None:
    """The file as served at ``base``; None when it needs no change."""
    out = data
    for suffix, built, served in REWRITES:
        if name.endswith(suffix) and built.encode() in out:
            out = out.replace(built.encode(), served.replace("BASE", base).encode())
    return None if out is data else out


@lru_cache(maxsize=64)
def gzipped(tag: str, data: bytes) -> tuple[bytes, str]:
    """The gzip of bytes served from memory (a rewritten file) and its ETag, once per ETag."""
    return gzip.compress(data, compresslevel=6, mtime=0), f"{tag}-gz"


@lru_cache(maxsize=512)
def rewritten(path: str, mtime_ns: int, size: int, base: str) -> tuple[bytes, str] | None:
    """A file's rewritten bytes and ETag, computed once per file, build and base."""
    if not path.endswith(tuple({s for s, _, _ in REWRITES})):
        return None
    data = rewrite_asset(path, Path(path).read_bytes(), base)
    return None if data is None else (data, etag(data))


def app_config(dicomweb: str, base: str) -> dict[str, object]:
    """OHIF's window.config: the viewer at ``base``, reading studies from ``dicomweb``."""
    source = {
        "friendlyName": "cxr-triage",
        "name": "cxr-triage",
        # Resolved against the page's origin in app_config_js (a path means this dashboard).
        "qidoRoot": dicomweb,
        "wadoRoot": dicomweb,
        "wadoUriRoot": dicomweb,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "bulkDataURI": {"enabled": True},
        "omitQuotationForMultipartRequest": True,
        # Our QIDO-RS matches exactly (no fuzzy matching, no * or ? wildcards).
        "supportsFuzzyMatching": False,
        "supportsWildcard": False,
        "supportsReject": False,
        "dicomUploadEnabled": False,  # studies arrive by C-STORE, STOW with a feed token, …
        "staticWado": False,
    }
    return {
        "name": "cxr-triage",
        "routerBasename": base.rstrip("/"),
        "extensions": [],
        "modes": [],
        # OHIF's first-run tour (11 steps) covers the viewport: off.
        "customizationService": {"ohif.tours": {"$set": []}},
        "showStudyList": True,
        "investigationalUseDialog": {"option": "never"},  # it would cover the viewport
        "maxNumberOfWebWorkers": 3,  # OHIF reads it unguarded: min(cores - 1, this)
        "showWarningMessageForCrossOrigin": True,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": "dicomweb",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "dicomweb",
                "configuration": source,
            }
        ],
    }


def app_config_js(dicomweb: str, base: str) -> str:
    """app-config.js: the config, with the DICOMweb roots made absolute against the page."""
    config = json.dumps(app_config(dicomweb, base), indent=1, sort_keys=True)
    return (
        "// Made by cxr-triage (dashboard/ohif_app.py); the build's own app-config.js is not used.\n"
        f"window.config = {config};\n"
        "(function (source) {\n"
        "  var root = new URL(source.qidoRoot, window.location.origin).href.replace(/\\/+$/, '');\n"
        "  source.qidoRoot = source.wadoRoot = source.wadoUriRoot = root;\n"
        "})(window.config.dataSources[0].configuration);\n"
    )


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of an absolute URL; None for a path on this server."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


# The viewer's page (found by loading it in Chromium and reading the violation reports):
# scripts from this origin only, no eval. Styles may be inline: the app's components inject
# <style> elements (its toasts, scroll areas, tool menus: each part of the app a few more, so
# hashes would break what no test opened); with every fetch, image and font limited to this
# origin, injected CSS has nowhere to send anything. Images may be data: URLs (it draws some).
PAGE_POLICY: dict[str, tuple[str, ...]] = {
    "default-src": ("'self'",),
    "script-src": ("'self'",),
    "style-src": ("'self'", "'unsafe-inline'"),
    "img-src": ("'self'", "data:"),
    "font-src": ("'self'",),
    "connect-src": ("'self'",),
    "worker-src": ("'self'",),
    "object-src": ("'none'",),
    "base-uri": ("'none'",),
    "form-action": ("'self'",),
    # the study page frames it beside the review panel (viewer.study with view=ohif)
    "frame-ancestors": ("'self'",),
}
# A script response's policy counts only when the script is a worker's (the browser ignores it
# on a script a page loads). The image decoders run in workers as emscripten builds whose glue
# makes functions from strings and compiles WebAssembly: 'unsafe-eval' there, not in the page.
WORKER_SCRIPT = ("'self'", "'unsafe-eval'")


def csp(dicomweb: str, worker: bool = False) -> str:
    """The viewer's Content-Security-Policy: this origin only (and the PACS's, when set)."""
    directives = dict(PAGE_POLICY)
    if worker:
        directives["script-src"] = WORKER_SCRIPT
    pacs = origin_of(dicomweb)
    if pacs:
        directives["connect-src"] = (*directives["connect-src"], pacs)
    return "; ".join(" ".join((name, *sources)) for name, sources in directives.items())
