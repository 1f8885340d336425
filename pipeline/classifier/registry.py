"""The site's model registry: candidates, one shadow, the live model, and the retired ones.

``register`` copies a weights file (a candidate from ``train --from-db``, say) into
``<data dir>/models/<version>.pt``, where it is never written again, and records it as a
*candidate*. An admin then, on the console (``/admin/models``), each step audited:

* puts one candidate in **shadow**: the workers score every new image with it too, after the
  live model, into ``shadow_predictions``; the worklist, the study's class and its priority
  never read those;
* compares the two on the studies reviewed since the shadow started (AUC with DeLong intervals,
  sensitivity and specificity at the policy's routine threshold);
* **promotes** it: it becomes the live model and the one before is retired; or **discards** it.
  Any retired version can be promoted again (rollback).

The workers look at the registry between batches (at most every ``CXR_REGISTRY_CHECK_S``
seconds, default 5) and load
the live and shadow models it names; a batch runs wholly on one model, its claims fenced as
always, so a switch loses and doubles nothing, and each result keeps its model version. With no
live row the weights of the settings (the shipped model) are live.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.classifier.weights import WeightsError, file_sha256, read_meta
from pipeline.models import Review, utcnow
from pipeline.states import MODEL_STATUSES, ModelStatus
from pipeline.tables_registry import ModelVersion

STATUSES = MODEL_STATUSES


class RegistryError(ValueError):
    """A registry action that cannot be done; the message says why."""


def version_of(path: Path) -> tuple[str, str]:
    """(version, sha256) of a weights file, as the workers name it: ``<arch>-<sha12>``.

    Read once per file and modification time."""
    try:
        return _version_in(str(path), path.stat().st_mtime_ns, path.stat().st_size)
    except (OSError, WeightsError) as exc:
        raise RegistryError(str(exc)) from exc


@lru_cache(maxsize=32)
def _version_in(path: str, mtime_ns: int, size: int) -> tuple[str, str]:
    meta = read_meta(Path(path))
    sha = file_sha256(Path(path))
    return f"{meta.get('arch', '?')}-{sha[:12]}", sha


@lru_cache(maxsize=32)
def _preprocess_in(path: str, mtime_ns: int) -> str:
    return str(read_meta(Path(path)).get("preprocess", "resize"))


def _preprocess_of_file(path: Path) -> str | None:
    try:
        return _preprocess_in(str(path), path.stat().st_mtime_ns)
    except (OSError, WeightsError):
        return None


def preprocess_of(session: Session, version: str | None, weights: Path | None = None) -> str:
    """The preprocessing of the model that made a prediction (``meta["preprocess"]``).

    ``weights``: the file the settings name; else the registry's copy of that version. Either
    file counts only while it still holds that version (a shipped file can be replaced by a
    newer model under the same name). A version neither holds is taken to read the whole film
    (``resize``, the models before the thorax crop).
    """
    if version is None:
        return "resize"
    path = session.scalar(select(ModelVersion.path).where(ModelVersion.version == version))
    for candidate in (weights, Path(path) if path else None):
        if candidate is not None and _holds(candidate, version):
            return _preprocess_of_file(candidate) or "resize"
    return "resize"


def _holds(path: Path, version: str) -> bool:
    if not path.is_file():
        return False
    try:
        return version_of(path)[0] == version
    except RegistryError:
        return False


def register(
    session: Session, path: Path, data_dir: Path, user_id: int | None, note: str | None = None
) -> ModelVersion:
    """Copy a weights file into the registry as a candidate (an existing version: an error)."""
    version, sha = version_of(path)
    if session.scalar(select(ModelVersion.id).where(ModelVersion.version == version)):
        raise RegistryError(f"{version} is already registered")
    target = data_dir / "models" / f"{version}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(target)
    row = ModelVersion(
        version=version,
        sha256=sha,
        path=str(target),
        status=ModelStatus.CANDIDATE,
        note=note,
        registered_by=user_id,
    )
    session.add(row)
    session.flush()
    return row


def ensure_live_row(session: Session, shipped: Path) -> ModelVersion:
    """The live row; the shipped weights are recorded as live the first time one is needed."""
    live = session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.LIVE)
    ).first()
    if live is not None:
        return live
    version, sha = version_of(shipped)
    row = session.scalars(select(ModelVersion).where(ModelVersion.version == version)).first()
    if row is None:
        row = ModelVersion(
            version=version,
            sha256=sha,
            path=str(shipped),
            status=ModelStatus.LIVE,
            note="shipped with cxr-triage",
        )
        session.add(row)
    row.status = ModelStatus.LIVE
    session.flush()
    return row


def _get(session: Session, version: str) -> ModelVersion:
    row = session.scalars(select(ModelVersion).where(ModelVersion.version == version)).first()
    if row is None:
        raise RegistryError(f"no model {version!r} in the registry")
    return row


def start_shadow(
    session: Session, version: str, user_id: int | None, shipped: Path
) -> ModelVersion:
    """Put a candidate (or a retired model) in shadow; the one there before goes back."""
    ensure_live_row(session, shipped)
    row = _get(session, version)
    if row.status not in (ModelStatus.CANDIDATE, ModelStatus.RETIRED):
        raise RegistryError(
            f"{version} is {row.status}: only a candidate or a retired model can go into shadow"
        )
    for other in session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.SHADOW)
    ):
        other.status, other.changed_by, other.changed_at = ModelStatus.CANDIDATE, user_id, utcnow()
    row.status, row.changed_by, row.changed_at, row.shadow_since = (
        ModelStatus.SHADOW,
        user_id,
        utcnow(),
        utcnow(),
    )
    session.flush()
    return row


def promote(session: Session, version: str, user_id: int | None, shipped: Path) -> ModelVersion:
    """Make a model live (a rollback when it was retired); the live one before is retired."""
    live = ensure_live_row(session, shipped)
    row = _get(session, version)
    if row.status == ModelStatus.LIVE:
        raise RegistryError(f"{version} is already live")
    if not Path(row.path).is_file():
        raise RegistryError(f"the file of {version} is missing: {row.path}")
    live.status, live.changed_by, live.changed_at = ModelStatus.RETIRED, user_id, utcnow()
    row.status, row.changed_by, row.changed_at = ModelStatus.LIVE, user_id, utcnow()
    session.flush()
    return row


def discard(session: Session, version: str, user_id: int | None) -> ModelVersion:
    """Retire a candidate or the shadow model (its file stays, for the record)."""
    row = _get(session, version)
    if row.status == ModelStatus.LIVE:
        raise RegistryError(f"{version} is live: promote another model to replace it")
    row.status, row.changed_by, row.changed_at = ModelStatus.RETIRED, user_id, utcnow()
    session.flush()
    return row


def in_force(session: Session) -> tuple[ModelVersion | None, ModelVersion | None]:
    """The live row (None: the settings' weights) and the shadow row (None: no shadow)."""
    rows = session.scalars(
        select(ModelVersion).where(ModelVersion.status.in_((ModelStatus.LIVE, ModelStatus.SHADOW)))
    )
    live = shadow = None
    for row in rows:
        if row.status == ModelStatus.LIVE:
            live = row
        else:
            shadow = row
    return live, shadow


def listing(session: Session) -> list[dict[str, Any]]:
    from pipeline.models import User

    names = {u.id: u.username for u in session.scalars(select(User))}
    out = []
    for row in session.scalars(
        select(ModelVersion).order_by(ModelVersion.registered_at.desc(), ModelVersion.id.desc())
    ):
        out.append(
            {
                "version": row.version,
                "status": row.status,
                "note": row.note,
                "registered_by": names.get(row.registered_by or -1),
                "registered_at": row.registered_at.isoformat(timespec="minutes"),
                "changed_by": names.get(row.changed_by or -1),
                "changed_at": row.changed_at.isoformat(timespec="minutes")
                if row.changed_at
                else None,
                "shadow_since": row.shadow_since.isoformat(timespec="minutes")
                if row.shadow_since
                else None,
            }
        )
    return out


def reviewed_since(session: Session, since: datetime) -> int:
    return len(set(session.scalars(select(Review.study_id).where(Review.created_at >= since))))
