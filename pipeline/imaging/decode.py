"""Bytes in, a display-ready 8-bit greyscale radiograph and its metadata out.

DICOM is decoded in the order the standard prescribes: Modality LUT / rescale, then the VOI LUT
or window, then MONOCHROME1 inversion, then 8-bit. JPEG and PNG are read with Pillow behind a
pixel-count guard. Anything that is not a single-frame greyscale radiograph raises
``RejectedInput`` with a reason a radiographer can act on.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from pipeline.imaging import display as dicom_display
from pipeline.imaging.header import dicom_metadata, drop_unreadable

PREVIEW_MAX_SIDE = 1024
PREVIEW_JPEG_QUALITY = 92
DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")
ACCEPTED_SUFFIXES = DICOM_SUFFIXES + RASTER_SUFFIXES
# Views the frontal-film model must not score; they are skipped with a reason.
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "XTABLE"}


class RejectedInput(ValueError):
    """The input is not something the model can or should read; the message says why (for
    people) and ``code`` what kind of refusal it is (for protocols: a DICOM failure status)."""

    code = "unreadable"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


REJECTION_CODES = ("unreadable", "not_an_image", "too_large")


class UndecodableInput(RejectedInput):
    """A parser failed in a way no specific check foresaw; the cause is kept for the fuzz."""


@dataclass
class Limits:
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    modalities: tuple[str, ...] = ("CR", "DX")


@dataclass
class DecodedImage:
    pixels: np.ndarray  # uint8, H x W, at most PREVIEW_MAX_SIDE on the long side
    kind: str  # dicom | jpeg | png
    dedup_key: str
    width: int
    height: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_lateral(self) -> bool:
        view = (self.meta.get("ViewPosition") or "").upper()
        return view in LATERAL_VIEWS

    @property
    def skip_reason(self) -> str | None:
        """Why the frontal-chest model must not score this image (lateral, not a chest)."""
        if self.is_lateral:
            view = self.meta.get("ViewPosition")
            return f"lateral view ({view}): the model reads frontal films"
        part = str(self.meta.get("BodyPartExamined") or "").strip().upper()
        if part not in dicom_display.CHEST_BODY_PARTS:
            return f"body part {part}: the model reads chest films"
        return None


def content_key(data: bytes) -> str:
    """Return the content-hash dedup key of raw bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_key(path: Path) -> str:
    """Return the content-hash dedup key of a file, read in chunks (never whole into memory)."""
    with open(path, "rb") as fh:
        return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()


def oversize_reason(size: int, limit: int) -> str:
    """The reason recorded for a file over the size limit."""
    return f"the file is {size / 1e6:.1f} MB, over the {limit / 1e6:.0f} MB limit"


def looks_like_dicom(data: bytes, filename: str) -> bool:
    """True for the DICM magic at offset 128 or a DICOM file suffix."""
    return data[128:132] == b"DICM" or filename.lower().endswith(DICOM_SUFFIXES)


def decode_bytes(data: bytes, filename: str, limits: Limits | None = None) -> DecodedImage:
    """Decode one file's bytes into a display-size 8-bit image plus metadata."""
    limits = limits or Limits()
    if len(data) == 0:
        raise RejectedInput("the file is empty")
    if len(data) > limits.max_bytes:
        raise RejectedInput(oversize_reason(len(data), limits.max_bytes), "too_large")
    try:
        if looks_like_dicom(data, filename):
            return _decode_dicom(data, limits)
        return _decode_raster(data, limits)
    except RejectedInput:
        raise
    except Exception as exc:
        # A parser failing in a way the checks above did not foresee: still the file's fault,
        # so it is rejected with a reason rather than failing the batch it arrived in.
        raise UndecodableInput(f"the file cannot be decoded ({type(exc).__name__})") from exc


# --------------------------------------------------------------------------- raster


