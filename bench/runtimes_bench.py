"""The model's runtimes side by side: speed, AUC against float32, CAM agreement; the choice.

Every runtime of ``pipeline.classifier.runtimes`` runs the same test images (the test splits of
``../shared/data/cxr/*/labels.csv``) and the same speed inputs, back to back in one run, so the
ratios are fair even on a shared machine. Quality is measured against eager float32: the
abnormal-vs-normal AUC (pooled over the sources) and the share of images whose CAM peaks in
the same cell. Speed is the model alone in the workers' layout (on a CPU a single-threaded
process per core, all at once), at its best batch size. The int8 models are calibrated on
training images, never on the test images they are judged on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from bench.model_speed import layout_runs, rates_of
from pipeline.service.supervisor import WorkerLayout

log = logging.getLogger(__name__)

SHARED_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"
BATCH_SIZES = (8, 16, 32)


def labelled_images(
    subset: str, per_source: int, meta: dict[str, Any]
) -> tuple[list[Path], np.ndarray]:
    """Up to per_source files of each collection's subset, spread over it, and abnormal labels."""
    from pipeline.training import datasets as ds

    paths: list[Path] = []
    abnormal: list[bool] = []
    for csv in sorted(SHARED_CXR.glob("*/labels.csv")):
        samples = ds.select_as_trained(ds.read_dataset(csv), subset, meta)
        step = max(1, len(samples) // per_source)
        for s in samples[::step][:per_source]:
            paths.append(s.path)
            mapped = ds.map_label(s.label, ds.parse_label_map(None), ["normal"])
            abnormal.append((mapped or s.label.lower()) != "normal")
    return paths, np.array(abnormal)


def _normalised(clf: Any, images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    return ((x - clf._mean) / clf._std)[:, None]


def _cam_peaks(cams: np.ndarray) -> np.ndarray:
    return cams.reshape(len(cams), -1).astype(np.float32).argmax(axis=1)


def _predict(clf: Any, images: np.ndarray, bs: int = 32) -> tuple[np.ndarray, np.ndarray]:
    probs, cams = [], []
    for i in range(0, len(images), bs):
        out = clf.predict(images[i : i + bs])
        probs.append(out.probabilities)
        cams.append(out.cams)
    return np.concatenate(probs), np.concatenate(cams)


def layout_speed(
    weights: Path,
    runtime: str,
    layout: WorkerLayout,
    inputs: np.ndarray,
    workdir: Path,
    batch_sizes: tuple[int, ...],
) -> dict[int, float]:
    """Images/s of the model alone under one runtime, the layout's processes all at once."""
    path = workdir / "runtime-inputs.npy"
    np.save(path, inputs)
    runs = layout_runs(weights, runtime, layout, path, batch_sizes, full_batches=True)
    if any(r[5] != runtime for r in runs):
        raise RuntimeError(f"runtime {runtime} fell back to {runs[0][5]} in the speed run")
    return rates_of(runs, batch_sizes)


def ensure_int8(
    weights: Path, fp32: Path, int8: Path, calibration: np.ndarray, requantise: bool = False
) -> bool:
    """Calibrate the int8 model unless one is beside the weights; True when one was written.

    Re-calibrating replaces the file that every CPU's recorded choice measured, so those
    choices are dropped (pipeline.classifier.runtime_record.forget_choices).
    """
    from pipeline.classifier import runtimes as rt
    from pipeline.classifier.runtime_record import forget_choices

    if int8.exists() and not requantise:
        log.info("int8 model %s kept (calibrated before; --requantise makes a new one)", int8.name)
        return False
    replaced = int8.exists()
    try:
        rt.quantize_int8(fp32, calibration, int8)
    except ImportError as exc:
        log.warning("int8 quantisation needs onnxruntime: %s", exc)
        return False
    if replaced:
        forget_choices(weights)
    return True


def compare_runtimes(
    weights: Path,
    layout: WorkerLayout,
    speed_inputs: np.ndarray,
    workdir: Path,
    per_source: int = 100,
    calibration_n: int = 150,
    runtimes: tuple[str, ...] | None = None,
    requantise: bool = False,
) -> list[dict[str, Any]]:
    """One row per runtime: img/s, AUC and its delta against float32, CAM agreement, passes.

    The int8 model is calibrated once per weights file and kept beside it, so that the record of
    every CPU measures the same file. ``requantise`` calibrates it again, replacing the file; the
    other CPUs' records, made on the old one, are then dropped.
    """
    from pipeline.classifier import runtimes as rt
    from pipeline.classifier.network import Classifier
    from pipeline.classifier.runtime_record import AUC_TOLERANCE, CAM_AGREEMENT
    from pipeline.training.datasets import load_images
    from pipeline.training.metrics import auc

    ref = Classifier(weights, "cpu", layout.threads)
    test_paths, abnormal = labelled_images("test", per_source, ref.meta)
    if not test_paths:
        raise RuntimeError(f"no labelled test images under {SHARED_CXR}")
    test = load_images(test_paths, ref.input_size, preprocess=ref.preprocess)
    calib_paths, _ = labelled_images("train", max(1, calibration_n // 3), ref.meta)
    calib = load_images(calib_paths, ref.input_size, preprocess=ref.preprocess)
    onnx_dir = rt.onnx_dir_for(weights)
    fp32 = onnx_dir / f"{ref.sha256[:12]}.onnx"
    if not fp32.exists():
        rt.export_onnx(ref.model, ref.input_size, fp32)
    int8 = onnx_dir / f"{ref.sha256[:12]}.int8.onnx"
    ensure_int8(weights, fp32, int8, _normalised(ref, calib), requantise)
    ref_probs, ref_cams = _predict(ref, test)
    ref_auc = auc(1.0 - ref_probs[:, 0], abnormal)
    ref_peaks = _cam_peaks(ref_cams)
    rows = []
    for name in runtimes or rt.RUNTIMES:
        row: dict[str, Any] = {"runtime": name}
        try:
            clf = Classifier(weights, "cpu", layout.threads, name, batch_size=32)
            if clf.runtime != name:
                raise rt.RuntimeUnavailable("fell back to eager (see the log)")
            probs, cams = _predict(clf, test)
            del clf
            sizes = (16,) if name == "compile" else BATCH_SIZES  # compile: one shape per size
            rates = layout_speed(weights, name, layout, speed_inputs, workdir, sizes)
        except Exception as exc:
            row.update(error=f"{type(exc).__name__}: {exc}"[:300], passes=False)
            rows.append(row)
            continue
        best = max(rates, key=lambda b: rates[b])
        row["img_s"] = round(rates[best], 1)
        row["batch"] = best
        row["auc"] = round(auc(1.0 - probs[:, 0], abnormal), 4)
        row["auc_delta"] = round(row["auc"] - ref_auc, 4)
        row["cam_agreement"] = round(float(np.mean(_cam_peaks(cams) == ref_peaks)), 3)
        row["max_p_diff"] = round(float(np.abs(probs - ref_probs).max()), 4)
        row["passes"] = bool(
            abs(row["auc"] - ref_auc) <= AUC_TOLERANCE and row["cam_agreement"] >= CAM_AGREEMENT
        )
        rows.append(row)
        log.info("runtime %s: %s", name, row)
    for row in rows:
        row["test_images"], row["calibration_images"] = len(test), len(calib)
    return rows


def choose(rows: list[dict[str, Any]]) -> str:
    """The fastest runtime that passes; eager when none does."""
    passing = [r for r in rows if r.get("passes")]
    return max(passing, key=lambda r: r["img_s"])["runtime"] if passing else "eager"


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as the bench prints them."""
    lines = [f"{'runtime':18} {'img/s':>7} {'batch':>5} {'AUC':>7} {'dAUC':>8} {'CAM':>6} passes"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['runtime']:18} unavailable: {r['error']}")
            continue
        lines.append(
            f"{r['runtime']:18} {r['img_s']:7.1f} {r['batch']:5d} {r['auc']:7.4f} "
            f"{r['auc_delta']:+8.4f} {r['cam_agreement']:6.1%} {r['passes']}"
        )
    return "\n".join(lines)
