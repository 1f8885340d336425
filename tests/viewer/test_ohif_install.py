"""Installing the pinned OHIF build: checksum, stamp, dist only, no escaping tar member,
precompression, the download, and the `cxr-triage ohif` command.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from pipeline.cli.main import main as cli_main
from pipeline.settings import ConfigError
from pipeline.viewer import ohif

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
