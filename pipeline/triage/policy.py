"""The site's triage policy: one versioned set of the rules that rank the worklist.

An admin edits it on the console (``/admin/policy``), with a reason; every change is a new
version (nothing is edited in place), audited with who, when and why, and any earlier version
can be brought back (as a new version with the old rules). The highest version is in force.
Version 0 is the built-in default, in force until a first change is saved.

The rules:

* ``thresholds``: p_abnormal cut-offs of the triage classes (routine < urgent < critical). None
  uses the ones chosen with the weights on validation data; a site sets its own once it has
  reviewed studies (issue 17's calibration).
* ``stat_boost``: what a STAT order adds to the 0-100 score.
* ``max_wait_h``: the longest a study should wait for a read; the reading order
  (``pipeline.triage.ordering``) reads a study ahead of higher priorities when waiting longer would
  break it. 0: no cap, priority alone.
* ``reads_per_hour``: how fast the department reads, which says when each waiting study would be
  read; the cap is judged against those times.
* ``temperature_scale``: the site's calibration of the model's probability,
  ``p = sigmoid(logit(p_model) / scale)`` (1: the model's own); the thresholds apply to that p.
  ``cxr-triage calibrate`` proposes it and the thresholds from the site's reviewed studies.

Every study records the version it was ranked under (``studies.policy_version``) beside the
model version. Saving a policy re-ranks the studies waiting for a read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, select
from sqlalchemy.orm import Session

from pipeline.models import PolicyVersion, Review, Study, User
from pipeline.states import State
from pipeline.triage import score as triage

DEFAULT_MAX_WAIT_H = 48.0
DEFAULT_READS_PER_HOUR = 20.0
MAX_REASON = 500


class PolicyError(ValueError):
    """A policy that cannot be saved; the message says which rule and why."""


@dataclass(frozen=True)
class Policy:
    version: int = 0
    thresholds: dict[str, float] | None = None
    stat_boost: float = triage.STAT_BOOST
    max_wait_h: float = DEFAULT_MAX_WAIT_H
    reads_per_hour: float = DEFAULT_READS_PER_HOUR
    temperature_scale: float = 1.0
    reason: str = "built-in default"
    created_by: str | None = None
    created_at: datetime | None = field(default=None, compare=False)

    def body(self) -> dict[str, Any]:
        """The rules alone, as stored."""
        return {
            "thresholds": self.thresholds,
            "stat_boost": self.stat_boost,
            "max_wait_h": self.max_wait_h,
            "reads_per_hour": self.reads_per_hour,
            "temperature_scale": self.temperature_scale,
        }

    def p(self, model_p: float) -> float:
        """The p_abnormal the thresholds apply to: the model's under this site's temperature."""
        return triage.rescale(model_p, self.temperature_scale)

    def thresholds_for(self, model_thresholds: Mapping[str, float]) -> dict[str, float]:
        """The thresholds in force: the policy's own, else the model's."""
        return dict(self.thresholds or model_thresholds)

    @property
    def max_wait_s(self) -> float | None:
        return self.max_wait_h * 3600.0 if self.max_wait_h > 0 else None

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["created_at"] = (
            self.created_at.strftime("%Y-%m-%d %H:%M UTC") if self.created_at else None
        )
        return doc


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float, what: str) -> float:
    raw = body.get(key)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PolicyError(f"{what} must be a number from {lo:g} to {hi:g}") from None
    if not lo <= value <= hi:
        raise PolicyError(f"{what} must be from {lo:g} to {hi:g} (got {value:g})")
    return value


def validate(body: Mapping[str, Any]) -> dict[str, Any]:
    """The stored form of a policy's rules; PolicyError names the first rule that is wrong."""
    thresholds = body.get("thresholds")
    if thresholds is not None:
        if not isinstance(thresholds, Mapping) or set(thresholds) != {
            "routine",
            "urgent",
            "critical",
        }:
            raise PolicyError("thresholds need routine, urgent and critical (or none: the model's)")
        t = {k: _number(thresholds, k, 0.0, 1.0, f"the {k} threshold") for k in thresholds}
        if not 0.0 < t["routine"] < t["urgent"] < t["critical"] < 1.0:
            raise PolicyError("thresholds must rise: 0 < routine < urgent < critical < 1")
        thresholds = {k: round(t[k], 4) for k in ("routine", "urgent", "critical")}
    return {
        "thresholds": thresholds,
        "stat_boost": _number(body, "stat_boost", 0.0, 50.0, "the STAT boost"),
        "max_wait_h": _number(body, "max_wait_h", 0.0, 24.0 * 30, "the maximum wait (hours)"),
        "reads_per_hour": _number(body, "reads_per_hour", 1.0, 1000.0, "reads per hour"),
        "temperature_scale": _number(
            {"t": body.get("temperature_scale", 1.0)}, "t", 0.2, 5.0, "the temperature scale"
        ),
    }


