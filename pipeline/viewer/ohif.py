"""The OHIF viewer, prebuilt: fetched from npm at a pinned version, checked, unpacked.

``install`` gets the ``@ohif/app`` tarball (``npm pack`` when npm is on PATH, so the registry,
proxy and credentials of the site's ``.npmrc`` apply; else straight from the registry, or
``npm_config_registry``'s), refuses it unless its sha512 is the one pinned here, and unpacks
``package/dist/`` only, file by file: a member that is a link, a device, absolute or climbing
out with ``..`` refuses the whole archive. It unpacks into a fresh folder beside the target and
renames it into place with a stamp (version and integrity), so a killed install leaves no
half-viewer, and a second install finds the stamp and does nothing. Before the rename every
compressible file gets a gzip sibling (pipeline.viewer.static_gzip) for the dashboard to send; an
install made before that gets them on the next install. Nothing in the repository
holds the 200 MB build; the dashboard serves it from ``viewer_dir`` (dashboard.ohif_view).
Running npm is pipeline.viewer.npm's part, the safe unpacking pipeline.viewer.archive's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from pipeline.settings import ConfigError, Settings
from pipeline.viewer import static_gzip
from pipeline.viewer.archive import UnsafeMember, extract_subtree
from pipeline.viewer.npm import NpmFailed, npm_pack

log = logging.getLogger(__name__)

PACKAGE = "@ohif/app"
VERSION = "3.13.2"
# `npm view @ohif/app@3.13.2 dist.integrity`: the registry's own record of the tarball.
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
DEFAULT_REGISTRY = "https://registry.npmjs.org/"
STAMP = ".cxr-ohif.json"
DIST = PurePosixPath("package/dist")
DOWNLOAD_TIMEOUT_S = 60  # per socket operation; the whole 50 MB may take longer
NPM_TIMEOUT_S = 1800
STALE_SCRATCH_S = 6 * 3600  # a scratch folder this old is a killed install's leftover


class OhifError(Exception):
    """The viewer could not be installed; the message says why and what to do."""


class DownloadFailed(OhifError):
    """The registry could not be reached or would not hand over the tarball."""


class IntegrityMismatch(OhifError):
    """The tarball is not the one pinned: refused."""


class UnsafeArchive(OhifError):
    """A member of the tarball would land outside the viewer folder, or is not a plain file."""


@dataclass(frozen=True)
class Installed:
    """What ``install`` did: unpacked ``files`` files, or nothing when already there."""

    path: Path
    version: str
    integrity: str
    files: int
    changed: bool
    gzipped: int = 0  # files with a precompressed .gz sibling (pipeline.viewer.static_gzip)


def viewer_dir(settings: Settings) -> Path:
    """The folder holding the viewer's index.html: CXR_OHIF_DIR, else under the data dir."""
    if settings.ohif_dir:
        return Path(settings.ohif_dir).expanduser().resolve()
    return settings.data_dir / "ohif" / VERSION


def dicomweb_root(settings: Settings) -> str:
    """The DICOMweb root the viewer reads from: CXR_VIEWER_DICOMWEB_URL, else ``/dicomweb``."""
    url = (settings.viewer_dicomweb_url or "/dicomweb").rstrip("/")
    parts = urlsplit(url)
    local = not parts.scheme and not parts.netloc and url.startswith("/")
    if not local and (parts.scheme not in ("http", "https") or not parts.netloc):
        raise ConfigError(
            f"CXR_VIEWER_DICOMWEB_URL={settings.viewer_dicomweb_url!r} must be an http(s) URL "
            "or a path on this server such as /dicomweb"
        )
    return url


def read_stamp(directory: Path) -> dict[str, Any] | None:
    """The stamp an install left in ``directory``, or None."""
    try:
        doc = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def installed(directory: Path, integrity: str | None = None) -> bool:
    """Whether ``directory`` holds this very build (the pinned one by default), complete."""
    stamp = read_stamp(directory)
    return (
        stamp is not None
        and stamp.get("version") == VERSION
        and stamp.get("integrity") == (integrity or INTEGRITY)
        and (directory / "index.html").is_file()
    )


def sri(path: Path) -> str:
    """The file's Subresource-Integrity string (``sha512-<base64>``), as npm records it."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha512")
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def verify(path: Path, integrity: str) -> None:
    """Refuse a tarball whose sha512 is not ``integrity``."""
    got = sri(path)
    if got != integrity:
        raise IntegrityMismatch(
            f"refused {path.name}: its checksum is {got[:30]}…, not the pinned {integrity[:30]}… "
            f"of {PACKAGE} {VERSION}; a proxy or mirror may have altered it. Nothing was installed."
        )


def extract_dist(tarball: Path, target: Path) -> int:
    """Unpack the tarball's package/dist/ into ``target`` (which must not exist); files count."""
    try:
        count = extract_subtree(tarball, DIST, target)
    except UnsafeMember as exc:
        raise UnsafeArchive(str(exc)) from exc
    if not (target.resolve() / "index.html").is_file():
        raise OhifError(f"{tarball.name} has no package/dist/index.html: not an OHIF build")
    return count


