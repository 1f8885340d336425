"""Synthetic training data: dark noisy films with or without a bright blob, and a folder of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage


def blob_image(
    rng: np.random.Generator, size: int, blob: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """Dark noisy background; with blob=True a bright disc at a random place (returns its centre)."""
    img = rng.normal(60, 12, (size, size))
    r = size // 8
    cy, cx = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
    if blob:
        yy, xx = np.mgrid[:size, :size]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 230
    return np.clip(img, 0, 255).astype(np.uint8), (cy, cx)


def make_folder(root: Path, n: int = 12, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            img, _ = blob_image(rng, size, label == "PNEUMONIA")
            PILImage.fromarray(img).save(root / label / f"{label}-{i}.png")
    return root
