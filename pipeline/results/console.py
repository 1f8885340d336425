"""What the admin console shows of the outbox: each destination's state, its latest rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import as_utc
from pipeline.results.destinations import describe
from pipeline.states import OutboxState
from pipeline.tables_results import Destination, OutboxItem, ResultObject
from pipeline.triage.studies import iso


def destination_states(session: Session) -> list[dict[str, Any]]:
    """Per destination: counts by status, oldest waiting, last success and last error."""
    counts: dict[int, dict[str, int]] = {}
    for dest_id, status, n in session.execute(
        select(OutboxItem.destination_id, OutboxItem.status, func.count(OutboxItem.id)).group_by(
            OutboxItem.destination_id, OutboxItem.status
        )
    ):
        counts.setdefault(dest_id, {})[status] = int(n)
    oldest = dict(
        session.execute(
            select(OutboxItem.destination_id, func.min(OutboxItem.created_at))
            .where(OutboxItem.status.in_((OutboxState.PENDING, OutboxState.SENDING)))
            .group_by(OutboxItem.destination_id)
        ).all()
    )
    out = []
    for dest in session.scalars(select(Destination).order_by(Destination.id)):
        by = {s: counts.get(dest.id, {}).get(s, 0) for s in OutboxState}
        waiting = oldest.get(dest.id)
        state = (
            "disabled"
            if not dest.enabled
            else (
                "failing"
                if dest.last_error_at
                and (not dest.last_ok_at or as_utc(dest.last_error_at) > as_utc(dest.last_ok_at))
                else "ok"
            )
        )
        out.append(
            {
                **describe(dest),
                "state": state,
                "counts": by,
                "oldest_waiting": iso(waiting),
                "last_ok_at": iso(dest.last_ok_at),
                "last_error": dest.last_error,
                "last_error_at": iso(dest.last_error_at),
            }
        )
    return out


def recent_items(session: Session, destination_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The latest rows of one destination, for the console's resend buttons."""
    rows = session.execute(
        select(OutboxItem, ResultObject)
        .join(ResultObject, ResultObject.id == OutboxItem.object_id)
        .where(OutboxItem.destination_id == destination_id)
        .order_by(OutboxItem.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            "id": item.id,
            "study_id": obj.study_id,
            "kind": obj.kind,
            "uid": obj.uid,
            "status": item.status,
            "attempts": item.attempts,
            "last_error": item.last_error,
            "sent_at": iso(item.sent_at),
            "next_attempt_at": iso(item.next_attempt_at),
        }
        for item, obj in rows
    ]
