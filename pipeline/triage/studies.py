"""A study's state and priority, derived from its images; the worklist query and its filters.

The worklist page, ``GET /api/worklist`` and ``cxr-triage worklist`` share one function
(``worklist_page``), so the order and the filters cannot drift: the studies waiting for a read in
the reading order of ``pipeline.triage.ordering`` under the site's policy (priority, unless a study
would wait past the maximum wait), then the rest by priority desc, unscored last, arrival, id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.orm import Session, load_only

from pipeline.models import Image, Prediction, Review, Study, as_utc, utcnow
from pipeline.states import ACTIVE_STATES, ALL_STATES, State
from pipeline.triage import score as triage

STATUSES = ALL_STATES
TRIAGE_FILTERS = (*triage.CLASSES, "none")  # "none": not scored (yet, or never)
MAX_SEARCH = 64  # the accession number and patient id columns are String(64)
_UNSCORED_LAST = func.coalesce(Study.priority, -1.0)


def refresh_study(session: Session, study: Study, thresholds: Mapping[str, float]) -> None:
    """Recompute a study's status, label, p_abnormal and priority from its images."""
    refresh_studies(session, [study], thresholds)


def refresh_studies(
    session: Session, studies: Iterable[Study], thresholds: Mapping[str, float]
) -> None:
    """``refresh_study`` for many studies with three queries in all (a worker's batch).

    ``thresholds`` are the model's; the site's policy in force (pipeline.triage.policy) may set its
    own, and its STAT boost; each scored study records the policy version.
    """
    from pipeline.triage.policy import active

    by_id = {study.id: study for study in studies}
    if not by_id:
        return
    policy = active(session, who=False)
    images: dict[int, list[Image]] = {i: [] for i in by_id}
    # Only what _derive reads: a worker's batch refreshes its studies on every commit, and
    # whole rows would bring each image's header and each prediction's CAM along.
    query = (
        select(Image)
        .where(Image.study_id.in_(list(by_id)))
        .options(load_only(Image.id, Image.study_id, Image.status, Image.reason))
    )
    for img in session.scalars(query):
        images[img.study_id].append(img)
    done = [img.id for imgs in images.values() for img in imgs if img.status == State.DONE]
    latest: dict[int, Prediction] = {}
    if done:
        preds = (
            select(Prediction)
            .where(Prediction.image_id.in_(done))
            .options(
                load_only(
                    Prediction.id,
                    Prediction.image_id,
                    Prediction.created_at,
                    Prediction.p_abnormal,
                    Prediction.label,
                    Prediction.model_version,
                )
            )
            .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        )
        for pred in session.scalars(preds):
            latest.setdefault(pred.image_id, pred)
    for study_id, study in by_id.items():
        _derive(
            study,
            images[study_id],
            latest,
            policy.thresholds_for(thresholds),
            policy.stat_boost,
            policy.version,
            policy.temperature_scale,
        )


def _derive(
    study: Study,
    images: list[Image],
    latest: Mapping[int, Prediction],
    thresholds: Mapping[str, float],
    stat_boost: float = triage.STAT_BOOST,
    policy_version: int | None = None,
    temperature_scale: float = 1.0,
) -> None:
    statuses = [img.status for img in images]
    if any(s in ACTIVE_STATES for s in statuses):
        study.status = State.PROCESSING if State.PROCESSING in statuses else State.QUEUED
        return
    scored = [
        (latest[img.id].p_abnormal, latest[img.id])
        for img in images
        if img.status == State.DONE and img.id in latest
    ]
    if scored:
        p, top = max(scored, key=lambda pair: pair[0])
        study.status = State.DONE
        study.reason = None
        study.p_abnormal = p
        study.label = top.label
        study.model_version = top.model_version
        site_p = triage.rescale(p, temperature_scale)
        study.triage_class = triage.triage_class(site_p, thresholds)
        study.priority = triage.priority_score(
            site_p, thresholds, study.requested_priority, stat_boost=stat_boost
        )
        study.policy_version = policy_version
        study.done_at = study.done_at or utcnow()
        return
    for final in (State.FAILED, State.SKIPPED, State.REJECTED):
        if final in statuses:
            study.status = final
            study.reason = next(img.reason for img in images if img.status == final)
            study.done_at = study.done_at or utcnow()
            return


def open_image_count(session: Session, image_ids: list[int]) -> int:
    """How many of these images are still queued or being processed."""
    query = select(func.count(Image.id)).where(
        Image.id.in_(image_ids), Image.status.in_(ACTIVE_STATES)
    )
    return int(session.scalar(query) or 0)


class FilterError(ValueError):
    """A worklist filter that cannot be applied; the message says which and why."""


