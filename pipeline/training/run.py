"""The ``train`` command's work: data → epochs with checkpoints → calibration → weights file.

Two heads:

``abnormal`` (the default, the triage output)
    Logit 0 is abnormal vs normal, trained with a binary loss on every source. The other
    logits name the finding (``findings``) and are trained only on abnormal images whose
    source names one, on *detached* features: the per-class head may not pull source cues
    (pneumonia only in children, COVID-19 only in one collection) into the backbone.
    An optional source-adversarial head (gradient reversal, ``adversary`` > 0) penalises
    features that tell the training sources apart. With ``cam_guide`` > 0, a second term
    penalises the share of each film's CAM evidence (|fc row 0 · layer4|, either sign) that
    lies outside the lungs the preprocessing found on it, under the same augmentation
    (films whose lungs were not found are exempt): the abnormal logit is pushed to rest on
    the lungs rather than on the mediastinum, the diaphragm or the film's edge.
``softmax``
    One softmax over ``classes`` (models before the abnormal head).

Sampling is balanced by source x label (``balance="source-label"``), so that a source cue
carries no information about the label in what the network is trained on. With
``holdout_source`` one source is left out of training and validation altogether and the
finished file is evaluated on every image of it (leave-one-source-out).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.classifier.network import (
    build_model,
    choose_device,
    head_outputs,
    head_probabilities,
    save_weights,
)
from pipeline.training import datasets as ds
from pipeline.training import evaluate as ev
from pipeline.training import train as tr
from pipeline.training.config import TrainConfig

log = logging.getLogger(__name__)

OTHER_FINDING = "other"
FINDING_LOSS_WEIGHT = 0.3


@dataclass
class Prepared:
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


def val_scores(model: torch.nn.Module, data: Prepared, cfg: TrainConfig) -> dict[str, Any]:
    """Validation loss and AUC: pooled, per source, and the mean over sources (selection)."""
    if len(data.labels["val"]) == 0:
        return {"val_loss": float("nan"), "val_auc_abnormal": float("nan")}
    logits = tr.predict_logits(model, data.images["val"], (cfg.mean, cfg.std))
    abnormal = data.abnormal["val"].numpy() > 0.5
    if cfg.head == "abnormal":
        z = torch.from_numpy(logits[:, 0])
        loss = float(F.binary_cross_entropy_with_logits(z, data.abnormal["val"]))
        score = logits[:, 0]
    else:
        y = torch.from_numpy(data.labels["val"].numpy())
        loss = float(F.cross_entropy(torch.from_numpy(logits), y))
        score = 1.0 - ev.softmax(logits)[:, cfg.classes.index("normal")]
    src = data.sources["val"].numpy()
    per_source = {
        name: ev.auc(score[src == k], abnormal[src == k])
        for k, name in enumerate(data.source_names)
    }
    usable = [v for v in per_source.values() if not np.isnan(v)]
    return {
        "val_loss": loss,
        "val_auc_pooled": ev.auc(score, abnormal),
        "val_auc_by_source": per_source,
        "val_auc_abnormal": float(np.mean(usable)) if usable else ev.auc(score, abnormal),
    }


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    if b is None:
        return True
    key = lambda m: (np.nan_to_num(m["val_auc_abnormal"], nan=0.0), -m["val_loss"])  # noqa: E731
    return key(a) >= key(b)


def make_loss(cfg: TrainConfig, data: Prepared, adversary: torch.nn.Module | None) -> Any:
    """The batch loss of the configured head (see the module docstring)."""
    if cfg.head != "abnormal":
        return None
    labels, abnormal, sources = data.labels["train"], data.abnormal["train"], data.sources["train"]

    def loss_fn(
        model: Any, x: torch.Tensor, idx: torch.Tensor, masks: torch.Tensor | None
    ) -> torch.Tensor:
        device = x.device
        fmaps = tr.feature_maps(model, x).float()
        feats = torch.flatten(model.avgpool(fmaps), 1)
        w, b = model.fc.weight.float(), model.fc.bias.float()
        z = feats @ w[0] + b[0]
        loss = F.binary_cross_entropy_with_logits(z, abnormal[idx].to(device))
        if cfg.cam_guide > 0 and masks is not None:
            found = masks.flatten(1).amax(1) > 0.5  # films whose lungs were found
            if found.any():
                cams = torch.einsum("k,nkhw->nhw", w[0], fmaps[found])
                outside = tr.cam_outside_lungs(cams, masks[found])
                loss = loss + cfg.cam_guide * outside.mean()
        find = labels[idx].to(device) - 1  # class index 1.. are the findings
        known = find >= 0
        if known.any() and w.shape[0] > 1:
            zf = feats.detach()[known] @ w[1:].T + b[1:]
            loss = loss + FINDING_LOSS_WEIGHT * F.cross_entropy(zf, find[known])
        if adversary is not None:
            reversed_feats = tr.GradientReversal.apply(feats, cfg.adversary)
            loss = loss + F.cross_entropy(adversary(reversed_feats), sources[idx].to(device))
        return loss

    return loss_fn


def fit(cfg: TrainConfig, data: Prepared) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train for cfg.epochs with a checkpoint after each; return the best model by validation."""
    torch.manual_seed(cfg.seed)
    device = choose_device(cfg.device)
    meta = {
        "arch": cfg.arch,
        "head": cfg.head,
        "classes": cfg.model_classes,
        "findings": cfg.findings,
    }
    model = build_model(cfg.arch, head_outputs(meta), cfg.layer4_stride)
    if cfg.init:
        tr.load_init(model, Path(cfg.init))
    model = model.to(device).to(memory_format=torch.channels_last)
    adversary = None
    params = list(model.parameters())
    if cfg.adversary > 0 and cfg.head == "abnormal" and len(data.source_names) > 1:
        features: int = model.fc.in_features  # type: ignore[union-attr,assignment]
        adversary = torch.nn.Sequential(
            torch.nn.Linear(features, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, len(data.source_names)),
        ).to(device)
        params += list(adversary.parameters())
    n_train = len(data.labels["train"])
    per_epoch = cfg.epoch_size or n_train
    steps = cfg.epochs * len(range(0, per_epoch, cfg.batch_size))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15
    )
    ckpt_path = Path(cfg.checkpoint or cfg.out + ".ckpt")
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start_epoch = 0
    if cfg.resume and ckpt_path.exists():
        ck = tr.load_checkpoint(ckpt_path)
        model.load_state_dict(ck["model"])
        if adversary is not None and ck.get("adversary"):
            adversary.load_state_dict(ck["adversary"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        history, best, start_epoch = ck["history"], ck["best"], int(ck["epoch"]) + 1
        log.info("resumed from %s after epoch %d", ckpt_path, start_epoch)
    if cfg.balance == "source-label":
        cells = (data.sources["train"] * 2 + data.abnormal["train"].long()).numpy()
    else:
        cells = data.labels["train"].numpy()
    augment_fn = tr.augment_sources if cfg.augment == "sources" else tr.augment_basic
    loss_fn = make_loss(cfg, data, adversary)
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        gen = torch.Generator().manual_seed(cfg.seed * 10_000 + epoch)
        order = tr.balanced_indices(cells, per_epoch, rng)
        bar = tr.Progress(per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        t0 = time.perf_counter()
        if adversary is not None:
            adversary.train()
        losses = tr.train_epoch(
            model,
            opt,
            sched,
            data.images["train"],
            data.labels["train"],
            order,
            cfg.batch_size,
            gen,
            (cfg.mean, cfg.std),
            bar,
            augment_fn=augment_fn,
            amp=cfg.amp,
            loss_fn=loss_fn,
            alt_images=data.lungs_only,
            alt_share=cfg.mix_lungs,
            masks=data.lung_masks,
        )
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "seconds": seconds,
            "images_per_s": per_epoch / seconds,
            **val_scores(model, data, cfg),
        }
        history.append(row)
        log.info(
            "epoch %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        )
        if _better(row, best and best["scores"]):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"epoch": epoch + 1, "scores": row, "state": state}
        tr.save_checkpoint(
            ckpt_path,
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "best": best,
                "config": dataclasses.asdict(cfg),
                "adversary": adversary.state_dict() if adversary is not None else None,
            },
        )
    if best is not None:
        model.load_state_dict(best["state"])
    return model, history


def calibrate(model: torch.nn.Module, data: Prepared, cfg: TrainConfig) -> dict[str, Any]:
    """Fit the temperature and thresholds on validation data, as the fp16 file will score."""
    model.load_state_dict({k: v.half().to(v.dtype) for k, v in model.state_dict().items()})
    logits = tr.predict_logits(model, data.images["val"], (cfg.mean, cfg.std))
    y = data.labels["val"].numpy()
    abnormal = data.abnormal["val"].numpy() > 0.5
    meta = {"head": cfg.head, "temperature": 1.0}
    if cfg.head == "abnormal":
        binary = np.stack([np.zeros(len(logits)), logits[:, 0]], axis=1)
        temperature = ev.fit_temperature(binary, abnormal.astype(int))
    else:
        temperature = ev.fit_temperature(logits, y)
    meta["temperature"] = temperature
    probs = head_probabilities(torch.from_numpy(logits).float(), meta).numpy()
    thresholds = ev.choose_thresholds(
        1.0 - probs[:, 0 if cfg.head == "abnormal" else cfg.classes.index("normal")],
        abnormal,
        cfg.sensitivity,
    )
    metrics = ev.summarize(probs, y, abnormal, cfg.model_classes, thresholds["routine"])
    return {"temperature": temperature, "thresholds": thresholds, "validation": metrics}


def run(cfg: TrainConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train, calibrate and write the weights file; return the model and its metadata."""
    if "normal" not in cfg.model_classes:
        raise ds.DatasetError("the classes must include 'normal' (p_abnormal = 1 - p(normal))")
    t0 = time.perf_counter()
    data = prepare(cfg)
    model, history = fit(cfg, data)
    cal = calibrate(model, data, cfg)
    best_epoch = max(history, key=lambda r: (r["val_auc_abnormal"], -r["val_loss"]))["epoch"]
    meta = {
        "arch": cfg.arch,
        "head": cfg.head,
        "classes": cfg.model_classes,
        "findings": list(cfg.findings) if cfg.head == "abnormal" else [],
        "class_meaning": (
            "p(normal) = 1 - sigmoid(z0 / T): abnormal vs normal, trained on every source; "
            "the findings share p_abnormal by a head trained only where the source names one "
            "(pneumonia: kaggle-pneumonia; covid19: covid19-radiography; other: any other "
            "finding, nih-cxr14-sample)"
            if cfg.head == "abnormal"
            else "softmax over the classes"
        ),
        "input_size": cfg.input_size,
        "layer4_stride": cfg.layer4_stride,
        "preprocess": cfg.preprocess,
        "mean": cfg.mean,
        "std": cfg.std,
        "temperature": cal["temperature"],
        "thresholds": cal["thresholds"],
        "trained": True,
        "description": (
            f"{cfg.arch} trained from scratch by `cxr-triage train` on {', '.join(data.counts)}; "
            "research and workflow triage only, not diagnosis"
        ),
        "training_data": {
            "sources": data.counts,
            "held_out_source": cfg.holdout_source,
            "split": {
                "seed": cfg.seed,
                "val_fraction": cfg.val_fraction,
                "holdout_fraction": cfg.holdout_fraction,
                "rule": "split=test rows, else sha256 hash hold-out; val by patient_id",
            },
            "config": {
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if k not in ("checkpoint", "cache_dir")
            },
        },
        "metrics": {"validation": cal["validation"], "history": history, "best_epoch": best_epoch},
        "operating_point": (
            f"routine: sensitivity >= {cfg.sensitivity} on validation; urgent: specificity >= 0.99; "
            "critical: specificity >= 0.999 (validation, abnormal vs normal)"
        ),
        "train_seconds": round(sum(h["seconds"] for h in history), 1),  # epochs only
        "run_seconds": round(time.perf_counter() - t0, 1),  # this invocation
    }
    save_weights(model, meta, Path(cfg.out))
    log.info("wrote %s (validation AUC %.4f)", cfg.out, cal["validation"]["auc_abnormal"])
    if data.holdout:
        from pipeline.training.evaluate_run import evaluate_samples, record_metrics

        result = evaluate_samples(
            data.holdout, Path(cfg.out), label_map=cfg.label_map, device=cfg.device
        )
        record_metrics(
            Path(cfg.out),
            "held_out_source",
            result,
            f"held out: {cfg.holdout_source} (every image of it)",
        )
        meta["metrics"]["held_out_source"] = result
        log.info("held-out source %s: AUC %.4f", cfg.holdout_source, result["auc_abnormal"])
    return model, meta
