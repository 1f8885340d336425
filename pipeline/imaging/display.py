"""DICOM header checks and the greyscale display pipeline (stored values to 8-bit, lungs dark).

The order is the standard's: Modality LUT / rescale, then the VOI LUT sequence, else the first
window, else the range of the data, then MONOCHROME1 (or an INVERSE Presentation LUT) inversion.
Two guards cover headers that do not describe their own pixels (seen in real files): a window
that saturates almost the whole image is ignored, and when the header contradicts itself about
polarity, the anatomy of a frontal chest decides it. Each guard that fires leaves a note in the
image's metadata, so the study page shows what was done.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A window inside which fewer pixels than this fall does not describe the image.
MIN_WINDOW_SHARE = 0.01
# Grey levels (of 255) by which the lungs must outshine the mediastinum before a chest
# whose header contradicts itself is inverted; normal films sit 20-120 levels the other way.
INVERTED_MARGIN = 40.0
CHEST_BODY_PARTS = {"", "CHEST", "THORAX", "TORAX", "LUNG", "LUNGS", "BRUST"}


def non_image_reason(meta: dict[str, Any]) -> str | None:
    """Why a known SOP class is not an image (RT plans, dose grids, reports, PDFs), else None."""
    from pydicom.uid import UID

    sop = str(meta.get("SOPClassUID") or "")
    if not sop:
        return None
    name = UID(sop).name
    if name == sop or "Image Storage" in name:
        return None  # unknown to pydicom, or an image class: the other checks decide
    return f"not an image: SOP class {name} ({sop})"


def pixel_error_reason(ds: Any, exc: Exception) -> str:
    """A one-line reason for pixel data that cannot be decoded."""
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if tsuid is not None and not tsuid.is_transfer_syntax:
        return f"the file meta names {str(tsuid)[:64]} as its transfer syntax, which is not one"
    if tsuid is not None and tsuid.is_compressed:
        return (
            f"the {tsuid.name} pixel data cannot be decoded (corrupt, truncated or an "
            f"unsupported variant): {text.rstrip(':')}"
        )
    return f"pixel data is truncated or corrupt: {text}"


def chest_contrast(pixels: np.ndarray) -> float:
    """Mean of the mediastinal strip minus the mean of both lung fields, in grey levels.

    Positive on a frontal chest shown the conventional way (lungs dark). Regions: the middle
    40 % of the height; mediastinum x 45-55 %, lungs x 20-35 % and 65-80 %.
    """
    h, w = pixels.shape
    band = pixels[int(h * 0.3) : int(h * 0.7)].astype(np.float32)
    mediastinum = band[:, int(w * 0.45) : int(w * 0.55)].mean()
    lungs = (
        band[:, int(w * 0.2) : int(w * 0.35)].mean() + band[:, int(w * 0.65) : int(w * 0.8)].mean()
    ) / 2
    return float(mediastinum - lungs)


def to_display(ds: Any, stored: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Apply Modality LUT, VOI LUT or window, and MONOCHROME1 inversion; return uint8.

    Notes about guards that fired are added to ``meta``.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    out: np.ndarray | None = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float32)
        out = scale_unit(values, float(values.min()), float(values.max()))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        inside = np.mean((values > center - width / 2) & (values < center + width / 2))
        if inside >= MIN_WINDOW_SHARE:
            out = _linear_window(values, center, width)
        else:
            meta["DisplayWindowIgnored"] = (
                f"window {center:g}/{width:g} holds {inside:.1%} of the pixels; "
                "the range of the data was used"
            )
    if out is None:
        # No usable window: the spread of the data itself, ignoring the outer half percent
        # (collimator edges and burned-in markers) as display software does.
        lo, hi = np.percentile(values, [0.5, 99.5])
        out = scale_unit(values, float(lo), float(hi))
    if _inverted_by_header(ds):
        out = 1.0 - out
    grey = np.round(out * 255.0).astype(np.uint8)
    if _header_doubtful(ds, meta) and _is_frontal_chest(meta):
        contrast = chest_contrast(grey)
        if contrast < -INVERTED_MARGIN:
            meta["DisplayPolarityInverted"] = (
                f"the header contradicts itself and the lungs were {-contrast:.0f} grey levels "
                "brighter than the mediastinum: shown inverted"
            )
            grey = 255 - grey
    return grey


def _inverted_by_header(ds: Any) -> bool:
    # In DX, INVERSE accompanies MONOCHROME1 and states the same inversion: never applied twice.
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    shape = str(ds.get("PresentationLUTShape", "")).upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _header_doubtful(ds: Any, meta: dict[str, Any]) -> bool:
    """True when the header cannot be trusted about polarity.

    Either its window did not describe the pixels, or its Pixel Intensity Relationship Sign
    says the image shows more X-ray intensity brighter (lungs white) while its photometric
    interpretation claims a conventional display.
    """
    if "DisplayWindowIgnored" in meta:
        return True
    try:
        sign = int(ds.get("PixelIntensityRelationshipSign", 0) or 0)
    except (TypeError, ValueError):
        return False
    inverted = _inverted_by_header(ds)
    return (sign == 1 and not inverted) or (sign == -1 and inverted)


def _is_frontal_chest(meta: dict[str, Any]) -> bool:
    from pipeline.imaging.decode import LATERAL_VIEWS

    part = str(meta.get("BodyPartExamined") or "").strip().upper()
    view = str(meta.get("ViewPosition") or "").strip().upper()
    return part in CHEST_BODY_PARTS and view not in LATERAL_VIEWS


def _first(value: Any) -> float:
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    # DICOM PS3.3 C.11.2.1.2.1 linear function, output in [0, 1].
    out = ((values - (center - 0.5)) / max(width - 1.0, 1.0)) + 0.5
    return np.clip(out, 0.0, 1.0)


def scale_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map values linearly from [lo, hi] to [0, 1], clipped; all zero when the range is empty."""
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)
