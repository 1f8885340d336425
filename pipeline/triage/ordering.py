"""The reading order: priority first, unless that would make a waiting study miss its maximum wait.

One pure rule serves the live worklist (the page, ``GET /api/worklist``, ``cxr-triage
worklist``) and the simulation's ``priority_capped`` discipline, so what the simulation measures
is what the department gets.

The rule, for studies waiting for a read, given when the next reads will happen:

* With no maximum wait, the highest priority first, the oldest first among equals.
* With a maximum wait ``cap``: read in arrival order from the next read on, the k-th oldest
  would be read at ``later_reads[k]``. Taking a younger study now pushes every older one back by
  one read. The first (oldest) study that would then miss its deadline (arrival + cap) bounds
  the choice: the pick is the highest priority among the studies up to and including it. A study
  read that way, ahead of a higher priority one, is *due*: its deadline forced it. Studies already
  past their deadline go first, oldest first.

Whenever reading in arrival order (FIFO) meets every deadline, this order meets them too (an
earliest-deadline-first exchange argument; the property tests in ``tests/triage/test_ordering.py`` check
it), and when no deadline is near it is exactly the priority order.

Times are plain numbers in one unit (hours in the simulation, seconds live).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def capped_prefix(arrivals: np.ndarray, later_reads: np.ndarray, cap: float) -> int:
    """How many of the oldest waiting studies may be read now without breaking the cap.

    ``arrivals`` are the waiting studies' arrival times in arrival order; ``later_reads`` the
    times of the reads after this one (at least as many as there are studies).
    """
    tight = arrivals + cap < later_reads[: len(arrivals)]
    return int(np.argmax(tight)) + 1 if tight.any() else len(arrivals)


def next_pick(
    priorities: np.ndarray, arrivals: np.ndarray, later_reads: np.ndarray, cap: float | None
) -> tuple[int, bool]:
    """The position (in arrival order) of the study to read next, and whether it is due."""
    best = int(np.argmax(priorities))
    if not cap:
        return best, False
    allowed = capped_prefix(arrivals, later_reads, cap)
    pos = int(np.argmax(priorities[:allowed]))
    return pos, pos != best


@dataclass(frozen=True)
class ReadingOrder:
    """Positions into the input (arrival order), in the order to read them; which are due."""

    order: list[int]
    due: frozenset[int]


def iter_reading_order(
    priorities: np.ndarray, arrivals: np.ndarray, reads: np.ndarray, cap: float | None
) -> Iterator[tuple[int, bool]]:
    """The reading order of the waiting studies, lazily: (position in the input, due) per read.

    ``priorities`` and ``arrivals`` are in arrival order (ties by arrival already broken by the
    caller, e.g. by id); ``reads`` holds the times of the next reads, the first being now: one
    per study and one more (a study passed over is then read after the last of them). Each read
    costs one pass over the studies left (``next_pick``), so a page of the worklist costs its
    length in passes, not the backlog's.
    """
    n = len(arrivals)
    if len(priorities) != n or len(reads) < n + 1:
        raise ValueError("one priority per study, and a read time per study and one more")
    prio = np.asarray(priorities, dtype=float)
    arr = np.asarray(arrivals, dtype=float)
    by_priority = np.argsort(-prio, kind="stable")
    if not cap or n == 0 or bool(np.all(arr + cap >= reads[n - 1])):
        for i in by_priority:  # no deadline can be missed
            yield int(i), False
        return
    taken = np.zeros(n, dtype=bool)
    best = 0  # the next untaken study in priority order
    for k in range(n):
        left = np.flatnonzero(~taken)
        # Once no waiting study can miss its deadline even if read last, the rest is priority.
        if bool(np.all(arr[left] + cap >= reads[n - 1])):
            for i in left[np.argsort(-prio[left], kind="stable")]:
                yield int(i), False
            return
        pos, _ = next_pick(prio[left], arr[left], reads[k + 1 :], cap)
        pick = int(left[pos])
        while taken[by_priority[best]]:
            best += 1
        taken[pick] = True
        yield pick, pick != int(by_priority[best])


def reading_order(
    priorities: np.ndarray, arrivals: np.ndarray, reads: np.ndarray, cap: float | None
) -> ReadingOrder:
    """The whole reading order (``iter_reading_order``) and which studies are due."""
    order, due = [], set()
    for pick, forced in iter_reading_order(priorities, arrivals, reads, cap):
        order.append(pick)
        if forced:
            due.add(pick)
    return ReadingOrder(order, frozenset(due))


def live_reads(n: int, now: float, reads_per_hour: float) -> np.ndarray:
    """Estimated times (seconds) of the next n + 1 reads: now, then one every 3600 / rate s."""
    step = 3600.0 / max(reads_per_hour, 1e-9)
    return now + step * np.arange(n + 1, dtype=float)
