"""Risk measures behind the dynamic parameters and the risk managers' reports (SPEC section 5).

Daily index log returns, their EWMA volatility, the portfolio price range R that volatility
sets (with EMIR's anti-procyclicality floor), and the historical value at risk and expected
shortfall of an account's portfolio. Pure: the caller reads marks from the store; these
functions only compute. Volatility and VaR are float risk models; what leaves this module as
money or as a parameter is a Decimal, rounded in the clearing house's favour (up).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import NamedTuple

import numpy as np

from clearing.domain.margin import (
    HeldPosition,
    Market,
    exposures_of,
    group_pnl,
    unit_pnl,
)
from clearing.domain.money import requirement_usd
from clearing.domain.risk_parameters import RiskParameters

RANGE_QUANTUM = Decimal("0.0001")
RAW_RANGE_QUANTUM = Decimal("0.00000001")
LOSS_QUANTUM = Decimal("0.000001")
VAR_RETURNS_MIN = 2
"""Fewer joint daily returns than this and VaR is not reported (None): one day is no history."""
VAR_VOL_FLOOR = 0.01
"""Options are revalued at their own volatility, floored here as in the portfolio model (the
default of its vol_floor); one with none known is priced at the floor."""


class NaiveTimestamp(ValueError):
    def __init__(self, value: datetime):
        super().__init__(f"index mark time {value.isoformat()} has no time zone")
        self.value = value


class NonPositivePrice(ValueError):
    def __init__(self, at: datetime, price: Decimal):
        super().__init__(f"index mark at {at.isoformat()} has price {price}: must be > 0")
        self.at = at
        self.price = price


def daily_log_returns(index_marks: Sequence[tuple[datetime, Decimal]]) -> list[float]:
    """ln(close_d / close_d-1) between consecutive days that have marks, oldest first.

    A day's close is its last mark by time in UTC. A day without marks is skipped, not filled:
    the return across the gap spans more than one day (the store holds marks every few
    minutes, so a gap is an outage, not a market closure).
    """
    closes: dict[date, tuple[datetime, Decimal]] = {}
    for at, price in index_marks:
        if at.tzinfo is None or at.utcoffset() is None:
            raise NaiveTimestamp(at)
        if price <= 0:
            raise NonPositivePrice(at, price)
        at_utc = at.astimezone(timezone.utc)
        day = at_utc.date()
        current = closes.get(day)
        if current is None or at_utc >= current[0]:
            closes[day] = (at_utc, price)
    prices = [float(closes[day][1]) for day in sorted(closes)]
    return [math.log(today / yesterday) for yesterday, today in zip(prices, prices[1:])]


def ewma_volatility(returns: Sequence[float], lam: float = 0.94) -> float:
    """RiskMetrics EWMA daily volatility: var_t = lam x var_t-1 + (1 - lam) x r_t^2, mean 0.

    Seeded with the first squared return, then every later return is folded in, the latest
    last; the result is the volatility after the latest return. Raises on an empty series.
    """
    if not returns:
        raise ValueError("EWMA volatility needs at least one return")
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1), got {lam!r}")
    variance = returns[0] ** 2
    for r in returns[1:]:
        variance = lam * variance + (1.0 - lam) * r * r
    return math.sqrt(variance)


class ValueAtRisk(NamedTuple):
    """Losses (positive) in USD over the margin period of risk, rounded up to cents."""

    var: Decimal
    expected_shortfall: Decimal


def historical_var(positions: Sequence[HeldPosition], market: Market,
                   returns_by_underlying: Mapping[str, Sequence[float]],
                   confidence: float = 0.99, horizon_days: int = 2,
                   vol_floor: float = VAR_VOL_FLOOR) -> ValueAtRisk | None:
    """Historical one-day VaR and expected shortfall of a portfolio, scaled by sqrt(horizon).

    Each historical day is a scenario: every underlying moves by e^r - 1 of its return that
    day. Futures and perpetuals gain units x price x move; options are repriced with Black-76
    at F = U e^r, their volatility and time to expiry unchanged (an instantaneous shock, as in
    the portfolio model). Return series are aligned by their ends (all end on the latest
    day; the caller builds them from one store), and only the days every held underlying has
    are used. With the k = ceil((1 - confidence) x n) worst losses of n days, VaR is the
    smallest of them (the empirical quantile) and ES their mean. A VaR below 0 (the portfolio
    gains on all but the best days) is reported as it is.

    Returns None when a held underlying has fewer than VAR_RETURNS_MIN joint returns; an
    empty portfolio has VaR and ES 0.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if horizon_days < 1:
        raise ValueError(f"horizon_days must be at least 1, got {horizon_days!r}")
    exposures = exposures_of([positions], market)
    if exposures.units.size == 0:
        return ValueAtRisk(Decimal("0.00"), Decimal("0.00"))
    series = [returns_by_underlying.get(name, ()) for name in exposures.underlyings]
    n_days = min(len(returns) for returns in series)
    if n_days < VAR_RETURNS_MIN:
        return None
    log_returns = np.array([list(returns)[-n_days:] for returns in series], dtype=float)
    moves = np.expm1(log_returns)
    pnl = group_pnl(exposures, unit_pnl(exposures, moves, None, vol_floor)).sum(axis=0)
    losses = np.sort(-pnl)[::-1]
    tail_share = Decimal(1) - Decimal(str(confidence))
    tail = max(1, math.ceil(tail_share * n_days))
    scale = math.sqrt(horizon_days)
    var = float(losses[tail - 1]) * scale
    expected_shortfall = float(losses[:tail].mean()) * scale
    return ValueAtRisk(_loss_usd(var), _loss_usd(expected_shortfall))


