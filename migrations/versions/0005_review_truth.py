"""ground truth on reviews: abnormal, finding, source, and the model's call at the time

Existing agree/disagree rows get the truth their action implies from the study's triage class
(agree with an abnormal call: abnormal; disagree with it: normal; and the reverse for a normal
call); "read" rows get none. Every existing row came from the console.

Revision ID: 0005_review_truth
Revises: 0004_outbox
Create Date: 2026-12-04 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_review_truth"
down_revision = "0004_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.add_column(sa.Column("abnormal", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("finding", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("source", sa.String(length=16), nullable=True, server_default="console")
        )
        batch_op.add_column(sa.Column("model_class", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("model_p", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("model_version", sa.String(length=80), nullable=True))
    reviews = sa.table(
        "reviews",
        sa.column("id", sa.Integer),
        sa.column("study_id", sa.Integer),
        sa.column("action", sa.String),
        sa.column("abnormal", sa.Boolean),
        sa.column("source", sa.String),
        sa.column("model_class", sa.String),
        sa.column("model_p", sa.Float),
        sa.column("model_version", sa.String),
    )
    studies = sa.table(
        "studies",
        sa.column("id", sa.Integer),
        sa.column("triage_class", sa.String),
        sa.column("p_abnormal", sa.Float),
        sa.column("model_version", sa.String),
    )

    def of_study(column: sa.ColumnClause) -> sa.ScalarSelect:
        return sa.select(column).where(studies.c.id == reviews.c.study_id).scalar_subquery()

    op.execute(reviews.update().values(source="console"))
    opinions = reviews.c.action.in_(("agree", "disagree"))
    op.execute(
        reviews.update()
        .where(opinions)
        .values(
            model_class=of_study(studies.c.triage_class),
            model_p=of_study(studies.c.p_abnormal),
            model_version=of_study(studies.c.model_version),
        )
    )
    called_abnormal = reviews.c.model_class != "normal"
    op.execute(
        reviews.update()
        .where(opinions, reviews.c.model_class.is_not(None))
        .values(
            abnormal=sa.case(
                (sa.and_(reviews.c.action == "agree", called_abnormal), sa.true()),
                (sa.and_(reviews.c.action == "disagree", ~called_abnormal), sa.true()),
                else_=sa.false(),
            )
        )
    )
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.alter_column(
            "source", existing_type=sa.String(length=16), nullable=False, server_default=None
        )


def downgrade() -> None:
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        for name in ("model_version", "model_p", "model_class", "source", "finding", "abnormal"):
            batch_op.drop_column(name)
