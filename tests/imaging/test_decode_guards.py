"""Decoding guards on generated DICOM: a window that misses the pixels, a self-contradicting
polarity, non-chest body parts and non-image SOP classes."""

from __future__ import annotations

import io

import pydicom
import pytest

from pipeline.imaging import decode as imaging
from pipeline.imaging.decode import RejectedInput
from pipeline.imaging.display import chest_contrast
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


def test_a_file_meta_naming_a_non_transfer_syntax_is_rejected_with_that_reason() -> None:
    """Found by the decoder fuzz: pydicom raised ValueError("UID is not a transfer syntax")
    while the reason for the undecodable pixels was being worded."""
    from reliability.samples import PhiRegistry
    from reliability.samples import dicom_bytes as sample_dicom

    data = sample_dicom(chest_like(64, seed=1), PhiRegistry().new_patient(1))
    explicit_le = b"1.2.840.10008.1.2.1\x00"
    assert explicit_le in data
    bad = data.replace(explicit_le, b"1.2.840.10008.1.1\x00\x00\x00", 1)  # Verification SOP class
    with pytest.raises(RejectedInput) as info:
        imaging.decode_bytes(bad, "x.dcm")
    assert str(info.value) == (
        "the file meta names 1.2.840.10008.1.1 as its transfer syntax, which is not one"
    )


def _with_broken_vr(data: bytes, tag_and_vr: bytes) -> bytes:
    """Overwrite an explicit-VR element's VR with bytes that are no VR at all."""
    assert data.count(tag_and_vr) == 1
    return data.replace(tag_and_vr, tag_and_vr[:4] + b"\x55\xd8", 1)


def test_a_malformed_private_element_is_dropped_and_named_but_a_malformed_row_count_rejects() -> (
    None
):
    """Found by the decoder fuzz: pydicom converts elements lazily, so an unknown VR raised
    NotImplementedError wherever the element happened to be read first."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(chest_like(64, seed=2))))
    block = ds.private_block(0x0009, "CXR TEST", create=True)
    block.add_new(0x10, "LO", "vendor note")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()

    private = imaging.decode_bytes(_with_broken_vr(data, b"\x09\x00\x10\x10LO"), "p.dcm")
    assert private.meta["UnreadableElements"] == ["(0009,1010)"]
    assert private.pixels.shape == (64, 64)
    with pytest.raises(RejectedInput) as info:
        imaging.decode_bytes(_with_broken_vr(data, b"\x28\x00\x10\x00US"), "r.dcm")
    assert (
        str(info.value) == "the image description cannot be read: element (0028,0010) is malformed"
    )