def _decode_raster(data: bytes, limits: Limits) -> DecodedImage:
    try:
        img = PILImage.open(io.BytesIO(data))
    except PILImage.DecompressionBombError as exc:
        # Pillow refuses headers claiming over twice its own limit before we can read the size.
        raise RejectedInput(
            f"image is over the {limits.max_pixels:,} pixel limit (a decompression bomb)"
        ) from exc
    except Exception as exc:
        raise RejectedInput("not a readable DICOM, JPEG or PNG file") from exc
    kind = (img.format or "").lower()
    if kind not in ("jpeg", "png"):
        raise RejectedInput(f"unsupported image format {img.format or 'unknown'}")
    w, h = img.size
    if w * h > limits.max_pixels:
        raise RejectedInput(f"image is {w}x{h} pixels, over the {limits.max_pixels:,} limit")
    try:
        if kind == "jpeg":
            # Decode at reduced scale, in the file's own mode: drafting a colour JPEG as "L"
            # would turn it grey before the colour check below could see it.
            img.draft(img.mode, (PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
        img.load()
    except Exception as exc:
        raise RejectedInput(f"the {kind.upper()} data is truncated or corrupt ({exc})") from exc
    arr = _raster_to_grey(img)
    return DecodedImage(
        pixels=_to_display(arr),
        kind=kind,
        dedup_key=content_key(data),
        width=w,
        height=h,
        meta={},
    )


def _raster_to_grey(img: PILImage.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        return _scale_to_uint8(arr, float(arr.min()), float(arr.max()))
    if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        # Radiographs saved as RGB have equal channels; a photograph or a coloured overlay does
        # not. Every 4th pixel each way is enough to tell, at a 16th of the cost.
        rgb = np.asarray(img.convert("RGB"))[::4, ::4].astype(np.int16)
        spread = np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean()
        if spread > 4.0:
            raise RejectedInput("colour image: a radiograph must be greyscale")
    return np.asarray(img.convert("L"), dtype=np.uint8)


# --------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, limits: Limits) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            # pydicom's warnings quote header values, which can be patient data.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            dropped = drop_unreadable(ds)
            meta = dicom_metadata(ds)
    except (InvalidDicomError, Exception) as exc:
        raise RejectedInput(f"unreadable DICOM file ({type(exc).__name__})") from exc
    if essential := [t for t in dropped if t.startswith("(0028,") or t == "(7FE0,0010)"]:
        raise RejectedInput(
            f"the image description cannot be read: element {essential[0]} is malformed"
        )
    if dropped:
        meta["UnreadableElements"] = dropped[:20]
    if "PixelData" not in ds and not any(k in meta for k in ("SOPClassUID", "Modality")):
        if data[128:132] == b"DICM":
            raise RejectedInput("corrupt DICOM file: no readable attributes after the header")
        raise RejectedInput("not a DICOM file: no DICM header and no readable DICOM attributes")
    modality = (meta.get("Modality") or "").upper()
    non_image = dicom_display.non_image_reason(meta)
    if non_image is not None:
        raise RejectedInput(non_image, "not_an_image")
    if "PixelData" not in ds:
        sop = meta.get("SOPClassUID") or "unknown"
        if sop.startswith("1.2.840.10008.5.1.4.1.1.") and modality:
            raise RejectedInput(f"no pixel data: the {modality} header arrived without its image")
        raise RejectedInput(f"no pixel data: not an image (SOP class {sop})")
    if limits.modalities and modality not in limits.modalities:
        allowed = ", ".join(limits.modalities)
        raise RejectedInput(
            f"modality {modality or 'missing'} is not accepted (allowed: {allowed})"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise RejectedInput(f"multi-frame image ({frames} frames): a radiograph has one")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise RejectedInput(f"colour image ({photometric}): a radiograph must be greyscale")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols == 0:
        raise RejectedInput("the image has no rows or columns")
    if rows * cols > limits.max_pixels:
        raise RejectedInput(f"image is {cols}x{rows} pixels, over the {limits.max_pixels:,} limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on odd-length or padded data
            stored = ds.pixel_array
    except Exception as exc:
        raise RejectedInput(dicom_display.pixel_error_reason(ds, exc)) from exc
    if stored.ndim != 2:
        raise RejectedInput(f"unexpected pixel array shape {stored.shape}")
    grey = dicom_display.to_display(ds, stored, meta)
    sop_uid = meta.get("SOPInstanceUID")
    return DecodedImage(
        pixels=_to_display(grey),
        kind="dicom",
        dedup_key=f"sop:{sop_uid}" if sop_uid else content_key(data),
        width=cols,
        height=rows,
        meta=meta,
    )


def dicom_to_uint8(ds: Any, stored: np.ndarray) -> np.ndarray:
    """Apply Modality LUT, VOI LUT or window, and MONOCHROME1 inversion; return uint8."""
    return dicom_display.to_display(ds, stored, {})


def _scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.round(dicom_display.scale_unit(values, lo, hi) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- outputs


def _to_display(grey: np.ndarray) -> np.ndarray:
    h, w = grey.shape
    scale = PREVIEW_MAX_SIDE / max(h, w)
    if scale >= 1.0:
        return np.ascontiguousarray(grey)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(PILImage.fromarray(grey).resize(size, PILImage.Resampling.BOX))


def encode_preview(pixels: np.ndarray) -> bytes:
    """Encode a display image as greyscale JPEG for storage in the database."""
    buf = io.BytesIO()
    PILImage.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return buf.getvalue()


def decode_preview(data: bytes) -> np.ndarray:
    """Decode a stored preview back to a uint8 array."""
    img = PILImage.open(io.BytesIO(data))
    # A stored preview is greyscale already: converting would only copy it.
    return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)


def model_input(preview: bytes, size: int, preprocess: str = "resize") -> np.ndarray:
    """Build the model-ready uint8 size x size image from the stored preview.

    ``preprocess`` is the weights' method (``meta["preprocess"]``), applied by the one function
    training and evaluation use too (pipeline.imaging.preprocess).
    """
    from pipeline.imaging.preprocess import model_input_from_grey

    return model_input_from_grey(decode_preview(preview), size, preprocess)
