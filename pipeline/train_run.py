"""The ``train`` command's work: data → epochs with checkpoints → calibration → weights file."""

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

from pipeline import datasets as ds
from pipeline import evaluate as ev
from pipeline import train as tr
from pipeline.classifier import DEFAULT_CLASSES, build_model, choose_device, save_weights

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    arch: str = "resnet18"
    classes: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    label_map: str | None = None
    input_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    val_fraction: float = 0.1
    holdout_fraction: float = 0.2
    epoch_size: int = 0  # images drawn per epoch; 0 = the training set's size
    device: str = "auto"
    checkpoint: str | None = None  # default: <out>.ckpt
    resume: bool = False
    init: str | None = None
    cache_dir: str | None = None
    amp: str = "off"  # "bf16": mixed-precision training (GPUs, CPUs with AMX)
    mean: float = 0.5
    std: float = 0.25
    sensitivity: float = 0.95


@dataclass
class Prepared:
    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    counts: dict[str, Any]


def prepare(cfg: TrainConfig) -> Prepared:
    """Read, map, split and load the images of the train and val subsets."""
    samples = ds.read_datasets(Path(p) for p in cfg.data)
    label_map = ds.parse_label_map(cfg.label_map)
    splits = ds.assign_split(samples, cfg.val_fraction, cfg.holdout_fraction, cfg.seed)
    mapped = [ds.map_label(s.label, label_map, cfg.classes) for s in samples]
    unknown = Counter(s.label for s, m in zip(samples, mapped, strict=True) if m is None)
    if unknown:
        log.warning("ignoring labels outside the classes: %s", dict(unknown))
    counts: dict[str, Any] = {}
    for s, sp, m in zip(samples, splits, mapped, strict=True):
        src = counts.setdefault(s.source, {})
        src.setdefault(sp, Counter())[m or s.label] += 1
    counts = {k: {sp: dict(c) for sp, c in v.items()} for k, v in counts.items()}
    images, labels = {}, {}
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    for subset in ("train", "val"):
        keep = [
            i for i, (sp, m) in enumerate(zip(splits, mapped, strict=True)) if sp == subset and m
        ]
        if subset == "train" and not keep:
            raise ds.DatasetError("no training images with a label in the model's classes")
        paths = [samples[i].path for i in keep]
        log.info("loading %d %s images at %d px", len(paths), subset, cfg.input_size)
        images[subset] = torch.from_numpy(ds.cached_images(paths, cfg.input_size, cache))
        y = [cfg.classes.index(mapped[i] or "") for i in keep]
        labels[subset] = torch.tensor(y, dtype=torch.long)
    return Prepared(images, labels, counts)


def _val_scores(model: torch.nn.Module, data: Prepared, cfg: TrainConfig) -> dict[str, float]:
    if len(data.labels["val"]) == 0:
        return {"val_loss": float("nan"), "val_auc_abnormal": float("nan")}
    logits = tr.predict_logits(model, data.images["val"], (cfg.mean, cfg.std))
    y = data.labels["val"].numpy()
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
    p_abn = 1.0 - ev.softmax(logits)[:, cfg.classes.index("normal")]
    return {"val_loss": loss, "val_auc_abnormal": ev.auc(p_abn, y != cfg.classes.index("normal"))}


def _better(a: dict[str, float], b: dict[str, float] | None) -> bool:
    if b is None:
        return True
    key = lambda m: (np.nan_to_num(m["val_auc_abnormal"], nan=0.0), -m["val_loss"])  # noqa: E731
    return key(a) >= key(b)


def fit(cfg: TrainConfig, data: Prepared) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train for cfg.epochs with a checkpoint after each; return the best model by validation."""
    torch.manual_seed(cfg.seed)
    device = choose_device(cfg.device)
    model = build_model(cfg.arch, len(cfg.classes))
    if cfg.init:
        tr.load_init(model, Path(cfg.init))
    model = model.to(device).to(memory_format=torch.channels_last)
    n_train = len(data.labels["train"])
    per_epoch = cfg.epoch_size or n_train
    steps = cfg.epochs * len(range(0, per_epoch, cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        history, best, start_epoch = ck["history"], ck["best"], int(ck["epoch"]) + 1
        log.info("resumed from %s after epoch %d", ckpt_path, start_epoch)
    labels_np = data.labels["train"].numpy()
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        gen = torch.Generator().manual_seed(cfg.seed * 10_000 + epoch)
        order = tr.balanced_indices(labels_np, per_epoch, rng)
        bar = tr.Progress(per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        t0 = time.perf_counter()
        losses = tr.train_epoch(
            model, opt, sched, data.images["train"], data.labels["train"], order,
            cfg.batch_size, gen, (cfg.mean, cfg.std), bar, amp=cfg.amp,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "seconds": seconds,
               "images_per_s": per_epoch / seconds, **_val_scores(model, data, cfg)}  # fmt: skip
        history.append(row)
        log.info(
            "epoch %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        )
        if _better(row, best and best["scores"]):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"epoch": epoch + 1, "scores": row, "state": state}
        tr.save_checkpoint(ckpt_path, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "history": history, "best": best,
            "config": dataclasses.asdict(cfg),
        })  # fmt: skip
    if best is not None:
        model.load_state_dict(best["state"])
    return model, history


def calibrate(model: torch.nn.Module, data: Prepared, cfg: TrainConfig) -> dict[str, Any]:
    """Fit the temperature and thresholds on validation data, as the fp16 file will score."""
    model.load_state_dict({k: v.half().to(v.dtype) for k, v in model.state_dict().items()})
    logits = tr.predict_logits(model, data.images["val"], (cfg.mean, cfg.std))
    y = data.labels["val"].numpy()
    normal = cfg.classes.index("normal")
    temperature = ev.fit_temperature(logits, y)
    probs = ev.softmax(logits, temperature)
    abnormal = y != normal
    thresholds = ev.choose_thresholds(1.0 - probs[:, normal], abnormal, cfg.sensitivity)
    metrics = ev.summarize(probs, y, abnormal, cfg.classes, thresholds["routine"])
    return {"temperature": temperature, "thresholds": thresholds, "validation": metrics}


def run(cfg: TrainConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train, calibrate and write the weights file; return the model and its metadata."""
    if "normal" not in cfg.classes:
        raise ds.DatasetError("the classes must include 'normal' (p_abnormal = 1 - p(normal))")
    t0 = time.perf_counter()
    data = prepare(cfg)
    model, history = fit(cfg, data)
    cal = calibrate(model, data, cfg)
    best_epoch = max(history, key=lambda r: (r["val_auc_abnormal"], -r["val_loss"]))["epoch"]
    meta = {
        "arch": cfg.arch,
        "classes": list(cfg.classes),
        "input_size": cfg.input_size,
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
        },  # fmt: skip
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
    return model, meta
