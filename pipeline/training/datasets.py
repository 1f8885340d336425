"""Labelled radiograph collections: a folder per class or a CSV of path,label.

Splits are deterministic: rows a CSV marks ``split=test`` are the test set; a source without
them gets a seeded hash hold-out. Validation takes a seeded fraction of the remaining *patients*
(``patient_id`` when the CSV has one, else the image), so no patient is in two splits.
Images go through the same path as inference: decode_bytes → stored JPEG preview → model_input.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.imaging.decode import RASTER_SUFFIXES, decode_bytes, decode_preview, encode_preview

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = RASTER_SUFFIXES + (".dcm", ".dicom")
# Source labels folded into the default classes; matching is case-insensitive.
DEFAULT_LABEL_MAP = {
    "normal": "normal",
    "pneumonia": "pneumonia",
    "bacterial": "pneumonia",
    "viral": "pneumonia",
    "covid19": "covid19",
    "covid-19": "covid19",
    "covid": "covid19",
    "abnormal": "abnormal",
}
# What a model with an abnormal-vs-normal head learns from each source label: abnormal or not,
# and the finding where the source names one the model has a class for.
ABNORMAL_LABEL = "abnormal"


class DatasetError(ValueError):
    """A data folder or CSV cannot be read as a labelled image collection."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str  # the source label, as given
    source: str  # the collection it came from (folder or CSV's parent folder name)
    key: str  # path relative to the collection root: stable across machines
    group: str  # patient id when known, else the key
    split: str  # the CSV's split column, lower case, or ""
    finding: str = ""  # the CSV's finding column (e.g. "Effusion|Nodule"), or ""


def parse_label_map(text: str | None) -> dict[str, str]:
    """Parse 'SRC=dst,SRC2=dst2' into a lower-case map added to the defaults."""
    mapping = dict(DEFAULT_LABEL_MAP)
    for item in (text or "").split(","):
        if item.strip():
            src, sep, dst = item.partition("=")
            if not sep:
                raise DatasetError(f"label map entry {item!r} is not SOURCE=class")
            mapping[src.strip().lower()] = dst.strip().lower()
    return mapping


def map_label(label: str, label_map: Mapping[str, str], classes: Sequence[str]) -> str | None:
    """Return the model class of a source label, or None when it has none."""
    low = label.strip().lower()
    target = label_map.get(low, low)
    return target if target in classes else None


