"""The bad-input corpus at the decoder, and the decoder fuzz (the suite's fast parts)."""

from __future__ import annotations

import pytest

from pipeline.imaging.decode import Limits, RejectedInput, decode_bytes
from reliability.corpus import SHARED_DICOM, cases, colour_jpeg, png_bomb
from reliability.fuzz import run_fuzz
from reliability.samples import PhiRegistry

CORPUS = cases(PhiRegistry())


@pytest.mark.parametrize(
    "case", [c for c in CORPUS if c.source != "<sparse>"], ids=lambda c: c.kind
)
def test_each_corpus_file_gets_its_documented_outcome(case) -> None:  # type: ignore[no-untyped-def]
    data = (SHARED_DICOM / case.source).read_bytes() if case.make is None else case.make()
    try:
        decoded = decode_bytes(data, case.filename, Limits())
        status, reason = "done", ""
        assert decoded.pixels.dtype.name == "uint8" and decoded.pixels.ndim == 2
    except RejectedInput as exc:
        status, reason = "rejected", str(exc)
    assert status == case.status, reason
    assert case.reason in reason


def test_a_colour_jpeg_is_rejected_though_decoded_at_reduced_scale() -> None:
    with pytest.raises(RejectedInput, match="colour image: a radiograph must be greyscale"):
        decode_bytes(colour_jpeg(), "colour.jpg")


def test_a_header_beyond_pillows_own_bomb_limit_gets_the_pixel_limit_reason() -> None:
    with pytest.raises(RejectedInput, match=r"over the 40,000,000 pixel limit \(a decompression"):
        decode_bytes(png_bomb(60_000, 60_000), "bomb.png")


def test_fuzz_of_the_decoder_ends_with_zero_unhandled_exceptions() -> None:
    result = run_fuzz(300)
    assert result.inputs == 300
    assert dict(result.unhandled) == {}
    # Both outcomes are exercised: mutations that still decode and ones that are rejected.
    assert result.decoded > 0 and result.rejected > 0
    assert result.decoded + result.rejected == 300
