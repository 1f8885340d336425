"""Classification metrics, temperature scaling and operating points, in plain numpy.

``abnormal`` means any class but normal; ``p_abnormal = 1 - p(normal)``. A prediction is
positive at threshold t when ``p_abnormal >= t`` (the rule pipeline.triage.score uses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Return the ROC AUC (Mann-Whitney U with tied ranks averaged); NaN with one class only."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (false positive rate, true positive rate) from the strictest threshold down."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    thresholds = np.unique(scores)[::-1]
    n_pos, n_neg = max(1, int(positive.sum())), max(1, int((~positive).sum()))
    tpr = [0.0] + [float((scores[positive] >= t).sum()) / n_pos for t in thresholds]
    fpr = [0.0] + [float((scores[~positive] >= t).sum()) / n_neg for t in thresholds]
    return np.array(fpr), np.array(tpr)


def sensitivity_specificity(
    scores: np.ndarray, positive: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Return (sensitivity, specificity) of the rule score >= threshold."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    pred = scores >= threshold
    sens = float(pred[positive].mean()) if positive.any() else float("nan")
    spec = float((~pred[~positive]).mean()) if (~positive).any() else float("nan")
    return sens, spec


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Return the n x n count matrix, rows = truth, columns = prediction."""
    cm = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def per_class(cm: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class from a confusion matrix."""
    out = {}
    for i, name in enumerate(classes):
        tp, predicted, support = cm[i, i], cm[:, i].sum(), cm[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(support),
        }
    return out


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 15
) -> float:
    """Return the ECE over equal-width confidence bins: sum_b |acc_b - conf_b| * n_b / n."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += abs(correct[mask].mean() - confidence[mask].mean()) * mask.sum()
    return float(total / len(confidence))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature."""
    z = np.asarray(logits, float) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return the temperature minimising validation NLL (log-spaced grid, 0.2 to 5)."""
    labels = np.asarray(labels, int)
    best_t, best_nll = 1.0, math.inf
    for t in np.exp(np.linspace(math.log(0.2), math.log(5.0), 401)):
        p = softmax(logits, float(t))[np.arange(len(labels)), labels]
        nll = float(-np.log(np.clip(p, 1e-12, None)).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def threshold_for_sensitivity(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """Return the highest threshold whose sensitivity is at least target."""
    pos = np.sort(np.asarray(scores, float)[np.asarray(positive, bool)])[::-1]
    k = max(1, math.ceil(target * len(pos)))
    return float(pos[k - 1])


def threshold_for_specificity(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """Return the lowest threshold whose specificity is at least target."""
    neg = np.sort(np.asarray(scores, float)[~np.asarray(positive, bool)])
    k = max(1, math.ceil(target * len(neg)))
    return float(np.nextafter(neg[k - 1], np.inf))


def choose_thresholds(
    scores: np.ndarray,
    positive: np.ndarray,
    sensitivity: float = 0.95,
    urgent_specificity: float = 0.99,
    critical_specificity: float = 0.999,
) -> dict[str, float]:
    """Routine at the sensitivity target; urgent and critical at higher-specificity points."""
    routine = threshold_for_sensitivity(scores, positive, sensitivity)
    urgent = max(threshold_for_specificity(scores, positive, urgent_specificity), routine + 1e-4)
    critical = max(threshold_for_specificity(scores, positive, critical_specificity), urgent + 1e-4)
    return {"routine": routine, "urgent": urgent, "critical": min(critical, 1.0 - 1e-6)}


def summarize(
    probs: np.ndarray,
    label_index: np.ndarray,
    abnormal: np.ndarray,
    classes: Sequence[str],
    threshold: float,
) -> dict[str, Any]:
    """All metrics for N x C probabilities; label_index -1 marks labels outside the classes."""
    probs, label_index = np.asarray(probs, float), np.asarray(label_index, int)
    abnormal = np.asarray(abnormal, bool)
    normal = list(classes).index("normal")
    p_abn = 1.0 - probs[:, normal]
    sens, spec = sensitivity_specificity(p_abn, abnormal, threshold)
    known = label_index >= 0
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(label_index[known], pred[known], len(classes))
    auc_ovr = {c: auc(probs[known, i], label_index[known] == i) for i, c in enumerate(classes)}
    correct = pred[known] == label_index[known]
    return {
        "n": int(len(probs)),
        "auc_abnormal": auc(p_abn, abnormal),
        "sensitivity_abnormal": sens,
        "specificity_abnormal": spec,
        "threshold": float(threshold),
        "accuracy": float(correct.mean()) if known.any() else float("nan"),
        "per_class": per_class(cm, classes),
        "confusion_matrix": cm.tolist(),
        "auc_ovr": auc_ovr,
        "ece": expected_calibration_error(probs[known].max(axis=1), correct),
        "ece_abnormal": expected_calibration_error(
            np.maximum(p_abn, 1 - p_abn), (p_abn >= 0.5) == abnormal
        ),
    }
