"""How well the model ranks and classifies, from (score, truth) pairs: pure functions, no I/O.

Used by the live performance numbers (``pipeline.monitoring.live``: the console, ``/metrics``)
and meant for calibration and model comparison, which need the same numbers on other pairs.

* AUC: the Mann-Whitney estimate (ties count one half). Its 95 % confidence interval uses
  DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988) with the normal approximation,
  clipped to [0, 1]; it needs at least two abnormal and two normal studies.
* At a threshold t a study is called abnormal when its score is >= t (as ``pipeline.triage.score``
  does). Sensitivity, specificity, PPV and NPV come with Wilson score 95 % intervals.
* Calibration: a reliability diagram of ten equal-width bins of the score; per bin the number
  of studies, the mean score and the observed share abnormal (Wilson interval); the expected
  calibration error (ECE: the bins' |observed - mean score| weighted by their size) and the
  Brier score (mean squared difference between score and truth).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Scores = Sequence[float] | np.ndarray
Truths = Sequence[bool] | Sequence[int] | np.ndarray
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
CALIBRATION_BINS = 10


def _arrays(scores: Scores, truths: Truths) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(truths, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and truths must be two sequences of the same length")
    return s, y


def _placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: per abnormal study the share of normal ones it outranks
    (ties one half), and per normal study the share of abnormal ones that outrank it."""
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, "left")
    tied = np.searchsorted(neg_sorted, pos, "right") - below
    v10 = (below + 0.5 * tied) / len(neg)
    above_lo = np.searchsorted(pos_sorted, neg, "right")
    tied_p = above_lo - np.searchsorted(pos_sorted, neg, "left")
    v01 = ((len(pos) - above_lo) + 0.5 * tied_p) / len(pos)
    return v10, v01


def auc(scores: Scores, truths: Truths) -> float | None:
    """Area under the ROC curve; None unless both classes are present."""
    s, y = _arrays(scores, truths)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    v10, _ = _placements(pos, neg)
    return float(v10.mean())


def auc_delong(scores: Scores, truths: Truths) -> dict[str, Any]:
    """AUC with DeLong's standard error and 95 % interval; the interval is None when there are
    fewer than two studies of either class."""
    s, y = _arrays(scores, truths)
    pos, neg = s[y], s[~y]
    doc: dict[str, Any] = {
        "auc": None,
        "se": None,
        "ci": None,
        "n_abnormal": int(len(pos)),
        "n_normal": int(len(neg)),
        "method": "DeLong",
    }
    if len(pos) == 0 or len(neg) == 0:
        return doc
    v10, v01 = _placements(pos, neg)
    area = float(v10.mean())
    doc["auc"] = area
    if len(pos) < 2 or len(neg) < 2:
        return doc
    var = float(v10.var(ddof=1)) / len(pos) + float(v01.var(ddof=1)) / len(neg)
    se = math.sqrt(max(0.0, var))
    doc["se"] = se
    doc["ci"] = [max(0.0, area - Z95 * se), min(1.0, area + Z95 * se)]
    return doc


def wilson(k: int, n: int) -> list[float] | None:
    """Wilson score 95 % interval of a proportion k/n; None when n is 0."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"value": (k / n) if n else None, "k": k, "n": n, "ci": wilson(k, n)}


def at_threshold(scores: Scores, truths: Truths, threshold: float) -> dict:
    """The confusion counts and sensitivity, specificity, PPV, NPV of "abnormal if >= t"."""
    s, y = _arrays(scores, truths)
    called = s >= threshold
    tp = int(np.sum(called & y))
    fp = int(np.sum(called & ~y))
    fn = int(np.sum(~called & y))
    tn = int(np.sum(~called & ~y))
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": _rate(tp, tp + fn),
        "specificity": _rate(tn, tn + fp),
        "ppv": _rate(tp, tp + fp),
        "npv": _rate(tn, tn + fn),
    }


def calibration(scores: Scores, truths: Truths, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """A reliability diagram (equal-width bins of the score), ECE and Brier score."""
    s, y = _arrays(scores, truths)
    # A score of exactly 1.0 belongs to the last bin.
    index = np.minimum((s * bins).astype(int), bins - 1) if len(s) else np.zeros(0, int)
    rows = []
    ece = 0.0
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        k = int(y[mask].sum())
        mean_p = float(s[mask].mean()) if n else None
        observed = k / n if n else None
        if n and mean_p is not None and observed is not None:
            ece += n * abs(observed - mean_p)
        rows.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": n,
                "abnormal": k,
                "mean_score": mean_p,
                "observed": observed,
                "ci": wilson(k, n),
            }
        )
    total = len(s)
    return {
        "bins": rows,
        "ece": (ece / total) if total else None,
        "brier": float(np.mean((s - y.astype(np.float64)) ** 2)) if total else None,
    }


def share(flags: Sequence[bool]) -> dict[str, Any]:
    """The share of True among flags, with its Wilson interval."""
    k = int(sum(bool(f) for f in flags))
    return _rate(k, len(flags))


def summarize(
    scores: Scores,
    truths: Truths,
    thresholds: Mapping[str, float] | None,
) -> dict[str, Any]:
    """Everything the live performance table shows for one group of reviewed studies."""
    s, y = _arrays(scores, truths)
    return {
        "reviewed": int(len(s)),
        "abnormal": int(y.sum()),
        "prevalence": float(y.mean()) if len(s) else None,
        "auc": auc_delong(s, y),
        "thresholds": {name: at_threshold(s, y, t) for name, t in (thresholds or {}).items()},
        "calibration": calibration(s, y),
    }
