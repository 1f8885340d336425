"""add the claiming worker's name to images

Revision ID: 0003_image_worker
Revises: 0002_batches_latency
Create Date: 2026-12-03 11:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_image_worker"
down_revision = "0002_batches_latency"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker", sa.String(length=120), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("worker")
