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

Bounded: ``expire`` (run by ``cxr-triage run`` every ``store_expire_every_s``) deletes the
instances of studies read more than ``store_retention_days`` ago, and past ``store_max_gb`` the
oldest read studies first. A study nobody has read is never expired. When the disk is full, or
the store is at its limit with only unread studies in it, new studies are refused with
``StorageFull`` and that reason; what was accepted stays.

The interface (``write``, ``open``, ``remove``, ``usage``) is what an object store would
implement; this one is the local filesystem.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.models import Instance, Review, Study, utcnow
from pipeline.settings import Settings
from pipeline.storage import StorageFull, is_storage_full

log = logging.getLogger(__name__)
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SOP_SC = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
CAPTURE_SERIES_NUMBER = 9900
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


# --------------------------------------------------------------------------- what a file is


@dataclass
class Described:
    """The fields of an ``instances`` row, read from a DICOM file's header."""

    sop_uid: str | None
    sop_class_uid: str
    study_uid: str | None
    series_uid: str | None
    transfer_syntax: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    rows: int | None
    columns: int | None
    frames: int | None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(value: Any, size: int = 64) -> str | None:
    return str(value)[:size] if value not in (None, "") else None


def describe(data: bytes) -> tuple[Described, bytes]:
    """The header of a DICOM file, and the file as a Part 10 file (unchanged if it was one)."""
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote header values
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if data[128:132] != b"DICM":
        # A bare dataset: a header in front makes it a file a viewer can open; the dataset's
        # own bytes follow untouched, so it is read in the syntax pydicom found it in.
        syntax = syntax or (IMPLICIT_LE if ds.is_implicit_VR else EXPLICIT_LE)
        data = _with_header(ds, syntax) + data
    described = Described(
        sop_uid=_text(ds.get("SOPInstanceUID")),
        sop_class_uid=_text(ds.get("SOPClassUID")) or SOP_SC,
        study_uid=_text(ds.get("StudyInstanceUID")),
        series_uid=_text(ds.get("SeriesInstanceUID")),
        transfer_syntax=syntax or EXPLICIT_LE,
        modality=_text(ds.get("Modality"), 16),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=_text(ds.get("SeriesDescription")),
        instance_number=_int(ds.get("InstanceNumber")),
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
        frames=_int(ds.get("NumberOfFrames")) or 1,
    )
    return described, data


