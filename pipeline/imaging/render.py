"""Render a stored CAM over its radiograph, on demand."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage


def cam_array(cam: bytes, h: int, w: int) -> np.ndarray:
    """Decode a stored float16 CAM."""
    return np.frombuffer(cam, dtype=np.float16).reshape(h, w).astype(np.float32)


def _colormap(x: np.ndarray) -> np.ndarray:
    # A perceptually ordered blue→cyan→yellow→red ramp; x in [0, 1].
    stops = np.array(
        [[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 128, 0], [255, 0, 0]],
        dtype=np.float32,
    )
    pos = x * (len(stops) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


Box = tuple[float, float, float, float]  # r0, r1, c0, c1: fractions of the film
WHOLE: Box = (0.0, 1.0, 0.0, 1.0)


def box_pixels(box: Box, w: int, h: int) -> tuple[int, int, int, int]:
    """The box in pixels of a w x h image: y0, y1, x0, x1 (at least one pixel each way)."""
    r0, r1, c0, c1 = box
    y0, x0 = min(int(round(r0 * h)), h - 1), min(int(round(c0 * w)), w - 1)
    return y0, max(int(round(r1 * h)), y0 + 1), x0, max(int(round(c1 * w)), x0 + 1)


def _heat(cam: np.ndarray, w: int, h: int, box: Box | None = None) -> np.ndarray:
    """The ReLU'd, max-normalised CAM on a w x h image, in [0, 1].

    The CAM covers the model input, which is ``box`` of the film (pipeline.imaging.preprocess
    .input_box; None: the whole film): it is upsampled onto that box, and nothing lies outside.
    """
    heat = np.maximum(cam, 0.0)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    y0, y1, x0, x1 = box_pixels(box or WHOLE, w, h)
    heat_img = PILImage.fromarray((heat * 255).astype(np.uint8)).resize(
        (x1 - x0, y1 - y0), PILImage.Resampling.BICUBIC
    )
    out = np.zeros((h, w), dtype=np.float32)
    out[y0:y1, x0:x1] = np.asarray(heat_img, dtype=np.float32) / 255.0
    return out


def peak_cell(cam: np.ndarray, box: Box | None = None) -> Box:
    """The CAM's strongest cell, as (r0, r1, c0, c1) fractions of the film."""
    gh, gw = cam.shape
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    b0, b1, a0, a1 = box or WHOLE
    rows, cols = (b1 - b0) / gh, (a1 - a0) / gw
    return (b0 + r * rows, b0 + (r + 1) * rows, a0 + c * cols, a0 + (c + 1) * cols)


def overlay_rgb(
    preview: np.ndarray, cam: np.ndarray, alpha: float = 0.45, box: Box | None = None
) -> np.ndarray:
    """Blend the ReLU'd, max-normalised CAM over the greyscale image; return RGB uint8."""
    h, w = preview.shape
    heat_up = _heat(cam, w, h, box)
    colour = _colormap(heat_up).astype(np.float32)
    grey = np.repeat(preview[..., None], 3, axis=2).astype(np.float32)
    weight = (alpha * heat_up)[..., None]
    return (grey * (1 - weight) + colour * weight).clip(0, 255).astype(np.uint8)


def overlay_png(
    preview: np.ndarray, cam: np.ndarray, alpha: float = 0.45, box: Box | None = None
) -> bytes:
    """``overlay_rgb`` as PNG bytes."""
    buf = io.BytesIO()
    PILImage.fromarray(overlay_rgb(preview, cam, alpha, box), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(cam: np.ndarray, width: int, height: int, box: Box | None = None) -> bytes:
    """The CAM alone as RGBA (alpha = strength): laid over the image in the browser, where
    CSS opacity gives the same blend as ``overlay_png`` and a slider can change it instantly."""
    heat_up = _heat(cam, width, height, box)
    rgba = np.dstack([_colormap(heat_up), (heat_up * 255).astype(np.uint8)])
    buf = io.BytesIO()
    PILImage.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()
