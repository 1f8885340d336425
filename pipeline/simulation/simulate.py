"""Discrete-event simulation of a reporting queue: FIFO against the AI priority worklist.

The experiment of Annarumma et al. (Radiology 2019): the same studies, the same reading capacity
per day, read in a different order. Events are study arrivals and reading slots (``capacity``
evenly spaced slots inside the reading hours of every day); at each slot the radiologist takes one
waiting study chosen by the discipline:

* ``fifo``: the oldest.
* ``priority``: the highest ``triage.priority_score``, oldest first among ties (the worklist order).
* ``priority_capped``: as ``priority``, unless taking that study would make a waiting study miss
  the maximum wait ``cap_h``; then the oldest study that must go first. Whenever FIFO meets the
  cap, this discipline meets it too (an earliest-deadline-first argument). The rule is
  ``pipeline.triage.ordering.next_pick``, the one the live worklist orders by.
* ``priority_ageing``: the product's own ageing term of ``priority_score`` (score rises to 100
  as the wait approaches ``cap_h``), recomputed at every slot.

Times are hours from the first arrival. Arrivals in the warm-up days are simulated but not counted.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

from pipeline.triage import score as triage
from pipeline.triage.ordering import next_pick
from pipeline.triage.score import ageing

DISCIPLINES = ("fifo", "priority", "priority_capped", "priority_ageing")
ORACLE_ABNORMAL, ORACLE_NORMAL = 90.0, 10.0  # the oracle row's scores (simulate.run_experiment)
# Relative arrivals per hour of day: a hospital's outpatient day on top of emergency traffic.
DEFAULT_HOURLY = (1, 1, 1, 1, 1, 1, 2, 3, 6, 8, 8, 8, 7, 7, 8, 8, 7, 6, 4, 3, 3, 2, 2, 1)


@dataclass(frozen=True)
class Scenario:
    """Workload and staffing of one simulated department."""

    days: int = 28
    warmup_days: int = 7
    volume: int = 200
    capacity: int = 200
    reading_hours: tuple[float, float] = (8.0, 18.0)
    backlog_days: float = 0.0
    cap_h: float = 48.0
    hourly: tuple[float, ...] = field(default=DEFAULT_HOURLY)
    seed: int = 0

    def as_dict(self) -> dict[str, object]:
        """The scenario as JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def arrival_times(scenario: Scenario, rng: np.random.Generator) -> np.ndarray:
    """Sorted arrival hours: ``volume`` a day, spread by the hour-of-day pattern."""
    weights = np.asarray(scenario.hourly, dtype=float)
    total_days = scenario.warmup_days + scenario.days
    days = np.repeat(np.arange(total_days), scenario.volume)
    hours = rng.choice(24, size=days.size, p=weights / weights.sum())
    return np.sort(days * 24.0 + hours + rng.random(days.size))


