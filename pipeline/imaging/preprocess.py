"""The one preprocessing function between a decoded radiograph and the network.

Training, evaluation and the running system all call :func:`model_input_from_grey`, so the
model in production reads exactly what it was trained on. A weights file names its method in
``meta["preprocess"]``:

``resize``
    The whole film, bilinearly resized to the square input (models before the thorax crop).
``lungs``
    ``thorax``, then everything but the found lungs (grown by LUNG_MARGIN, soft-edged) is
    blacked out, so the network cannot read shoulders, the mediastinum's surroundings, lines,
    leads or the crop's edges. Where the lungs are not found, the ``thorax`` input is used.
``thorax``
    What identifies a source is removed before the network sees it:

    1. *Borders.* Rows and columns at the film's edge that are flat (padding, collimator
       shadow, scanned-film margins) are trimmed.
    2. *Lung fields.* A classical localiser (below) finds the two lungs as the largest dark,
       compact regions inside the body and crops to their bounding box plus a margin, so
       shoulders, burned-in text and markers in the corners, the neck and the abdomen are
       cut away. When it cannot find two plausible lungs it falls back to a fixed central
       crop of the trimmed film and says so (``Localisation.found``).
    3. *Resolution.* The crop is read at READ_SIDE (64) pixels across, then up-sampled to the
       network's input: the lowest resolution among the training sources (most of the NIH
       sample is 64 x 64), so that how sharp a film is no longer tells where it came from.
       This costs detail (small nodules are below it) and is the price of a model that does
       not recognise scanners; raise it when no training source is that coarse.
    4. *Intensity.* Contrast-limited adaptive histogram equalisation (CLAHE) at the read
       resolution, then a global histogram equalisation of the input, so exposure, detector
       response and windowing of the source no longer set the grey levels: every input has
       the same grey-level histogram.

The lung localiser (a documented classical method, after the threshold-and-components
approaches reviewed by van Ginneken et al., IEEE TMI 2001): on a 96-pixel working copy,
histogram-equalise, mark pixels darker than the Otsu threshold, open morphologically,
drop dark regions that touch the film's edge (air outside the body), and keep the two
largest remaining regions that are tall, not tiny and not on the midline. Lungs that touch
the edge (tightly collimated films) are recovered by a second pass that only drops regions
touching the top or the sides over more than a third of their length.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image as PILImage

METHODS = ("resize", "thorax", "lungs")
VERSION = 2  # of the thorax method; part of the training cache key
READ_SIDE = 64  # the crop is read at this many pixels across, whatever the film's resolution
WORK_SIDE = 96  # the localiser's working resolution: cheap, and enough for lung-sized regions
CROP_MARGIN = 0.08  # fraction of the lung box added on each side
FALLBACK_BOX = (0.06, 0.94, 0.08, 0.92)  # rows, cols of the trimmed film when lungs are not found
LOCAL_BLOCK = 31  # adaptive threshold window on the working copy (a third of it)
LOCAL_OFFSET = 4  # grey levels below the local mean
DARK_PERCENTILE = 65  # and below this percentile of the whole film
LUNG_MARGIN = 0.04  # "lungs": the found lungs grown by this fraction of the side stay visible
CLAHE_CLIP = 2.0
CLAHE_TILES = 4

cv2.setNumThreads(1)  # called per image from many processes; a pool per call costs more


class PreprocessError(ValueError):
    """An unknown preprocessing method was asked for."""


@dataclass(frozen=True)
class Localisation:
    """Where the crop came from, in fractions of the decoded film (rows, cols)."""

    box: tuple[float, float, float, float]  # r0, r1, c0, c1 of the crop on the film
    found: bool  # False: no two plausible lungs, the fixed fallback box was used
    lung_mask: np.ndarray | None = None  # bool, on the model input, where the lungs were found


def model_input_from_grey(grey: np.ndarray, size: int, method: str = "resize") -> np.ndarray:
    """Return the uint8 size x size network input for a uint8 greyscale film."""
    return preprocess(grey, size, method)[0]


def preprocess(
    grey: np.ndarray, size: int, method: str = "resize"
) -> tuple[np.ndarray, Localisation]:
    """Return (uint8 size x size input, where it came from) for a uint8 greyscale film."""
    if method not in METHODS:
        raise PreprocessError(f"unknown preprocessing {method!r}; choose one of {METHODS}")
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    if method == "resize":
        img = PILImage.fromarray(grey).resize((size, size), PILImage.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8), Localisation((0.0, 1.0, 0.0, 1.0), True)
    h, w = grey.shape
    r0, r1, c0, c1 = trim_borders(grey)
    body = grey[r0:r1, c0:c1]
    found, box, work_mask = locate_lungs(body)
    br0, br1, bc0, bc1 = box
    bh, bw = body.shape
    y0, y1 = int(round(br0 * bh)), max(int(round(br1 * bh)), int(round(br0 * bh)) + 1)
    x0, x1 = int(round(bc0 * bw)), max(int(round(bc1 * bw)), int(round(bc0 * bw)) + 1)
    crop = body[y0:y1, x0:x1]
    read = min(size, READ_SIDE)
    interp = cv2.INTER_AREA if min(crop.shape) > read else cv2.INTER_LINEAR
    out = equalise(cv2.resize(crop, (read, read), interpolation=interp))
    if read != size:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_LINEAR)
    out = cv2.equalizeHist(out)
    mask = None
    if work_mask is not None:
        wh, ww = work_mask.shape
        sub = work_mask[
            int(br0 * wh) : max(int(br1 * wh), int(br0 * wh) + 1),
            int(bc0 * ww) : max(int(bc1 * ww), int(bc0 * ww) + 1),
        ]
        mask = cv2.resize(sub.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    if method == "lungs" and mask is not None:
        out, mask = mask_outside_lungs(out, mask)
    film_box = ((r0 + y0) / h, (r0 + y1) / h, (c0 + x0) / w, (c0 + x1) / w)
    return out, Localisation(film_box, found, mask)


def input_box(grey: np.ndarray, method: str) -> tuple[float, float, float, float]:
    """The part of the film the model input covers, as (r0, r1, c0, c1) fractions of it.

    A CAM covers the model input, so this is where it lies on the film: the whole film for
    ``resize``, the crop for ``thorax`` and ``lungs``. The same function as the input's, so
    a stored preview gives the very box its model input came from.
    """
    if method == "resize":
        return (0.0, 1.0, 0.0, 1.0)
    return preprocess(grey, READ_SIDE, method)[1].box


def mask_outside_lungs(img: np.ndarray, lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Black out what is not lung: the found lungs grown by LUNG_MARGIN, with a soft edge.

    Returns the masked input and the region the network still sees (the grown lungs).
    """
    side = img.shape[0]
    grow = max(1, int(round(LUNG_MARGIN * side)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    seen = cv2.dilate(lungs.astype(np.uint8), kernel)
    soft = cv2.GaussianBlur(seen.astype(np.float32), (0, 0), max(1.0, grow / 2)) * seen
    return (img.astype(np.float32) * soft).round().astype(np.uint8), seen > 0


def equalise(img: np.ndarray) -> np.ndarray:
    """CLAHE on a uint8 image."""
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(CLAHE_TILES, CLAHE_TILES))
    return clahe.apply(img)


def trim_borders(grey: np.ndarray, max_fraction: float = 0.2) -> tuple[int, int, int, int]:
    """Return (r0, r1, c0, c1) after dropping flat rows and columns at each edge.

    A line is flat when its spread (standard deviation) is under 3 grey levels, or when it is
    nearly all black or white (padding, labels on a uniform strip). At most max_fraction of the
    film goes from each side.
    """
    h, w = grey.shape
    small = (
        grey if max(h, w) <= 256 else cv2.resize(grey, (256, 256), interpolation=cv2.INTER_LINEAR)
    )
    sh, sw = small.shape
    f = small.astype(np.float32)

    def flat(lines: np.ndarray) -> np.ndarray:
        sd = lines.std(axis=1)
        mean = lines.mean(axis=1)
        return (sd < 3.0) | (mean < 6.0) | (mean > 249.0)

    rows, cols = flat(f), flat(f.T)

    def run(mask: np.ndarray, limit: int) -> int:
        n = 0
        while n < limit and mask[n]:
            n += 1
        return n

    top, bottom = run(rows, int(sh * max_fraction)), run(rows[::-1], int(sh * max_fraction))
    left, right = run(cols, int(sw * max_fraction)), run(cols[::-1], int(sw * max_fraction))
    r0, r1 = int(top * h / sh), h - int(bottom * h / sh)
    c0, c1 = int(left * w / sw), w - int(right * w / sw)
    if r1 - r0 < h // 2 or c1 - c0 < w // 2:
        return 0, h, 0, w
    return r0, r1, c0, c1


def locate_lungs(
    body: np.ndarray,
) -> tuple[bool, tuple[float, float, float, float], np.ndarray | None]:
    """Find the lung fields on a border-trimmed film.

    Returns (found, crop box as fractions r0, r1, c0, c1 of ``body``, lung mask on the working
    copy or None). When not found, the box is FALLBACK_BOX.
    """
    work = cv2.resize(body, (WORK_SIDE, WORK_SIDE), interpolation=cv2.INTER_AREA)
    work = cv2.GaussianBlur(cv2.equalizeHist(work), (3, 3), 0)
    # Dark against the neighbourhood (a third of the film) and dark overall: lungs, not the
    # soft tissue beside them nor the bright abdomen below.
    local = cv2.adaptiveThreshold(
        work, 1, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, LOCAL_BLOCK, LOCAL_OFFSET
    )
    dark = local & (work < np.percentile(work, DARK_PERCENTILE)).astype(np.uint8)
    for k in (3, 5, 9):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        lungs = _lung_regions(cv2.erode(dark, kernel), strict=False)
        if lungs is not None:
            # grow the cores back inside the dark mask (a geodesic dilation by the same kernel)
            lungs = (cv2.dilate(lungs.astype(np.uint8), kernel) & dark).astype(bool)
            ys, xs = np.nonzero(lungs)
            r0, r1 = ys.min() / WORK_SIDE, (ys.max() + 1) / WORK_SIDE
            c0, c1 = xs.min() / WORK_SIDE, (xs.max() + 1) / WORK_SIDE
            mh, mw = (r1 - r0) * CROP_MARGIN, (c1 - c0) * CROP_MARGIN
            box = (max(0.0, r0 - mh), min(1.0, r1 + mh), max(0.0, c0 - mw), min(1.0, c1 + mw))
            return True, box, lungs
    return False, FALLBACK_BOX, None


def _lung_regions(dark: np.ndarray, strict: bool) -> np.ndarray | None:
    side = WORK_SIDE
    # Lungs joined under the heart or through the trachea become one region: cut the mask at
    # the midline column (the darkest-free column between 35 % and 65 % of the width).
    centre = dark[:, int(0.35 * side) : int(0.65 * side)].sum(axis=0)
    cut = int(0.35 * side) + int(np.argmin(centre))
    dark = dark.copy()
    dark[:, cut] = 0
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(
        dark.astype(np.uint8), connectivity=4
    )
    keep = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if area < 0.015 * side * side or h < 0.25 * side or area > 0.4 * side * side:
            continue
        if strict and (x == 0 or y == 0 or x + w >= side or y + h >= side):
            continue
        if not strict:
            region = labels == i
            edge = max(region[0].sum(), region[-1].sum(), region[:, 0].sum(), region[:, -1].sum())
            if edge > side / 3:
                continue
        cx = centroids[i][0] / side
        keep.append((int(area), i, cx))
    keep.sort(reverse=True)
    left = [k for k in keep if k[2] < cut / side]
    right = [k for k in keep if k[2] >= cut / side]
    if not left or not right:
        return None
    mask = np.isin(labels, (left[0][1], right[0][1]))
    ys, xs = np.nonzero(mask)
    height, width = (ys.max() - ys.min() + 1) / side, (xs.max() - xs.min() + 1) / side
    if height < 0.3 or width < 0.4 or mask.mean() < 0.06:
        return None
    return mask
