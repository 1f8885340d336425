"""The preprocessing between a decoded film and the network: a pure function on generated films.

A chest phantom (a bright body, two dark lungs, a spine and ribs) is drawn with and without what
identifies a source: a bright border, a burned-in letter, a 64-pixel film. The network input
``thorax`` builds must not let a trivial classifier (the project's shortcut probe: logistic
regression on 16 x 16 thumbnails and eight intensity statistics) tell the variants apart, while
the plain ``resize`` input does.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.imaging import preprocess as pp
from pipeline.imaging.decode import encode_preview, model_input
from pipeline.training.shortcuts import image_stats, probe, thumbnails


def phantom(rng: np.random.Generator, side: int = 512) -> tuple[np.ndarray, tuple[int, ...]]:
    """A frontal chest phantom; returns it and the lungs' box (r0, r1, c0, c1) in pixels."""
    img = np.full((side, side), rng.uniform(20, 40), np.float32)  # air around the body
    yy, xx = np.mgrid[:side, :side] / side
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    body = ((xx - cx) / rng.uniform(0.40, 0.46)) ** 2 + ((yy - 0.55) / 0.55) ** 2 <= 1
    img[body] = rng.uniform(150, 185)
    lungs = np.zeros_like(body)
    top, h = rng.uniform(0.16, 0.22), rng.uniform(0.27, 0.33)
    for sx in (-1, 1):
        lx = cx + sx * rng.uniform(0.17, 0.21)
        lungs |= ((xx - lx) / rng.uniform(0.11, 0.14)) ** 2 + ((yy - top - h) / h) ** 2 <= 1
    img[lungs] = rng.uniform(55, 80)
    ribs = (np.sin(yy * side / rng.uniform(16, 22)) > 0.6) & lungs
    img[ribs] += 35
    spine = (np.abs(xx - cx) < 0.035) & body
    img[spine] = 200
    # films differ in sharpness, exposure and noise whatever their source
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 6.0))
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    img += rng.normal(0, rng.uniform(1, 8), img.shape)
    ys, xs = np.nonzero(lungs)
    return np.clip(img, 0, 255).astype(np.uint8), (ys.min(), ys.max(), xs.min(), xs.max())


def bright_border(img: np.ndarray) -> np.ndarray:
    side = img.shape[0]
    pad = side // 10
    out = np.full((side + 2 * pad, side + 2 * pad), 255, np.uint8)
    out[pad:-pad, pad:-pad] = img
    return cv2.resize(out, (side, side), interpolation=cv2.INTER_AREA)


