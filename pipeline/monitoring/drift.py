"""Drift: are the films arriving here like the ones the model was measured on?

A *reference* is kept beside the weights (``<weights>.reference.json``, made by ``cxr-triage
drift-reference DATA...`` from labelled films the model was measured on, keyed by the weights'
sha256). It holds, per feature, the shares of films in fixed bins:

``score``
    the model's p_abnormal (10 bins over 0-1);
``intensity``
    the mean grey level of the decoded display image (16 bins over 0-255);
``size``
    the native image's long side, log2 (bins from 64 to 8192 px);
``kind``
    the file kind and modality (``jpeg``, ``png``, ``dicom:CR``, ``dicom:DX``, ...).

The live side is the most recent scored images (``LIVE_IMAGES``, within ``LIVE_DAYS``), whose
intensity ingest records in the image's ``meta["input"]``. Each feature's shift is the
population stability index, ``PSI = sum((live - ref) * ln(live / ref))`` over the bins (shares
floored at 1e-4). The documented limit is the usual one: below 0.1 stable, 0.1-0.25 a moderate
shift, **above 0.25 a major shift: the alarm**, raised when any feature passes it over at least
``MIN_IMAGES`` live images. While it stands the console shows it, ``/metrics`` carries
``cxr_drift_psi`` and ``cxr_drift_alarm``, and the worklist shows "scores may not be reliable
here".
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.models import Image, Prediction
from pipeline.states import State

PSI_LIMIT = 0.25
PSI_MODERATE = 0.1
MIN_IMAGES = 100
LIVE_IMAGES = 1000
LIVE_DAYS = 30
FLOOR = 1e-4
EDGES = {
    "score": [i / 10 for i in range(11)],
    "intensity": [i * 16.0 for i in range(17)],
    "size": [float(k) for k in range(6, 14)],  # log2 of the long side: 64 ... 8192 px
}
FEATURES = ("score", "intensity", "size", "kind")


def reference_path(weights: Path) -> Path:
    return weights.with_name(weights.stem + ".reference.json")


def shares(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """Share of values per bin; values beyond the outer edges count in the outer bins."""
    if not len(values):
        return [0.0] * (len(edges) - 1)
    v = np.clip(np.asarray(values, float), edges[0], edges[-1])
    counts, _ = np.histogram(v, bins=np.asarray(edges, float))
    return [round(float(c) / len(v), 6) for c in counts]


def kind_shares(kinds: Iterable[str]) -> dict[str, float]:
    counts = Counter(kinds)
    total = sum(counts.values())
    return {k: round(n / total, 6) for k, n in sorted(counts.items())} if total else {}


def psi(
    reference: Sequence[float] | Mapping[str, float], live: Sequence[float] | Mapping[str, float]
) -> float:
    """Population stability index of live against reference shares (bins or categories)."""
    if isinstance(reference, Mapping) or isinstance(live, Mapping):
        ref_m, live_m = dict(reference), dict(live)  # type: ignore[arg-type]
        keys = sorted(set(ref_m) | set(live_m))
        ref, cur = [ref_m.get(k, 0.0) for k in keys], [live_m.get(k, 0.0) for k in keys]
    else:
        ref, cur = list(reference), list(live)
    total = 0.0
    for r, c in zip(ref, cur, strict=True):
        r, c = max(r, FLOOR), max(c, FLOOR)
        total += (c - r) * math.log(c / r)
    return round(total, 4)


def kind_of(kind: str, modality: str | None) -> str:
    return f"{kind}:{modality}" if kind == "dicom" and modality else kind


def size_of(width: int | None, height: int | None) -> float | None:
    side = max(width or 0, height or 0)
    return math.log2(side) if side > 0 else None


def profile(
    scores: Sequence[float],
    intensities: Sequence[float],
    sizes: Sequence[float],
    kinds: Sequence[str],
) -> dict[str, Any]:
    """The per-feature shares of one set of films."""
    return {
        "n": len(scores),
        "score": shares(scores, EDGES["score"]),
        "intensity": shares(intensities, EDGES["intensity"]),
        "size": shares(sizes, EDGES["size"]),
        "kind": kind_shares(kinds),
    }


def site_reference_path(data_dir: Path) -> Path:
    """Where a site's own reference is kept (made from its live films on the console)."""
    return data_dir / "drift-reference.json"