@dataclass(frozen=True)
class WorklistFilter:
    """What a radiologist narrowed the worklist to; empty means everything."""

    statuses: tuple[str, ...] = ()
    triage_classes: tuple[str, ...] = ()
    reviewed: bool | None = None
    date_from: date | None = None  # received on or after this UTC day
    date_to: date | None = None  # received on or before this UTC day
    search: str | None = None  # accession number or patient id: exact or prefix
    params: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> WorklistFilter:
        """Read ``status``, ``triage``, ``reviewed``, ``date_from``, ``date_to`` and ``q``."""
        statuses = _choices(args.get("status", ""), STATUSES, "status")
        classes = _choices(args.get("triage", ""), TRIAGE_FILTERS, "triage")
        reviewed_raw = (args.get("reviewed") or "").strip().lower()
        if reviewed_raw not in ("", "yes", "no"):
            raise FilterError("reviewed must be yes or no")
        search = (args.get("q") or "").strip() or None
        if search is not None and len(search) > MAX_SEARCH:
            raise FilterError(f"search is longer than {MAX_SEARCH} characters")
        date_from, date_to = _day(args, "date_from"), _day(args, "date_to")
        if date_from and date_to and date_from > date_to:
            raise FilterError("date_from is after date_to")
        keys = ("status", "triage", "reviewed", "date_from", "date_to", "q")
        params = {k: str(args[k]).strip() for k in keys if str(args.get(k) or "").strip()}
        return cls(
            statuses,
            classes,
            {"": None, "yes": True, "no": False}[reviewed_raw],
            date_from,
            date_to,
            search,
            params,
        )

    def conditions(self) -> list[ColumnElement[bool]]:
        """SQL conditions on ``Study`` for these filters."""
        where: list[ColumnElement[bool]] = []
        if self.statuses:
            where.append(Study.status.in_(self.statuses))
        if self.triage_classes:
            named = [c for c in self.triage_classes if c != "none"]
            parts = [Study.triage_class.in_(named)] if named else []
            if "none" in self.triage_classes:
                parts.append(Study.triage_class.is_(None))
            where.append(or_(*parts))
        if self.reviewed is not None:
            has_review = exists().where(Review.study_id == Study.id)
            where.append(has_review if self.reviewed else ~has_review)
        if self.date_from:
            where.append(Study.received_at >= datetime.combine(self.date_from, time(), UTC))
        if self.date_to:
            end = datetime.combine(self.date_to + timedelta(days=1), time(), UTC)
            where.append(Study.received_at < end)
        if self.search:
            where.append(
                or_(
                    _prefix(Study.accession_number, self.search),
                    _prefix(Study.patient_id, self.search),
                )
            )
        return where


def _choices(raw: str, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    values = tuple(v.strip().lower() for v in str(raw).split(",") if v.strip())
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise FilterError(f"unknown {name} {unknown[0]!r}; use one of {', '.join(allowed)}")
    return values


def _day(args: Mapping[str, str], name: str) -> date | None:
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise FilterError(f"{name} must be a date like 2026-11-22, not {raw!r}") from None


def _prefix(column: Any, text: str) -> ColumnElement[bool]:
    """Exact-or-prefix match as a range on the column's index (``LIKE`` often skips it)."""
    upper = text[:-1] + chr(ord(text[-1]) + 1)
    # The range finds candidates through the B-tree index; startswith keeps the match exact
    # under any collation.
    return and_(column >= text, column < upper, column.startswith(text, autoescape=True))


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


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC; SQLite hands back naive datetimes that are UTC by construction."""
    if dt is None:
        return None
    return as_utc(dt).astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def study_summary(study: Study, reviewed: bool | None = None) -> dict[str, object]:
    """The stable JSON form of a study used by the CLI and the API (no patient name)."""
    doc: dict[str, object] = {
        "id": study.id,
        "status": study.status,
        "reason": study.reason,
        "label": study.label,
        "p_abnormal": None if study.p_abnormal is None else round(study.p_abnormal, 4),
        "triage_class": study.triage_class,
        "priority": study.priority,
        "accession_number": study.accession_number,
        "requested_priority": study.requested_priority,
        "model_version": study.model_version,
        "policy_version": study.policy_version,
        "received_at": iso(study.received_at),
        "done_at": iso(study.done_at),
    }
    if reviewed is not None:
        doc["reviewed"] = reviewed
    return doc


def worklist_document(
    session: Session,
    model: Mapping[str, object],
    limit: int | None,
    filters: WorklistFilter | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """The worklist JSON shared by ``cxr-triage worklist --json`` and ``GET /api/worklist``."""
    from pipeline.monitoring.reviews import reviewed_study_ids

    page = worklist_page(session, limit, offset, filters)
    reviewed = reviewed_study_ids(session, [s.id for s in page.studies])
    return {
        "model": {"version": model["version"], "trained": model["trained"]},
        "policy_version": page.policy_version,
        "total": worklist_count(session, filters),
        "offset": offset,
        "limit": limit,
        "studies": [
            {**study_summary(s, s.id in reviewed), "due": s.id in page.due} for s in page.studies
        ],
    }


def format_wait(seconds: float) -> str:
    """A waiting time as a radiologist says it: "45 min", "3 h 12 min", "2 d 5 h"."""
    minutes = max(0, int(seconds // 60))
    if minutes < 1:
        return "< 1 min"
    hours, mins = divmod(minutes, 60)
    if hours == 0:
        return f"{mins} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if days else f"{hours} h {mins} min"


def waiting_seconds(study: Study, now: datetime | None = None) -> float:
    """Seconds since the study arrived."""
    return ((now or utcnow()) - as_utc(study.received_at)).total_seconds()