def _loss_usd(value: float) -> Decimal:
    return requirement_usd(Decimal(value).quantize(LOSS_QUANTUM, rounding=ROUND_HALF_EVEN))


@dataclass(frozen=True)
class RangeDecision:
    """A portfolio price range R and what produced it (what a RiskParametersSet records)."""

    value: Decimal
    raw: Decimal  # z x sigma x sqrt(mpor), before the floor, the cap and anti-procyclicality
    floor_applied: bool  # the anti-procyclicality floor (75% of the trailing high) bound
    inputs: dict[str, str] = field(default_factory=dict)


def dynamic_range(sigma_daily: float, params: RiskParameters,
                  trailing_max: Decimal | None) -> RangeDecision:
    """SPEC 5: R = clamp(z x sigma_daily x sqrt(mpor), range_floor, range_cap), then never below
    range_anti_procyclical_floor x trailing_max (EMIR RTS Art. 28: R follows volatility up at
    once and down by at most 25% of its trailing 365-day high). trailing_max is that high
    (None without history). R is rounded up to 4 decimals (a wider range is the prudent
    side); raw is reported to 8 decimals.
    """
    if not math.isfinite(sigma_daily) or sigma_daily < 0:
        raise ValueError(f"sigma_daily must be a finite number >= 0, got {sigma_daily!r}")
    sigma = Decimal(repr(sigma_daily))
    mpor = params.margin_period_of_risk_days
    raw = params.range_confidence_z * sigma * mpor.sqrt()
    clamped = min(max(raw, params.range_floor), params.range_cap)
    floor = None if trailing_max is None \
        else params.range_anti_procyclical_floor * trailing_max
    floor_applied = floor is not None and floor > clamped
    value = floor if floor_applied and floor is not None else clamped
    inputs = {
        "sigma_daily": repr(sigma_daily),
        "confidence_z": str(params.range_confidence_z),
        "margin_period_of_risk_days": str(mpor),
        "range_floor": str(params.range_floor),
        "range_cap": str(params.range_cap),
        "anti_procyclical_floor": str(params.range_anti_procyclical_floor),
        "trailing_max": "" if trailing_max is None else str(trailing_max),
    }
    return RangeDecision(
        value=value.quantize(RANGE_QUANTUM, rounding=ROUND_CEILING),
        raw=raw.quantize(RAW_RANGE_QUANTUM, rounding=ROUND_HALF_EVEN),
        floor_applied=floor_applied,
        inputs=inputs,
    )
