"""model registry and shadow predictions

Every model the site runs or tries is a row: a candidate (registered), the one in shadow (scoring
new studies beside the live one without touching the order), the live one, or retired. Shadow
predictions are kept apart from the live ones.

Revision ID: 0007_model_registry
Revises: 0006_policy
Create Date: 2026-12-04 19:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_model_registry"
down_revision = "0006_policy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=80), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("registered_by", sa.Integer(), nullable=True),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_by", sa.Integer(), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("shadow_since", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["registered_by"], ["users.id"]),
        sa.ForeignKeyConstraint(["changed_by"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version"),
    )
    op.create_table(
        "shadow_predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=80), nullable=False),
        sa.Column("p_abnormal", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("image_id", "model_version"),
    )
    op.create_index("ix_shadow_predictions_image_id", "shadow_predictions", ["image_id"])


def downgrade() -> None:
    op.drop_index("ix_shadow_predictions_image_id", table_name="shadow_predictions")
    op.drop_table("shadow_predictions")
    op.drop_table("model_versions")
