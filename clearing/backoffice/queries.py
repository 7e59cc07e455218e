"""What the back office reads: balances, positions and statements, now or at a past moment.

Without bounds the answers come from the read models (brought up to date first); with
`--as-of`, `--known-at` or `--until` they come from an in-memory replay of the log to that
point, through the same `evolve`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from clearing.app import Ledger
from clearing.backoffice.replay import ReplayBounds, replay
from clearing.domain.clock import format_time
from clearing.domain.ledger import LedgerState, Mark, StatementLine
from clearing.domain.money import asset_spec, canonical_decimal
from clearing.domain.valuation import value_position
from clearing.projections import tables as t
from clearing.projections.ledger import instrument_from_row, position_from_row


def ledger_state(ledger: Ledger, bounds: ReplayBounds, account: str | None = None,
                 with_statement: bool = False) -> LedgerState:
    """The state to answer from: the read models, or a replay when bounded."""
    if not bounds.unbounded:
        return replay(ledger.store, bounds)
    ledger.refresh()
    state = LedgerState()
    with ledger.engine.connect() as conn:
        for row in conn.execute(select(t.instruments)):
            state.instruments[row.symbol] = instrument_from_row(row)
        for row in conn.execute(select(t.marks)):
            state.marks[row.symbol] = Mark(row.price, row.iv, row.marked_at, row.position)
        balances = select(t.balances)
        positions = select(t.positions)
        if account is not None:
            balances = balances.where(t.balances.c.account_id == account)
            positions = positions.where(t.positions.c.account_id == account)
        for row in conn.execute(balances):
            state.balances[(row.account_id, row.asset)] = row.balance
        for row in conn.execute(positions):
            state.positions[(row.account_id, row.instrument)] = position_from_row(row)
        if with_statement:
            query = select(t.statement).order_by(t.statement.c.position, t.statement.c.asset)
            if account is not None:
                query = query.where(t.statement.c.account_id == account)
            for row in conn.execute(query):
                state.statement.append(StatementLine(
                    row.position, row.account_id, row.asset, row.effective_at, row.type,
                    row.reference, row.amount, row.balance))
    return state


def money_text(amount: Decimal, asset: str) -> str:
    """An amount at its asset's scale, e.g. `10000.000000` USDC."""
    return format(amount.quantize(asset_spec(asset).quantum), "f")


def balance_rows(state: LedgerState, account: str | None = None) -> list[dict[str, Any]]:
    return [
        {"account_id": account_id, "asset": asset, "balance": money_text(balance, asset)}
        for (account_id, asset), balance in sorted(state.balances.items())
        if account is None or account_id == account
    ]


def _greek(value: float) -> str:
    return f"{value:.8f}" if value else "0"


def position_rows(state: LedgerState, at: datetime,
                  account: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for (account_id, symbol), position in sorted(state.positions.items()):
        if position.quantity == 0 or (account is not None and account_id != account):
            continue
        instrument = state.instruments[symbol]
        valuation = value_position(instrument, position, state.marks, at)
        pnl = valuation.unrealised_pnl
        last = position.last_settlement_price if instrument.is_linear_delta_one else None
        rows.append({
            "account_id": account_id,
            "instrument": symbol,
            "quantity": canonical_decimal(position.quantity),
            "mark_price": None if valuation.mark_price is None
            else canonical_decimal(valuation.mark_price),
            "average_entry_price": canonical_decimal(position.average_entry_price),
            "last_settlement_price": None if last is None else canonical_decimal(last),
            "unrealised_pnl": None if pnl is None
            else money_text(pnl, instrument.settlement_asset),
            "realised_pnl": money_text(position.realised_pnl, instrument.settlement_asset),
            "delta": _greek(valuation.delta),
            "gamma": _greek(valuation.gamma),
            "vega": _greek(valuation.vega),
            "theta": _greek(valuation.theta),
        })
    return rows


def statement_rows(state: LedgerState, account: str, start: datetime | None = None,
                   end: datetime | None = None) -> list[dict[str, Any]]:
    return [
        {"position": line.position, "effective_at": format_time(line.effective_at),
         "type": line.type, "reference": line.reference, "asset": line.asset,
         "amount": money_text(line.amount, line.asset),
         "balance": money_text(line.balance, line.asset)}
        for line in state.statement
        if line.account_id == account
        and (start is None or line.effective_at >= start)
        and (end is None or line.effective_at <= end)
    ]