def _with_header(ds: Any, syntax: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
    from pydicom.uid import UID as UIDValue  # noqa: N811

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UIDValue(str(ds.get("SOPClassUID") or SOP_SC))
    meta.MediaStorageSOPInstanceUID = UIDValue(str(ds.get("SOPInstanceUID") or ""))
    meta.TransferSyntaxUID = UIDValue(syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


# --------------------------------------------------------------------------- captures


def capture(
    data: bytes, kind: str, fields: dict[str, Any], meta: dict[str, Any], key: str
) -> bytes:
    """A Secondary Capture of a JPEG or PNG radiograph, in the study ``fields`` describe.

    A baseline (or extended) sequential JPEG is encapsulated as received; a progressive JPEG or
    a PNG is stored as its pixels: 8-bit grey, or 16-bit for a 16-bit PNG.
    """
    import numpy as np
    from PIL import Image as PILImage
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID
    from pydicom.uid import UID as UIDValue  # noqa: N811

    img = PILImage.open(io.BytesIO(data))
    ds = Dataset()
    ds.SOPClassUID = SOP_SC
    ds.SOPInstanceUID = derived_uid("capture", key)
    ds.StudyInstanceUID = fields["study_uid"]
    ds.SeriesInstanceUID = derived_uid("capture-series", fields["study_uid"])
    ds.Modality = (meta.get("Modality") or "OT")[:16]
    ds.ConversionType = "WSD"
    ds.SeriesNumber = CAPTURE_SERIES_NUMBER
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"{kind.upper()} as received"
    ds.PatientName = fields.get("patient_name") or ""
    ds.PatientID = fields.get("patient_id") or ""
    ds.PatientSex = meta.get("PatientSex") or ""
    ds.PatientBirthDate = ""
    ds.AccessionNumber = fields.get("accession_number") or ""
    ds.StudyDate = fields.get("study_date") or ""
    ds.StudyTime = meta.get("StudyTime") or ""
    ds.StudyID = ""
    ds.ReferringPhysicianName = ""
    ds.BodyPartExamined = (meta.get("BodyPartExamined") or "CHEST")[:16]
    if meta.get("ViewPosition"):
        ds.ViewPosition = meta["ViewPosition"]
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = img.height, img.width
    ds.PixelRepresentation = 0
    process = _jpeg_process(data) if kind == "jpeg" else None
    if process in (0xC0, 0xC1) and img.mode in ("L", "RGB", "YCbCr"):
        layers = len(img.getbands())
        from PIL import JpegImagePlugin

        subsampled = layers == 3 and JpegImagePlugin.get_sampling(img) not in (0, -1)
        syntax = JPEG_BASELINE if process == 0xC0 else JPEG_EXTENDED
        ds.SamplesPerPixel = layers
        ds.PhotometricInterpretation = (
            "MONOCHROME2" if layers == 1 else "YBR_FULL_422" if subsampled else "YBR_FULL"
        )
        if layers == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([data if len(data) % 2 == 0 else data + b"\0"])
        ds["PixelData"].VR = "OB"
    else:
        syntax = EXPLICIT_LE
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            pixels = np.asarray(img).astype(np.uint16)
            bits = 16
        else:
            pixels = np.asarray(img.convert("L"), dtype=np.uint8)
            bits = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = UIDValue(SOP_SC)
    file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    file_meta.TransferSyntaxUID = UIDValue(syntax)
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = file_meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _jpeg_process(data: bytes) -> int | None:
    """The JPEG's start-of-frame marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive...)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


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


# --------------------------------------------------------------------------- retention


def _read() -> Any:
    return exists().where(Review.study_id == Study.id)


def expire(
    factory: sessionmaker[Session],
    store: InstanceStore,
    settings: Settings,
    now: datetime | None = None,
    orphan_age_s: float = 3600.0,
) -> dict[str, int]:
    """Delete what retention allows: read studies past the retention, then, while the store
    is over its size limit, the oldest read studies. Unread studies are never touched.
    Files no row names (a crash between write and commit) older than an hour go too."""
    now = now or utcnow()
    cutoff = now - timedelta(days=settings.store_retention_days)
    counts = {"studies": 0, "instances": 0, "bytes": 0, "orphans": 0}
    with session_scope(factory) as session:
        has_instances = exists().where(Instance.study_id == Study.id)
        old = list(
            session.scalars(
                select(Study.id)
                .where(_read(), has_instances, Study.received_at < cutoff)
                .order_by(Study.received_at)
            )
        )
        total = store.usage(session, fresh=True)
        over = total - store.max_bytes
        if over > 0:
            oldest_read = session.execute(
                select(Study.id, func.sum(Instance.size))
                .join(Instance, Instance.study_id == Study.id)
                .where(_read(), Study.id.not_in(old or [-1]))
                .group_by(Study.id, Study.received_at)
                .order_by(Study.received_at)
            ).all()
            freed = (
                int(
                    session.scalar(
                        select(func.coalesce(func.sum(Instance.size), 0)).where(
                            Instance.study_id.in_(old)
                        )
                    )
                    or 0
                )
                if old
                else 0
            )
            for study_id, size in oldest_read:
                if freed >= over:
                    break
                old.append(study_id)
                freed += int(size or 0)
    for start in range(0, len(old), 200):
        chunk = old[start : start + 200]
        with session_scope(factory) as session:
            rows = session.execute(
                select(Instance.path, Instance.size).where(Instance.study_id.in_(chunk))
            ).all()
            session.execute(delete(Instance).where(Instance.study_id.in_(chunk)))
        for rel, size in rows:  # rows first: a crash here leaves files, which go as orphans
            store.remove(rel)
            counts["instances"] += 1
            counts["bytes"] += int(size)
        counts["studies"] += len(chunk)
    counts["orphans"] = _orphans(factory, store, orphan_age_s)
    with session_scope(factory) as session:
        store.usage(session, fresh=True)
    if counts["studies"] or counts["orphans"]:
        log.info(
            "instance store: expired %d instances of %d read studies (%.1f MB), %d orphans",
            counts["instances"],
            counts["studies"],
            counts["bytes"] / 1e6,
            counts["orphans"],
        )
    return counts


def _orphans(factory: sessionmaker[Session], store: InstanceStore, age_s: float) -> int:
    cutoff = time.time() - age_s
    candidates = [rel for rel, mtime in store.files() if mtime < cutoff]
    removed = 0
    for start in range(0, len(candidates), 500):
        chunk = candidates[start : start + 500]
        with session_scope(factory) as session:
            named = set(session.scalars(select(Instance.path).where(Instance.path.in_(chunk))))
        for rel in chunk:
            if rel not in named:
                store.remove(rel)
                removed += 1
    return removed


def store_state(session: Session, store: InstanceStore) -> dict[str, Any]:
    """What the admin console shows: size, limit, counts, unread share."""
    total = store.usage(session, fresh=True)
    instances = int(session.scalar(select(func.count(Instance.id))) or 0)
    studies = int(session.scalar(select(func.count(func.distinct(Instance.study_id)))) or 0)
    unread = int(
        session.scalar(
            select(func.coalesce(func.sum(Instance.size), 0))
            .join(Study, Study.id == Instance.study_id)
            .where(~_read())
        )
        or 0
    )
    return {
        "bytes": total,
        "limit_bytes": store.max_bytes,
        "used_share": round(total / store.max_bytes, 4) if store.max_bytes else 0.0,
        "instances": instances,
        "studies": studies,
        "unread_bytes": unread,
        "root": str(store.root),
    }
