"""Reviews: a radiologist's action on a study (read, agree or disagree with the model), and the
ground truth it carries.

A read may record what the radiologist found: normal or abnormal, and for abnormal optionally a
finding category (``FINDINGS``). Agreement follows from it: the model's call is abnormal when the
study's triage class is not "normal", and the read agrees when it says the same. The old buttons
keep working: "agree" records the model's call as the truth, "disagree" its opposite, "read"
(without a finding) records no truth. Outcomes imported from the RIS (``pipeline.monitoring.labels``) are
reviews too, with ``source="ris"`` and the importing account as the user.

A study's ground truth is the newest review that carries one, whatever its source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import Review, Study, as_utc
from pipeline.states import State

ACTIONS = ("read", "agree", "disagree")
MAX_COMMENT = 2000
# Finding categories: stored key -> what the radiologist sees.
FINDINGS = {
    "pneumonia": "pneumonia / consolidation",
    "covid19": "COVID-19 pattern",
    "effusion": "effusion",
    "pneumothorax": "pneumothorax",
    "mass_nodule": "mass / nodule",
    "cardiomegaly": "cardiomegaly",
    "other": "other",
}
SOURCES = ("console", "ris")


class ReviewError(ValueError):
    """A review that cannot be recorded; the message says why."""


def model_calls_abnormal(triage_class: str | None) -> bool | None:
    """The model's call on a study: abnormal unless its class is "normal"; None if unscored."""
    return None if triage_class is None else triage_class != "normal"


def agreement(abnormal: bool | None, triage_class: str | None) -> str | None:
    """ "agree" or "disagree" for a truth against the model's call; None if either is missing."""
    call = model_calls_abnormal(triage_class)
    if abnormal is None or call is None:
        return None
    return "agree" if abnormal == call else "disagree"


def parse_truth(value: str | None) -> bool | None:
    """The form's "abnormal"/"normal" as a bool; empty means no truth recorded."""
    text = (value or "").strip().lower()
    if not text:
        return None
    if text in ("abnormal", "normal"):
        return text == "abnormal"
    raise ReviewError(f"unknown read {value!r}; use abnormal or normal")


def truth_words(abnormal: bool | None, finding: str | None) -> str | None:
    """ "abnormal (effusion)", "normal", or None when no truth was recorded."""
    if abnormal is None:
        return None
    if not abnormal:
        return "normal"
    return f"abnormal ({FINDINGS[finding]})" if finding in FINDINGS else "abnormal"


def check_finding(finding: str | None, abnormal: bool | None) -> str | None:
    """A finding key, or None; only an abnormal read carries one."""
    key = (finding or "").strip() or None
    if key is None:
        return None
    if key not in FINDINGS:
        raise ReviewError(f"unknown finding {key!r}; use one of {', '.join(FINDINGS)}")
    if abnormal is not True:
        raise ReviewError("only an abnormal read can name a finding")
    return key


def record_review(
    session: Session,
    study_id: int,
    user_id: int,
    action: str,
    comment: str | None = None,
    *,
    abnormal: bool | None = None,
    finding: str | None = None,
) -> Review:
    """Store one review with who and when, and the ground truth it carries.

    ``action="read"`` with ``abnormal`` set records that truth; on a classified study the stored
    action becomes agree or disagree accordingly. ``agree``/``disagree`` without ``abnormal``
    record the truth they imply; with ``abnormal`` the two must match.
    """
    if action not in ACTIONS:
        raise ReviewError(f"unknown review action {action!r}; use one of {', '.join(ACTIONS)}")
    study = session.get(Study, study_id)
    if study is None:
        raise ReviewError(f"no study {study_id}")
    if action in ("agree", "disagree") and study.status != State.DONE:
        raise ReviewError("only a classified study can be agreed or disagreed with")
    text = (comment or "").strip() or None
    if text is not None and len(text) > MAX_COMMENT:
        raise ReviewError(f"comment is longer than {MAX_COMMENT} characters")
    call = model_calls_abnormal(study.triage_class) if study.status == State.DONE else None
    if action in ("agree", "disagree"):
        if call is None:
            raise ReviewError("this study has no triage class to agree or disagree with")
        implied = call if action == "agree" else not call
        if abnormal is not None and abnormal != implied:
            raise ReviewError(
                f"a read of {'abnormal' if abnormal else 'normal'} cannot "
                f"{action} with a model that called it "
                f"{'abnormal' if call else 'normal'}"
            )
        abnormal = implied
    elif abnormal is not None and call is not None:
        action = "agree" if abnormal == call else "disagree"
    key = check_finding(finding, abnormal)
    review = Review(
        study_id=study_id,
        user_id=user_id,
        action=action,
        comment=text,
        abnormal=abnormal,
        finding=key,
        source="console",
        **model_snapshot(study, abnormal),
    )
    session.add(review)
    session.flush()
    return review


def model_snapshot(study: Study, abnormal: bool | None) -> dict[str, object]:
    """The model's call on the study now, kept on a review that records a truth."""
    if abnormal is None or study.status != State.DONE:
        return {"model_class": None, "model_p": None, "model_version": None}
    return {
        "model_class": study.triage_class,
        "model_p": study.p_abnormal,
        "model_version": study.model_version,
    }


def reviewed_study_ids(session: Session, study_ids: list[int]) -> set[int]:
    """The studies among study_ids that someone has reviewed."""
    if not study_ids:
        return set()
    rows = session.scalars(select(Review.study_id).where(Review.study_id.in_(study_ids)))
    return set(rows)


@dataclass(frozen=True)
class Truth:
    """A study's ground truth: the newest review that carries one."""

    study_id: int
    abnormal: bool
    finding: str | None
    source: str
    review_id: int
    recorded_at: datetime
    model_class: str | None  # the model's class when the truth was recorded


def latest_truths(
    session: Session,
    since: datetime | None = None,
    until: datetime | None = None,
    study_ids: Iterable[int] | None = None,
) -> dict[int, Truth]:
    """Each study's ground truth, by study id; ``since``/``until`` bound when it was recorded.

    The newest truth-bearing review wins (a later read corrects an import and the reverse);
    the window applies to that newest one, so a study corrected after ``until`` is left out.
    """
    query = select(Review).where(Review.abnormal.is_not(None))
    if study_ids is not None:
        query = query.where(Review.study_id.in_(list(study_ids)))
    if since is not None:  # only studies with a truth recorded in the window can qualify
        recent = select(Review.study_id).where(
            Review.abnormal.is_not(None), Review.created_at >= since
        )
        query = query.where(Review.study_id.in_(recent))
    out: dict[int, Truth] = {}
    for r in session.scalars(query.order_by(Review.created_at, Review.id)):
        out[r.study_id] = Truth(
            r.study_id, bool(r.abnormal), r.finding, r.source, r.id, r.created_at, r.model_class
        )
    return {
        sid: t
        for sid, t in out.items()
        if (since is None or as_utc(t.recorded_at) >= since)
        and (until is None or as_utc(t.recorded_at) < until)
    }
