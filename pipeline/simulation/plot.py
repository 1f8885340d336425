"""Draw the simulated delay distributions (cumulative, log-hours axis) as a PNG with Pillow."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "fifo": (90, 90, 90),
    "priority": (200, 40, 40),
    "priority_capped": (30, 110, 200),
    "priority_ageing": (40, 150, 70),
}
PANEL_W, PANEL_H, MARGIN = 520, 360, 56
X_MIN_H = 0.1


def _x(hours: float, x_max: float) -> float:
    span = math.log10(x_max) - math.log10(X_MIN_H)
    return MARGIN + (math.log10(max(hours, X_MIN_H)) - math.log10(X_MIN_H)) / span * (
        PANEL_W - MARGIN - 16
    )


def _y(fraction: float) -> float:
    return 30 + (1.0 - fraction) * (PANEL_H - 30 - MARGIN)


def _panel(
    draw: ImageDraw.ImageDraw, label: str, curves: Mapping[str, np.ndarray], x_max: float
) -> None:
    def at(x: float, y: float) -> tuple[float, float]:
        return x, y

    draw.text(at(MARGIN, 8), f"{label} studies: share read within x hours", fill="black")
    draw.rectangle([at(MARGIN, _y(1.0)), at(PANEL_W - 16, _y(0.0))], outline="black")
    for frac in (0.25, 0.5, 0.75, 1.0):
        draw.line([at(MARGIN, _y(frac)), at(PANEL_W - 16, _y(frac))], fill=(225, 225, 225))
        draw.text(at(MARGIN - 34, _y(frac) - 6), f"{frac:.2f}", fill="black")
    tick = X_MIN_H
    while tick <= x_max * 1.0001:
        x = _x(tick, x_max)
        draw.line([at(x, _y(0.0)), at(x, _y(0.0) + 4)], fill="black")
        draw.text(at(x - 3 * len(f"{tick:g}"), _y(0.0) + 8), f"{tick:g}", fill="black")
        tick *= 10
    draw.text(at(PANEL_W // 2 - 40, PANEL_H - 22), "delay (hours, log)", fill="black")
    for row, (name, delays) in enumerate(curves.items()):
        colour = COLOURS.get(name, (0, 0, 0))
        draw.text(at(MARGIN + 8, _y(1.0) + 6 + 13 * row), name, fill=colour)
        if delays.size == 0:
            continue
        qs = np.linspace(0.0, 1.0, 300)
        xs = np.quantile(delays, qs)
        pts = [at(_x(float(h), x_max), _y(float(q))) for h, q in zip(xs, qs, strict=True)]
        draw.line(pts, fill=colour, width=2)


def plot_delays(curves: Mapping[str, np.ndarray], path: Path, title: str = "") -> Path:
    """Write cumulative delay curves per discipline, abnormal and normal side by side."""
    abnormal = curves["abnormal"].astype(bool)
    names = [k for k in curves if k != "abnormal"]
    longest = max((float(curves[k].max(initial=0.0)) for k in names), default=1.0)
    x_max = 10.0 ** math.ceil(math.log10(max(longest, 1.0)))
    image = Image.new("RGB", (2 * PANEL_W, PANEL_H + 24), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 4), f"Simulated reporting delay: {title}", fill="black")
    for i, (label, mask) in enumerate((("abnormal", abnormal), ("normal", ~abnormal))):
        group = {k: curves[k][mask] for k in names}
        panel = Image.new("RGB", (PANEL_W, PANEL_H), "white")
        _panel(ImageDraw.Draw(panel), label, group, x_max)
        image.paste(panel, (i * PANEL_W, 24))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
