"""The reporting-queue simulation: a case computed by hand, its scores, and its properties."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.classifier.network import DEFAULT_THRESHOLDS
from pipeline.simulation import simulate as sim
from pipeline.triage import score as triage

THR = dict(DEFAULT_THRESHOLDS)


# --------------------------------------------------------------------------- hand-computed case


def test_reading_slots_are_evenly_spaced_in_reading_hours() -> None:
    assert sim.reading_slots(1, (8.0, 16.0), 0.0, 80.0).tolist() == [12.0, 36.0, 60.0]
    assert sim.reading_slots(2, (8.0, 18.0), 11.0, 40.0).tolist() == [15.5, 34.5, 39.5]


def test_tiny_case_by_hand() -> None:
    """Four studies, one read a day at noon (slots at 12, 36, 60, 84 h).

    A normal 09:00, B abnormal 10:00, C normal 11:00 on day 0; D abnormal 09:00 on day 1 (33 h).
    FIFO reads A, B, C, D. Priority reads B (critical), D (urgent), then C before A (higher p).
    With a 52 h cap: at 36 h, reading D would leave C to be read at 84 h, past its deadline of
    63 h, so only A or C may be read: C (higher priority); then A must go (deadline 61 h); then D.
    """
    arrivals = np.array([9.0, 10.0, 11.0, 33.0])
    p = np.array([0.1, 0.95, 0.2, 0.8])
    scores = sim.base_scores(p, THR)
    assert scores.tolist() == [6.25, 85.0, 12.5, 62.5]
    slots = sim.reading_slots(1, (8.0, 16.0), 0.0, 24 * 6)

    def waits(discipline: str, cap: float | None = None) -> list[float]:
        return (sim.simulate(arrivals, scores, slots, discipline, cap) - arrivals).tolist()

    assert waits("fifo") == [3.0, 26.0, 49.0, 51.0]
    assert waits("priority") == [75.0, 2.0, 49.0, 3.0]
    assert waits("priority_capped", 52.0) == [51.0, 2.0, 25.0, 51.0]
    # Cap of 50 h: even FIFO misses it (D waits 51 h), and the capped list degrades to FIFO order.
    assert waits("priority_capped", 50.0) == [27.0, 2.0, 49.0, 51.0]

    counted = sim.summarise(np.array(waits("priority")), p >= THR["routine"], ["x"] * 4)
    assert counted["abnormal"] == {
        "n": 2,
        "mean_h": 2.5,
        "median_h": 2.5,
        "p95_h": 2.95,
        "max_h": 3.0,
    }
    assert counted["normal"]["mean_h"] == 62.0 and counted["normal"]["max_h"] == 75.0


def test_ageing_scores_match_triage_priority_score() -> None:
    rng = np.random.default_rng(3)
    p, waited = rng.random(200), rng.random(200) * 60
    expected = [
        triage.priority_score(float(x), THR, None, w * 3600, 48 * 3600)
        for x, w in zip(p, waited, strict=True)
    ]
    got = sim.ageing_scores(sim.base_scores(p, THR), waited, 48.0)
    assert np.allclose(got, expected, atol=0.011)


def test_synthetic_model_has_the_asked_sensitivity_and_specificity() -> None:
    p, abnormal = sim.synthetic_predictions(40_000, 0.3, 0.95, 0.71, 0.4, np.random.default_rng(0))
    flagged = p >= 0.4
    assert abs(abnormal.mean() - 0.3) < 0.01
    assert abs(flagged[abnormal].mean() - 0.95) < 0.01
    assert abs((~flagged[~abnormal]).mean() - 0.71) < 0.01


# --------------------------------------------------------------------------- properties

arrival_lists = st.lists(st.floats(0.0, 24 * 5, allow_nan=False), min_size=1, max_size=40)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, tuple[float, float]]:
    arrivals = np.sort(np.array(draw(arrival_lists)))
    abnormal = np.array(
        draw(st.lists(st.booleans(), min_size=len(arrivals), max_size=len(arrivals)))
    )
    capacity = draw(st.integers(1, 12))
    start = draw(st.integers(0, 20))
    return arrivals, abnormal, capacity, (float(start), float(draw(st.integers(start + 1, 24))))


def _slots(arrivals: np.ndarray, capacity: int, hours: tuple[float, float]) -> np.ndarray:
    return sim.reading_slots(capacity, hours, 0.0, float(arrivals.max()) + 24 * (len(arrivals) + 2))


@settings(max_examples=150, deadline=None)
@given(workloads(), st.data())
def test_perfect_model_never_makes_an_abnormal_study_wait_longer(workload, data) -> None:
    arrivals, abnormal, capacity, hours = workload
    slots = _slots(arrivals, capacity, hours)
    # A perfect model that is also certain: every abnormal study scores the same, so abnormal
    # studies are read in arrival order ahead of every normal one.
    certain = sim.base_scores(abnormal.astype(float), THR)
    fifo = sim.simulate(arrivals, certain, slots, "fifo")
    prio = sim.simulate(arrivals, certain, slots, "priority")
    assert np.all(prio[abnormal] <= fifo[abnormal])
    # A perfect but graded model reorders abnormal studies among themselves: their reads still
    # take the earliest slots, so no slower on the whole (sum) and none past FIFO's last.
    graded_p = np.where(
        abnormal,
        data.draw(st.lists(st.floats(0.45, 1.0), min_size=len(arrivals), max_size=len(arrivals))),
        data.draw(st.lists(st.floats(0.0, 0.35), min_size=len(arrivals), max_size=len(arrivals))),
    )
    graded = sim.simulate(arrivals, sim.base_scores(graded_p, THR), slots, "priority")
    assert np.sort(graded[abnormal]).tolist() == np.sort(prio[abnormal]).tolist()
    assert graded[abnormal].sum() <= fifo[abnormal].sum() + 1e-9


@settings(max_examples=150, deadline=None)
@given(workloads(), st.lists(st.floats(0.0, 1.0), min_size=40, max_size=40), st.floats(0.0, 48.0))
def test_capped_priority_keeps_the_cap_whenever_capacity_allows(workload, ps, slack) -> None:
    arrivals, _, capacity, hours = workload
    scores = sim.base_scores(np.array(ps[: len(arrivals)]), THR)
    slots = _slots(arrivals, capacity, hours)
    fifo_max = float((sim.simulate(arrivals, scores, slots, "fifo") - arrivals).max())
    # Capacity allows a cap iff FIFO (earliest deadline first) meets it; a cap must be > 0, and
    # FIFO can wait 0 h (a study arriving exactly at a reading slot).
    cap = max(fifo_max + slack, 1e-6)
    capped = sim.simulate(arrivals, scores, slots, "priority_capped", cap)
    assert float((capped - arrivals).max()) <= cap + 1e-9
    assert sorted(capped.tolist()) == sorted(sim.simulate(arrivals, scores, slots, "fifo").tolist())
