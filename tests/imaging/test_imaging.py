"""Decoding and rejection of DICOM, JPEG and PNG input."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.imaging import decode as imaging
from pipeline.imaging.decode import Limits, RejectedInput
from tests.conftest import chest_like, dicom_bytes, jpeg_bytes, png_bytes


def lungs_darker_than_mediastinum(pixels: np.ndarray) -> bool:
    """Polarity check on the synthetic chest: lung fields at x=0.3/0.7, mediastinum at x=0.5."""
    h, w = pixels.shape
    band = pixels[int(h * 0.4) : int(h * 0.6)]
    lungs = (
        band[:, int(w * 0.27) : int(w * 0.33)].mean()
        + band[:, int(w * 0.67) : int(w * 0.73)].mean()
    ) / 2
    mediastinum = band[:, int(w * 0.47) : int(w * 0.53)].mean()
    return bool(lungs + 30 < mediastinum)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_polarity_is_lungs_dark(photometric: str) -> None:
    out = imaging.decode_bytes(dicom_bytes(photometric=photometric), "x.dcm")
    assert out.kind == "dicom" and out.pixels.dtype == np.uint8
    assert lungs_darker_than_mediastinum(out.pixels)
    assert out.meta["PhotometricInterpretation"] == photometric
    assert out.dedup_key.startswith("sop:")


def test_dicom_window_is_applied() -> None:
    # A narrow window around mid-grey saturates most of the image to 0 or 255.
    wide = imaging.decode_bytes(dicom_bytes(), "a.dcm").pixels
    narrow = imaging.decode_bytes(dicom_bytes(window=(2048, 200)), "b.dcm").pixels
    saturated = lambda a: float(np.mean((a == 0) | (a == 255)))  # noqa: E731
    assert saturated(narrow) > saturated(wide) + 0.3


def test_dicom_metadata_extracted() -> None:
    out = imaging.decode_bytes(dicom_bytes(priority="STAT", view="AP"), "x.dcm")
    assert out.meta["AccessionNumber"] == "ACC-0001"
    assert out.meta["PatientID"] == "PID-0001"
    assert out.meta["ViewPosition"] == "AP"
    assert out.meta["RequestedProcedurePriority"] == "STAT"
    assert not out.is_lateral
    assert imaging.decode_bytes(dicom_bytes(view="LL"), "l.dcm").is_lateral


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"frames": 2}, "multi-frame"),
        ({"samples": 3}, "colour"),
        ({"modality": "CT"}, "modality CT is not accepted"),
        ({"pixel_data": False}, "no pixel data: the CR header"),
    ],
)
def test_dicom_rejections_have_specific_reasons(kwargs: dict, reason: str) -> None:
    with pytest.raises(RejectedInput, match=reason):
        imaging.decode_bytes(dicom_bytes(**kwargs), "x.dcm")


def test_truncated_dicom_pixel_data_is_rejected() -> None:
    data = dicom_bytes()
    with pytest.raises(RejectedInput, match="truncated|cannot be decoded"):
        imaging.decode_bytes(data[: len(data) - 5000], "x.dcm")


def test_jpeg_and_png_decode_and_dedup_by_content() -> None:
    arr = chest_like(seed=5)
    j = imaging.decode_bytes(jpeg_bytes(arr), "a.jpg")
    p = imaging.decode_bytes(png_bytes(arr), "a.png")
    assert (j.kind, p.kind) == ("jpeg", "png")
    assert np.array_equal(p.pixels, arr)
    assert j.dedup_key.startswith("sha256:") and j.dedup_key != p.dedup_key
    assert lungs_darker_than_mediastinum(j.pixels)


def test_greyscale_saved_as_rgb_is_accepted_but_colour_is_rejected() -> None:
    arr = chest_like()
    assert imaging.decode_bytes(jpeg_bytes(arr, mode="RGB"), "g.jpg").kind == "jpeg"
    colour = np.stack([arr, np.roll(arr, 40, axis=1), 255 - arr], axis=2)
    with pytest.raises(RejectedInput, match="colour"):
        imaging.decode_bytes(png_bytes(colour), "c.png")


def test_size_and_pixel_limits() -> None:
    with pytest.raises(RejectedInput, match="over the"):
        imaging.decode_bytes(png_bytes(chest_like()), "a.png", Limits(max_bytes=100))
    with pytest.raises(RejectedInput, match="pixels, over the"):
        imaging.decode_bytes(png_bytes(chest_like()), "a.png", Limits(max_pixels=1000))


def test_garbage_and_empty_are_rejected() -> None:
    with pytest.raises(RejectedInput, match="not a readable"):
        imaging.decode_bytes(b"hello world" * 10, "a.jpg")
    with pytest.raises(RejectedInput, match="empty"):
        imaging.decode_bytes(b"", "a.png")


def test_preview_roundtrip_and_model_input() -> None:
    out = imaging.decode_bytes(png_bytes(chest_like(size=300)), "a.png")
    blob = imaging.encode_preview(out.pixels)
    back = imaging.decode_preview(blob)
    assert back.shape == (300, 300)
    assert np.abs(back.astype(int) - out.pixels.astype(int)).mean() < 3
    assert imaging.model_input(blob, 224).shape == (224, 224)
