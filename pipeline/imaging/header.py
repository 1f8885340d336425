"""DICOM header values made storable: the fields kept, cut to their VR, no control characters."""

from __future__ import annotations

import unicodedata
from typing import Any


def drop_unreadable(ds: Any) -> list[str]:
    """Remove top-level elements pydicom cannot convert (unknown VR, bad length); name them.

    pydicom converts an element when it is first touched, so one malformed element would
    otherwise fail the decode wherever it happens to be read. A broken private or descriptive
    element is dropped and the image still read; a broken image description is rejected.
    """
    dropped = []
    for tag in list(ds.keys()):
        try:
            ds[tag]
        except Exception:
            dropped.append(f"({tag.group:04X},{tag.element:04X})")
            del ds[tag]
    return dropped


# Fields a JPEG/PNG may be given by a sidecar JSON or an upload form (DICOM keywords).
RASTER_HEADER_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "PatientID",
    "PatientName",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "InstitutionName",
    "RequestedProcedurePriority",
)
# What is kept from a DICOM header: the same, plus what identifies and describes the image.
DICOM_HEADER_KEYS = (
    *RASTER_HEADER_KEYS,
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyPriorityID",
    "PhotometricInterpretation",
    "BitsStored",
    # Copied into the results sent back to the PACS (pipeline.results.dicom_objects).
    "PatientBirthDate",
    "IssuerOfPatientID",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)


# The longest value of each value representation (PS3.5 6.2), so stored columns always fit.
# PN: three component groups of 64 (alphabetic, ideographic, phonetic) and their separators.
_VR_MAX = {
    "CS": 16,
    "SH": 16,
    "DA": 8,
    "TM": 16,
    "AS": 4,
    "UI": 64,
    "LO": 64,
    "PN": 194,
    "IS": 12,
    "DS": 16,
}


def header_text(keyword: str, value: Any) -> str:
    """A header value as storable text: control characters dropped, cut to its VR's length.

    Headers from the wild carry NUL bytes, escape sequences and over-long values; PostgreSQL
    refuses NUL in text and enforces column lengths, so one such file would otherwise fail
    its whole transaction.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    text = "".join(ch for ch in str(value) if unicodedata.category(ch) != "Cc").strip()
    try:
        vr = dictionary_VR(tag_for_keyword(keyword) or 0)
    except KeyError:
        vr = "LO"
    return text[: _VR_MAX.get(vr, 64)]


def storable_name(filename: str) -> str:
    """A file name as stored for display: no control characters, at most 255 characters."""
    return "".join(ch for ch in filename if unicodedata.category(ch) != "Cc")[-255:]


def header_fields(values: dict[str, Any]) -> dict[str, str]:
    """The known header fields among sidecar or form values, cleaned and cut to length."""
    out = {}
    for key in RASTER_HEADER_KEYS:
        value = values.get(key)
        if value is not None and (text := header_text(key, value)):
            out[key] = text
    return out


def dicom_metadata(ds: Any) -> dict[str, Any]:
    """Extract the header fields the worklist, grouping and dedup need."""
    meta: dict[str, Any] = {}
    for key in DICOM_HEADER_KEYS:
        value = ds.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, int):
            meta[key] = value
        elif text := header_text(key, value):
            meta[key] = text
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid:
        meta["TransferSyntaxUID"] = str(tsuid)
    return meta
