"""SQL tables: studies, images, predictions, reviews, users, audit events; the declarative base.

The database is the source of truth; Redis only holds work in flight. The results' tables are
in ``pipeline.tables_results``, the model registry's in ``pipeline.tables_registry``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The state and role tuples live in pipeline.states; re-exported here, where modules import
# them from.
from pipeline.states import ACTIVE_STATES as ACTIVE_STATES
from pipeline.states import ALL_STATES as ALL_STATES
from pipeline.states import FINAL_STATES as FINAL_STATES
from pipeline.states import PERSON_ROLES as PERSON_ROLES
from pipeline.states import ROLES as ROLES
from pipeline.states import Role, State

# What each role may do. A feed token can send studies and nothing else; a monitoring token
# can read /metrics and nothing else.
SCOPES: dict[str, frozenset[str]] = {
    Role.ADMIN: frozenset({"read", "review", "admin", "ingest", "metrics"}),
    Role.RADIOLOGIST: frozenset({"read", "review"}),
    Role.FEED: frozenset({"ingest"}),
    Role.MONITOR: frozenset({"metrics"}),
}

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime:
    """A stored time as aware UTC; SQLite hands back naive datetimes that are UTC by construction."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    """One imaging study; its priority is the maximum over its frontal images."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(200))
    study_date: Mapped[str | None] = mapped_column(String(16))
    requested_priority: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32), default="cli")
    lane: Mapped[str] = mapped_column(String(16), default="live")
    status: Mapped[str] = mapped_column(String(16), default=State.RECEIVED, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(String(32))
    p_abnormal: Mapped[float | None] = mapped_column(Float)
    triage_class: Mapped[str | None] = mapped_column(String(16))
    priority: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(80))
    # The triage policy (pipeline.triage.policy) the study was ranked under; None: before policies.
    policy_version: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    images: Mapped[list[Image]] = relationship(back_populates="study", order_by="Image.id")
    reviews: Mapped[list[Review]] = relationship(back_populates="study", order_by="Review.id")

    __table_args__ = (Index("ix_studies_worklist", "priority", "received_at"),)


class Image(Base):
    """One radiograph (a DICOM instance or a JPEG/PNG file) and its processing state."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    # "sop:<SOPInstanceUID>" for DICOM, "sha256:<hex>" for anything else: the dedup key.
    dedup_key: Mapped[str] = mapped_column(String(200), unique=True)
    filename: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    sop_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # 8-bit greyscale PNG at display size; the model input is rebuilt from it after a Redis loss.
    # Deferred: loaded only where the pixels are needed, never with the row's state.
    preview: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    status: Mapped[str] = mapped_column(String(16), default=State.RECEIVED, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The Celery name of the worker that claimed it last: when that worker dies (its supervisor
    # sees it exit, or its heartbeat stops), what it held is re-sent at once.
    worker: Mapped[str | None] = mapped_column(String(120))
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Ingest to result, for the end-to-end latency histogram.
    latency_ms: Mapped[float | None] = mapped_column(Float)

    study: Mapped[Study] = relationship(back_populates="images")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="image")


class Prediction(Base):
    """The model's output for one image; unique per image and model version."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_version: Mapped[str] = mapped_column(String(80))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    label: Mapped[str] = mapped_column(String(32))
    p_abnormal: Mapped[float] = mapped_column(Float)
    triage_class: Mapped[str] = mapped_column(String(16))
    priority: Mapped[float] = mapped_column(Float)
    cam_class: Mapped[str] = mapped_column(String(32))
    cam: Mapped[bytes] = mapped_column(LargeBinary)  # float16, row-major, cam_h x cam_w
    cam_h: Mapped[int] = mapped_column(Integer)
    cam_w: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    inference_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    image: Mapped[Image] = relationship(back_populates="predictions")

    __table_args__ = (UniqueConstraint("image_id", "model_version"),)


class Batch(Base):
    """One forward pass of a worker: its size and cost, for throughput and latency metrics."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str | None] = mapped_column(String(120))
    model_version: Mapped[str] = mapped_column(String(80))
    size: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    inference_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class User(Base):
    """A person (radiologist, admin) or a machine feed holding an API token."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    api_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Review(Base):
    """A radiologist's action on a study (read, agree or disagree with the model), or an
    outcome imported from the RIS; either may carry the ground truth (``pipeline.triage.reviews``)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    # A console read: the radiologist; a RIS import: the account that ran it.
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(16))  # read | agree | disagree | import
    comment: Mapped[str | None] = mapped_column(Text)
    # Ground truth: None when the read said nothing about the finding ("mark read").
    abnormal: Mapped[bool | None] = mapped_column()
    finding: Mapped[str | None] = mapped_column(String(32))  # pipeline.triage.reviews.FINDINGS
    source: Mapped[str] = mapped_column(String(16), default="console")  # console | ris
    # The model's call on the study when the truth was recorded.
    model_class: Mapped[str | None] = mapped_column(String(16))
    model_p: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="reviews")


class PolicyVersion(Base):
    """One version of the site's triage policy (pipeline.triage.policy); the highest is in force."""

    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    body: Mapped[str] = mapped_column(Text)  # JSON: pipeline.triage.policy.Policy.body()
    reason: Mapped[str] = mapped_column(Text)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """Who did what to which object, for privacy audits."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(40), index=True)
    target: Mapped[str | None] = mapped_column(String(80))
    detail: Mapped[str | None] = mapped_column(Text)
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Instance(Base):
    """One DICOM instance in the instance store (``pipeline.store.instances``): a file as received,
    the Secondary Capture made at ingest of a JPEG/PNG, or a result object (the CAM capture,
    the SR) built for the viewer. The row holds what QIDO-RS answers; the file holds the rest."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # received | capture | cam | sr
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    frames: Mapped[int | None] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(400))  # relative to the store's root
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
