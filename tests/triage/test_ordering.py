"""The reading order (pipeline.triage.ordering): priority, unless a waiting study would pass the cap.

Property tests: the order is a permutation; without a cap, or with every deadline far away, it is
the priority order; whenever reading in arrival order meets every deadline, it does too.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.triage.ordering import live_reads, reading_order

CAP = 10.0


@st.composite
def queues(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Waiting studies (arrival order), their priorities, and the next reads (one a unit)."""
    n = draw(st.integers(1, 25))
    waited = sorted(draw(st.lists(st.floats(0.0, 2 * CAP), min_size=n, max_size=n)), reverse=True)
    arrivals = -np.asarray(waited)  # now is 0; the oldest first
    priorities = np.asarray(
        draw(st.lists(st.sampled_from([10.0, 30.0, 60.0, 90.0]), min_size=n, max_size=n))
    )
    step = draw(st.sampled_from([0.1, 0.5, 1.0]))
    return arrivals, priorities, step * np.arange(n + 1, dtype=float)


@settings(max_examples=300, deadline=None)
@given(queues())
def test_capped_order_meets_the_cap_whenever_fifo_does(q) -> None:  # type: ignore[no-untyped-def]
    arrivals, priorities, reads = q
    n = len(arrivals)
    out = reading_order(priorities, arrivals, reads, CAP)
    assert sorted(out.order) == list(range(n))
    fifo_meets = bool(np.all(arrivals + CAP >= reads[:n]))
    if fifo_meets:
        read_at = np.empty(n)
        read_at[out.order] = reads[:n]
        assert np.all(read_at - arrivals <= CAP + 1e-9)
    assert out.due <= set(range(n))


@settings(max_examples=200, deadline=None)
@given(queues())
def test_without_a_cap_or_a_near_deadline_it_is_the_priority_order(q) -> None:  # type: ignore[no-untyped-def]
    arrivals, priorities, reads = q
    by_priority = list(np.argsort(-priorities, kind="stable"))
    assert reading_order(priorities, arrivals, reads, None).order == by_priority
    far = reading_order(priorities, arrivals, reads, 1e6)
    assert far.order == by_priority and far.due == frozenset()


def test_an_old_normal_study_is_read_in_time_ahead_of_critical_ones_and_is_due() -> None:
    # 0: a normal film waiting 47.9 h; 1-3: critical films just in; a read every 3 minutes.
    hour = 3600.0
    arrivals = np.array([-47.9 * hour, -60.0, -30.0, -10.0])
    priorities = np.array([10.0, 90.0, 90.0, 85.0])
    reads = live_reads(4, 0.0, reads_per_hour=20)
    assert reads[1] == 180.0 and len(reads) == 5
    out = reading_order(priorities, arrivals, reads, 48 * hour)
    # 6 minutes to spare: two critical films first, then the old one (at 6 min), before the
    # third critical film, which it is due ahead of.
    assert out.order == [1, 2, 0, 3] and out.due == frozenset({0})
    one_read = reading_order(
        priorities, np.array([-47.95 * hour, -60.0, -30.0, -10.0]), reads, 48 * hour
    )
    assert one_read.order == [1, 0, 2, 3] and one_read.due == frozenset({0})
    # With an hour more to spare it can wait: abnormal first, and nothing is due.
    later = reading_order(priorities, arrivals, reads, 49 * hour)
    assert later.order == [1, 2, 3, 0] and later.due == frozenset()
    # With no cap: priority alone.
    assert reading_order(priorities, arrivals, reads, None).order == [1, 2, 3, 0]


def test_studies_past_the_cap_go_first_oldest_first_then_priority() -> None:
    hour = 3600.0
    arrivals = np.array([-80 * hour, -60 * hour, -1.0])  # two overdue (cap 48 h), one new
    priorities = np.array([10.0, 30.0, 90.0])
    out = reading_order(priorities, arrivals, live_reads(3, 0.0, 20), 48 * hour)
    assert out.order == [0, 1, 2] and out.due == frozenset({0, 1})


def test_ties_on_priority_keep_arrival_order() -> None:
    arrivals = np.array([-3.0, -2.0, -1.0])
    out = reading_order(np.array([50.0, 50.0, 50.0]), arrivals, np.arange(4.0), 100.0)
    assert out.order == [0, 1, 2]
