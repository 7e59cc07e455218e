"""Settlement price of expired instruments (read model).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "settlements",
        sa.Column("symbol", sa.Text(), primary_key=True),
        sa.Column("settlement_price", sa.Numeric().with_variant(sa.Text(), "sqlite"),
                  nullable=False),
    )


def downgrade() -> None:
    op.drop_table("settlements")
