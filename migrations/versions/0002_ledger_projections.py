"""Ledger read models: accounts, instruments, balances, positions, statement, trades, marks.

Every table here is a projection: it can be dropped and rebuilt from the events at any time
(`clearing projections rebuild`).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _decimal() -> sa.types.TypeEngine:
    return sa.Numeric().with_variant(sa.Text(), "sqlite")


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime(timezone=True).with_variant(sa.String(27), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.Text(), primary_key=True),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("margin_model", sa.Text(), nullable=False),
    )
    op.create_table(
        "instruments",
        sa.Column("symbol", sa.Text(), primary_key=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("underlying", sa.Text(), nullable=False),
        sa.Column("settlement_asset", sa.Text(), nullable=False),
        sa.Column("expiry", _timestamp(), nullable=True),
        sa.Column("strike", _decimal(), nullable=True),
        sa.Column("option_type", sa.Text(), nullable=True),
        sa.Column("multiplier", _decimal(), nullable=False),
    )
    op.create_table(
        "balances",
        sa.Column("account_id", sa.Text(), primary_key=True),
        sa.Column("asset", sa.Text(), primary_key=True),
        sa.Column("balance", _decimal(), nullable=False),
    )
    op.create_table(
        "positions",
        sa.Column("account_id", sa.Text(), primary_key=True),
        sa.Column("instrument", sa.Text(), primary_key=True),
        sa.Column("quantity", _decimal(), nullable=False),
        sa.Column("average_entry_price", _decimal(), nullable=False),
        sa.Column("settlement_basis", _decimal(), nullable=False),
        sa.Column("realised_pnl", _decimal(), nullable=False),
    )
    op.create_table(
        "statement",
        sa.Column("position", sa.BigInteger(), primary_key=True),
        sa.Column("account_id", sa.Text(), primary_key=True),
        sa.Column("asset", sa.Text(), primary_key=True),
        sa.Column("effective_at", _timestamp(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=False),
        sa.Column("amount", _decimal(), nullable=False),
        sa.Column("balance", _decimal(), nullable=False),
    )
    op.create_index("ix_statement_account", "statement", ["account_id", "position"])
    op.create_table(
        "trade_legs",
        sa.Column("trade_id", sa.Text(), primary_key=True),
        sa.Column("leg", sa.Integer(), primary_key=True),
        sa.Column("instrument", sa.Text(), nullable=False),
        sa.Column("buyer", sa.Text(), nullable=False),
        sa.Column("seller", sa.Text(), nullable=False),
        sa.Column("quantity", _decimal(), nullable=False),
        sa.Column("price", _decimal(), nullable=False),
        sa.Column("buyer_fee", _decimal(), nullable=False),
        sa.Column("seller_fee", _decimal(), nullable=False),
        sa.Column("traded_at", _timestamp(), nullable=False),
        sa.Column("busted", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "marks",
        sa.Column("symbol", sa.Text(), primary_key=True),
        sa.Column("price", _decimal(), nullable=False),
        sa.Column("iv", _decimal(), nullable=True),
        sa.Column("marked_at", _timestamp(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    for table in ("marks", "trade_legs", "statement", "positions", "balances", "instruments",
                  "accounts"):
        op.drop_table(table)
    op.execute("DELETE FROM checkpoints WHERE name = 'ledger'")
