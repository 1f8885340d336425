"""Find the weights file in use and describe it, without importing torch.

A weights file is what ``torch.save`` writes: a zip holding a pickle (``data.pkl``) whose
tensors are references to the zip's other members. The metadata is plain Python inside that
pickle, so ``read_meta`` unpickles it with a restricted unpickler that knows only the few
globals a state dict uses and turns every tensor into a placeholder: the dashboard, the CLI and
ingest learn the input size, preprocessing and thresholds in milliseconds, and torch (seconds
to import) is loaded only by the processes that run the network. Any file ``torch.save`` wrote
since torch 1.6 reads this way, so no sidecar has to be kept in step with the weights.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.settings import Settings

log = logging.getLogger(__name__)

FORMAT = "cxr-triage-weights/1"


class WeightsError(Exception):
    """The weights file is missing, unreadable or inconsistent."""


class _TensorStub:
    """Stands in for a tensor of the state dict: the metadata reader never needs its values."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


# The globals a state dict's pickle names; anything else is refused (as weights_only does).
_ALLOWED = {
    ("collections", "OrderedDict"): dict,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorStub,
    ("torch._utils", "_rebuild_parameter"): _TensorStub,
}


class _MetaUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _TensorStub
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid: Any) -> None:
        return None  # a tensor's storage: left in the zip


def read_blob(path: Path) -> dict[str, Any]:
    """The weights file's top-level dict, its tensors replaced by placeholders."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise WeightsError(f"{path.name} is not a torch.save archive")
            blob = _MetaUnpickler(io.BytesIO(archive.read(pkl))).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError) as exc:
        raise WeightsError(f"cannot read weights {path.name}: {exc}") from exc
    if not isinstance(blob, dict):
        raise WeightsError(f"{path.name} is not a cxr-triage weights file")
    return blob


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata of a weights file, read without torch."""
    return dict(read_blob(path).get("meta", {}))


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def ensure_weights(settings: Settings) -> Path:
    """Return the weights path; generate the untrained stand-in when nothing better exists."""
    path = settings.weights_path
    if path.exists():
        return path
    if settings.weights is not None:
        raise WeightsError(f"CXR_WEIGHTS points to a missing file: {path}")
    log.warning("no trained weights shipped; generating an UNTRAINED stand-in at %s", path)
    from pipeline.classifier.network import (
        create_untrained_weights,  # torch: only in this rare case
    )

    return create_untrained_weights(path)


@lru_cache(maxsize=8)
def _describe(path: str, mtime: float) -> dict[str, Any]:
    meta = read_meta(Path(path))
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
