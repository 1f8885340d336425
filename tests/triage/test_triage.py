"""The priority formula: classes, bands, STAT boost, ageing, study aggregation."""

from __future__ import annotations

import pytest

from pipeline.triage import score as triage

T = {"critical": 0.9, "urgent": 0.7, "routine": 0.4}


def test_p_abnormal_is_one_minus_normal() -> None:
    assert triage.p_abnormal({"normal": 0.2, "pneumonia": 0.5, "covid19": 0.3}) == pytest.approx(
        0.8
    )
    assert triage.p_abnormal({"a": 0.1, "b": 0.9}) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("p", "cls"),
    [
        (0.0, "normal"),
        (0.39, "normal"),
        (0.4, "routine"),
        (0.69, "routine"),
        (0.7, "urgent"),
        (0.9, "critical"),
        (1.0, "critical"),
    ],
)
def test_triage_class_thresholds(p: float, cls: str) -> None:
    assert triage.triage_class(p, T) == cls


def test_score_is_monotonic_and_inside_class_bands() -> None:
    ps = [i / 100 for i in range(101)]
    scores = [triage.priority_score(p, T) for p in ps]
    assert scores == sorted(scores)
    for p, s in zip(ps, scores, strict=True):
        lo, hi = triage.BANDS[triage.triage_class(p, T)]
        assert lo <= s <= hi
    assert triage.priority_score(0.0, T) == 0.0
    assert triage.priority_score(1.0, T) == 95.0


def test_stat_boost_and_cap() -> None:
    assert triage.priority_score(0.1, T, "STAT") == pytest.approx(
        triage.priority_score(0.1, T) + 20
    )
    assert triage.priority_score(0.99, T, "stat") == 100.0
    assert triage.priority_score(0.1, T, "ROUTINE") == triage.priority_score(0.1, T)


def test_ageing_reaches_the_top_at_the_maximum_wait() -> None:
    fresh = triage.priority_score(0.05, T, waited_s=0, max_wait_s=3600)
    half = triage.priority_score(0.05, T, waited_s=1800, max_wait_s=3600)
    assert half == pytest.approx(fresh + 50, abs=0.01)
    assert triage.priority_score(0.05, T, waited_s=7200, max_wait_s=3600) == 100.0


def test_study_takes_the_maximum_over_images() -> None:
    assert triage.study_p_abnormal([0.1, 0.8, 0.3]) == 0.8
    assert triage.study_p_abnormal([]) is None