def burned_in_letter(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    side = img.shape[0]
    cv2.putText(
        out,
        "R",
        (side // 40, side // 8),
        cv2.FONT_HERSHEY_SIMPLEX,
        side / 180,
        255,
        max(2, side // 60),
    )
    return out


def low_resolution(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)


VARIANTS = {
    "bright border": bright_border,
    "burned-in letter": burned_in_letter,
    "64-px film": low_resolution,
}


def probe_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    """Held-out accuracy of the shortcut probe telling set a from set b."""
    x = np.concatenate([a, b])
    features = np.column_stack([thumbnails(x), image_stats(x)])
    target = np.r_[np.zeros(len(a)), np.ones(len(b))]
    return probe(features, target, seed=0)["accuracy"]


@pytest.fixture(scope="module")
def films() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [phantom(rng)[0] for _ in range(120)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_trivial_classifier_cannot_tell_the_variant_after_thorax(
    films: list[np.ndarray], variant: str
) -> None:
    change = VARIANTS[variant]
    # half the films plain, the other half (other phantoms) with the variant
    plain, changed = films[::2], [change(f) for f in films[1::2]]

    def inputs(method: str, group: list[np.ndarray]) -> np.ndarray:
        return np.stack([pp.model_input_from_grey(f, 128, method) for f in group])

    before = probe_accuracy(inputs("resize", plain), inputs("resize", changed))
    after = probe_accuracy(inputs("thorax", plain), inputs("thorax", changed))
    if variant != "64-px film":  # a 64-px film resized is no cue at 16 x 16: only blur tells
        assert before >= 0.9, f"the probe should see the {variant} in the plain input"
    assert after <= 0.75, f"{variant}: the probe still tells them apart ({after:.2f})"


def test_the_crop_holds_the_lungs_and_drops_the_border(films: list[np.ndarray]) -> None:
    rng = np.random.default_rng(1)
    inside = found = 0
    for _ in range(40):
        film, (r0, r1, c0, c1) = phantom(rng)
        out, loc = pp.preprocess(film, 128, "thorax")
        assert out.shape == (128, 128) and out.dtype == np.uint8
        found += loc.found
        br0, br1, bc0, bc1 = (v * 512 for v in loc.box)
        # the crop holds both lungs (a few pixels of slack) and is smaller than the film
        inside += br0 <= r0 + 8 and br1 >= r1 - 8 and bc0 <= c0 + 8 and bc1 >= c1 - 8
        assert (br1 - br0) * (bc1 - bc0) < 0.8 * 512 * 512
    assert found == 40 and inside >= 38


def test_the_lung_mask_lies_on_the_lungs() -> None:
    film, _ = phantom(np.random.default_rng(2))
    out, loc = pp.preprocess(film, 128, "thorax")
    assert loc.lung_mask is not None and loc.lung_mask.shape == (128, 128)
    # the lungs are the darkest part of the equalised input
    assert out[loc.lung_mask].mean() < out[~loc.lung_mask].mean() - 30
    assert 0.2 < loc.lung_mask.mean() < 0.8


def test_no_lungs_falls_back_to_the_fixed_box_and_says_so() -> None:
    flat = np.random.default_rng(3).normal(128, 12, (300, 300)).clip(0, 255).astype(np.uint8)
    out, loc = pp.preprocess(flat, 64, "thorax")
    assert out.shape == (64, 64) and not loc.found and loc.lung_mask is None
    r0, r1, c0, c1 = pp.FALLBACK_BOX
    assert loc.box == pytest.approx((r0, r1, c0, c1), abs=0.01)


def test_pure_deterministic_and_shared_with_the_running_system() -> None:
    film, _ = phantom(np.random.default_rng(4))
    copy = film.copy()
    a = pp.model_input_from_grey(film, 128, "thorax")
    b = pp.model_input_from_grey(film, 128, "thorax")
    assert np.array_equal(a, b) and np.array_equal(film, copy)  # same answer, input untouched
    # the ingest path builds its input from the stored JPEG preview by the same function
    preview = encode_preview(film)
    via_ingest = model_input(preview, 128, "thorax")
    from pipeline.imaging.decode import decode_preview

    assert np.array_equal(
        via_ingest, pp.model_input_from_grey(decode_preview(preview), 128, "thorax")
    )
    # "resize" is the whole film, as models before the thorax crop were trained
    assert model_input(preview, 32).shape == (32, 32)


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(pp.PreprocessError, match="unknown preprocessing 'heart'"):
        pp.preprocess(np.zeros((10, 10), np.uint8), 8, "heart")


def test_trim_borders_drops_flat_padding_only() -> None:
    film, _ = phantom(np.random.default_rng(5), side=200)
    padded = np.zeros((240, 260), np.uint8)
    padded[20:220, 30:230] = film
    r0, r1, c0, c1 = pp.trim_borders(padded)
    assert abs(r0 - 20) <= 2 and abs(r1 - 220) <= 2 and abs(c0 - 30) <= 2 and abs(c1 - 230) <= 2
    assert pp.trim_borders(film) == (0, 200, 0, 200)  # a film without padding keeps its edges


def test_lungs_method_blacks_out_all_but_the_grown_lungs() -> None:
    film, _ = phantom(np.random.default_rng(6))
    thorax, tloc = pp.preprocess(film, 128, "thorax")
    lungs, loc = pp.preprocess(film, 128, "lungs")
    assert loc.found and loc.lung_mask is not None and tloc.lung_mask is not None
    assert loc.lung_mask.sum() > tloc.lung_mask.sum()  # the seen region is the grown lungs
    outside = ~loc.lung_mask
    assert outside.any() and lungs[outside].max() == 0  # nothing outside is left to read
    inner = cv2.erode(tloc.lung_mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.array_equal(lungs[inner], thorax[inner])  # the lungs themselves are unchanged
