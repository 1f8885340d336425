"""Shortcut probe: can a trivial classifier tell the data sources apart?

If logistic regression on 16x16 thumbnails (or on eight image statistics) separates the
paediatric collection from the adult one, a CNN can score well by recognising the source rather
than the disease. Run: ``python -m pipeline.training.shortcuts KAGGLE.csv COVID.csv [--json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from pipeline.training import datasets as ds
from pipeline.training import metrics as ev

log = logging.getLogger(__name__)


def thumbnails(images: np.ndarray, size: int = 16) -> np.ndarray:
    """Return N x size*size area-averaged thumbnails scaled to [0, 1]."""
    out = [
        np.asarray(PILImage.fromarray(im).resize((size, size), PILImage.Resampling.BOX)) / 255.0
        for im in images
    ]
    return np.stack(out).reshape(len(images), -1)


def image_stats(images: np.ndarray) -> np.ndarray:
    """Return N x 8 statistics: mean, std, 5/25/50/75/95th percentiles, border-to-centre ratio."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    pct = np.percentile(x, [5, 25, 50, 75, 95], axis=1).T
    s = images.shape[1] // 8
    border = np.concatenate(
        [images[:, :s].reshape(len(images), -1), images[:, -s:].reshape(len(images), -1)], 1
    )
    centre = images[:, 3 * s : 5 * s, 3 * s : 5 * s].reshape(len(images), -1)
    ratio = (border.mean(1) + 1) / (centre.mean(1) + 1)
    return np.column_stack([x.mean(1), x.std(1), pct, ratio])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 500) -> np.ndarray:
    """Fit L2-regularised logistic regression by full-batch gradient descent; return weights."""
    xb = np.column_stack([x, np.ones(len(x))])
    w = np.zeros(xb.shape[1])
    lr = 1.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (p - y) / len(y) + l2 * np.r_[w[:-1], 0.0]
        w -= lr * grad
    return w


def probe(features: np.ndarray, target: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Train on a seeded 70 %, report AUC and accuracy on the other 30 %."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(target))
    cut = int(0.7 * len(order))
    tr, te = order[:cut], order[cut:]
    mu, sd = features[tr].mean(0), features[tr].std(0) + 1e-6
    w = fit_logistic((features[tr] - mu) / sd, target[tr].astype(float))
    z = np.column_stack([(features[te] - mu) / sd, np.ones(len(te))]) @ w
    return {
        "n_test": int(len(te)),
        "auc": ev.auc(z, target[te].astype(bool)),
        "accuracy": float(((z > 0) == target[te].astype(bool)).mean()),
    }


def fit_softmax(
    x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-2, steps: int = 500
) -> np.ndarray:
    """Multinomial L2-regularised logistic regression by full-batch gradient descent."""
    xb = np.column_stack([x, np.ones(len(x))])
    w = np.zeros((xb.shape[1], classes))
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        z = xb @ w
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        grad = xb.T @ (p - onehot) / len(y)
        grad[:-1] += l2 * w[:-1]
        w -= 1.0 * grad
    return w


def source_probe(features: np.ndarray, sources: list[str], seed: int = 0) -> dict[str, Any]:
    """How well a linear probe tells the sources apart from features (70/30, balanced).

    Each source contributes the same number of rows (the smallest source's count), so chance
    is 1 / number of sources. A model that does not encode the source scores near chance.
    """
    names = sorted(set(sources))
    src = np.array([names.index(s) for s in sources])
    rng = np.random.default_rng(seed)
    n = min(int((src == k).sum()) for k in range(len(names)))
    keep = np.concatenate([rng.permutation(np.nonzero(src == k)[0])[:n] for k in range(len(names))])
    order = rng.permutation(keep)
    cut = int(0.7 * len(order))
    tr, te = order[:cut], order[cut:]
    mu, sd = features[tr].mean(0), features[tr].std(0) + 1e-6
    w = fit_softmax((features[tr] - mu) / sd, src[tr], len(names))
    z = np.column_stack([(features[te] - mu) / sd, np.ones(len(te))]) @ w
    return {
        "sources": names,
        "per_source": n,
        "n_test": int(len(te)),
        "accuracy": float((z.argmax(axis=1) == src[te]).mean()),
        "chance": 1.0 / len(names),
    }


def run_probes(csvs: list[Path], per_source: int = 1500, seed: int = 0) -> dict[str, Any]:
    """Probe source separability on all images and on normal images only."""
    samples = ds.read_datasets(csvs)
    sources = sorted({s.source for s in samples})
    if len(sources) != 2:
        raise ds.DatasetError(f"need exactly two sources, got {sources}")
    rng = np.random.default_rng(seed)
    picked: list[ds.Sample] = []
    for src in sources:
        pool = [s for s in samples if s.source == src]
        picked += [pool[i] for i in rng.permutation(len(pool))[:per_source]]
    images = ds.load_images([s.path for s in picked], 64)
    target = np.array([s.source == sources[1] for s in picked])
    normal = np.array([s.label.lower() == "normal" for s in picked])
    out: dict[str, Any] = {"sources": sources, "n": len(picked)}
    feats = {"thumbnail16": thumbnails(images), "stats8": image_stats(images)}
    for name, f in feats.items():
        out[f"source_all_{name}"] = probe(f, target, seed)
        out[f"source_normals_only_{name}"] = probe(f[normal], target[normal], seed)
        # Within one source: how far does the label itself follow from a thumbnail?
        for k, src in enumerate(sources):
            mask = target == bool(k)
            out[f"label_within_{src}_{name}"] = probe(f[mask], ~normal[mask], seed)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csvs", nargs=2, type=Path)
    parser.add_argument("--per-source", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run_probes(args.csvs, args.per_source, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
