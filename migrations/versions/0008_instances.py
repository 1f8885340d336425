"""instance store

Every accepted DICOM instance is kept as received, and every JPEG/PNG as a Secondary Capture,
in files under the data directory; this table is what the DICOMweb read side searches.

Revision ID: 0008_instances
Revises: 0007_model_registry
Create Date: 2026-12-06 23:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_instances"
down_revision = "0007_model_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=64), nullable=True),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("frames", sa.Integer(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=400), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_uid"),
    )
    for column in ("study_id", "image_id", "study_uid", "series_uid", "created_at"):
        op.create_index(f"ix_instances_{column}", "instances", [column])


def downgrade() -> None:
    for column in ("study_id", "image_id", "study_uid", "series_uid", "created_at"):
        op.drop_index(f"ix_instances_{column}", table_name="instances")
    op.drop_table("instances")
