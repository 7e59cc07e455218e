"""Core descriptions of the ledger's read-model tables (created by migration 0002)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Integer, MetaData, Table, Text

from clearing.store.decimals import ExactDecimal
from clearing.store.timestamps import UtcTimestamp

metadata = MetaData()

accounts = Table(
    "accounts", metadata,
    Column("account_id", Text, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("margin_model", Text, nullable=False),
)
instruments = Table(
    "instruments", metadata,
    Column("symbol", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("underlying", Text, nullable=False),
    Column("settlement_asset", Text, nullable=False),
    Column("expiry", UtcTimestamp, nullable=True),
    Column("strike", ExactDecimal, nullable=True),
    Column("option_type", Text, nullable=True),
    Column("multiplier", ExactDecimal, nullable=False),
)
balances = Table(
    "balances", metadata,
    Column("account_id", Text, primary_key=True),
    Column("asset", Text, primary_key=True),
    Column("balance", ExactDecimal, nullable=False),
)
positions = Table(
    "positions", metadata,
    Column("account_id", Text, primary_key=True),
    Column("instrument", Text, primary_key=True),
    Column("quantity", ExactDecimal, nullable=False),
    Column("average_entry_price", ExactDecimal, nullable=False),
    Column("settlement_basis", ExactDecimal, nullable=False),
    Column("realised_pnl", ExactDecimal, nullable=False),
)
statement = Table(
    "statement", metadata,
    Column("position", BigInteger, primary_key=True),
    Column("account_id", Text, primary_key=True),
    Column("asset", Text, primary_key=True),
    Column("effective_at", UtcTimestamp, nullable=False),
    Column("type", Text, nullable=False),
    Column("reference", Text, nullable=False),
    Column("amount", ExactDecimal, nullable=False),
    Column("balance", ExactDecimal, nullable=False),
)
trade_legs = Table(
    "trade_legs", metadata,
    Column("trade_id", Text, primary_key=True),
    Column("leg", Integer, primary_key=True),
    Column("instrument", Text, nullable=False),
    Column("buyer", Text, nullable=False),
    Column("seller", Text, nullable=False),
    Column("quantity", ExactDecimal, nullable=False),
    Column("price", ExactDecimal, nullable=False),
    Column("buyer_fee", ExactDecimal, nullable=False),
    Column("seller_fee", ExactDecimal, nullable=False),
    Column("traded_at", UtcTimestamp, nullable=False),
    Column("busted", Boolean, nullable=False),
)
marks = Table(
    "marks", metadata,
    Column("symbol", Text, primary_key=True),
    Column("price", ExactDecimal, nullable=False),
    Column("iv", ExactDecimal, nullable=True),
    Column("marked_at", UtcTimestamp, nullable=False),
    Column("position", BigInteger, nullable=False),
)

risk_parameter_changes = Table(
    "risk_parameter_changes", metadata,
    Column("position", BigInteger, primary_key=True),
    Column("name", Text, nullable=False),
    Column("underlying", Text, nullable=True),
    Column("value", ExactDecimal, nullable=False),
    Column("effective_at", UtcTimestamp, nullable=False),
)
margin_states = Table(
    "margin_states", metadata,
    Column("account_id", Text, primary_key=True),
    Column("status", Text, nullable=False),
    Column("equity", ExactDecimal, nullable=False),
    Column("initial", ExactDecimal, nullable=False),
    Column("maintenance", ExactDecimal, nullable=False),
    Column("since", UtcTimestamp, nullable=False),
    Column("position", BigInteger, nullable=False),
)

settlements = Table(
    "settlements", metadata,
    Column("symbol", Text, primary_key=True),
    Column("settlement_price", ExactDecimal, nullable=False),
)

LEDGER_TABLES = (accounts, instruments, balances, positions, statement, trade_legs, marks,
                 risk_parameter_changes, margin_states, settlements)
