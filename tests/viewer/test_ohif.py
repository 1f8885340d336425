"""The OHIF viewer: installing the pinned build (checksum, stamp, dist only, no escaping tar
member), serving it at /ohif/ behind login (rewritten for the base, the app's own routes, our
app-config.js, cache headers, mimetypes, gzip, its own Content-Security-Policy), the page shown
without it, the links to it, and the real build in headless Chromium.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from werkzeug.serving import make_server

from dashboard import create_app, security
from pipeline.cli.main import main as cli_main
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import ingest_paths
from pipeline.migrate import upgrade
from pipeline.models import Study
from pipeline.settings import ConfigError
from pipeline.users import create_user
from pipeline.viewer import ohif, static_gzip
from tests.conftest import PASSWORD, REPO, chest_like, dicom_bytes
from tests.dashboard.test_dashboard import login

# --------------------------------------------------------------------------- install

FILES = {
    "package/package.json": b'{"name": "@ohif/app"}',
    "package/LICENSE": b"MIT",
    "package/dist/index.html": b"<!doctype html><title>OHIF</title>",
    "package/dist/app.bundle.0123456789abcdef.js": b'__webpack_require__.p = "/";',
    "package/dist/sub/0123456789abcdef.wasm": b"\0asm\1\0\0\0",
}


def tarball(path: Path, files: dict[str, bytes] = FILES, extra: list[tarfile.TarInfo] = ()) -> Path:  # type: ignore[assignment]
    """A small .tgz shaped like an npm package; ``extra`` members are added with no data."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


def test_install_unpacks_dist_only_and_stamps_version_and_integrity(tmp_path: Path) -> None:
    tgz = tarball(tmp_path / "app.tgz")
    integrity = ohif.sri(tgz)
    target = tmp_path / "viewer" / ohif.VERSION
    done = ohif.install(target, tarball=tgz, integrity=integrity)
    assert (done.changed, done.files, done.path) == (True, 3, target)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == [
        ohif.STAMP,
        "app.bundle.0123456789abcdef.js",
        "index.html",
        "sub/0123456789abcdef.wasm",
    ]
    assert (target / "sub/0123456789abcdef.wasm").read_bytes() == b"\0asm\1\0\0\0"
    assert ohif.read_stamp(target) == {
        "package": "@ohif/app",
        "version": ohif.VERSION,
        "integrity": integrity,
        "files": 3,
        "gzip": 0,
    }
    assert ohif.installed(target, integrity) and not ohif.installed(target)  # not the pinned one
    assert tgz.exists()  # the operator's file is left where it was
    assert [p.name for p in target.parent.iterdir()] == [ohif.VERSION]  # no scratch left


def test_a_second_install_does_nothing(tmp_path: Path) -> None:
    tgz = tarball(tmp_path / "app.tgz")
    integrity, target = ohif.sri(tgz), tmp_path / "viewer"
    ohif.install(target, tarball=tgz, integrity=integrity)
    before = (target / "index.html").stat().st_mtime_ns

    def no_download(folder: Path) -> Path:
        raise AssertionError("an installed viewer must not be downloaded again")

    again = ohif.install(target, fetcher=no_download, integrity=integrity)
    assert (again.changed, again.files) == (False, 3)
    assert (target / "index.html").stat().st_mtime_ns == before


def test_install_precompresses_what_pays_and_an_older_install_gets_it(tmp_path: Path) -> None:
    script = b"function f(){return 'the same line again';}\n" * 200  # 9 KB, compresses well
    files = {
        **FILES,
        "package/dist/big.bundle.0123456789abcdef.js": script,
        "package/dist/noise.js": bytes(random.Random(1).randbytes(4096)),
        "package/dist/a.png": b"\x89PNG" + b"\0" * 4096,
    }
    tgz = tarball(tmp_path / "app.tgz", files)
    integrity, target = ohif.sri(tgz), tmp_path / "viewer"
    done = ohif.install(target, tarball=tgz, integrity=integrity)
    gz = target / "big.bundle.0123456789abcdef.js.gz"
    assert done.gzipped == 1 and gzip.decompress(gz.read_bytes()) == script
    assert len(gz.read_bytes()) < len(script) // 10
    assert not (target / "noise.js.gz").exists()  # random bytes: gzip does not pay
    assert not (target / "a.png.gz").exists() and not (target / "index.html.gz").exists()  # tiny
    assert not list(target.glob(".*.tmp"))
    # an install stamped before precompression gets its siblings on the next install
    gz.unlink()
    stamp = ohif.read_stamp(target) or {}
    del stamp["gzip"]
    (target / ohif.STAMP).write_text(json.dumps(stamp))
    again = ohif.install(target, tarball=tgz, integrity=integrity)
    assert (again.changed, again.gzipped) == (False, 1) and gz.is_file()
    assert (ohif.read_stamp(target) or {})["gzip"] == 1


