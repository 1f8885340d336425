"""Decoding guards on generated DICOM: a window that misses the pixels, a self-contradicting
polarity, non-chest body parts and non-image SOP classes."""

from __future__ import annotations

import io

import pydicom
import pytest

from pipeline import imaging
from pipeline.dicom_display import chest_contrast
from pipeline.imaging import RejectedInput
from tests.conftest import chest_like, dicom_bytes


def _edit(data: bytes, **values: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for key, value in values.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_window_outside_the_pixel_data_is_ignored() -> None:
    data = _edit(dicom_bytes(), WindowCenter=60000, WindowWidth=100)
    out = imaging.decode_bytes(data, "w.dcm")
    assert out.meta["DisplayWindowIgnored"].startswith("window 60000/100 holds 0.0% of the pixels")
    assert chest_contrast(out.pixels) > 40  # shown from the data's range, lungs still dark
    assert "DisplayPolarityInverted" not in out.meta


def test_lungs_bright_with_a_contradicting_header_are_inverted_but_a_plain_header_is_trusted() -> (
    None
):
    negative = 255 - chest_like()
    contradicting = _edit(dicom_bytes(negative), PixelIntensityRelationshipSign=1)
    out = imaging.decode_bytes(contradicting, "n.dcm")
    assert out.meta["DisplayPolarityInverted"].startswith("the header contradicts itself")
    assert chest_contrast(out.pixels) > 40
    # Without the contradiction the header is followed, even when the picture looks odd.
    plain = imaging.decode_bytes(dicom_bytes(negative), "p.dcm")
    assert chest_contrast(plain.pixels) < -40 and "DisplayPolarityInverted" not in plain.meta
    # Not a chest: anatomy says nothing, so nothing is inverted.
    hip = imaging.decode_bytes(_edit(contradicting, BodyPartExamined="HIP"), "h.dcm")
    assert "DisplayPolarityInverted" not in hip.meta


def test_skip_reasons_for_lateral_and_non_chest_images() -> None:
    assert imaging.decode_bytes(dicom_bytes(), "a.dcm").skip_reason is None
    hip = imaging.decode_bytes(_edit(dicom_bytes(), BodyPartExamined="HIP"), "h.dcm")
    assert hip.skip_reason == "body part HIP: the model reads chest films"
    lateral = imaging.decode_bytes(dicom_bytes(view="LL"), "l.dcm")
    assert lateral.skip_reason == "lateral view (LL): the model reads frontal films"


def test_a_non_image_sop_class_is_rejected_by_name() -> None:
    data = _edit(dicom_bytes(), SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11")
    with pytest.raises(RejectedInput, match=r"^not an image: SOP class Basic Text SR Storage"):
        imaging.decode_bytes(data, "sr.dcm")
