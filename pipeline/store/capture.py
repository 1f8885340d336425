"""JPEG and PNG radiographs kept as Secondary Captures of their study, nothing re-encoded."""

from __future__ import annotations

import io
from typing import Any

from pipeline.store.dicom_file import EXPLICIT_LE, SOP_SC
from pipeline.store.instances import derived_uid

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
CAPTURE_SERIES_NUMBER = 9900


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
