"""What a position is worth at its marks: unrealised P&L and the greeks a trading screen shows.

Futures and perpetuals are valued against their last settlement (that is what the next
variation margin pays); options against their entry price, with Black-76 greeks on the
underlying's index price as the forward and the option's implied volatility from its mark
(or implied from the mark price when the mark gives none).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from clearing.domain.instruments import Instrument
from clearing.domain.ledger import Mark, Position
from clearing.domain.pricing import ImpliedVolatilityError, black76, implied_vol

SECONDS_PER_YEAR = 365 * 24 * 3600


@dataclass(frozen=True)
class PositionValuation:
    mark_price: Decimal | None
    unrealised_pnl: Decimal | None
    delta: float
    gamma: float
    vega: float
    theta: float


def years_to_expiry(instrument: Instrument, at: datetime) -> float:
    if instrument.expiry is None:
        return 0.0
    return max((instrument.expiry - at).total_seconds(), 0.0) / SECONDS_PER_YEAR


def option_volatility(instrument: Instrument, mark: Mark | None, index: Decimal | None,
                      at: datetime) -> float | None:
    """The option's implied volatility: from its mark, else implied from its mark price."""
    if mark is None:
        return None
    if mark.iv is not None:
        return float(mark.iv)
    if index is None or instrument.strike is None:
        return None
    t_years = years_to_expiry(instrument, at)
    if t_years <= 0:
        return None
    try:
        return implied_vol(str(instrument.option_type), float(index), float(instrument.strike),
                           float(mark.price), t_years)
    except ImpliedVolatilityError:
        return None


def value_position(instrument: Instrument, position: Position, marks: Mapping[str, Mark],
                   at: datetime) -> PositionValuation:
    mark = marks.get(instrument.symbol)
    index_mark = marks.get(instrument.underlying)
    index = None if index_mark is None else index_mark.price
    units = position.quantity * instrument.multiplier
    mark_price = None if mark is None else mark.price
    if instrument.is_linear_delta_one:
        pnl = None if mark_price is None else \
            (position.quantity * mark_price - position.settlement_basis) * instrument.multiplier
        return PositionValuation(mark_price, pnl, float(units), 0.0, 0.0, 0.0)
    pnl = None if mark_price is None else \
        units * (mark_price - position.average_entry_price)
    vol = option_volatility(instrument, mark, index, at)
    if vol is None or index is None or instrument.strike is None:
        return PositionValuation(mark_price, pnl, 0.0, 0.0, 0.0, 0.0)
    greeks = black76(str(instrument.option_type), float(index), float(instrument.strike), vol,
                     years_to_expiry(instrument, at))
    scale = float(units)
    return PositionValuation(mark_price, pnl, greeks.delta * scale, greeks.gamma * scale,
                             greeks.vega * scale, greeks.theta * scale)
