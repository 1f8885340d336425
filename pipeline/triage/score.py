"""Priority: pure functions from model probabilities to a triage class and a 0-100 score.

Radiologists read this module's rules on the dashboard's "How priority works" page:

* ``p_abnormal = 1 - p(normal)`` per image; a study takes the maximum over its frontal images.
* Triage class by thresholds stored with the weights (chosen on validation data):
  ``critical`` >= t_critical > ``urgent`` >= t_urgent > ``routine`` >= t_routine > ``normal``.
* Score: each class owns a band (normal 0-25, routine 25-50, urgent 50-75, critical 75-95) and
  the study sits inside its band in proportion to p_abnormal, so the score never contradicts
  the class. A requested STAT priority adds 20 (the site's policy may set another boost). Ageing adds up to 100 as the wait approaches the
  configured maximum, so no study waits past it. The score is capped at 100.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

CLASSES = ("critical", "urgent", "routine", "normal")
BANDS = {
    "normal": (0.0, 25.0),
    "routine": (25.0, 50.0),
    "urgent": (50.0, 75.0),
    "critical": (75.0, 95.0),
}
STAT_BOOST = 20.0
STAT_VALUES = {"STAT", "HIGH", "URGENT", "EMERGENCY"}


def rescale(p: float, scale: float = 1.0) -> float:
    """p_abnormal under a site's temperature: sigmoid(logit(p) / scale); 1 leaves it unchanged."""
    if scale == 1.0:
        return p
    q = min(1.0 - 1e-9, max(1e-9, p))
    return 1.0 / (1.0 + math.exp(-math.log(q / (1.0 - q)) / scale))


def p_abnormal(probabilities: Mapping[str, float]) -> float:
    """Return 1 - p(normal); with no 'normal' class, the largest probability."""
    if "normal" in probabilities:
        return min(1.0, max(0.0, 1.0 - float(probabilities["normal"])))
    return max(float(p) for p in probabilities.values())


def triage_class(p: float, thresholds: Mapping[str, float]) -> str:
    """Map p_abnormal to critical / urgent / routine / normal."""
    if p >= thresholds["critical"]:
        return "critical"
    if p >= thresholds["urgent"]:
        return "urgent"
    if p >= thresholds["routine"]:
        return "routine"
    return "normal"


def _class_range(cls: str, thresholds: Mapping[str, float]) -> tuple[float, float]:
    edges = {
        "normal": (0.0, thresholds["routine"]),
        "routine": (thresholds["routine"], thresholds["urgent"]),
        "urgent": (thresholds["urgent"], thresholds["critical"]),
        "critical": (thresholds["critical"], 1.0),
    }
    return edges[cls]


def is_stat(requested_priority: str | None) -> bool:
    """True when the order asked for STAT (or an equivalent) reading."""
    return (requested_priority or "").strip().upper() in STAT_VALUES


def priority_score(
    p: float,
    thresholds: Mapping[str, float],
    requested_priority: str | None = None,
    waited_s: float = 0.0,
    max_wait_s: float | None = None,
    stat_boost: float = STAT_BOOST,
) -> float:
    """Return the 0-100 priority of a study with abnormality probability p."""
    cls = triage_class(p, thresholds)
    lo, hi = _class_range(cls, thresholds)
    fraction = 0.0 if hi <= lo else min(1.0, max(0.0, (p - lo) / (hi - lo)))
    band_lo, band_hi = BANDS[cls]
    score = band_lo + fraction * (band_hi - band_lo)
    if is_stat(requested_priority):
        score += stat_boost
    if max_wait_s and max_wait_s > 0 and waited_s > 0:
        score += float(ageing(waited_s, max_wait_s))
    return round(min(100.0, score), 2)


def ageing(waited: Any, max_wait: float) -> Any:
    """The ageing term: up to 100 points, reached when a study has waited ``max_wait`` (same
    unit as ``waited``); numbers or numpy arrays (the simulation's vectorised queue)."""
    return 100.0 * np.minimum(1.0, np.maximum(waited, 0.0) / max_wait)


def study_p_abnormal(image_scores: Iterable[float]) -> float | None:
    """A study's p_abnormal: the maximum over its scored frontal images."""
    scores = list(image_scores)
    return max(scores) if scores else None
