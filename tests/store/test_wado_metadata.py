"""The DICOMweb metadata of an instance leaves out a pixel spacing that is not positive."""

from __future__ import annotations

import io

import pydicom

from pipeline.store import wado
from tests.conftest import dicom_bytes


def test_a_pixel_spacing_that_is_not_positive_is_left_out_of_the_metadata() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    ds.PixelSpacing, ds.ImagerPixelSpacing = ["0.000", "0.000"], ["0.139", "0.139"]
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    meta = wado.metadata(data, "http://x/dicomweb/studies/1/series/2/instances/3")
    assert "00280030" not in meta  # OHIF 3.13.2 draws nothing at all with it
    assert meta["00181164"] == {"vr": "DS", "Value": [0.139, 0.139]}
    assert meta["00280010"]["Value"] == [256] and meta["00020010"]["Value"] == [
        "1.2.840.10008.1.2.1"
    ]
    assert pydicom.dcmread(io.BytesIO(data)).PixelSpacing == [0, 0]  # the instance untouched
    ds.PixelSpacing = ["0.2", "0.2"]
    buf = io.BytesIO()
    ds.save_as(buf)
    assert wado.metadata(buf.getvalue(), "http://x/i")["00280030"]["Value"] == [0.2, 0.2]
