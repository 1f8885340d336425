"""WADO-RS over the instance store: metadata, frames, bulk data and rendered images.

Metadata is pydicom's PS3.18 JSON (``Dataset.to_json_dict``) with a bulk-data handler: large
binary elements, the pixel data among them, are given as ``BulkDataURI`` under the instance's
own URL, and the stored transfer syntax is added as (0002,0010) so a viewer knows how its
frames are encoded; a pixel spacing that is not positive is left out of it (the instance itself
is always sent as received). Frames go out in the stored transfer syntax when the client
accepts it (``transfer-syntax=*`` or that UID), else decoded to Explicit VR Little Endian.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

EXPLICIT_LE = "1.2.840.10008.1.2.1"
NATIVE = {EXPLICIT_LE, "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
BULK_THRESHOLD = 1024
THUMBNAIL_SIDE = 128
_UNQUOTED_TYPE = re.compile(r'(;\s*type=)([^";,\s]+)')
# Pixel Spacing, Imager Pixel Spacing, Nominal Scanned Pixel Spacing: some CR plates write
# "0\0" for "unknown" (the NEMA WG04 RG1 film does). Given it, OHIF 3.13.2 draws nothing (a
# black viewport and thumbnail); without the attribute it assumes 1 mm and shows the film.
SPACINGS = ("00280030", "00181164", "00182010")


class NotAcceptable(ValueError):
    """The client accepts no form this object can be sent in (406)."""


def read(data: bytes, pixels: bool = True) -> Any:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote header values
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)


def metadata(data: bytes, instance_url: str) -> dict[str, Any]:
    """One instance's metadata as PS3.18 JSON, bulk data by reference."""
    ds = read(data)

    def bulk(element: Any) -> str:
        return f"{instance_url}/bulk/{int(element.tag):08X}"

    out: dict[str, Any] = ds.to_json_dict(
        bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=bulk
    )
    for tag in SPACINGS:
        values = out.get(tag, {}).get("Value")
        if values is not None and not all(_positive(v) for v in values):
            del out[tag]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        from pydicom.dataset import Dataset

        syntax = Dataset()
        syntax.TransferSyntaxUID = meta.TransferSyntaxUID
        out.update(syntax.to_json_dict())
    return out


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


@dataclass
class Accepted:
    """What an Accept header allows for frames or bulk data."""

    syntaxes: set[str]  # transfer syntax UIDs, "*" for any
    native_ok: bool  # Explicit VR Little Endian octet-stream (the default) is acceptable


def parse_accept(header: str | None) -> Accepted:
    from werkzeug.http import parse_options_header

    if not header or header.strip() in ("*/*", "*"):
        return Accepted({EXPLICIT_LE}, True)
    syntaxes: set[str] = set()
    native = False
    # OHIF sends the type unquoted (type=application/octet-stream), which a MIME parameter
    # parser reads as "application": quote it first.
    header = _UNQUOTED_TYPE.sub(r'\1"\2"', header)
    for entry in header.split(","):
        media, options = parse_options_header(entry.strip())
        media = media.lower()
        kind = (options.get("type") or "").lower() if media == "multipart/related" else media
        syntax = options.get("transfer-syntax")
        if kind in ("application/octet-stream", "*/*", "*", "multipart/related", ""):
            if syntax:
                syntaxes.add(syntax)
            if not syntax or syntax == EXPLICIT_LE:
                native = True
        elif kind.startswith("image/") and syntax:
            syntaxes.add(syntax)
    if not syntaxes and not native:
        raise NotAcceptable(f"frames are sent as application/octet-stream, not {header}")
    return Accepted(syntaxes | ({EXPLICIT_LE} if native else set()), native)


def frames(data: bytes, numbers: list[int], accept: Accepted) -> tuple[list[bytes], str]:
    """The frames asked for (1-based), and the transfer syntax they are in."""
    from pydicom.encaps import generate_frames

    ds = read(data)
    if "PixelData" not in ds:
        raise LookupError("this instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if any(n < 1 or n > count for n in numbers):
        raise LookupError(f"this instance has {count} frame(s)")
    stored = str(ds.file_meta.TransferSyntaxUID)
    if "*" in accept.syntaxes or stored in accept.syntaxes:
        if stored in NATIVE and stored != "1.2.840.10008.1.2.1.99":
            size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
            size = size * int(ds.BitsAllocated) // 8
            raw = ds.PixelData
            return [raw[(n - 1) * size : n * size] for n in numbers], stored
        if stored not in NATIVE:
            every = list(generate_frames(ds.PixelData, number_of_frames=count))
            return [every[n - 1] for n in numbers], stored
    if not accept.native_ok:
        raise NotAcceptable(f"the frames are stored as {stored} and cannot be sent as asked")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = ds.pixel_array
    if count == 1:
        pixels = pixels[np.newaxis]
    return [
        np.ascontiguousarray(pixels[n - 1]).astype(pixels.dtype.newbyteorder("<")).tobytes()
        for n in numbers
    ], EXPLICIT_LE


def bulk(data: bytes, tag: int) -> bytes:
    """The raw value of one top-level element."""
    ds = read(data)
    if tag not in ds:
        raise LookupError(f"no element ({tag >> 16:04X},{tag & 0xFFFF:04X}) in this instance")
    value = ds[tag].value
    if isinstance(value, bytes):
        return value
    raise LookupError("that element is not bulk data")


def rendered(data: bytes, side: int | None = None, media: str = "image/jpeg") -> bytes:
    """The first frame as a display image (VOI LUT or window, MONOCHROME1 inverted)."""
    from PIL import Image as PILImage

    from pipeline.imaging.display import to_display
    from pipeline.imaging.header import dicom_metadata

    ds = read(data)
    if "PixelData" not in ds:
        raise LookupError("this instance has no pixel data to render")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stored = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        stored = stored[0]
    if stored.ndim == 3:  # colour: pydicom gives RGB
        image = PILImage.fromarray(np.asarray(stored, dtype=np.uint8), "RGB")
    else:
        image = PILImage.fromarray(to_display(ds, stored, dicom_metadata(ds)), "L")
    if side:
        image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, "PNG" if media == "image/png" else "JPEG", quality=90)
    return buf.getvalue()
