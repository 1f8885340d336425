"""The performance statistics on generated scores whose true values are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.monitoring.performance import (
    at_threshold,
    auc,
    auc_delong,
    calibration,
    share,
    summarize,
    wilson,
)


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def binormal(d: float, n_pos: int, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Abnormal scores ~ N(d, 1), normal ~ N(0, 1): the true AUC is Phi(d / sqrt 2)."""
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    return scores, np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]


def delong_by_hand(scores: np.ndarray, truths: np.ndarray) -> tuple[float, float]:
    """DeLong's AUC and variance the slow way: every abnormal/normal pair."""
    pos, neg = scores[truths], scores[~truths]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(psi.mean()), float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def test_auc_small_exact_cases() -> None:
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([0.2, 0.2, 0.2, 0.2], [0, 1, 0, 1]) == 0.5  # all tied: one half
    assert auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert auc([0.3, 0.4], [1, 1]) is None
    one = auc_delong([0.3, 0.4, 0.1], [1, 1, 0])
    assert one["auc"] == 1.0 and one["ci"] is None and one["n_normal"] == 1


def test_delong_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.uniform(size=300), 1)  # many ties
    truths = rng.uniform(size=300) < scores
    area, var = delong_by_hand(scores, truths)
    doc = auc_delong(scores, truths)
    assert doc["auc"] == pytest.approx(area, abs=1e-12)
    assert doc["se"] == pytest.approx(math.sqrt(var), abs=1e-12)
    lo, hi = doc["ci"]
    assert lo == pytest.approx(area - 1.959964 * math.sqrt(var), abs=1e-6)
    assert hi == pytest.approx(area + 1.959964 * math.sqrt(var), abs=1e-6)


def test_auc_of_binormal_scores_is_phi_of_d_over_root_two() -> None:
    for d in (0.0, 0.5, 1.0, 2.0):
        scores, truths = binormal(d, 20000, 30000, seed=int(10 * d))
        doc = auc_delong(scores, truths)
        truth = phi(d / math.sqrt(2))
        assert doc["auc"] == pytest.approx(truth, abs=0.01), d
        assert doc["ci"][0] < truth < doc["ci"][1], d
        assert doc["ci"][1] - doc["ci"][0] < 0.02


def test_delong_interval_covers_the_true_auc_about_95_percent_of_the_time() -> None:
    truth = phi(1.0 / math.sqrt(2))
    covered = 0
    for seed in range(400):
        lo, hi = auc_delong(*binormal(1.0, 60, 90, seed))["ci"]
        covered += lo <= truth <= hi
    assert 0.91 <= covered / 400 <= 0.98


def test_threshold_rates_on_known_counts() -> None:
    # 10 abnormal (8 at or above 0.5), 20 normal (5 at or above 0.5)
    scores = [0.9] * 7 + [0.5] + [0.2] * 2 + [0.5] * 1 + [0.7] * 4 + [0.1] * 15
    truths = [True] * 10 + [False] * 20
    doc = at_threshold(scores, truths, 0.5)
    assert (doc["tp"], doc["fn"], doc["fp"], doc["tn"]) == (8, 2, 5, 15)
    assert doc["sensitivity"]["value"] == 0.8 and doc["specificity"]["value"] == 0.75
    assert doc["ppv"]["value"] == pytest.approx(8 / 13) and doc["npv"]["value"] == pytest.approx(
        15 / 17
    )
    assert doc["sensitivity"]["ci"] == pytest.approx([0.4902, 0.9433], abs=1e-4)  # Wilson
    none = at_threshold([0.1, 0.2], [False, False], 0.5)
    assert none["sensitivity"]["value"] is None and none["ppv"]["value"] is None
    assert none["specificity"]["value"] == 1.0


def test_threshold_rates_on_binormal_scores_match_the_normal_tails() -> None:
    scores, truths = binormal(1.5, 40000, 40000, seed=7)
    doc = at_threshold(scores, truths, 1.0)
    assert doc["sensitivity"]["value"] == pytest.approx(1 - phi(-0.5), abs=0.01)  # P(N(1.5)>=1)
    assert doc["specificity"]["value"] == pytest.approx(phi(1.0), abs=0.01)  # P(N(0)<1)
    assert doc["ppv"]["value"] == pytest.approx(phi(0.5) / (phi(0.5) + 1 - phi(1.0)), abs=0.01)


def test_wilson_interval_values() -> None:
    assert wilson(0, 0) is None
    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert share([True, False, True, True])["value"] == 0.75


def test_calibration_of_calibrated_and_overconfident_scores() -> None:
    rng = np.random.default_rng(11)
    p = rng.uniform(size=200000)
    calibrated = rng.uniform(size=p.size) < p
    doc = calibration(p, calibrated)
    assert len(doc["bins"]) == 10 and sum(b["n"] for b in doc["bins"]) == p.size
    assert doc["ece"] < 0.01
    assert doc["brier"] == pytest.approx(1 / 6, abs=0.005)  # E[p(1-p)] for p ~ U(0,1)
    for b in doc["bins"]:
        assert b["observed"] == pytest.approx(b["mean_score"], abs=0.02)
    # The truth follows p squared: the model is overconfident by p - p^2 on average.
    squared = rng.uniform(size=p.size) < p**2
    doc = calibration(p, squared)
    top = doc["bins"][9]
    assert top["observed"] == pytest.approx((1 - 0.9**3) / 3 / 0.1, abs=0.01)  # E[p^2 | p>0.9]
    assert doc["ece"] == pytest.approx(1 / 2 - 1 / 3, abs=0.01)  # E[p - p^2] = 1/6
    assert calibration([1.0, 0.0], [True, False])["bins"][9]["n"] == 1


def test_summarize_puts_it_together() -> None:
    scores, truths = binormal(1.0, 300, 700, seed=5)
    scores = 1 / (1 + np.exp(-scores))
    doc = summarize(scores, truths, {"routine": 0.5, "urgent": 0.7})
    assert (doc["reviewed"], doc["abnormal"], doc["prevalence"]) == (1000, 300, 0.3)
    assert set(doc["thresholds"]) == {"routine", "urgent"}
    assert doc["thresholds"]["routine"]["tp"] + doc["thresholds"]["routine"]["fn"] == 300
    assert doc["auc"]["auc"] == pytest.approx(auc(scores, truths))
    empty = summarize([], [], {"routine": 0.5})
    assert empty["reviewed"] == 0 and empty["auc"]["auc"] is None and empty["prevalence"] is None
