"""What a DICOM file is: the fields of its ``instances`` row, and a Part 10 header if it lacks one."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

SOP_SC = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


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
