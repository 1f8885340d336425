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


def _heat(cam: np.ndarray, w: int, h: int) -> np.ndarray:
    """The ReLU'd, max-normalised CAM upsampled to w x h, in [0, 1]."""
    heat = np.maximum(cam, 0.0)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    heat_img = PILImage.fromarray((heat * 255).astype(np.uint8)).resize(
        (w, h), PILImage.Resampling.BICUBIC
    )
    return np.asarray(heat_img, dtype=np.float32) / 255.0


def overlay_rgb(preview: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend the ReLU'd, max-normalised CAM over the greyscale image; return RGB uint8."""
    h, w = preview.shape
    heat_up = _heat(cam, w, h)
    colour = _colormap(heat_up).astype(np.float32)
    grey = np.repeat(preview[..., None], 3, axis=2).astype(np.float32)
    weight = (alpha * heat_up)[..., None]
    return (grey * (1 - weight) + colour * weight).clip(0, 255).astype(np.uint8)


def overlay_png(preview: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> bytes:
    """``overlay_rgb`` as PNG bytes."""
    buf = io.BytesIO()
    PILImage.fromarray(overlay_rgb(preview, cam, alpha), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(cam: np.ndarray, width: int, height: int) -> bytes:
    """The CAM alone as RGBA (alpha = strength): laid over the image in the browser, where
    CSS opacity gives the same blend as ``overlay_png`` and a slider can change it instantly."""
    heat_up = _heat(cam, width, height)
    rgba = np.dstack([_colormap(heat_up), (heat_up * 255).astype(np.uint8)])
    buf = io.BytesIO()
    PILImage.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()


def cam_peak(cam: np.ndarray) -> tuple[float, float]:
    """Return the CAM maximum as (row, col) fractions of the image."""
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return (r + 0.5) / cam.shape[0], (c + 0.5) / cam.shape[1]
