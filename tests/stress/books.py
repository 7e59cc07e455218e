"""Small books for the stress tests, stated as the back office would: who holds what."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from clearing.domain.instruments import Instrument
from clearing.domain.ledger import Mark
from clearing.domain.margin import HeldPosition, Market
from clearing.domain.risk_parameters import DEFAULTS
from clearing.domain.stress import CascadeParameters, StressAccount, StressBook

D = Decimal
AT = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
EXPIRY = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)  # 29 days and 20 hours after AT
BTC_PERP = Instrument(symbol="BTC-PERP", kind="perpetual", underlying="BTC",
                      settlement_asset="USDC", multiplier=D(1))
ETH_PERP = Instrument(symbol="ETH-PERP", kind="perpetual", underlying="ETH",
                      settlement_asset="USDC", multiplier=D(1))


def option(symbol: str, expiry: datetime = EXPIRY) -> Instrument:
    underlying, _, strike, flag = symbol.split("-")
    return Instrument(symbol=symbol, kind="option", underlying=underlying,
                      settlement_asset="USDC", expiry=expiry, strike=D(strike),
                      option_type="call" if flag == "C" else "put", multiplier=D(1))


def held(instrument: Instrument, quantity: str, price: str) -> HeldPosition:
    """A position opened by one fill at `price`."""
    q = D(quantity)
    return HeldPosition(instrument, q, q * D(price), D(price))


def account(account_id: str, balances: dict[str, str], *positions: HeldPosition,
            model: str = "standard") -> StressAccount:
    return StressAccount(account_id, model, {a: D(v) for a, v in balances.items()},
                         list(positions))


def market(index: dict[str, str], marks: dict[str, tuple[str, str | None]]) -> Market:
    return Market(AT, {u: D(p) for u, p in index.items()},
                  {s: Mark(D(p), None if iv is None else D(iv), AT, n)
                   for n, (s, (p, iv)) in enumerate(marks.items(), start=1)})


def book(accounts: list[StressAccount], at_market: Market) -> StressBook:
    return StressBook(accounts, at_market, DEFAULTS)


def cascade(**depth: str) -> CascadeParameters:
    return CascadeParameters(depth_usd={u: D(v) for u, v in depth.items()})
