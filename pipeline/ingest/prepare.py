"""Find and decode the files to ingest, before any database work: what their rows need."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.imaging import decode as imaging
from pipeline.imaging.decode import DecodedImage, Limits, RejectedInput
from pipeline.imaging.header import header_fields
from pipeline.profiling import STAGES


def iter_input_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Yield files named directly, and files in folders (recursive) that look ingestible."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.name.startswith("."):
                    continue
                if child.suffix.lower() in imaging.ACCEPTED_SUFFIXES or _has_dicom_magic(child):
                    yield child
        else:
            yield path


def _has_dicom_magic(path: Path) -> bool:
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def study_fields(meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The study row's fields of a decoded file: its header, overridden by form or sidecar."""
    # Form or sidecar values win over the header; both are cleaned to storable text.
    merged = {**meta, **header_fields(extra)}
    priority = merged.get("RequestedProcedurePriority") or merged.get("StudyPriorityID")
    return {
        "study_uid": merged.get("StudyInstanceUID"),
        "accession_number": merged.get("AccessionNumber"),
        "patient_id": merged.get("PatientID"),
        "patient_name": merged.get("PatientName"),
        "study_date": merged.get("StudyDate"),
        "requested_priority": (str(priority).upper() if priority else None),
    }


@dataclass
class Prepared:
    """One file decoded, before any database work: what its rows need, without the pixels."""

    filename: str
    key: str
    decoded: DecodedImage | None
    reason: str | None
    preview: bytes | None
    code: str | None = None  # imaging.RejectedInput.code when it was refused


def prepare(data: bytes, filename: str, limits: Limits, extra_meta: dict[str, Any]) -> Prepared:
    """Decode one file, encode its preview and note its grey level; a refusal is kept too."""
    try:
        with STAGES.time("decode"):
            decoded = imaging.decode_bytes(data, filename, limits)
    except RejectedInput as exc:
        return Prepared(filename, imaging.content_key(data), None, str(exc), None, exc.code)
    if decoded.kind != "dicom":
        # JPEG/PNG carry no header: a sidecar JSON or the upload form gives their fields.
        decoded.meta.update(header_fields(extra_meta))
    with STAGES.time("preview"):
        preview = imaging.encode_preview(decoded.pixels)
    # The display image's grey level, for drift (pipeline.monitoring.drift): a strided sample is enough.
    sample = decoded.pixels[::4, ::4]
    if sample.size:
        decoded.meta["input"] = {
            "mean": round(float(sample.mean()), 1),
            "std": round(float(sample.std()), 1),
        }
    decoded.pixels = decoded.pixels[:0]  # the chunk holds previews, not full images
    return Prepared(filename, decoded.dedup_key, decoded, None, preview)
