"""The ``evaluate`` command's work: score labelled images through the shipped Classifier."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from pipeline.classifier.network import Classifier
from pipeline.training import datasets as ds
from pipeline.training import metrics as ev
from pipeline.triage.score import triage_class

log = logging.getLogger(__name__)

# Lung fields on the square model input, as (row0, row1, col0, col1) fractions: two boxes
# either side of the mediastinum, from below the clavicles to above the diaphragm domes.
LUNG_BOXES = ((0.12, 0.80, 0.12, 0.45), (0.12, 0.80, 0.55, 0.88))


def lung_mask(size: int) -> np.ndarray:
    """Return a size x size boolean mask of the lung-field boxes."""
    mask = np.zeros((size, size), dtype=bool)
    for r0, r1, c0, c1 in LUNG_BOXES:
        mask[round(r0 * size) : round(r1 * size), round(c0 * size) : round(c1 * size)] = True
    return mask


def upsample_cam(cam: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize a CAM to size x size, ReLU applied first."""
    img = PILImage.fromarray(np.maximum(cam.astype(np.float32), 0.0), mode="F")
    return np.asarray(img.resize((size, size), PILImage.Resampling.BILINEAR), dtype=np.float32)


def cam_lung_stats(
    cams: np.ndarray, size: int, masks: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per CAM: whether its upsampled peak lies in the lung fields, and its mass fraction there.

    ``masks`` (N x size x size) are the lungs the preprocessing found on each input; an empty
    mask (lungs not found) falls back to the fixed lung-field boxes.
    """
    boxes = lung_mask(size)
    peaks, mass = np.zeros(len(cams), bool), np.zeros(len(cams))
    for i, cam in enumerate(cams):
        mask = boxes if masks is None or not masks[i].any() else masks[i]
        up = upsample_cam(cam, size)
        r, c = np.unravel_index(int(np.argmax(up)), up.shape)
        peaks[i] = mask[r, c]
        total = float(up.sum())
        mass[i] = float(up[mask].sum()) / total if total > 0 else 0.0
    return peaks, mass


def predict_all(
    clf: Classifier, images: np.ndarray, batch: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (N x C), the CAMs of the model's calls and the calls, for uint8 images."""
    probs, cams, calls = [], [], []
    for start in range(0, len(images), batch):
        out = clf.predict(images[start : start + batch])
        probs.append(out.probabilities)
        cams.append(out.cams)
        calls.append(out.cam_index)
    return np.concatenate(probs), np.concatenate(cams), np.concatenate(calls)


def run_evaluation(
    data: list[Path], weights: Path, subset: str = "all", **options: Any
) -> dict[str, Any]:
    """Evaluate a weights file on the ``subset`` of labelled images it was split with;
    ``options`` are ``evaluate_samples``'s (optionally write PNGs and a predictions CSV)."""
    meta = torch.load(weights, map_location="cpu", weights_only=True).get("meta", {})
    samples = ds.select_as_trained(ds.read_datasets(data), subset, meta)
    if not samples:
        raise ds.DatasetError(f"no images in subset {subset!r} of {', '.join(map(str, data))}")
    result = evaluate_samples(samples, weights, **options)
    result["subset"] = subset
    return result


def evaluate_samples(
    samples: list[ds.Sample],
    weights: Path,
    label_map: str | None = None,
    report: Path | None = None,
    predictions_out: Path | None = None,
    device: str = "auto",
    source_probe: bool = False,
) -> dict[str, Any]:
    """Score samples through the production Classifier: overall, and per source.

    ``source_probe``: also fit a linear probe on the model's pooled penultimate features to
    tell the sources apart (pipeline.training.shortcuts.source_probe).
    """
    clf = Classifier(weights, device=device)
    lmap = ds.parse_label_map(label_map)
    targets = [*clf.classes, ds.ABNORMAL_LABEL]
    mapped = [ds.map_label(s.label, lmap, targets) for s in samples]
    label_index = np.array([clf.classes.index(m) if m in clf.classes else -1 for m in mapped])
    abnormal = np.array(
        [(m or s.label.lower()) != "normal" for s, m in zip(samples, mapped, strict=True)]
    )
    log.info("evaluating %d images (%s)", len(samples), dict(Counter(s.label for s in samples)))
    images, masks, found = ds.load_images_located(
        [s.path for s in samples], clf.input_size, preprocess=clf.preprocess
    )
    probs, cams, calls = predict_all(clf, images)
    result = ev.summarize(probs, label_index, abnormal, clf.classes, clf.thresholds["routine"])
    p_abn = 1.0 - probs[:, clf.classes.index("normal")]
    pred = calls
    flagged = pred != clf.classes.index("normal")  # the model's call, as the worklist shows it
    peaks, mass = cam_lung_stats(
        cams, clf.input_size, masks if clf.preprocess != "resize" else None
    )
    box_peaks, _ = cam_lung_stats(cams, clf.input_size)  # the fixed boxes, for every model
    sources = np.array([s.source for s in samples])
    per_source = {}
    for name in sorted({s.source for s in samples}):  # str keys: the file loads weights_only
        here = sources == name
        fl = here & flagged
        per_source[name] = {
            "n": int(here.sum()),
            "labels": dict(Counter(s.label for s, h in zip(samples, here, strict=True) if h)),
            "auc_abnormal": ev.auc(p_abn[here], abnormal[here]),
            "cam_peak_in_lungs": float(peaks[fl].mean()) if fl.any() else float("nan"),
            "cam_peak_in_lung_boxes": float(box_peaks[fl].mean()) if fl.any() else float("nan"),
            "abnormal_predictions": int(fl.sum()),
            "lungs_found": float(found[here].mean()),
        }
    result.update(
        {
            "weights": clf.version,
            "thresholds": clf.thresholds,
            "temperature": clf.temperature,
            "preprocess": clf.preprocess,
            "labels": dict(Counter(s.label for s in samples)),
            "triage": dict(Counter(_triage(p, clf.thresholds) for p in p_abn)),
            "per_source": per_source,
            "cam": {
                "abnormal_predictions": int(flagged.sum()),
                "peak_in_lung_fields": float(peaks[flagged].mean())
                if flagged.any()
                else float("nan"),
                "mass_in_lung_fields": float(mass[flagged].mean())
                if flagged.any()
                else float("nan"),
                "lung_field_area": float(lung_mask(clf.input_size).mean()),
                "lung_fields": "the lungs the preprocessing found, else the fixed boxes"
                if clf.preprocess != "resize"
                else "fixed boxes",
                "grid": f"{cams.shape[1]}x{cams.shape[2]}",
            },
        }
    )
    if source_probe and len(per_source) > 1:
        from pipeline.training.shortcuts import source_probe as probe_sources

        feats = np.concatenate(
            [clf.pooled_features(images[i : i + 64]) for i in range(0, len(images), 64)]
        )
        result["source_probe"] = probe_sources(feats, [s.source for s in samples])
    if predictions_out is not None:
        write_predictions(predictions_out, samples, abnormal, p_abn, [clf.classes[i] for i in pred])
    if report is not None:
        from pipeline.training.figures import write_report

        write_report(report, result, probs, label_index, abnormal, clf.classes, images, cams)
    return result


def record_metrics(weights: Path, name: str, result: dict[str, Any], command: str) -> None:
    """Store a compact summary of an evaluation in the weights' meta["metrics"][name]."""
    keys = (
        "n",
        "auc_abnormal",
        "sensitivity_abnormal",
        "specificity_abnormal",
        "accuracy",
        "ece",
        "labels",
        "per_source",
        "cam",
        "source_probe",
    )
    summary = {k: result[k] for k in keys if k in result} | {"command": command}
    record_summary(weights, name, summary)


def _triage(p: float, thresholds: dict[str, float]) -> str:
    return triage_class(float(p), thresholds)


def write_predictions(
    path: Path,
    samples: list[ds.Sample],
    abnormal: np.ndarray,
    p_abnormal: np.ndarray,
    predicted: list[str],
) -> None:
    """Write path,label,abnormal,p_abnormal,predicted, one row per image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "abnormal", "p_abnormal", "predicted"])
        for s, a, p, c in zip(samples, abnormal, p_abnormal, predicted, strict=True):
            writer.writerow([str(s.path), s.label, int(a), f"{p:.6f}", c])


def record_summary(weights: Path, name: str, summary: dict[str, Any]) -> None:
    """Store a summary (e.g. the LOSO table) as is in the weights' meta["metrics"][name]."""
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    blob["meta"].setdefault("metrics", {})[name] = summary
    tmp = weights.with_suffix(weights.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(weights)