def test_a_download_that_is_not_the_pinned_one_is_refused_and_deleted(tmp_path: Path) -> None:
    fetched: list[Path] = []

    def tampered(folder: Path) -> Path:
        fetched.append(tarball(folder / "app-3.13.2.tgz"))
        return fetched[0]

    target = tmp_path / "viewer"
    with pytest.raises(ohif.IntegrityMismatch, match="not the pinned") as refused:
        ohif.install(target, fetcher=tampered)
    assert ohif.INTEGRITY[:30] in str(refused.value)
    assert fetched and not fetched[0].exists()
    assert list(tmp_path.iterdir()) == []  # no target, no scratch folder: nothing installed


def test_an_operator_tarball_with_the_wrong_checksum_is_refused_but_kept(tmp_path: Path) -> None:
    tgz = tarball(tmp_path / "app.tgz")
    with pytest.raises(ohif.IntegrityMismatch):
        ohif.install(tmp_path / "viewer", tarball=tgz)
    assert tgz.exists() and not (tmp_path / "viewer").exists()


@pytest.mark.parametrize(
    "hostile",
    [
        member("package/dist/../../escaped.txt"),
        member("/tmp/escaped.txt"),
        member("package/dist/assets/../../../escaped.txt"),
        member("package/dist/link", tarfile.SYMTYPE, "/etc/passwd"),
        member("package/dist/hard", tarfile.LNKTYPE, "package/dist/index.html"),
        member("package/dist/fifo", tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "absolute", "dotdot-deep", "symlink", "hardlink", "fifo"],
)
def test_a_member_escaping_the_folder_refuses_the_whole_archive(
    tmp_path: Path, hostile: tarfile.TarInfo
) -> None:
    tgz = tarball(tmp_path / "evil.tgz", extra=[hostile])
    target = tmp_path / "a" / "b" / "viewer"
    with pytest.raises(ohif.UnsafeArchive, match="refused the archive"):
        ohif.install(target, tarball=tgz, integrity=ohif.sri(tgz))
    assert not target.exists()
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/escaped.txt").exists()
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == []  # scratch removed


def test_an_install_replaces_an_older_build_but_never_a_foreign_folder(tmp_path: Path) -> None:
    tgz = tarball(tmp_path / "app.tgz")
    older = tmp_path / "older"
    older.mkdir()
    (older / ohif.STAMP).write_text(json.dumps({"version": "3.0.0", "integrity": "sha512-x"}))
    (older / "stale.js").write_text("old")
    ohif.install(older, tarball=tgz, integrity=ohif.sri(tgz))
    assert not (older / "stale.js").exists() and (older / "index.html").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's")
    with pytest.raises(ohif.OhifError, match="not a viewer installed by cxr-triage"):
        ohif.install(foreign, tarball=tgz, integrity=ohif.sri(tgz))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_a_tarball_without_dist_index_is_not_an_ohif_build(tmp_path: Path) -> None:
    tgz = tarball(tmp_path / "other.tgz", {"package/dist/x.js": b"1", "package/index.html": b"2"})
    with pytest.raises(ohif.OhifError, match="no package/dist/index.html"):
        ohif.install(tmp_path / "viewer", tarball=tgz, integrity=ohif.sri(tgz))


def test_fetch_without_npm_uses_the_registry_npm_would(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    asked: list[str] = []

    def urlopen(url: str):  # type: ignore[no-untyped-def]
        asked.append(url)
        return io.BytesIO(b"tarball bytes")

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(ohif, "_urlopen", urlopen)
    monkeypatch.setenv("npm_config_registry", "https://npm.hospital.example/repo/")
    got = ohif.fetch(tmp_path)
    assert asked == ["https://npm.hospital.example/repo/@ohif/app/-/app-3.13.2.tgz"]
    assert got.read_bytes() == b"tarball bytes"

    def unreachable(url: str):  # type: ignore[no-untyped-def]
        raise OSError("[Errno 111] Connection refused")

    monkeypatch.setattr(ohif, "_urlopen", unreachable)
    with pytest.raises(ohif.DownloadFailed, match="Connection refused"):
        ohif.fetch(tmp_path / "again")


def _cli(args: list[str], capsys) -> tuple[int, list[str], str]:  # type: ignore[no-untyped-def]
    code = cli_main(args)
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def test_the_command_prints_one_json_line_and_says_why(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "viewer"
    monkeypatch.setenv("CXR_OHIF_DIR", str(target))
    tgz = tarball(tmp_path / "app.tgz")

    code, lines, _ = _cli(["ohif", "install", "--tarball", str(tgz), "--json"], capsys)
    assert code == 1 and len(lines) == 1
    doc = json.loads(lines[0])
    assert (doc["ok"], doc["reason"], doc["path"]) == (False, "integrity", str(target))

    def down(folder: Path) -> Path:
        raise ohif.DownloadFailed("could not download …: Connection refused")

    monkeypatch.setattr(ohif, "fetch", down)
    code, lines, err = _cli(["ohif", "install"], capsys)
    assert code == 3 and "works without it" in err and lines == []
    code, lines, _ = _cli(["ohif", "install", "--json"], capsys)
    assert code == 3 and json.loads(lines[0])["reason"] == "download"

    monkeypatch.setattr(ohif, "INTEGRITY", ohif.sri(tgz))  # as if this were the pinned build
    code, lines, _ = _cli(["ohif", "install", "--tarball", str(tgz), "--json"], capsys)
    assert code == 0 and len(lines) == 1
    assert json.loads(lines[0])["changed"] is True and json.loads(lines[0])["files"] == 3
    code, lines, _ = _cli(["ohif", "install", "--json"], capsys)  # fetch would fail: not called
    assert code == 0 and json.loads(lines[0])["changed"] is False
    code, lines, _ = _cli(["ohif", "status", "--json"], capsys)
    assert code == 0 and json.loads(lines[0])["installed"] is True


def test_the_viewer_dir_follows_the_data_dir_unless_set(settings) -> None:  # type: ignore[no-untyped-def]
    assert ohif.viewer_dir(settings) == settings.data_dir / "ohif" / ohif.VERSION
    assert ohif.viewer_dir(settings.with_(ohif_dir="/srv/ohif")) == Path("/srv/ohif")
    assert ohif.dicomweb_root(settings) == "/dicomweb"
    pacs = settings.with_(viewer_dicomweb_url="https://pacs.example.org/dicom-web/")
    assert ohif.dicomweb_root(pacs) == "https://pacs.example.org/dicom-web"
    for bad in ("ftp://pacs/x", "pacs.example.org/dicom-web", "javascript:alert(1)"):
        with pytest.raises(ConfigError, match="CXR_VIEWER_DICOMWEB_URL"):
            ohif.dicomweb_root(settings.with_(viewer_dicomweb_url=bad))


# --------------------------------------------------------------------------- serving

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
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
)


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


def _app(settings, **changes):  # type: ignore[no-untyped-def]
    return create_app({"CXR_SETTINGS": settings.with_(**changes), "TESTING": True})


@pytest.fixture
def viewer(settings, populated, build):  # type: ignore[no-untyped-def]
    client = _app(settings, ohif_dir=str(build)).test_client()
    assert login(client).status_code == 302
    return client


def test_the_viewer_needs_a_session(settings, populated, build) -> None:  # type: ignore[no-untyped-def]
    client = _app(settings, ohif_dir=str(build)).test_client()
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
    assert plain.get_data() == BUILD["es6-shim.min.js"] and plain.mimetype == "text/javascript"
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


def _config(js: str) -> dict:
    match = re.search(r"^window\.config = (\{.*?\n\});$", js, re.S | re.M)
    assert match, js
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def test_our_app_config_reads_this_dashboards_dicomweb(viewer) -> None:  # type: ignore[no-untyped-def]
    response = viewer.get("/ohif/app-config.js")
    js = response.get_data(as_text=True)
    assert response.mimetype == "text/javascript" and "config/default.js" not in js
    config = _config(js)
    assert (config["routerBasename"], config["showStudyList"]) == ("/ohif", True)
    assert config["investigationalUseDialog"] == {"option": "never"}
    assert config["defaultDataSourceName"] == "dicomweb" and len(config["dataSources"]) == 1
    source = config["dataSources"][0]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    c = source["configuration"]
    assert (c["qidoRoot"], c["wadoRoot"], c["wadoUriRoot"]) == ("/dicomweb",) * 3
    assert (c["imageRendering"], c["thumbnailRendering"]) == ("wadors", "wadors")
    assert c["bulkDataURI"] == {"enabled": True} and c["omitQuotationForMultipartRequest"] is True
    assert (c["supportsFuzzyMatching"], c["supportsWildcard"], c["dicomUploadEnabled"]) == (
        False,
        False,
        False,
    )
    assert not re.search(r"https?://", js)  # nothing from elsewhere: no CDN, no analytics


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_the_app_config_makes_the_roots_absolute_against_the_page(viewer) -> None:  # type: ignore[no-untyped-def]
    js = viewer.get("/ohif/app-config.js").get_data(as_text=True)
    probe = (
        "globalThis.window = {location: {origin: 'http://pacs-less.example:8000'}};\n"
        + js
        + "\nconsole.log(JSON.stringify(window.config.dataSources[0].configuration));"
    )
    out = subprocess.run(["node", "-e", probe], capture_output=True, text=True, timeout=30)
    c = json.loads(out.stdout)
    assert c["qidoRoot"] == c["wadoRoot"] == "http://pacs-less.example:8000/dicomweb"


def test_a_sites_pacs_as_the_data_source(settings, populated, build) -> None:  # type: ignore[no-untyped-def]
    client = _app(
        settings,
        ohif_dir=str(build),
        viewer_dicomweb_url="https://pacs.example.org:8443/dicom-web/",
    ).test_client()
    login(client)
    c = _config(client.get("/ohif/app-config.js").get_data(as_text=True))["dataSources"][0]
    assert c["configuration"]["qidoRoot"] == "https://pacs.example.org:8443/dicom-web"
    policy = client.get("/ohif/").headers["Content-Security-Policy"]
    assert "connect-src 'self' https://pacs.example.org:8443;" in policy
    assert policy.count("pacs.example.org") == 1  # its origin may be fetched from, nothing else
    with pytest.raises(ConfigError):
        _app(settings, viewer_dicomweb_url="ftp://pacs.example.org/")


def test_without_a_build_the_viewer_says_how_to_install_it(client_without_build) -> None:  # type: ignore[no-untyped-def]
    for path in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/app.bundle.css"):
        response = client_without_build.get(path)
        html = response.get_data(as_text=True)
        assert response.status_code == 404, path
        assert "cxr-triage ohif install" in html and "make install" in html
        assert f"@ohif/app</code> {ohif.VERSION}" in html
        assert response.headers["Content-Security-Policy"] == security.CSP


@pytest.fixture
def client_without_build(settings, populated):  # type: ignore[no-untyped-def]
    client = _app(settings).test_client()  # the data dir has no ohif/ folder
    login(client)
    return client


def _dicom_study(populated) -> Study:  # type: ignore[no-untyped-def]
    with populated() as session:
        return session.scalars(select(Study).where(Study.study_uid.is_not(None))).one()


def test_links_to_the_viewer_only_with_a_build_and_a_study_uid(
    viewer, client_without_build, populated
) -> None:  # type: ignore[no-untyped-def]
    dicom = _dicom_study(populated)
    reading = f'href="/studies/{dicom.id}?view=ohif"'
    page = viewer.get(f"/studies/{dicom.id}").get_data(as_text=True)
    assert f'<a id="open-in-viewer" {reading}>' in page and "<kbd>v</kbd>" in page
    rows = viewer.get("/worklist/rows").get_data(as_text=True)
    assert rows.count("Open in viewer") == 1 and reading in rows  # the JPEG/PNG ones have no UID
    assert "<th>Viewer</th>" in viewer.get("/").get_data(as_text=True)
    with populated() as session:
        jpeg = session.scalars(select(Study).where(Study.study_uid.is_(None))).first()
    assert "open-in-viewer" not in viewer.get(f"/studies/{jpeg.id}").get_data(as_text=True)
    # no UID: view=ohif falls back to the preview page
    assert 'id="ohif-frame"' not in viewer.get(f"/studies/{jpeg.id}?view=ohif").get_data(
        as_text=True
    )

    plain = client_without_build.get(f"/studies/{dicom.id}").get_data(as_text=True)
    assert "open-in-viewer" not in plain and 'id="radiograph"' in plain  # the preview stays
    assert "<code>cxr-triage ohif install</code>" in plain  # and how to get the viewer
    assert 'id="viewer-missing"' not in page
    assert 'id="ohif-frame"' not in client_without_build.get(
        f"/studies/{dicom.id}?view=ohif"
    ).get_data(as_text=True)
    assert "Open in viewer" not in client_without_build.get("/worklist/rows").get_data(as_text=True)
    assert "<th>Viewer</th>" not in client_without_build.get("/").get_data(as_text=True)


def test_the_viewer_beside_the_review_panel(viewer, populated) -> None:  # type: ignore[no-untyped-def]
    dicom = _dicom_study(populated)
    page = viewer.get(f"/studies/{dicom.id}?view=ohif").get_data(as_text=True)
    src = f"/ohif/viewer?StudyInstanceUIDs={dicom.study_uid}"
    assert f'<iframe id="ohif-frame" src="{src}"' in page
    assert 'id="review-form"' in page and 'id="radiograph"' not in page
    assert f'action="/studies/{dicom.id}/review?view=ohif"' in page  # comes back to this view
    assert f'<a id="open-in-viewer" href="/studies/{dicom.id}">' in page  # v: the preview
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    done = viewer.post(
        f"/studies/{dicom.id}/review?view=ohif", data={"action": "read", "csrf_token": token}
    )
    assert done.status_code == 302 and done.headers["Location"] == f"/studies/{dicom.id}?view=ohif"
    framed = viewer.get(src)
    assert framed.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert "frame-ancestors 'self'" in framed.headers["Content-Security-Policy"]
    # the rest of the dashboard may be framed by nobody
    plain = viewer.get(f"/studies/{dicom.id}")
    assert plain.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in plain.headers["Content-Security-Policy"]


# --------------------------------------------------------------------------- the real build

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Where `make install` put it: CXR_OHIF_DIR, else the data dir's (./var by default).
_DATA_DIR = Path(os.environ.get("CXR_DATA_DIR") or REPO / "var")
REAL_BUILD = Path(os.environ.get("CXR_OHIF_DIR") or _DATA_DIR / "ohif" / ohif.VERSION)
# Headless Chromium has no GPU: ANGLE on SwiftShader gives WebGL 2, which cornerstone needs.
FLAGS = [
    "--no-sandbox",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
VIOLATIONS = """window.__csp = [];
document.addEventListener('securitypolicyviolation', e => window.__csp.push(
  [e.effectiveDirective, e.blockedURI, e.sourceFile].join(' ')));"""


@pytest.fixture
def ohif_server(settings, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The dashboard with the real build, a radiologist, and one DICOM study (not scored)."""
    if CHROMIUM is None:
        pytest.skip("Chromium not installed (.ci/run installs Debian's chromium)")
    if not ohif.installed(REAL_BUILD):
        pytest.skip(f"OHIF {ohif.VERSION} not installed at {REAL_BUILD}: `make install` does it")
    live = settings.with_(ohif_dir=str(REAL_BUILD))
    upgrade(live.db_url)
    factory = make_session_factory(make_engine(live.db_url))
    with factory() as session:
        create_user(session, "rad", PASSWORD, "radiologist")
        session.commit()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "chest.dcm").write_bytes(dicom_bytes(chest_like(seed=40)))
    (item,) = ingest_paths(factory, [tmp_path / "in"], Limits()).accepted
    with factory() as session:
        uid = session.get(Study, item.study_id).study_uid
    server = make_server("127.0.0.1", 0, create_app({"CXR_SETTINGS": live}), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", f"{item.study_id}:{uid}"
    server.shutdown()
    thread.join(timeout=10)


def test_ohif_loads_behind_login_from_this_origin_only(ohif_server) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    base, study = ohif_server
    study_id, uid = study.split(":")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        context.add_init_script(VIOLATIONS)
        page = context.new_page()
        requests, console, bad = [], [], []
        page.on("request", lambda r: requests.append(r))
        page.on("console", lambda m: console.append(m.text))
        page.on(
            "response",
            lambda r: (
                bad.append(f"{r.status} {r.url}") if r.status >= 400 and "/ohif/" in r.url else None
            ),
        )

        # Logged out, /ohif/ sends the browser to log in, and the login brings it back.
        page.goto(base + "/ohif/")
        assert page.url == base + "/login?next=%2Fohif%2F"
        page.fill("input[name=username]", "rad")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Study List", timeout=60_000)
        assert page.url == base + "/ohif/"
        assert page.evaluate("() => !!document.createElement('canvas').getContext('webgl2')")
        assert page.evaluate("window.__csp") == []

        # The study list asked our QIDO-RS, with the session cookie, for JSON.
        qido = [r for r in requests if r.url.startswith(base + "/dicomweb/studies?")]
        assert qido, [r.url for r in requests]
        assert "application/dicom+json" in qido[0].headers["accept"]
        assert "session=" in qido[0].all_headers().get("cookie", "")

        # The worklist's keys still work beside the new column: j selects, Enter opens the
        # study page; there, v opens the study in the viewer with the review panel beside it,
        # and the viewer asks QIDO for it.
        page.goto(base + "/")
        assert page.inner_text(f'tr[data-study-id="{study_id}"] td.open-viewer') == "Open in viewer"
        page.keyboard.press("j")
        page.keyboard.press("Enter")
        page.wait_for_url(f"{base}/studies/{study_id}")
        link = page.get_attribute("#open-in-viewer", "href")
        assert link == f"/studies/{study_id}?view=ohif"
        page.keyboard.press("v")
        page.wait_for_url(f"{base}{link}")
        direct = f"/ohif/viewer?StudyInstanceUIDs={uid}"
        assert page.get_attribute("#ohif-frame", "src") == direct
        assert page.get_attribute("#viewer-full", "href") == direct
        page.wait_for_function(
            "() => { const d = document.getElementById('ohif-frame')"
            ".contentDocument; const r = d && d.getElementById('root');"
            " return !!r && r.childElementCount > 0; }",
            timeout=60_000,
        )
        page.wait_for_timeout(3000)
        asked = [r.url for r in requests if r.url.startswith(base + "/dicomweb/")]
        assert any(f"StudyInstanceUID={uid}" in u for u in asked), asked
        assert page.evaluate("window.__csp") == []
        assert any("CornerstoneRender: using GPU rendering" in m for m in console), console
        # In the viewer its own keys apply; Esc comes back to the review panel, r marks read.
        box = page.locator("#ohif-frame").bounding_box()
        assert box is not None and box["width"] > 600 and box["height"] > 500
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        assert page.evaluate("document.activeElement.id") == "ohif-frame"
        page.keyboard.press("Escape")
        assert page.evaluate("document.activeElement.id") == "mark-read"
        page.keyboard.press("r")
        page.wait_for_selector("#reviews li.review")
        assert page.url == f"{base}/studies/{study_id}?view=ohif"
        assert page.inner_text("#reviews li.review").startswith("read by rad")

        foreign = [r.url for r in requests if not r.url.startswith(base)]
        assert foreign == [] and bad == []
        assert not [m for m in console if "Content Security Policy" in m], console
        context.close()
        browser.close()