def read_reference(
    weights: Path, sha256: str, data_dir: Path | None = None
) -> dict[str, Any] | None:
    """The reference of these weights: the site's own when it has one, else the one shipped
    beside the weights; None when neither was made for these weights."""
    paths = [site_reference_path(data_dir)] if data_dir is not None else []
    for path in [*paths, reference_path(weights)]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("weights_sha256") == sha256:
            return dict(doc)
    return None


def write_site_reference(
    session: Session, data_dir: Path, sha256: str, now: datetime, by: str
) -> dict[str, Any]:
    """Make the live profile this site's reference (an admin's decision, after validating the
    model on these films: issue 17's calibration)."""
    live = live_profile(session, now)
    if live["n"] < MIN_IMAGES:
        raise ValueError(
            f"{live['n']} scored images in the last {LIVE_DAYS} days: at least "
            f"{MIN_IMAGES} are needed for a reference"
        )
    doc = {
        "weights_sha256": sha256,
        "made": now.strftime("%Y-%m-%d"),
        "n": live["n"],
        "from": {"live": live["n"], "by": by},
        "features": {k: v for k, v in live.items() if k != "n"},
    }
    path = site_reference_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return doc


def live_profile(session: Session, now: datetime) -> dict[str, Any]:
    """The profile of the most recent scored images (one score per image: its newest)."""
    since = now - timedelta(days=LIVE_DAYS)
    rows = session.execute(
        select(
            Image.id,
            Image.kind,
            Image.modality,
            Image.width,
            Image.height,
            Image.meta,
            Prediction.p_abnormal,
        )
        .join(Prediction, Prediction.image_id == Image.id)
        .where(Image.status == State.DONE, Image.done_at >= since)
        .order_by(Image.done_at.desc(), Image.id.desc(), Prediction.id.desc())
        .limit(LIVE_IMAGES * 2)
    ).all()
    seen: set[int] = set()
    scores, intensities, sizes, kinds = [], [], [], []
    for image_id, kind, modality, width, height, meta, p in rows:
        if image_id in seen or len(seen) >= LIVE_IMAGES:
            continue
        seen.add(image_id)
        scores.append(float(p))
        mean = ((meta or {}).get("input") or {}).get("mean")
        if mean is not None:
            intensities.append(float(mean))
        size = size_of(width, height)
        if size is not None:
            sizes.append(size)
        kinds.append(kind_of(kind, modality))
    return profile(scores, intensities, sizes, kinds)


def status(session: Session, reference: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """Per feature: the PSI against the reference, its level, and whether the alarm stands."""
    live = live_profile(session, now)
    doc: dict[str, Any] = {
        "limit": PSI_LIMIT,
        "moderate": PSI_MODERATE,
        "min_images": MIN_IMAGES,
        "live_images": live["n"],
        "reference": None,
        "features": {},
        "alarm": False,
        "shifted": [],
    }
    if reference is None:
        doc["note"] = "no drift reference for these weights (cxr-triage drift-reference)"
        return doc
    doc["reference"] = {
        "n": reference.get("n"),
        "made": reference.get("made"),
        "from": reference.get("from"),
    }
    for name in FEATURES:
        ref, cur = reference["features"].get(name), live.get(name)
        if ref is None or not cur or not sum(cur.values() if isinstance(cur, dict) else cur):
            continue
        value = psi(ref, cur)
        level = "major" if value > PSI_LIMIT else "moderate" if value > PSI_MODERATE else "stable"
        doc["features"][name] = {"psi": value, "level": level}
    if live["n"] >= MIN_IMAGES:
        doc["shifted"] = [k for k, v in doc["features"].items() if v["level"] == "major"]
        doc["alarm"] = bool(doc["shifted"])
    return doc
