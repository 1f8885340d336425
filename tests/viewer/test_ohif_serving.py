"""Serving the OHIF build at /ohif/ behind login: rewritten for the base, the app's own routes,
cache headers, mimetypes, gzip, its own Content-Security-Policy.
"""

from __future__ import annotations

import gzip
import re
import time

from dashboard import security
from pipeline.viewer import ohif, static_gzip
from tests.web import app_for, login

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
)


def test_the_viewer_needs_a_session(settings, populated, build) -> None:  # type: ignore[no-untyped-def]
    client = app_for(settings, ohif_dir=str(build)).test_client()
    for path in (
        "/ohif/",
        "/ohif/viewer?StudyInstanceUIDs=1.2.3",
        "/ohif/app-config.js",
        "/ohif/0ddf166f7a343eda.wasm",
        "/ohif/_cxr/inline-0.js",
    ):
        response = client.get(path)
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/login?next=%2Fohif%2F"), path
    assert login(client).status_code == 302
    assert client.get("/ohif/").status_code == 200


def test_index_is_rewritten_for_the_base_without_inline_scripts(viewer) -> None:  # type: ignore[no-untyped-def]
    response = viewer.get("/ohif/")
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == [
        "/ohif/_cxr/inline-0.js",
        "/ohif/manifest.json",
        "/ohif/assets/fav.ico",
        "/ohif/app-config.js",
        "/ohif/_cxr/inline-1.js",
        "/ohif/app.bundle.0123456789abcdef.js",
        "/ohif/app.bundle.css",
    ]
    assert "<script>" not in html and "init-service-worker" not in html
    assert viewer.get("/ohif/_cxr/inline-0.js").get_data() == (
        b'console.time("scriptToView"),window.PUBLIC_URL="/ohif/"'
    )
    boot = viewer.get("/ohif/_cxr/inline-1.js")
    assert boot.mimetype == "text/javascript"
    assert (
        boot.get_data()
        == b'function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/ohif/"'
    )
    assert viewer.get("/ohif/_cxr/inline-2.js").status_code == 404
    assert response.headers["Content-Security-Policy"] == PAGE_CSP
    assert response.headers["Cache-Control"] == "private, no-cache"
    again = viewer.get("/ohif/", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304


def test_the_apps_own_routes_get_index_and_missing_files_404(viewer) -> None:  # type: ignore[no-untyped-def]
    index = viewer.get("/ohif/").get_data()
    for route in (
        "/ohif/viewer?StudyInstanceUIDs=1.2.840.1",
        "/ohif/viewer/dicomweb",
        "/ohif/index.html",
        "/ohif/segmentation",
    ):
        response = viewer.get(route)
        assert (response.status_code, response.get_data()) == (200, index), route
    for missing in (
        "/ohif/nothere.js",
        "/ohif/assets/none.png",
        f"/ohif/{ohif.STAMP}",
        "/ohif/..%2Fsecret.txt",
        "/ohif/assets/..%2F..%2Fsecret.txt",
    ):
        response = viewer.get(missing)
        assert response.status_code == 404, missing
        assert b"outside the build" not in response.get_data()


def test_assets_are_rewritten_typed_and_cached(viewer, build) -> None:  # type: ignore[no-untyped-def]
    bundle = viewer.get("/ohif/app.bundle.0123456789abcdef.js")
    assert bundle.get_data() == (
        b'(() => {\n__webpack_require__.p = "/ohif/";\n})();\n'
        b"window.browserImportFunction('/ohif/dicom-microscopy-viewer/v.min.js');"
    )
    assert bundle.mimetype == "text/javascript"
    assert bundle.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    assert (
        viewer.get(
            "/ohif/app.bundle.0123456789abcdef.js",
            headers={"If-None-Match": bundle.headers["ETag"]},
        ).status_code
        == 304
    )
    css = viewer.get("/ohif/app.bundle.css")
    assert css.get_data() == b"@font-face{src:url(/ohif/a34f9d1faa5f3315.woff2) format('woff2')}"
    assert (css.mimetype, css.headers["Cache-Control"]) == ("text/css", "private, no-cache")
    wasm = viewer.get("/ohif/0ddf166f7a343eda.wasm")
    assert (wasm.mimetype, wasm.get_data()) == ("application/wasm", b"\0asm\1\0\0\0")
    assert wasm.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    font = viewer.get("/ohif/a34f9d1faa5f3315.woff2")
    assert (font.mimetype, font.headers["Cache-Control"]) == (
        "font/woff2",
        "private, max-age=31536000, immutable",
    )
    assert viewer.get("/ohif/manifest.json").get_json() == {
        "icons": [{"src": "/ohif/assets/android-chrome-36x36.png"}]
    }
    plain = viewer.get("/ohif/es6-shim.min.js")
    assert (
        plain.get_data() == (build / "es6-shim.min.js").read_bytes()
        and plain.mimetype == "text/javascript"
    )
    assert (
        viewer.get(
            "/ohif/es6-shim.min.js", headers={"If-None-Match": plain.headers["ETag"]}
        ).status_code
        == 304
    )


def test_a_browser_that_accepts_gzip_gets_the_precompressed_build(viewer, build) -> None:  # type: ignore[no-untyped-def]
    script = b"function f(){return 'the same line again';}\n" * 200
    (build / "big.bundle.0123456789abcdef.js").write_bytes(script)
    (build / "big.png").write_bytes(b"\x89PNG" + b"\0" * 4096)
    rewritten = b'__webpack_require__.p = "/";\n' + script
    (build / "app.bundle.fedcba9876543210.js").write_bytes(rewritten)
    assert static_gzip.precompress(build).files == 2
    url, gzip_ok = "/ohif/big.bundle.0123456789abcdef.js", {"Accept-Encoding": "gzip, deflate"}
    packed = viewer.get(url, headers=gzip_ok)
    assert packed.headers["Content-Encoding"] == "gzip" and packed.mimetype == "text/javascript"
    assert "Accept-Encoding" in packed.headers["Vary"]
    assert gzip.decompress(packed.get_data()) == script and len(packed.get_data()) < 1000
    assert packed.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    plain = viewer.get(url)  # no Accept-Encoding: the file as it is
    assert plain.get_data() == script and "Content-Encoding" not in plain.headers
    assert "Accept-Encoding" in plain.headers["Vary"]
    assert plain.headers["ETag"] != packed.headers["ETag"]
    refused = viewer.get(url, headers={"Accept-Encoding": "gzip;q=0, br"})
    assert refused.get_data() == script and "Content-Encoding" not in refused.headers
    again = viewer.get(url, headers={**gzip_ok, "If-None-Match": packed.headers["ETag"]})
    assert again.status_code == 304
    # a file rewritten for the base is gzipped in memory, with its own ETag
    base = viewer.get("/ohif/app.bundle.fedcba9876543210.js", headers=gzip_ok)
    assert base.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(base.get_data()) == rewritten.replace(b'= "/"', b'= "/ohif/"')
    same = viewer.get(
        "/ohif/app.bundle.fedcba9876543210.js",
        headers={**gzip_ok, "If-None-Match": base.headers["ETag"]},
    )
    assert same.status_code == 304
    # a file changed after its sibling was written is sent as it is now, not the stale sibling
    time.sleep(0.01)
    (build / "big.bundle.0123456789abcdef.js").write_bytes(script + b"//changed\n")
    fresh = viewer.get(url, headers=gzip_ok)
    assert fresh.get_data() == script + b"//changed\n" and "Content-Encoding" not in fresh.headers
    image = viewer.get("/ohif/big.png", headers=gzip_ok)  # not compressible: never encoded
    assert "Content-Encoding" not in image.headers
    assert "Accept-Encoding" not in image.headers.get("Vary", "")


def test_scripts_carry_the_worker_policy_pages_the_strict_one(viewer) -> None:  # type: ignore[no-untyped-def]
    worker = PAGE_CSP.replace("script-src 'self';", "script-src 'self' 'unsafe-eval';")
    for script in ("/ohif/app.bundle.0123456789abcdef.js", "/ohif/es6-shim.min.js"):
        assert viewer.get(script).headers["Content-Security-Policy"] == worker, script
    assert viewer.get("/ohif/app.bundle.css").headers["Content-Security-Policy"] == PAGE_CSP
    assert viewer.get("/ohif/viewer").headers["Content-Security-Policy"] == PAGE_CSP
    # The rest of the dashboard keeps its own policy.
    assert viewer.get("/").headers["Content-Security-Policy"] == security.CSP
    assert "'unsafe-inline'" not in security.CSP and "'unsafe-eval'" not in security.CSP
