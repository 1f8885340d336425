"""The worklist's filters: what a radiologist narrowed it to, read and checked, as SQL."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, or_

from pipeline.models import Review, Study
from pipeline.states import ALL_STATES
from pipeline.triage import score as triage

STATUSES = ALL_STATES
TRIAGE_FILTERS = (*triage.CLASSES, "none")  # "none": not scored (yet, or never)
MAX_SEARCH = 64  # the accession number and patient id columns are String(64)


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
