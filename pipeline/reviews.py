"""Radiologists' review actions on a study: read, agree or disagree with the model."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import Review, Study

ACTIONS = ("read", "agree", "disagree")
MAX_COMMENT = 2000


class ReviewError(ValueError):
    """A review that cannot be recorded; the message says why."""


def record_review(
    session: Session, study_id: int, user_id: int, action: str, comment: str | None = None
) -> Review:
    """Store one review action with who and when; agree/disagree also count as read."""
    if action not in ACTIONS:
        raise ReviewError(f"unknown review action {action!r}; use one of {', '.join(ACTIONS)}")
    study = session.get(Study, study_id)
    if study is None:
        raise ReviewError(f"no study {study_id}")
    if action in ("agree", "disagree") and study.status != "done":
        raise ReviewError("only a classified study can be agreed or disagreed with")
    text = (comment or "").strip() or None
    if text is not None and len(text) > MAX_COMMENT:
        raise ReviewError(f"comment is longer than {MAX_COMMENT} characters")
    review = Review(study_id=study_id, user_id=user_id, action=action, comment=text)
    session.add(review)
    session.flush()
    return review


def reviewed_study_ids(session: Session, study_ids: list[int]) -> set[int]:
    """The studies among study_ids that someone has reviewed."""
    if not study_ids:
        return set()
    rows = session.scalars(select(Review.study_id).where(Review.study_id.in_(study_ids)))
    return set(rows)