def registry_url() -> str:
    """The tarball's URL on npm's registry (``npm_config_registry`` honoured, as npm does)."""
    registry = os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")
    base = (registry or DEFAULT_REGISTRY).rstrip("/")
    return f"{base}/{PACKAGE}/-/{PACKAGE.split('/')[1]}-{VERSION}.tgz"


def _urlopen(url: str) -> IO[bytes]:
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)  # type: ignore[no-any-return]


def _download(url: str, folder: Path) -> Path:
    dest = folder / url.rsplit("/", 1)[-1]
    try:
        with _urlopen(url) as response, dest.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:  # URLError, HTTPError, timeouts and resets are all OSErrors
        raise DownloadFailed(f"could not download {url}: {exc}") from exc
    return dest


def fetch(folder: Path) -> Path:
    """Download the pinned tarball into ``folder``: with npm when installed, else over HTTP."""
    npm = shutil.which("npm")
    if npm:
        log.info("fetching %s@%s with npm pack", PACKAGE, VERSION)
        try:
            return npm_pack(npm, f"{PACKAGE}@{VERSION}", folder, NPM_TIMEOUT_S)
        except NpmFailed as exc:
            raise DownloadFailed(str(exc)) from exc
    url = registry_url()
    log.info("fetching %s", url)
    return _download(url, folder)


def _clear_for_install(target: Path) -> None:
    """Remove an older or broken install at ``target``; refuse to touch anything else."""
    if not target.exists():
        return
    if target.is_dir() and (read_stamp(target) is not None or not any(target.iterdir())):
        shutil.rmtree(target)
        return
    raise OhifError(
        f"{target} exists and is not a viewer installed by cxr-triage; "
        "move it away or set CXR_OHIF_DIR to another folder"
    )


def _remove_stale_scratch(folder: Path) -> None:
    now = time.time()
    for old in folder.glob(".ohif-*"):
        if old.is_dir() and now - old.stat().st_mtime > STALE_SCRATCH_S:
            shutil.rmtree(old, ignore_errors=True)


def _already(target: Path, integrity: str) -> Installed | None:
    if not installed(target, integrity):
        return None
    stamp = read_stamp(target) or {}
    if "gzip" not in stamp:  # installed before the build was precompressed: do it now
        stamp["gzip"] = static_gzip.precompress(target).kept
        tmp = target / f"{STAMP}.tmp"
        tmp.write_text(json.dumps(stamp, indent=1) + "\n")
        os.replace(tmp, target / STAMP)
    return Installed(
        target,
        VERSION,
        integrity,
        int(stamp.get("files", 0)),
        changed=False,
        gzipped=int(stamp["gzip"]),
    )


def install(
    target: Path,
    tarball: Path | None = None,
    fetcher: Callable[[Path], Path] | None = None,
    integrity: str | None = None,
) -> Installed:
    """Install the pinned viewer build at ``target`` unless it is there already.

    ``tarball``: a file fetched beforehand (an offline site copies it in); else ``fetcher``
    (default ``fetch``) downloads one into a scratch folder beside the target, deleted after.
    ``integrity``: what the tarball must hash to (default the pinned ``INTEGRITY``).
    """
    integrity = integrity or INTEGRITY
    fetcher = fetcher or fetch
    if (done := _already(target, integrity)) is not None:
        return done
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(target.parent)
    with tempfile.TemporaryDirectory(prefix=".ohif-", dir=target.parent) as scratch:
        work = Path(scratch)
        if tarball is None:
            (work / "download").mkdir()
        archive = tarball if tarball is not None else fetcher(work / "download")
        try:
            verify(archive, integrity)
        except IntegrityMismatch:
            if tarball is None:
                archive.unlink(missing_ok=True)  # never leave a tampered download about
            raise
        staging = work / "dist"
        files = extract_dist(archive, staging)
        gzipped = static_gzip.precompress(staging).kept
        stamp = {
            "package": PACKAGE,
            "version": VERSION,
            "integrity": integrity,
            "files": files,
            "gzip": gzipped,
        }
        (staging / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        if (done := _already(target, integrity)) is not None:  # another install won the race
            return done
        _clear_for_install(target)
        staging.rename(target)
    log.info(
        "installed %s %s at %s (%d files, %d precompressed)",
        PACKAGE,
        VERSION,
        target,
        files,
        gzipped,
    )
    return Installed(target, VERSION, integrity, files, changed=True, gzipped=gzipped)
