"""Local calibration: thresholds and a temperature for this site, from its own reviewed studies.

``propose`` reads the studies whose ground truth was recorded in a window (radiologists' reads
and RIS imports, pipeline.monitoring.live), fits the temperature scale that makes the model's
probability honest on them (``sigmoid(logit(p) / scale)``, the scale minimising the negative
log-likelihood), and chooses the thresholds on that probability by the rule the weights were
made with (routine at the target sensitivity; urgent and critical at specificity 0.99 and
0.999). Beside each: the sensitivity and specificity they give on the same studies, with 95 %
Wilson intervals, the same for the policy in force, and how many studies waiting for a read
would change triage class. Nothing changes until an admin applies it on the console (or rejects
it); ``cxr-triage calibrate`` prints the proposal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from pipeline.monitoring import performance
from pipeline.training import metrics as ev
from pipeline.triage.policy import Policy, active, preview

MIN_EACH = 20  # abnormal and normal reviewed studies needed before anything is proposed


class CalibrationError(ValueError):
    """Too little ground truth to propose anything; the message says how much there is."""


def fit_scale(p: np.ndarray, abnormal: np.ndarray) -> float:
    """The temperature scale minimising the NLL of sigmoid(logit(p) / scale): the training's
    own fit (``evaluate.fit_temperature``, grid 0.2 to 5) on the logit of p."""
    q = np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    z = np.log(q / (1 - q))
    binary = np.stack([np.zeros(len(z)), z], axis=1)  # as train_run.calibrate fits T
    return round(ev.fit_temperature(binary, np.asarray(abnormal, bool).astype(int)), 3)


def _rates(p: np.ndarray, y: np.ndarray, thresholds: Mapping[str, float]) -> dict[str, Any]:
    out = {}
    for name in ("routine", "urgent", "critical"):
        r = performance.at_threshold(p, y, float(thresholds[name]))
        out[name] = {
            "threshold": round(float(thresholds[name]), 4),
            "sensitivity": r["sensitivity"],
            "specificity": r["specificity"],
        }
    return out


def propose(
    session: Session,
    since: datetime,
    until: datetime,
    model_thresholds: Mapping[str, float],
    target_sensitivity: float = 0.95,
) -> dict[str, Any]:
    """The proposal document (see the module docstring); CalibrationError with too few reads."""
    from pipeline.monitoring.live import reviewed_studies

    if not 0.5 <= target_sensitivity < 1.0:
        raise CalibrationError("the target sensitivity must be from 0.5 to below 1")
    rows = [r for r in reviewed_studies(session, since, until) if r.score is not None]
    y = np.array([r.abnormal for r in rows], bool)
    n_abn, n_norm = int(y.sum()), int((~y).sum())
    if n_abn < MIN_EACH or n_norm < MIN_EACH:
        raise CalibrationError(
            f"{n_abn} abnormal and {n_norm} normal reviewed studies since {since:%Y-%m-%d}: "
            f"at least {MIN_EACH} of each are needed"
        )
    p = np.array([float(r.score) for r in rows])  # type: ignore[arg-type]
    current = active(session)
    scale = fit_scale(p, y)
    site = Policy(temperature_scale=scale)
    p_site = np.array([site.p(float(x)) for x in p])
    raw = ev.choose_thresholds(p_site, y, target_sensitivity)
    # Four decimals, rounded so as to keep each target: routine down (sensitivity), the others
    # up (specificity); each strictly above the one below.
    routine = math.floor(min(max(raw["routine"], 1e-4), 0.9997) * 1e4) / 1e4
    urgent = max(math.ceil(min(raw["urgent"], 0.9998) * 1e4) / 1e4, routine + 1e-4)
    critical = max(math.ceil(min(raw["critical"], 0.9999) * 1e4) / 1e4, urgent + 1e-4)
    thresholds = {
        "routine": round(routine, 4),
        "urgent": round(urgent, 4),
        "critical": round(min(critical, 0.9999), 4),
    }
    body = {**current.body(), "thresholds": thresholds, "temperature_scale": scale}
    p_now = np.array([current.p(float(x)) for x in p])
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "reviewed": len(rows),
        "abnormal": n_abn,
        "normal": n_norm,
        "target_sensitivity": target_sensitivity,
        "auc": performance.auc_delong(p, y),
        "temperature_scale": scale,
        "thresholds": thresholds,
        "expected": _rates(p_site, y, thresholds),
        "current": {
            "policy_version": current.version,
            "temperature_scale": current.temperature_scale,
            **_rates(p_now, y, current.thresholds_for(model_thresholds)),
        },
        "waiting_changed": preview(session, body, model_thresholds),
        "body": body,
        "reason": (
            f"calibrated on {len(rows)} reviewed studies ({n_abn} abnormal) from "
            f"{since:%Y-%m-%d}, target sensitivity {target_sensitivity:g}"
        ),
    }