def _from_row(row: PolicyVersion, user: str | None) -> Policy:
    body = json.loads(row.body)
    return Policy(
        version=row.version,
        thresholds=body.get("thresholds"),
        stat_boost=float(body["stat_boost"]),
        max_wait_h=float(body["max_wait_h"]),
        reads_per_hour=float(body["reads_per_hour"]),
        temperature_scale=float(body.get("temperature_scale", 1.0)),
        reason=row.reason,
        created_by=user,
        created_at=row.created_at,
    )


def active(session: Session, who: bool = True) -> Policy:
    """The policy in force: the highest version, else the built-in default (version 0).

    ``who=False`` leaves out the author's name (one query less: the workers' write path).
    """
    row = session.scalars(
        select(PolicyVersion).order_by(PolicyVersion.version.desc()).limit(1)
    ).first()
    if row is None:
        return Policy()
    user = session.get(User, row.user_id) if who and row.user_id else None
    return _from_row(row, user.username if user else None)


def history(session: Session) -> list[Policy]:
    """Every saved version, newest first, then the built-in default."""
    rows = session.execute(
        select(PolicyVersion, User.username)
        .outerjoin(User, User.id == PolicyVersion.user_id)
        .order_by(PolicyVersion.version.desc())
    ).all()
    return [*(_from_row(row, name) for row, name in rows), Policy()]


def save(
    session: Session,
    body: Mapping[str, Any],
    user_id: int | None,
    reason: str,
    model_thresholds: Mapping[str, float],
) -> tuple[Policy, int]:
    """Store the rules as the next version and re-rank the waiting studies.

    Returns the new policy and how many waiting studies changed triage class. The caller
    commits (with its audit row).
    """
    reason = (reason or "").strip()
    if not reason:
        raise PolicyError("say why the policy changes (the reason is kept with the version)")
    if len(reason) > MAX_REASON:
        raise PolicyError(f"the reason is longer than {MAX_REASON} characters")
    rules = validate(body)
    latest = session.scalar(select(func.max(PolicyVersion.version))) or 0
    row = PolicyVersion(
        version=latest + 1, body=json.dumps(rules, sort_keys=True), reason=reason, user_id=user_id
    )
    session.add(row)
    session.flush()
    user = session.get(User, user_id) if user_id else None
    policy = _from_row(row, user.username if user else None)
    return policy, rerank_waiting(session, policy, model_thresholds)


def rollback(
    session: Session,
    version: int,
    user_id: int | None,
    reason: str,
    model_thresholds: Mapping[str, float],
) -> tuple[Policy, int]:
    """Bring back the rules of an earlier version, as a new version."""
    if version == 0:
        body = Policy().body()
    else:
        row = session.scalar(select(PolicyVersion).where(PolicyVersion.version == version))
        if row is None:
            raise PolicyError(f"there is no policy version {version}")
        body = json.loads(row.body)
    return save(
        session, body, user_id, f"back to version {version}: {reason.strip()}", model_thresholds
    )


def awaiting_read() -> ColumnElement[bool]:
    """SQL condition: the study is scored and no radiologist has reviewed it."""
    return and_(
        Study.status == State.DONE,
        Study.priority.is_not(None),
        ~exists().where(Review.study_id == Study.id),
    )


def rerank_waiting(session: Session, policy: Policy, model_thresholds: Mapping[str, float]) -> int:
    """Re-derive class and priority of the studies waiting for a read; return how many moved class.

    From the stored p_abnormal, so no image is run again.
    """
    thresholds = policy.thresholds_for(model_thresholds)
    moved = 0
    scored = select(Study).where(awaiting_read(), Study.p_abnormal.is_not(None))
    for study in session.scalars(scored):
        assert study.p_abnormal is not None
        p = policy.p(study.p_abnormal)
        cls = triage.triage_class(p, thresholds)
        moved += cls != study.triage_class
        study.triage_class = cls
        study.priority = triage.priority_score(
            p, thresholds, study.requested_priority, stat_boost=policy.stat_boost
        )
        study.policy_version = policy.version
    return moved


def preview(
    session: Session, body: Mapping[str, Any], model_thresholds: Mapping[str, float]
) -> int:
    """How many waiting studies would change triage class under these rules (nothing saved)."""
    rules = Policy(**validate(body))
    thresholds = rules.thresholds_for(model_thresholds)
    rows = session.execute(
        select(Study.p_abnormal, Study.triage_class).where(
            awaiting_read(), Study.p_abnormal.is_not(None)
        )
    )
    return sum(triage.triage_class(rules.p(float(p or 0.0)), thresholds) != cls for p, cls in rows)
