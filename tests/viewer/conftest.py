"""Fixtures the viewer's tests share: a small build shaped like OHIF's, clients with, without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.viewer import ohif
from tests.web import app_for, login

INDEX = (
    '<!doctype html><html><head><script>console.time("scriptToView"),window.PUBLIC_URL="/"'
    '</script><link rel="manifest" href="/manifest.json"><link rel="icon" href="/assets/fav.ico">'
    '<script rel="preload" as="script" src="/app-config.js"></script>'
    '<script rel="preload" as="script" type="module" src="/init-service-worker.js"></script>'
    '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
    '<script defer src="/app.bundle.0123456789abcdef.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div></body></html>'
)
BUILD = {
    "index.html": INDEX.encode(),
    "app-config.js": b"window.config = {name: 'config/default.js'};",
    "app.bundle.0123456789abcdef.js": b'(() => {\n__webpack_require__.p = "/";\n})();\n'
    b"window.browserImportFunction('/dicom-microscopy-viewer/v.min.js');",
    "app.bundle.css": b"@font-face{src:url(/a34f9d1faa5f3315.woff2) format('woff2')}",
    "a34f9d1faa5f3315.woff2": b"wOF2",
    "0ddf166f7a343eda.wasm": b"\0asm\1\0\0\0",
    "manifest.json": b'{"icons": [{"src": "/assets/android-chrome-36x36.png"}]}',
    "es6-shim.min.js": b"/* no public path here */",
    "assets/fav.ico": b"\0\0\1\0",
}


@pytest.fixture
def build(tmp_path: Path) -> Path:
    """A few files shaped like the npm build's, stamped as the pinned version."""
    root = tmp_path / "ohif-build"
    for name, data in BUILD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    stamp = {"version": ohif.VERSION, "integrity": ohif.INTEGRITY}
    (root / ohif.STAMP).write_text(json.dumps(stamp))
    (tmp_path / "secret.txt").write_text("outside the build")
    return root


@pytest.fixture
def viewer(settings, populated, build):  # type: ignore[no-untyped-def]
    client = app_for(settings, ohif_dir=str(build)).test_client()
    assert login(client).status_code == 302
    return client


@pytest.fixture
def client_without_build(settings, populated):  # type: ignore[no-untyped-def]
    client = app_for(settings).test_client()  # the data dir has no ohif/ folder
    login(client)
    return client
