"""A watched folder: files dropped into it are ingested, then moved out of the way.

Polling, not inotify: it works the same on network shares, where change events are unreliable.
A file counts as complete once its size and modification time have not changed for a settle
interval and it can be opened; a file still being written is never read. Afterwards it goes to
``processed/`` (accepted or a duplicate) or to ``rejected/`` with ``<name>.reason.txt`` beside
it. A JPEG/PNG may have a sidecar ``<name>.json`` (or ``<stem>.json``) of DICOM-keyword fields,
which travels with it. Only regular files directly in the folder are considered: names come
from the folder itself, so no path from outside touches the file system.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.imaging.decode import ACCEPTED_SUFFIXES, file_key
from pipeline.ingest.intake import Intake
from pipeline.ingest.persist import IngestItem
from pipeline.states import State

log = logging.getLogger(__name__)
PROCESSED, REJECTED = "processed", "rejected"
# Names that writers use while a file is incomplete (renamed when done).
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart")


class SidecarError(ValueError):
    """A sidecar JSON that cannot be used; the image is rejected rather than misfiled."""


@dataclass
class _Seen:
    signature: tuple[int, int, int, int]  # size, mtime_ns of the file and of its sidecar
    stable_since: float


def sidecar_of(path: Path) -> Path | None:
    """The sidecar JSON of an image, if one exists: ``a.jpg.json`` or ``a.json``."""
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate != path and candidate.is_file():
            return candidate
    return None


def read_sidecar(path: Path) -> dict[str, Any]:
    """The fields in a sidecar JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SidecarError(f"its sidecar {path.name} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SidecarError(f"its sidecar {path.name} is not a JSON object")
    return data


def unique_target(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/stem-N.suffix`` when that name is taken."""
    target = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 1
    while target.exists() or target.with_name(target.name + ".reason.txt").exists():
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target


class FolderWatcher:
    """Poll one folder and ingest what settles in it."""

    def __init__(self, folder: Path, intake: Intake, settle_s: float = 2.0) -> None:
        self.folder = folder.resolve()
        self.intake = intake
        self.settle_s = settle_s
        self._seen: dict[str, _Seen] = {}
        for sub in (PROCESSED, REJECTED):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    def candidates(self) -> list[Path]:
        """Regular files directly in the folder that may be images (sidecars travel along)."""
        out = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                name = entry.name
                if not entry.is_file(follow_symlinks=False) or name.startswith("."):
                    continue
                if name.lower().endswith(TEMPORARY_SUFFIXES):
                    continue
                if name.lower().endswith(".json") and self._is_sidecar(name):
                    continue
                out.append(Path(entry.path))
        return sorted(out)

    def _is_sidecar(self, name: str) -> bool:
        base = name[: -len(".json")]
        if (self.folder / base).is_file():
            return True
        return any((self.folder / (base + s)).is_file() for s in ACCEPTED_SUFFIXES)

    def _signature(self, path: Path) -> tuple[int, int, int, int] | None:
        try:
            st = path.stat()
            side = sidecar_of(path)
            sst = side.stat() if side else None
        except OSError:
            return None
        return (
            st.st_size,
            st.st_mtime_ns,
            sst.st_size if sst else -1,
            sst.st_mtime_ns if sst else -1,
        )

    def ready(self, now: float | None = None) -> list[Path]:
        """Files whose size and mtime (and their sidecar's) held still for the settle time."""
        now = time.monotonic() if now is None else now
        present, out = set(), []
        for path in self.candidates():
            present.add(path.name)
            sig = self._signature(path)
            if sig is None:
                continue
            seen = self._seen.get(path.name)
            if seen is None or seen.signature != sig:
                self._seen[path.name] = _Seen(sig, now)
            elif now - seen.stable_since >= self.settle_s and _can_open(path):
                out.append(path)
        for name in set(self._seen) - present:
            del self._seen[name]
        return out

    def scan_once(self) -> list[IngestItem]:
        """Ingest every settled file once; return what became of each."""
        items = []
        for path in self.ready():
            try:
                items.append(self.process(path))
            except Exception:
                # Database unreachable or the like: leave the file for the next scan.
                log.exception("could not ingest a watched file; it stays for the next scan")
            self._seen.pop(path.name, None)
        return items

    def process(self, path: Path) -> IngestItem:
        """Ingest one settled file, then move it (and its sidecar) out of the folder."""
        side = sidecar_of(path)
        size = path.stat().st_size
        if size > self.intake.limits.max_bytes:
            item = self.intake.reject_oversize(file_key(path), size, path.name, "watch")
        else:
            data = path.read_bytes()
            try:
                extra = read_sidecar(side) if side else None
            except SidecarError as exc:
                from pipeline.imaging.decode import content_key

                item = self.intake.reject(content_key(data), path.name, str(exc), "watch")
            else:
                item = self.intake.submit(data, path.name, "watch", extra)
        self._move(path, side, item)
        log.info(
            "watched file: study %s %s%s",
            item.study_id,
            item.status,
            " (duplicate)" if item.duplicate else "",
        )
        return item

    def _move(self, path: Path, side: Path | None, item: IngestItem) -> None:
        rejected = item.status == State.REJECTED
        target = unique_target(self.folder / (REJECTED if rejected else PROCESSED), path.name)
        os.replace(path, target)
        if side is not None:
            os.replace(side, unique_target(target.parent, target.name + ".json"))
        if rejected:
            target.with_name(target.name + ".reason.txt").write_text(
                f"{item.reason}\n", encoding="utf-8"
            )

    def run(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """Scan until ``stop`` is set."""
        log.info("watching %s (settle %.1f s)", self.folder, self.settle_s)
        while not stop.is_set():
            self.scan_once()
            stop.wait(poll_s)


def _can_open(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return True
    except OSError:
        return False
