"""The ``train`` command's work: data → epochs with checkpoints → calibration → weights file.

The data comes from ``pipeline.training.prepare``; the epochs, and the losses of the two
heads, from ``pipeline.training.fit``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.classifier.network import head_probabilities, save_weights
from pipeline.training import datasets as ds
from pipeline.training import metrics as ev
from pipeline.training import train as tr
from pipeline.training.config import TrainConfig
from pipeline.training.fit import fit
from pipeline.training.prepare import Prepared, prepare

log = logging.getLogger(__name__)


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
        from pipeline.training.evaluation import evaluate_samples, record_metrics

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
