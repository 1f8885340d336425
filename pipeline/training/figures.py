"""PNG figures for ``evaluate --report``: confusion matrix, ROC curves, a grid of CAM overlays.

Drawn with Pillow alone so the project needs no plotting library.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from pipeline.imaging.render import overlay_png
from pipeline.training import metrics as ev

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def confusion_png(cm: np.ndarray, classes: Sequence[str], cell: int = 90) -> PILImage.Image:
    """Draw a confusion matrix (rows truth, columns predicted) with counts."""
    n, margin = len(classes), 110
    img = PILImage.new("RGB", (margin + n * cell + 10, margin + n * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    peak = max(1, int(cm.max()))
    for i in range(n):
        draw.text((5, margin + i * cell + cell // 2), classes[i], fill="black")
        draw.text((margin + i * cell + 5, margin - 20), classes[i], fill="black")
        for j in range(n):
            shade = int(255 - 200 * cm[i, j] / peak)
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=(shade, shade, 255), outline="grey")
            draw.text((x0 + cell // 3, y0 + cell // 2 - 5), str(int(cm[i, j])), fill="black")
    draw.text((margin, 10), "truth (rows) vs predicted (columns)", fill="black")
    return img


def roc_png(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]], size: int = 420
) -> PILImage.Image:
    """Draw ROC curves, one per entry (fpr, tpr, auc), with a legend."""
    pad = 40
    img = PILImage.new("RGB", (size + 2 * pad, size + 2 * pad + 20 * len(curves)), "white")
    draw = ImageDraw.Draw(img)

    def xy(f: float, t: float) -> tuple[float, float]:
        return pad + f * size, pad + (1 - t) * size

    draw.rectangle([pad, pad, pad + size, pad + size], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(180, 180, 180))
    draw.text((pad, pad + size + 5), "false positive rate ->", fill="black")
    draw.text((5, 10), "true positive rate", fill="black")
    for k, (name, (fpr, tpr, area)) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        draw.line([xy(f, t) for f, t in zip(fpr, tpr, strict=True)], fill=colour, width=2)
        draw.text((pad, pad + size + 22 + 20 * k), f"{name}: AUC {area:.4f}", fill=colour)
    return img


def cam_grid_png(
    images: np.ndarray, cams: np.ndarray, captions: Sequence[str], tile: int = 224, cols: int = 4
) -> PILImage.Image:
    """Tile CAM overlays (pipeline.imaging.render.overlay_png) with a caption under each."""
    rows = max(1, -(-len(images) // cols))
    grid = PILImage.new("RGB", (cols * tile, rows * (tile + 16)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, cam, text) in enumerate(zip(images, cams, captions, strict=True)):
        big = np.asarray(PILImage.fromarray(img).resize((tile, tile), PILImage.Resampling.BILINEAR))
        over = PILImage.open(io.BytesIO(overlay_png(big, cam.astype(np.float32))))
        x, y = (k % cols) * tile, (k // cols) * (tile + 16)
        grid.paste(over, (x, y))
        draw.text((x + 3, y + tile + 2), text, fill="black")
    return grid


def write_report(
    folder: Path,
    result: dict[str, Any],
    probs: np.ndarray,
    label_index: np.ndarray,
    abnormal: np.ndarray,
    classes: Sequence[str],
    images: np.ndarray,
    cams: np.ndarray,
    n_cams: int = 16,
    seed: int = 0,
) -> list[Path]:
    """Write confusion_matrix.png, roc.png, cam_grid.png and metrics.json; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    cm = np.array(result["confusion_matrix"])
    p_abn = 1.0 - probs[:, list(classes).index("normal")]
    curves = {"abnormal vs normal": (*ev.roc_curve(p_abn, abnormal), ev.auc(p_abn, abnormal))}
    known = label_index >= 0
    for i, c in enumerate(classes):
        positive = label_index[known] == i
        if positive.any() and (~positive).any():
            scores = probs[known, i]
            curves[f"{c} (one vs rest)"] = (
                *ev.roc_curve(scores, positive),
                ev.auc(scores, positive),
            )
    pred = probs.argmax(axis=1)
    flagged = np.flatnonzero(pred != list(classes).index("normal"))
    pick = np.random.default_rng(seed).permutation(flagged)[:n_cams]
    captions = [f"{classes[pred[i]]} p_abn={p_abn[i]:.2f} abn={int(abnormal[i])}" for i in pick]
    paths = [folder / "confusion_matrix.png", folder / "roc.png", folder / "cam_grid.png"]
    confusion_png(cm, classes).save(paths[0])
    roc_png(curves).save(paths[1])
    cam_grid_png(images[pick], cams[pick], captions).save(paths[2])
    metrics = folder / "metrics.json"
    metrics.write_text(json.dumps(result, indent=2, default=float))
    return [*paths, metrics]
