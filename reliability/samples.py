"""Generated studies for the harness: synthetic chests as DICOM, PNG and JPEG.

Every DICOM carries a distinctive fake patient name and id (``ZZTEST^PHI^<hex>``,
``ZZPID<hex>``) so the PHI scan can look for exactly these strings in every log of the run.
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage


@dataclass
class PhiRegistry:
    """The fake patient names and ids written into the run's DICOM files."""

    run_tag: str = field(default_factory=lambda: secrets.token_hex(4).upper())
    names: set[str] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)

    def new_patient(self, n: int) -> tuple[str, str]:
        """Return a (PatientName, PatientID) pair unique to this run."""
        name = f"ZZTEST^PHI^{self.run_tag}{n:05d}"
        pid = f"ZZPID{self.run_tag}{n:05d}"
        self.names.add(name)
        self.ids.add(pid)
        return name, pid

    def needles(self) -> set[str]:
        """Strings that must not occur in any log: names (also in their display form) and ids."""
        out = set(self.ids) | set(self.names)
        out |= {n.replace("^", " ") for n in self.names}
        # The distinctive part alone catches names split or reformatted by a logger.
        out |= {n.rsplit("^", 1)[1] for n in self.names}
        return out


def chest_like(size: int = 160, seed: int = 0) -> np.ndarray:
    """A synthetic frontal chest: bright mediastinum, dark lung fields, noise (uint8)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.45 * (
        np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.02)
        + np.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) / 0.02)
    )
    img += 0.25 * np.exp(-((x - 0.5) ** 2) / 0.004)
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def dicom_bytes(
    arr: np.ndarray,
    patient: tuple[str, str],
    *,
    frames: int = 1,
    samples: int = 1,
    modality: str = "CR",
    pixel_data: bool = True,
    rows_cols: tuple[int, int] | None = None,
    raw_elements: dict[int, tuple[str, bytes]] | None = None,
) -> bytes:
    """A small standard DICOM radiograph (12-bit MONOCHROME2) written with pydicom.

    ``rows_cols`` overrides the header's size without changing the pixel data (a bomb or a
    lying header); ``raw_elements`` writes tag → (VR, raw bytes) verbatim (invalid characters).
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.tag import Tag
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    values = (arr.astype(np.uint16) << 4).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("generated.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = patient
    ds.AccessionNumber = "ACC" + patient[1][-9:]
    ds.StudyDate = "20261122"
    ds.Modality = modality
    ds.ViewPosition = "PA"
    ds.BodyPartExamined = "CHEST"
    set_pixels(ds, values, 12, "MONOCHROME2", samples, frames, pixel_data)
    if rows_cols:
        ds.Rows, ds.Columns = rows_cols
    for tag, (vr, raw) in (raw_elements or {}).items():
        ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)  # type: ignore[assignment]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def set_pixels(
    ds: Any,
    values: np.ndarray,
    bits: int,
    photometric: str,
    samples: int = 1,
    frames: int = 1,
    pixel_data: bool = True,
) -> None:
    """The image pixel module of a generated radiograph: size, bit depth, frames, pixel data."""
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric if samples == 1 else "RGB"
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if samples > 1:
        ds.PlanarConfiguration = 0
    if pixel_data:
        data = np.repeat(values[..., None], samples, axis=2) if samples > 1 else values
        stacked = np.stack([data] * frames) if frames > 1 else data
        ds.PixelData = np.ascontiguousarray(stacked).tobytes()


def write_studies(folder: Path, n: int, phi: PhiRegistry, start: int = 0) -> list[Path]:
    """Write n distinct frontal studies, two thirds DICOM with fake PHI, the rest PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        arr = chest_like(seed=i)
        if i % 3 == 2:
            path = folder / f"study-{i:05d}.png"
            path.write_bytes(png_bytes(arr))
        else:
            path = folder / f"study-{i:05d}.dcm"
            path.write_bytes(dicom_bytes(arr, phi.new_patient(i)))
        paths.append(path)
    return paths