def read_dataset(path: Path) -> list[Sample]:
    """Read a folder per class or a CSV with columns path,label (optional split, patient_id)."""
    if path.is_dir():
        return _read_folder(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        return _read_csv(path)
    raise DatasetError(f"{path} is neither a folder of class folders nor a .csv file")


def _read_folder(root: Path) -> list[Sample]:
    samples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(class_dir.rglob("*")):
            if img.suffix.lower() in IMAGE_SUFFIXES and img.is_file():
                key = img.relative_to(root).as_posix()
                samples.append(Sample(img, class_dir.name, root.name, key, key, ""))
    if not samples:
        raise DatasetError(f"{root} has no class folders with images in them")
    return samples


def _read_csv(csv_path: Path) -> list[Sample]:
    root = csv_path.parent
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = {f.strip().lower() for f in reader.fieldnames or []}
        if not {"path", "label"} <= fields:
            raise DatasetError(f"{csv_path.name} needs columns path,label (has {sorted(fields)})")
        samples = []
        for row in reader:
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            rel = row["path"]
            group = row.get("patient_id") or rel
            split = row.get("split", "").lower()
            finding = row.get("finding", "")
            samples.append(Sample(root / rel, row["label"], root.name, rel, group, split, finding))
    return samples


def read_datasets(paths: Iterable[Path]) -> list[Sample]:
    """Read and concatenate several collections."""
    out: list[Sample] = []
    for path in paths:
        found = read_dataset(path)
        log.info("%s: %d images %s", path, len(found), dict(Counter(s.label for s in found)))
        out.extend(found)
    return out


def hash_fraction(text: str, seed: int, salt: str) -> float:
    """Map a string to a stable pseudo-random number in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(
    samples: Sequence[Sample], val_fraction: float, holdout_fraction: float, seed: int
) -> list[str]:
    """Return 'train', 'val' or 'test' for each sample (see the module docstring)."""
    has_test = {s.source for s in samples if s.split == "test"}
    out = []
    for s in samples:
        if s.source in has_test:
            held = s.split == "test"
        else:
            held = hash_fraction(s.group, seed, "holdout") < holdout_fraction
        if held:
            out.append("test")
        elif hash_fraction(s.group, seed, "val") < val_fraction:
            out.append("val")
        else:
            out.append("train")
    return out


def select(
    samples: Sequence[Sample],
    subset: str,
    val_fraction: float = 0.1,
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> list[Sample]:
    """Keep the samples of one subset: all, train, val or test."""
    if subset == "all":
        return list(samples)
    splits = assign_split(samples, val_fraction, holdout_fraction, seed)
    return [s for s, sp in zip(samples, splits, strict=True) if sp == subset]


def select_as_trained(
    samples: Sequence[Sample], subset: str, meta: Mapping[str, Any]
) -> list[Sample]:
    """Keep the samples of one subset under the split a weights file (its ``meta``) was trained on."""
    split = meta.get("training_data", {}).get("split", {})
    return select(
        samples,
        subset,
        val_fraction=float(split.get("val_fraction", 0.1)),
        holdout_fraction=float(split.get("holdout_fraction", 0.2)),
        seed=int(split.get("seed", 0)),
    )


def load_one(path: Path, size: int, preprocess: str = "resize") -> np.ndarray:
    """Return the uint8 size x size model input the running system would build for a file."""
    return load_located(path, size, preprocess)[0]


def load_located(path: Path, size: int, preprocess: str = "resize") -> tuple[np.ndarray, Any]:
    """The model input and where the preprocessing found the lungs (pipeline.imaging.preprocess)."""
    from pipeline.imaging.preprocess import preprocess as run_preprocess

    decoded = decode_bytes(path.read_bytes(), path.name)
    grey = decode_preview(encode_preview(decoded.pixels))
    return run_preprocess(grey, size, preprocess)


def load_images(
    paths: Sequence[Path], size: int, threads: int = 2, preprocess: str = "resize"
) -> np.ndarray:
    """Load many files into an N x size x size uint8 array (PIL and OpenCV release the GIL)."""
    return load_images_located(paths, size, threads, preprocess)[0]


def load_images_located(
    paths: Sequence[Path], size: int, threads: int = 2, preprocess: str = "resize"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, lung masks (N x size x size bool) and whether the lungs were found, per file."""
    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    masks = np.zeros((len(paths), size, size), dtype=bool)
    found = np.zeros(len(paths), dtype=bool)

    def work(i: int) -> None:
        out[i], loc = load_located(paths[i], size, preprocess)
        found[i] = loc.found
        if loc.lung_mask is not None:
            masks[i] = loc.lung_mask

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(work, range(len(paths))))
    return out, masks, found


def _cache_file(cache_dir: Path, kind: str, paths: Sequence[Path], size: int, tag: str) -> Path:
    key = hashlib.sha256(("\n".join(map(str, paths)) + f"|{size}{tag}").encode()).hexdigest()[:16]
    return cache_dir / f"{kind}-{size}-{key}.npy"


def _image_tag(preprocess: str) -> str:
    from pipeline.imaging.preprocess import VERSION

    return "" if preprocess == "resize" else f"|{preprocess}/{VERSION}"


def cached_images(
    paths: Sequence[Path], size: int, cache_dir: Path | None, preprocess: str = "resize"
) -> np.ndarray:
    """Load images, reusing an .npy cache keyed by the file list, size and preprocessing."""
    if cache_dir is None:
        return load_images(paths, size, preprocess=preprocess)
    cache = _cache_file(cache_dir, "images", paths, size, _image_tag(preprocess))
    if cache.exists():
        return np.load(cache)
    arr = load_images(paths, size, preprocess=preprocess)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, arr)
    return arr


def cached_located(
    paths: Sequence[Path], size: int, cache_dir: Path | None, preprocess: str = "thorax"
) -> tuple[np.ndarray, np.ndarray]:
    """Images (as ``cached_images``) and the lungs the preprocessing found on each input.

    The masks are N x size x size bool, empty where the lungs were not found; they are cached
    beside the images as packed bits. Files are decoded once when the masks' cache is missing.
    """
    if cache_dir is None:
        images, masks, found = load_images_located(paths, size, preprocess=preprocess)
        masks[~found] = False
        return images, masks
    cache = _cache_file(cache_dir, "masks", paths, size, f"|masks{_image_tag(preprocess)}")
    if cache.exists():
        images = cached_images(paths, size, cache_dir, preprocess)
        return images, np.unpackbits(np.load(cache), axis=-1)[..., :size].astype(bool)
    images, masks, found = load_images_located(paths, size, preprocess=preprocess)
    masks[~found] = False
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, np.packbits(masks, axis=-1))
    np.save(_cache_file(cache_dir, "images", paths, size, _image_tag(preprocess)), images)
    return images, masks
