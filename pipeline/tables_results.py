"""SQL tables of results sent back: destinations, the result objects, the outbox."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.models import Base, utcnow
from pipeline.states import ObjectState, OutboxState


class Destination(Base):
    """Where results go: a DICOM node (C-STORE), a DICOMweb service (STOW-RS), or, for
    critical alerts, an HL7 v2 receiver over MLLP or a webhook. Secrets are kept encrypted
    (``pipeline.results.destinations``) and never shown back."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # dicom | dicomweb | mllp | webhook
    ae_title: Mapped[str | None] = mapped_column(String(16))
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    url: Mapped[str | None] = mapped_column(String(500))
    auth: Mapped[str] = mapped_column(String(16), default="none")  # none | bearer | basic | hmac
    username: Mapped[str | None] = mapped_column(String(120))
    secret: Mapped[str | None] = mapped_column(Text)  # Fernet token of the password or key
    want_sr: Mapped[bool] = mapped_column(default=True)
    want_sc: Mapped[bool] = mapped_column(default=True)
    enabled: Mapped[bool] = mapped_column(default=True)
    source: Mapped[str] = mapped_column(String(16), default="console")  # console | env
    last_ok_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ResultObject(Base):
    """One object that leaves the system (an SR, a CAM capture, an alert), with the UID and
    snapshot it is built from on every send, so a re-send is the same object."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"))
    kind: Mapped[str] = mapped_column(String(8))  # sr | sc | alert
    # "sr:<study>:<model>:<n images>", "sc:<image>:<model>", "alert:<study>:<model>"
    key: Mapped[str] = mapped_column(String(200), unique=True)
    model_version: Mapped[str | None] = mapped_column(String(80))
    images: Mapped[int] = mapped_column(Integer, default=0)  # scored films it covers
    uid: Mapped[str] = mapped_column(String(64), unique=True)  # SOP Instance UID or event id
    status: Mapped[str] = mapped_column(String(16), default=ObjectState.READY)  # ready | skipped
    reason: Mapped[str | None] = mapped_column(Text)
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class OutboxItem(Base):
    """One object owed to one destination: pending until sent, retried with backoff."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id"))
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING)  # OutboxState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    __table_args__ = (
        UniqueConstraint("object_id", "destination_id"),
        Index("ix_outbox_due", "status", "next_attempt_at"),
    )