def reading_slots(
    capacity: int, hours: tuple[float, float], start_h: float, until_h: float
) -> np.ndarray:
    """Slot times from start_h to until_h: capacity a day, evenly spaced in the reading hours."""
    lo, hi = hours
    if capacity < 1 or not 0.0 <= lo < hi <= 24.0:
        raise ValueError("capacity must be >= 1 and reading hours a range inside 0-24")
    step = (hi - lo) / capacity
    first_day, last_day = int(start_h // 24), int(math.ceil(until_h / 24))
    day = np.repeat(np.arange(first_day, last_day + 1), capacity)
    slots = day * 24.0 + lo + (np.tile(np.arange(capacity), last_day + 1 - first_day) + 0.5) * step
    return slots[(slots >= start_h) & (slots <= until_h)]


def slots_for(arrivals: np.ndarray, scenario: Scenario) -> np.ndarray:
    """Enough reading slots to drain the queue after the last arrival."""
    start = scenario.backlog_days * 24.0
    drain_days = len(arrivals) / scenario.capacity + 2
    until = max(float(arrivals.max(initial=0.0)), start) + 24.0 * drain_days
    return reading_slots(scenario.capacity, scenario.reading_hours, start, until)


def simulate(
    arrivals: np.ndarray,
    scores: np.ndarray,
    slots: np.ndarray,
    discipline: str,
    cap_h: float | None = None,
) -> np.ndarray:
    """Return the hour each study is read; arrivals must be sorted, slots sorted and sufficient."""
    if discipline not in DISCIPLINES:
        raise ValueError(f"unknown discipline {discipline!r}; choose from {', '.join(DISCIPLINES)}")
    if discipline in ("priority_capped", "priority_ageing") and not cap_h:
        raise ValueError(f"{discipline} needs a maximum wait (cap_h > 0)")
    n = len(arrivals)
    read = np.full(n, np.nan)
    waiting: list[int] = []  # indices in arrival order (fifo, capped, ageing)
    heap: list[tuple[float, float, int]] = []  # (-score, arrival, index) for priority
    head = nxt = done = 0
    for s, t in enumerate(slots):
        while nxt < n and arrivals[nxt] <= t:
            if discipline == "priority":
                heapq.heappush(heap, (-float(scores[nxt]), float(arrivals[nxt]), nxt))
            else:
                waiting.append(nxt)
            nxt += 1
        if discipline == "fifo":
            if head == len(waiting):
                continue
            pick = waiting[head]
            head += 1
        elif discipline == "priority":
            if not heap:
                continue
            pick = heapq.heappop(heap)[2]
        else:
            if not waiting:
                continue
            idx = np.asarray(waiting)
            if discipline == "priority_capped":
                pos = next_pick(scores[idx], arrivals[idx], slots[s + 1 :], float(cap_h or 0))[0]
            else:
                pos = int(
                    np.argmax(ageing_scores(scores[idx], t - arrivals[idx], float(cap_h or 0)))
                )
            pick = waiting.pop(pos)
        read[pick] = t
        done += 1
        if done == n:
            break
    if done < n:
        raise ValueError("not enough reading slots to drain the queue")
    return read


def ageing_scores(base: np.ndarray, waited_h: np.ndarray, cap_h: float) -> np.ndarray:
    """Vectorised ageing term of ``triage.priority_score`` on top of a base score."""
    return np.round(np.minimum(100.0, base + ageing(waited_h, cap_h)), 2)


def base_scores(p: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
    """Priority of each study at arrival, from pipeline.triage.score."""
    return np.array([triage.priority_score(float(x), thresholds) for x in p])


def synthetic_predictions(
    n: int,
    prevalence: float,
    sensitivity: float,
    specificity: float,
    cut: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw (p_abnormal, abnormal) for a binormal model with this sensitivity and specificity at p = cut.

    Latent scores are N(0, 1) for normal and N(d, 1) for abnormal studies; the latent cut meets
    both operating figures, and a logistic map sends it to ``cut``, so ``p >= cut`` flags abnormal.
    """
    for name, value in (("sensitivity", sensitivity), ("specificity", specificity)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
    z_cut = NormalDist().inv_cdf(specificity)
    shift = z_cut + NormalDist().inv_cdf(sensitivity)
    abnormal = rng.random(n) < prevalence
    z = rng.standard_normal(n) + np.where(abnormal, shift, 0.0)
    p = 1.0 / (1.0 + np.exp(-(z - z_cut + math.log(cut / (1.0 - cut)))))
    return p, abnormal


def delay_stats(hours: np.ndarray) -> dict[str, float | int | None]:
    """Count, mean, median, 95th percentile and maximum of delays in hours."""
    if hours.size == 0:
        return {"n": 0, "mean_h": None, "median_h": None, "p95_h": None, "max_h": None}
    return {
        "n": int(hours.size),
        "mean_h": round(float(hours.mean()), 2),
        "median_h": round(float(np.median(hours)), 2),
        "p95_h": round(float(np.percentile(hours, 95)), 2),
        "max_h": round(float(hours.max()), 2),
    }


def summarise(
    delays: np.ndarray, abnormal: np.ndarray, classes: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """Delay statistics for abnormal and normal studies and for each predicted triage class."""
    cls = np.asarray(classes)
    out = {"abnormal": delay_stats(delays[abnormal]), "normal": delay_stats(delays[~abnormal])}
    out.update({f"class_{c}": delay_stats(delays[cls == c]) for c in triage.CLASSES})
    return out


def run_experiment(
    scenario: Scenario,
    p_pool: np.ndarray,
    abnormal_pool: np.ndarray,
    thresholds: Mapping[str, float],
    disciplines: Sequence[str] = DISCIPLINES,
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Draw studies from the pool onto simulated arrivals and read them under each discipline.

    Returns the summary document and, per discipline, the counted studies' delays in hours
    (with an ``abnormal`` mask) for plotting.
    """
    rng = np.random.default_rng(scenario.seed)
    arrivals = arrival_times(scenario, rng)
    pick = rng.integers(0, len(p_pool), size=arrivals.size)
    p, abnormal = p_pool[pick], abnormal_pool[pick].astype(bool)
    scores = base_scores(p, thresholds)
    classes = [triage.triage_class(float(x), thresholds) for x in p]
    slots = slots_for(arrivals, scenario)
    counted = (arrivals >= scenario.warmup_days * 24.0) & (
        arrivals < (scenario.warmup_days + scenario.days) * 24.0
    )
    flagged = p >= thresholds["routine"]
    doc: dict[str, object] = {
        "counted_studies": int(counted.sum()),
        "sensitivity": _ratio(flagged & abnormal & counted, abnormal & counted),
        "specificity": _ratio(~flagged & ~abnormal & counted, ~abnormal & counted),
        "prevalence": _ratio(abnormal & counted, counted),
    }
    curves: dict[str, np.ndarray] = {"abnormal": abnormal[counted]}
    cls = [c for c, keep in zip(classes, counted, strict=True) if keep]
    for name in disciplines:
        read = simulate(arrivals, scores, slots, name, scenario.cap_h)
        delays = (read - arrivals)[counted]
        doc[name] = summarise(delays, abnormal[counted], cls)
        curves[name] = delays
    # The oracle: perfect knowledge of which films are abnormal. Read abnormal first (in arrival
    # order), it gives the abnormal films the earliest slots any order can: no model's order
    # cuts their mean wait further (an exchange argument on identical slots). The same knowledge
    # under the maximum wait is shown beside it; the capped rule does not minimise the mean, so
    # that row is a reference, not a bound.
    oracle_scores = np.where(abnormal, ORACLE_ABNORMAL, ORACLE_NORMAL)
    for name, discipline in (("oracle", "priority"), ("oracle_capped", "priority_capped")):
        read = simulate(arrivals, oracle_scores, slots, discipline, scenario.cap_h)
        delays = (read - arrivals)[counted]
        doc[name] = summarise(delays, abnormal[counted], cls)
        curves[name] = delays
    doc["achieved_share"] = {
        name: achieved_share(doc, name) for name in disciplines if name != "fifo"
    }
    return doc, curves


def achieved_share(doc: Mapping[str, object], name: str) -> float | None:
    """How much of the oracle's cut in the abnormal films' mean wait ``name`` delivers.

    (FIFO mean - name's mean) / (FIFO mean - oracle's mean): 1 is all that any order could do
    with the same capacity; a maximum wait costs some of it by design.

    None when the oracle cuts nothing.
    """

    def mean(discipline: str) -> float | None:
        row = doc.get(discipline)
        return row["abnormal"]["mean_h"] if isinstance(row, Mapping) else None  # type: ignore[no-any-return]

    fifo, mine, best = mean("fifo"), mean(name), mean("oracle")
    if fifo is None or mine is None or best is None or fifo - best <= 1e-9:
        return None
    return round((fifo - mine) / (fifo - best), 3)


def _ratio(num: np.ndarray, den: np.ndarray) -> float | None:
    return round(float(num.sum() / den.sum()), 4) if den.sum() else None
