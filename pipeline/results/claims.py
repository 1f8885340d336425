"""Hand outbox rows to senders under a fenced lease, and record how each send went.

``claim_due`` hands rows to a sender under a lease; ``renew`` extends it while the sender
works through them; ``record`` writes the outcome. Each claim increments the row's
``attempts``, which fences it: a sender whose lease lapsed and whose row was claimed again by
another can neither renew nor record it. A row that was sent is never picked again; one whose
sender died before recording is picked again when its lease ends and the SAME object (same
UID, same bytes) is sent again, which a PACS stores as the instance it already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from pipeline.models import AuditEvent, utcnow
from pipeline.states import OutboxState
from pipeline.tables_results import Destination, OutboxItem, ResultObject

BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 600.0
LEASE_S = 120.0  # the default lease of a claim (CXR_OUTBOX_LEASE_S)
MAX_REJECTIONS = 5  # a destination that answers "no" this many times: failed, resend by hand


def backoff_s(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 5, 10, 20 … 600."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


def claim_due(
    session: Session,
    limit: int = 50,
    now: datetime | None = None,
    kinds: tuple[str, ...] | None = None,
    lease_s: float = LEASE_S,
) -> dict[int, int]:
    """Take due rows (pending and due, or a lapsed claim) of enabled destinations (of these
    ``kinds``) under a lease; return ``{row id: attempts}``, the fence of each claim.

    The UPDATE re-checks "due" on each row it writes, so of two senders selecting the same
    rows at once only one claims each (PostgreSQL re-evaluates the condition on the row the
    first committed; SQLite serialises the writers).
    """
    now = now or utcnow()
    due = or_(
        and_(OutboxItem.status == OutboxState.PENDING, OutboxItem.next_attempt_at <= now),
        and_(OutboxItem.status == OutboxState.SENDING, OutboxItem.claimed_until < now),
    )
    enabled = select(Destination.id).where(Destination.enabled.is_(True))
    if kinds is not None:
        enabled = enabled.where(Destination.kind.in_(kinds))
    ids = session.scalars(
        select(OutboxItem.id)
        .where(due, OutboxItem.destination_id.in_(enabled))
        .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
        .limit(limit)
    ).all()
    if not ids:
        return {}
    rows = session.execute(
        update(OutboxItem)
        .where(OutboxItem.id.in_(ids), due)
        .values(
            status=OutboxState.SENDING,
            claimed_until=now + timedelta(seconds=lease_s),
            attempts=OutboxItem.attempts + 1,
        )
        .returning(OutboxItem.id, OutboxItem.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    return {int(r[0]): int(r[1]) for r in sorted(rows)}


def renew(
    session: Session, claims: dict[int, int], lease_s: float = LEASE_S, now: datetime | None = None
) -> int:
    """Extend the lease of claims still held (same attempt, still sending); return how many."""
    if not claims:
        return 0
    now = now or utcnow()
    held = or_(*(and_(OutboxItem.id == i, OutboxItem.attempts == a) for i, a in claims.items()))
    moved = session.execute(
        update(OutboxItem)
        .where(held, OutboxItem.status == OutboxState.SENDING)
        .values(claimed_until=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return int(moved.rowcount)  # type: ignore[attr-defined]


@dataclass
class Outcome:
    """How one send went: ok, or an error that is ``transient`` (retry) or a rejection."""

    ok: bool
    error: str | None = None
    transient: bool = True


def record(
    session: Session,
    item_id: int,
    outcome: Outcome,
    now: datetime | None = None,
    attempt: int | None = None,
) -> str:
    """Write a send's outcome on its row and its destination; return the new status.

    With ``attempt`` (the claim's fence), a row claimed again since is left alone ("gone").
    A delivered or given-up alert is audited.
    """
    now = now or utcnow()
    item = session.get(OutboxItem, item_id, with_for_update=True)
    if (
        item is None
        or item.status != OutboxState.SENDING
        or (attempt is not None and item.attempts != attempt)
    ):
        return "gone"
    dest = session.get(Destination, item.destination_id)
    obj = session.get(ResultObject, item.object_id)
    where = f"{dest.kind} destination {dest.name!r}" if dest is not None else "a destination"
    if outcome.ok:
        item.status, item.sent_at, item.last_error, item.claimed_until = (
            OutboxState.SENT,
            now,
            None,
            None,
        )
        if dest is not None:
            dest.last_ok_at = now
        if obj is not None and obj.kind == "alert":
            session.add(
                AuditEvent(
                    action="alert_sent",
                    target=f"study:{obj.study_id}",
                    detail=f"event {obj.uid} delivered to {where}, attempt {item.attempts}",
                )
            )
        return OutboxState.SENT
    item.last_error = (outcome.error or "failed")[:2000]
    item.claimed_until = None
    if dest is not None:
        dest.last_error, dest.last_error_at = item.last_error, now
    if not outcome.transient and item.attempts >= MAX_REJECTIONS:
        item.status = OutboxState.FAILED
        if obj is not None and obj.kind == "alert":
            session.add(
                AuditEvent(
                    action="alert_failed",
                    target=f"study:{obj.study_id}",
                    detail=f"event {obj.uid} refused by {where} "
                    f"{item.attempts} times: {item.last_error}"[:2000],
                )
            )
    else:
        item.status = OutboxState.PENDING
        item.next_attempt_at = now + timedelta(seconds=backoff_s(item.attempts))
    return item.status


def resend(session: Session, item_id: int) -> bool:
    """Queue one row again now (an admin's resend): same object, same UID."""
    moved = session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item_id, OutboxItem.status != OutboxState.SENDING)
        .values(status=OutboxState.PENDING, next_attempt_at=utcnow(), claimed_until=None)
        .execution_options(synchronize_session=False)
    )
    return bool(moved.rowcount)  # type: ignore[attr-defined]


def retry_now(session: Session, destination_id: int) -> int:
    """Make every waiting row of a destination due now (it is back; skip the backoff)."""
    moved = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.destination_id == destination_id,
            OutboxItem.status.in_((OutboxState.PENDING, OutboxState.FAILED)),
        )
        .values(status=OutboxState.PENDING, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(moved.rowcount)  # type: ignore[attr-defined]
