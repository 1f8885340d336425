"""Find the weights file in use and describe it."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.classifier import WeightsError, create_untrained_weights, file_sha256
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def ensure_weights(settings: Settings) -> Path:
    """Return the weights path; generate the untrained stand-in when nothing better exists."""
    path = settings.weights_path
    if path.exists():
        return path
    if settings.weights is not None:
        raise WeightsError(f"CXR_WEIGHTS points to a missing file: {path}")
    log.warning("no trained weights shipped; generating an UNTRAINED stand-in at %s", path)
    return create_untrained_weights(path)


@lru_cache(maxsize=8)
def _describe(path: str, mtime: float) -> dict[str, Any]:
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = dict(blob.get("meta", {}))
    sha = file_sha256(Path(path))
    return {
        "version": f"{meta.get('arch', '?')}-{sha[:12]}",
        "sha256": sha,
        "arch": meta.get("arch"),
        "classes": meta.get("classes"),
        "trained": bool(meta.get("trained", False)),
        "thresholds": meta.get("thresholds"),
        "input_size": int(meta.get("input_size", 224)),
        "preprocess": str(meta.get("preprocess", "resize")),
        "description": meta.get("description", ""),
        "metrics": meta.get("metrics", {}),
        "file": Path(path).name,
    }


def describe_weights(settings: Settings) -> dict[str, Any]:
    """Metadata of the weights in use, for the dashboard and the CLI."""
    path = ensure_weights(settings)
    return _describe(str(path), path.stat().st_mtime)
