"""Live performance: the model's scores against the ground truth recorded in a time window.

The studies counted are those whose current ground truth (``pipeline.triage.reviews.latest_truths``:
the newest read or RIS outcome) was recorded in the window. Each is scored by the study's
current p(abnormal) (the maximum over its frontal images); studies without a score (not
classified) are counted as ``unscored`` and left out of the statistics.

Groups: a study's institution (DICOM InstitutionName), modality and view (ViewPosition) are
those of its first image (lowest id) that carries the value; "(none)" when none does.

"Top of the worklist": an abnormal read counts as put at the top when the study's triage class
when the truth was recorded was urgent or critical (priority band 50-95 before the STAT boost
and ageing); for rows recorded before the model's call was kept with the read, the study's
current class stands in. ``top`` is the share of abnormal reads that were.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import Image, Study, as_utc
from pipeline.monitoring.performance import share, summarize
from pipeline.states import State
from pipeline.triage.reviews import latest_truths
from pipeline.triage.studies import iso

WINDOWS_DAYS = (7, 30, 90)
DEFAULT_DAYS = 30
SPLITS = ("institution", "modality", "view")
TOP_CLASSES = ("urgent", "critical")
UNKNOWN = "(none)"
CHUNK = 500


@dataclass(frozen=True)
class ReviewedStudy:
    study_id: int
    abnormal: bool
    finding: str | None
    source: str
    recorded_at: datetime
    score: float | None
    class_at_read: str | None
    institution: str
    modality: str
    view: str


def reviewed_studies(session: Session, since: datetime, until: datetime) -> list[ReviewedStudy]:
    """The studies whose current ground truth was recorded in [since, until), with their score
    and groups, oldest truth first."""
    truths = latest_truths(session, since, until)
    ids = sorted(truths)
    studies: dict[int, tuple[float | None, str | None, str]] = {}
    groups: dict[int, dict[str, str]] = defaultdict(dict)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        for sid, p, cls, status in session.execute(
            select(Study.id, Study.p_abnormal, Study.triage_class, Study.status).where(
                Study.id.in_(chunk)
            )
        ):
            studies[sid] = (p, cls, status)
        for sid, modality, view, meta in session.execute(
            select(Image.study_id, Image.modality, Image.view_position, Image.meta)
            .where(Image.study_id.in_(chunk))
            .order_by(Image.id)
        ):
            found = groups[sid]
            institution = (meta or {}).get("InstitutionName")
            for key, value in (
                ("institution", institution),
                ("modality", modality),
                ("view", view),
            ):
                text = str(value or "").strip()
                if key not in found and text:
                    found[key] = text if key == "institution" else text.upper()
    rows = []
    for sid in ids:
        t = truths[sid]
        p, cls, status = studies.get(sid, (None, None, "unknown"))
        score = float(p) if p is not None and status == State.DONE else None
        g = groups.get(sid, {})
        rows.append(
            ReviewedStudy(
                sid,
                t.abnormal,
                t.finding,
                t.source,
                as_utc(t.recorded_at),
                score,
                t.model_class or cls,
                g.get("institution", UNKNOWN),
                g.get("modality", UNKNOWN),
                g.get("view", UNKNOWN),
            )
        )
    rows.sort(key=lambda r: (r.recorded_at, r.study_id))
    return rows


def group_summary(rows: list[ReviewedStudy], thresholds: dict[str, float] | None) -> dict:
    """The statistics of one group: reviewed, AUC, the thresholds, calibration, top share."""
    scored = [r for r in rows if r.score is not None]
    doc = summarize(
        [r.score for r in scored if r.score is not None], [r.abnormal for r in scored], thresholds
    )
    doc["unscored"] = len(rows) - len(scored)
    doc["top"] = share([r.class_at_read in TOP_CLASSES for r in scored if r.abnormal])
    return doc


def performance_from_rows(
    rows: list[ReviewedStudy],
    thresholds: dict[str, float] | None,
    now: datetime,
    days: int,
) -> dict[str, Any]:
    """The window's document: overall and split by institution, modality and view."""
    since = now - timedelta(days=days)
    rows = [r for r in rows if since <= r.recorded_at < now + timedelta(seconds=1)]
    by: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        members: dict[str, list[ReviewedStudy]] = defaultdict(list)
        for r in rows:
            members[getattr(r, split)].append(r)
        by[split] = [
            {"group": name, **group_summary(members[name], thresholds)}
            for name in sorted(members, key=lambda n: (-len(members[n]), n))
        ]
    sources: dict[str, int] = defaultdict(int)
    for r in rows:
        sources[r.source] += 1
    return {
        "window_days": days,
        "since": iso(since),
        "until": iso(now),
        "thresholds": dict(thresholds or {}),
        "sources": dict(sources),
        "overall": group_summary(rows, thresholds),
        "by": by,
        "top_classes": list(TOP_CLASSES),
        "auc_method": "DeLong",
    }


def _in_force(
    session: Session, model_thresholds: dict[str, float] | None, rows: list[ReviewedStudy]
) -> tuple[dict[str, float] | None, list[ReviewedStudy]]:
    """The site's policy applied: its thresholds, and the scores under its temperature."""
    from dataclasses import replace

    from pipeline.triage.policy import active

    policy = active(session, who=False)
    thresholds = (
        policy.thresholds_for(model_thresholds or {})
        if model_thresholds or policy.thresholds
        else None
    )
    if policy.temperature_scale != 1.0:
        rows = [replace(r, score=None if r.score is None else policy.p(r.score)) for r in rows]
    return thresholds, rows


def live_performance(
    session: Session, thresholds: dict[str, float] | None, now: datetime, days: int
) -> dict[str, Any]:
    """The live performance of the last ``days`` days up to ``now``, under the policy in force
    (its thresholds and temperature; ``thresholds`` are the model's)."""
    rows = reviewed_studies(session, now - timedelta(days=days), now + timedelta(seconds=1))
    in_force, rows = _in_force(session, thresholds, rows)
    return performance_from_rows(rows, in_force, now, days)


def live_performance_windows(
    session: Session, thresholds: dict[str, float] | None, now: datetime
) -> dict[int, dict[str, Any]]:
    """Every window of ``WINDOWS_DAYS`` from one query (for ``/metrics``)."""
    longest = max(WINDOWS_DAYS)
    rows = reviewed_studies(session, now - timedelta(days=longest), now + timedelta(seconds=1))
    in_force, rows = _in_force(session, thresholds, rows)
    return {d: performance_from_rows(rows, in_force, now, d) for d in WINDOWS_DAYS}
