"""The instance store: every accepted film kept as DICOM, for the viewer and DICOMweb.

A DICOM instance is kept as received: the bytes unchanged, in the transfer syntax it came in
(a dataset that arrived without a Part 10 header gets one put in front, its own bytes
untouched). A JPEG or PNG is kept as a Secondary Capture of the same study, patient and
accession: a baseline JPEG's bitstream is encapsulated as it is (JPEG Baseline transfer
syntax, nothing re-encoded), anything else as its decoded pixels, 16-bit PNGs at 16 bits.

Files live under ``Settings.instance_dir`` named by their content hash, so no header value
ever becomes part of a path; the ``instances`` table maps UIDs to files. The files are written
(atomically, fsynced) before the rows that point at them are committed: a crash between the two
leaves a file no row names, which ``expire`` removes, never a row without its file.

Bounded: ``expire`` (pipeline.store.retention, run by ``cxr-triage run`` every
``store_expire_every_s``) deletes the instances of studies read more than
``store_retention_days`` ago, and past ``store_max_gb`` the oldest read studies first. A study nobody has read is never expired. When the disk is full, or
the store is at its limit with only unread studies in it, new studies are refused with
``StorageFull`` and that reason; what was accepted stays.

The interface (``write``, ``open``, ``remove``, ``usage``) is what an object store would
implement; this one is the local filesystem. What a file is (its header) is read by
pipeline.store.dicom_file; a JPEG or PNG becomes a capture in pipeline.store.capture.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import Instance, Study
from pipeline.settings import Settings
from pipeline.storage import StorageFull, is_storage_full
from pipeline.store.dicom_file import describe

log = logging.getLogger(__name__)
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
USAGE_CACHE_S = 5.0


def valid_uid(value: str) -> bool:
    """A DICOM UID: digits and dots, no empty or zero-led component, at most 64 characters."""
    return 0 < len(value) <= 64 and UID.match(value) is not None


def derived_uid(*parts: str) -> str:
    """A UID that is the same every time for the same parts (pydicom's hash of them)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["cxr-triage", *parts]))


class InstanceStore:
    """DICOM files on the local filesystem, named by content; the rows say what they are."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._usage: tuple[float, int] | None = None  # (monotonic time, bytes) last counted
        self._lock = threading.Lock()

    @classmethod
    def of(cls, settings: Settings) -> InstanceStore:
        return cls(settings.instance_dir, int(settings.store_max_gb * 1024**3))

    def _path(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError("an instance path outside the store")
        return path

    def write(self, data: bytes) -> tuple[str, str]:
        """Store bytes; return (path relative to the root, sha256). Raises ``StorageFull``."""
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"
        path = self._path(rel)
        if path.exists() and path.stat().st_size == len(data):
            return rel, digest
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_storage_full(exc):
                log.error("the disk holding the instance store is full: refusing new studies")
                raise StorageFull("the instance store") from exc
            raise
        return rel, digest

    def open(self, rel: str) -> IO[bytes]:
        return open(self._path(rel), "rb")

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def size_of(self, rel: str) -> int:
        return self._path(rel).stat().st_size

    def remove(self, rel: str) -> None:
        path = self._path(rel)
        path.unlink(missing_ok=True)
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break

    def files(self) -> Iterator[tuple[str, float]]:
        """Every stored file: (relative path, modification time)."""
        if not self.root.exists():
            return
        for path in self.root.glob("*/*/*.dcm"):
            yield str(path.relative_to(self.root)), path.stat().st_mtime

    def usage(self, session: Session, fresh: bool = False) -> int:
        """Bytes the store's rows account for (counted at most every few seconds)."""
        with self._lock:
            now = time.monotonic()
            if not fresh and self._usage and now - self._usage[0] < USAGE_CACHE_S:
                return self._usage[1]
            total = int(session.scalar(select(func.coalesce(func.sum(Instance.size), 0))) or 0)
            self._usage = (now, total)
            return total

    def added(self, size: int) -> None:
        with self._lock:
            if self._usage:
                self._usage = (self._usage[0], self._usage[1] + size)

    def check_room(self, session: Session) -> None:
        """Refuse new studies while the store is at its size limit (``expire`` makes room
        from read studies; when it cannot, every study in the store still waits for a read)."""
        if self.usage(session) >= self.max_bytes:
            raise StorageFull(
                f"the instance store (at its {self.max_bytes / 1024**3:.0f} GB limit, "
                "holding only studies that still wait for a read)"
            )


# --------------------------------------------------------------------------- rows


def keep(
    session: Session,
    store: InstanceStore,
    study: Study,
    image_id: int | None,
    kind: str,
    data: bytes,
    study_uid: str,
) -> Instance:
    """Write one DICOM file and add its row (not committed)."""
    described, data = describe(data)
    rel, digest = store.write(data)
    row = Instance(
        study_id=study.id,
        image_id=image_id,
        kind=kind,
        study_uid=study_uid,
        series_uid=described.series_uid or derived_uid("series", study_uid),
        sop_uid=described.sop_uid or derived_uid("sop", digest),
        sop_class_uid=described.sop_class_uid,
        transfer_syntax=described.transfer_syntax,
        modality=described.modality,
        series_number=described.series_number,
        series_description=described.series_description,
        instance_number=described.instance_number,
        rows=described.rows,
        columns=described.columns,
        frames=described.frames,
        size=len(data),
        sha256=digest,
        path=rel,
    )
    session.add(row)
    store.added(len(data))
    return row
