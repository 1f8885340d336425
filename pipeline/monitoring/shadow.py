"""Live against shadow: both models measured on the studies reviewed since the shadow started
(the console's Models page, the new-site bench)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.classifier.registry import in_force
from pipeline.models import Image, Study, as_utc
from pipeline.monitoring import performance
from pipeline.tables_registry import ShadowPrediction
from pipeline.triage.reviews import latest_truths
from pipeline.triage.score import rescale


def comparison(
    session: Session, routine_threshold: float | None, temperature_scale: float = 1.0
) -> dict[str, Any] | None:
    """Live against shadow on the studies reviewed since the shadow started; None: no shadow.

    Both models' probabilities are read under the policy's temperature before its routine
    threshold is applied, as the worklist would read them.
    """
    _, shadow = in_force(session)
    if shadow is None or shadow.shadow_since is None:
        return None
    since: datetime = as_utc(shadow.shadow_since)  # SQLite hands back naive UTC
    truths = latest_truths(session, since=since)
    rows = session.execute(
        select(Study.id, Study.p_abnormal, ShadowPrediction.p_abnormal)
        .join(Image, Image.study_id == Study.id)
        .join(ShadowPrediction, ShadowPrediction.image_id == Image.id)
        .where(
            Study.id.in_(list(truths)),
            ShadowPrediction.model_version == shadow.version,
            Study.p_abnormal.is_not(None),
        )
    ).all()
    best: dict[int, tuple[float, float]] = {}
    for sid, live_p, shadow_p in rows:  # a study's score is its highest image's
        old = best.get(sid, (0.0, 0.0))
        best[sid] = (float(live_p or 0.0), max(old[1], float(shadow_p)))
    ids = sorted(best)
    y = np.array([truths[i].abnormal for i in ids], bool)
    doc: dict[str, Any] = {
        "shadow_version": shadow.version,
        "since": since.isoformat(timespec="minutes"),
        "studies": len(ids),
        "abnormal": int(y.sum()),
    }
    for name, k in (("live", 0), ("shadow", 1)):
        s = np.array([rescale(best[i][k], temperature_scale) for i in ids], float)
        doc[name] = {"auc": performance.auc_delong(s, y)}
        if routine_threshold is not None and len(ids):
            r = performance.at_threshold(s, y, routine_threshold)
            doc[name]["routine"] = {
                "sensitivity": r["sensitivity"],
                "specificity": r["specificity"],
            }
    return doc
