"""Train for the configured epochs, a checkpoint after each; keep the best by validation.

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
carries no information about the label in what the network is trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.classifier.network import build_model, choose_device, head_outputs
from pipeline.training import metrics as ev
from pipeline.training import train as tr
from pipeline.training.config import TrainConfig
from pipeline.training.prepare import Prepared

log = logging.getLogger(__name__)

FINDING_LOSS_WEIGHT = 0.3


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
        t0 = time.perf_counter()
        if adversary is not None:
            adversary.train()
        with tqdm(
            total=per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", mininterval=0.5
        ) as bar:
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
