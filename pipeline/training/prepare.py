"""The data a training run trains on: read, map to the model's classes, split and load.

With ``holdout_source`` one source is left out of training and validation altogether and the
finished file is evaluated on every image of it (leave-one-source-out).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.training import datasets as ds
from pipeline.training.config import TrainConfig

log = logging.getLogger(__name__)

OTHER_FINDING = "other"


@dataclass
class Prepared:
    """The train and val images of a run, their labels and sources, and the held-out source."""

    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]  # class index in cfg.model_classes (-1: abnormal, no class)
    abnormal: dict[str, torch.Tensor]  # 0/1
    sources: dict[str, torch.Tensor]  # index in source_names
    source_names: list[str]
    counts: dict[str, Any]
    holdout: list[ds.Sample] = field(default_factory=list)
    lungs_only: torch.Tensor | None = None  # the train images as "lungs" (cfg.mix_lungs)
    lung_masks: torch.Tensor | None = None  # the found lungs on the train images (cfg.cam_guide)


def target_class(sample: ds.Sample, label_map: dict[str, str], cfg: TrainConfig) -> str | None:
    """The model class a sample trains as, or None when its label means nothing to the model.

    For the abnormal head a source label of "abnormal" (a finding the source does not name as
    one of ours) becomes the ``other`` finding.
    """
    classes = cfg.model_classes
    mapped = ds.map_label(sample.label, label_map, [*classes, ds.ABNORMAL_LABEL])
    if mapped == ds.ABNORMAL_LABEL:
        return OTHER_FINDING if OTHER_FINDING in classes else None
    return mapped


def select_sources(
    samples: list[ds.Sample], holdout_source: str | None
) -> tuple[list[ds.Sample], list[ds.Sample]]:
    """Split samples into (training sources, the held-out source); an unknown name is an error."""
    if holdout_source is None:
        return list(samples), []
    names = sorted({s.source for s in samples})
    if holdout_source not in names:
        raise ds.DatasetError(f"no source named {holdout_source!r}; the data has {names}")
    if len(names) < 2:
        raise ds.DatasetError("leaving a source out needs at least two sources")
    kept = [s for s in samples if s.source != holdout_source]
    return kept, [s for s in samples if s.source == holdout_source]


def prepare(cfg: TrainConfig) -> Prepared:
    """Read, map, split and load the images of the train and val subsets."""
    everything = ds.read_datasets(Path(p) for p in cfg.data)
    samples, holdout = select_sources(everything, cfg.holdout_source)
    label_map = ds.parse_label_map(cfg.label_map)
    classes = cfg.model_classes
    splits = ds.assign_split(samples, cfg.val_fraction, cfg.holdout_fraction, cfg.seed)
    mapped = [target_class(s, label_map, cfg) for s in samples]
    unknown = Counter(s.label for s, m in zip(samples, mapped, strict=True) if m is None)
    if unknown:
        log.warning("ignoring labels outside the classes: %s", dict(unknown))
    source_names = sorted({s.source for s in samples})
    counts: dict[str, Any] = {}
    for s, sp, m in zip(samples, splits, mapped, strict=True):
        src = counts.setdefault(s.source, {})
        src.setdefault(sp, Counter())[m or s.label] += 1
    counts = {k: {sp: dict(c) for sp, c in v.items()} for k, v in counts.items()}
    images, labels, abnormal, sources = {}, {}, {}, {}
    lungs_only = lung_masks = None
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    for subset in ("train", "val"):
        keep = [
            i for i, (sp, m) in enumerate(zip(splits, mapped, strict=True)) if sp == subset and m
        ]
        if subset == "train" and not keep:
            raise ds.DatasetError("no training images with a label in the model's classes")
        paths = [samples[i].path for i in keep]
        log.info(
            "loading %d %s images at %d px (%s)", len(paths), subset, cfg.input_size, cfg.preprocess
        )
        if subset == "train" and cfg.cam_guide > 0:
            arr, masks = ds.cached_located(paths, cfg.input_size, cache, cfg.preprocess)
            lung_masks = torch.from_numpy(masks)
            log.info(
                "lungs found on %d of the %d train images",
                int(lung_masks.flatten(1).any(1).sum()),
                len(paths),
            )
        else:
            arr = ds.cached_images(paths, cfg.input_size, cache, preprocess=cfg.preprocess)
        images[subset] = torch.from_numpy(arr)
        labels[subset] = torch.tensor([classes.index(mapped[i] or "") for i in keep])
        abnormal[subset] = torch.tensor([float(mapped[i] != "normal") for i in keep])
        sources[subset] = torch.tensor([source_names.index(samples[i].source) for i in keep])
        if subset == "train" and cfg.mix_lungs > 0 and cfg.preprocess == "thorax":
            log.info("loading the %d train images again as lungs only", len(paths))
            lungs_only = torch.from_numpy(
                ds.cached_images(paths, cfg.input_size, cache, preprocess="lungs")
            )
    return Prepared(
        images, labels, abnormal, sources, source_names, counts, holdout, lungs_only, lung_masks
    )
