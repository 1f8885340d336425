"""The worklist in reading order: one page of it, its size, a study's neighbours in it.

The worklist page, ``GET /api/worklist`` and ``cxr-triage worklist`` share one function
(``worklist_page``), so the order and the filters cannot drift: the studies waiting for a read in
the reading order of ``pipeline.triage.ordering`` under the site's policy (priority, unless a study
would wait past the maximum wait), then the rest by priority desc, unscored last, arrival, id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from pipeline.models import Study, as_utc, utcnow
from pipeline.triage.filters import WorklistFilter

_UNSCORED_LAST = func.coalesce(Study.priority, -1.0)


def worklist_query(
    limit: int | None = None, offset: int = 0, filters: WorklistFilter | None = None
) -> Select[Study]:
    """Studies by priority desc (unscored last), then arrival asc, then id."""
    query = select(Study).order_by(_UNSCORED_LAST.desc(), Study.received_at.asc(), Study.id.asc())
    if filters is not None:
        query = query.where(*filters.conditions())
    if limit:
        query = query.limit(limit).offset(offset)
    return query


def worklist_count(session: Session, filters: WorklistFilter | None = None) -> int:
    """How many studies the filters select."""
    query = select(func.count(Study.id))
    if filters is not None:
        query = query.where(*filters.conditions())
    return int(session.scalar(query) or 0)


@dataclass
class WorklistPage:
    """One page of the worklist in reading order, and which of its studies are due."""

    studies: list[Study]
    due: frozenset[int]
    policy_version: int


def _reading(
    session: Session, policy: Any, now: datetime
) -> tuple[list[int], Iterator[tuple[int, bool]]]:
    """The ids of the studies waiting for a read (arrival order) and their lazy reading order."""
    import numpy as np

    from pipeline.triage.ordering import iter_reading_order, live_reads
    from pipeline.triage.policy import awaiting_read

    rows = session.execute(
        select(Study.id, Study.priority, Study.received_at)
        .where(awaiting_read())
        .order_by(Study.received_at.asc(), Study.id.asc())
    ).all()
    ids = [r[0] for r in rows]
    prio = np.array([float(r[1] or 0.0) for r in rows])
    arrivals = np.array([as_utc(r[2]).timestamp() for r in rows])
    reads = live_reads(len(rows), now.timestamp(), policy.reads_per_hour)
    return ids, iter_reading_order(prio, arrivals, reads, policy.max_wait_s)


def worklist_page(
    session: Session,
    limit: int | None,
    offset: int = 0,
    filters: WorklistFilter | None = None,
    policy: Any = None,
    now: datetime | None = None,
) -> WorklistPage:
    """The worklist as the radiologist reads it, under the site's policy (pipeline.triage.policy).

    With a maximum wait in force, the studies waiting for a read come first, in the reading
    order of ``pipeline.triage.ordering`` (priority, unless a study would wait past the cap); then the
    rest (reviewed, not yet scored, failed, rejected) in ``worklist_query`` order. Without one,
    ``worklist_query`` alone (priority desc, unscored last, then arrival). The reading order is
    followed only as far as the page needs.
    """
    from pipeline.triage.policy import active, awaiting_read

    policy = policy or active(session, who=False)
    where = filters.conditions() if filters is not None else []
    if policy.max_wait_s is None:
        studies = list(session.scalars(worklist_query(limit, offset, filters)))
        return WorklistPage(studies, frozenset(), policy.version)
    ids, order = _reading(session, policy, now or utcnow())
    chosen = (
        set(session.scalars(select(Study.id).where(awaiting_read(), *where))) if where else None
    )
    waiting = len(chosen) if chosen is not None else len(ids)
    end = waiting if limit is None else min(waiting, offset + limit)
    head: list[int] = []
    due: set[int] = set()
    for pos, forced in order:
        if len(head) >= end:
            break
        sid = ids[pos]
        if chosen is None or sid in chosen:
            head.append(sid)
            if forced:
                due.add(sid)
    head_ids = head[offset:end]
    by_id = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(head_ids)))}
    studies = [by_id[i] for i in head_ids if i in by_id]
    room = None if limit is None else limit - len(studies)
    if room is None or room > 0:
        rest = worklist_query(None, 0, filters).where(~awaiting_read())
        rest = rest.offset(max(0, offset - waiting))
        if room is not None:
            rest = rest.limit(room)
        studies.extend(session.scalars(rest))
    return WorklistPage(studies, frozenset(due & set(head_ids)), policy.version)


def neighbour_ids(
    session: Session, study: Study, filters: WorklistFilter | None = None
) -> tuple[int | None, int | None]:
    """The studies before and after this one in worklist order under the same filters."""
    from pipeline.triage.policy import active

    policy = active(session, who=False)
    if policy.max_wait_s is not None:
        return _neighbours_in_reading_order(session, study, filters, policy)
    p, received = _UNSCORED_LAST, Study.received_at
    mine_p = -1.0 if study.priority is None else study.priority
    later = or_(
        p < mine_p,
        and_(p == mine_p, received > study.received_at),
        and_(p == mine_p, received == study.received_at, Study.id > study.id),
    )
    earlier = or_(
        p > mine_p,
        and_(p == mine_p, received < study.received_at),
        and_(p == mine_p, received == study.received_at, Study.id < study.id),
    )
    where = filters.conditions() if filters is not None else []
    nxt = session.scalar(worklist_query(1).where(later, *where).with_only_columns(Study.id))
    prev = session.scalar(
        select(Study.id)
        .where(earlier, *where)
        .order_by(p.asc(), received.desc(), Study.id.desc())
        .limit(1)
    )
    return prev, nxt


def _neighbours_in_reading_order(
    session: Session, study: Study, filters: WorklistFilter | None, policy: Any
) -> tuple[int | None, int | None]:
    """``neighbour_ids`` under a maximum wait: the reading order is followed up to the study."""
    from pipeline.triage.policy import awaiting_read

    where = filters.conditions() if filters is not None else []
    ids, order = _reading(session, policy, utcnow())
    chosen = set(session.scalars(select(Study.id).where(awaiting_read(), *where)))
    rest_ids = worklist_query().where(~awaiting_read(), *where).with_only_columns(Study.id)
    waiting = (ids[pos] for pos, _ in order if ids[pos] in chosen)
    if study.id in chosen:
        prev: int | None = None
        for sid in waiting:
            if sid == study.id:
                return prev, next(waiting, None) or session.scalar(rest_ids.limit(1))
            prev = sid
        return prev, None
    others = list(session.scalars(rest_ids))
    if study.id not in others:
        return None, None
    k = others.index(study.id)
    last_waiting = None
    if k == 0:
        for last_waiting in waiting:  # noqa: B007 - the last one is the one before the rest
            pass
    return (
        others[k - 1] if k > 0 else last_waiting,
        others[k + 1] if k + 1 < len(others) else None,
    )
