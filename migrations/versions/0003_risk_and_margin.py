"""Risk parameter history and margin states (read models).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _decimal() -> sa.types.TypeEngine:
    return sa.Numeric().with_variant(sa.Text(), "sqlite")


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime(timezone=True).with_variant(sa.String(27), "sqlite")


def upgrade() -> None:
    op.create_table(
        "risk_parameter_changes",
        sa.Column("position", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("underlying", sa.Text(), nullable=True),
        sa.Column("value", _decimal(), nullable=False),
        sa.Column("effective_at", _timestamp(), nullable=False),
    )
    op.create_table(
        "margin_states",
        sa.Column("account_id", sa.Text(), primary_key=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("equity", _decimal(), nullable=False),
        sa.Column("initial", _decimal(), nullable=False),
        sa.Column("maintenance", _decimal(), nullable=False),
        sa.Column("since", _timestamp(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("margin_states")
    op.drop_table("risk_parameter_changes")
