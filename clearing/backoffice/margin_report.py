"""`clearing margin`: every account's collateral, equity, requirements and status, as the
ledger stands or at a past moment, with the workings of one account on request (`--explain`)
and historical VaR beside the requirement (`--var`)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from clearing.app import Ledger
from clearing.backoffice.replay import ReplayBounds, replay
from clearing.domain.ledger import LedgerState
from clearing.domain.margin import AccountMargin, account_margin
from clearing.domain.margin_sweep import books, market_at, params_at
from clearing.domain.risk_measures import daily_log_returns, historical_var
from clearing.jobs.catalog import index_history


def state_for(ledger: Ledger, bounds: ReplayBounds, at: datetime) -> LedgerState:
    return ledger.state_at(at) if bounds.unbounded else replay(ledger.store, bounds)


def _text(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def margin_rows(ledger: Ledger, bounds: ReplayBounds, at: datetime,
                account: str | None = None, with_var: bool = False) -> list[dict[str, Any]]:
    state = state_for(ledger, bounds, at)
    market = market_at(state, at)
    params = params_at(state, at)
    returns: dict[str, list[float]] = {}
    if with_var:
        history = index_history(ledger, at)
        returns = {u: daily_log_returns(h) for u, h in history.items()}
    rows = []
    for account_id, book in sorted(books(state).items()):
        if account is not None and account_id != account:
            continue
        margin = account_margin(state.accounts[account_id].margin_model, book.balances,
                                book.positions, market, params)
        row = margin_row(account_id, margin)
        if with_var:
            var = historical_var(book.positions, market, returns)
            row["var_99_2d"] = None if var is None else _text(var.var)
            row["expected_shortfall_99_2d"] = None if var is None else _text(
                var.expected_shortfall)
        rows.append(row)
    return rows


def margin_row(account_id: str, margin: AccountMargin) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "model": margin.model,
        "collateral_value": _text(margin.collateral_value),
        "equity": _text(margin.equity),
        "initial": _text(margin.initial),
        "maintenance": _text(margin.maintenance),
        "margin_ratio": _text(margin.margin_ratio),
        "status": margin.status,
    }


def explain(ledger: Ledger, bounds: ReplayBounds, at: datetime,
            account_id: str) -> dict[str, Any]:
    """One account's workings: each position's (or underlying's) contribution and the worst
    scenario of the portfolio grid with its move and volatility state."""
    state = state_for(ledger, bounds, at)
    book = books(state).get(account_id)
    if book is None:
        from clearing.domain.rejections import UnknownAccount

        raise UnknownAccount(account_id, field="account")
    margin = account_margin(state.accounts[account_id].margin_model, book.balances,
                            book.positions, market_at(state, at), params_at(state, at))
    requirement = margin.requirement
    return {
        **margin_row(account_id, margin),
        "at": at.isoformat(),
        "contributions": [
            {"symbol": c.symbol, "initial": _text(c.initial),
             "maintenance": _text(c.maintenance)} for c in requirement.contributions
        ],
        "worst_scenarios": [
            {"underlying": w.underlying, "move": f"{w.move:+.4f}", "vol_state": w.vol_state,
             "loss": _text(w.loss)} for w in requirement.worst
        ],
    }
