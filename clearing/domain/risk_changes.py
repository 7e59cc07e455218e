"""Deciding risk parameter changes: set by hand (`clearing risk set`), or by the daily risk
job from the volatility of the index (SPEC section 5, "Dynamic parameters")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from clearing.domain.clock import storage_time
from clearing.domain.commands import NewFact
from clearing.domain.events import RiskParametersSet
from clearing.domain.instruments import UNDERLYINGS
from clearing.domain.ledger import LedgerState
from clearing.domain.rejections import Rejected
from clearing.domain.risk_measures import daily_log_returns, dynamic_range, ewma_volatility
from clearing.domain.risk_parameters import (
    ParameterChange,
    RiskParameters,
    check_change,
    parameters_in_force,
)

RISK_STREAM = "risk-parameters"
TRAILING_WINDOW = timedelta(days=365)
RETURNS_MIN = 2
"""Fewer daily returns than this give no volatility estimate: the range is left alone."""


def current_value(params: RiskParameters, name: str, underlying: str | None) -> Decimal:
    value = getattr(params, name)
    if underlying is not None:
        return Decimal(value.get(underlying, Decimal(0)))
    return Decimal(value)


def decide_set_parameter(changes: Sequence[ParameterChange], name: str,
                         underlying: str | None, value: Decimal, at: datetime,
                         actor: str) -> list[NewFact]:
    try:
        check_change(name, underlying, value)
    except ValueError as exc:
        raise Rejected("name" if "unknown" in str(exc) else "value", str(exc), value) from None
    # `previous` is the value in force just before `at`. Changes effective at `at` itself are
    # left out: one of them may be this very command's first recording, and a replayed
    # command must decide the same fact under the same key (SPEC section 6, invariant 6).
    before = [c for c in changes if c.effective_at < at]
    previous = current_value(parameters_in_force(before, at), name, underlying)
    event = RiskParametersSet(name=name, underlying=underlying, value=value, previous=previous,
                              reason="set by hand", inputs={"actor": actor})
    key = f"risk:set:{name}:{underlying or '-'}:{storage_time(at)}"
    return [NewFact(RISK_STREAM, event, key, at)]


def trailing_high(changes: Sequence[ParameterChange], underlying: str,
                  at: datetime) -> Decimal:
    """The highest portfolio range in force at any moment of the trailing 365 days."""
    start = at - TRAILING_WINDOW
    ranges = [c for c in changes if c.name == "portfolio_range" and c.underlying == underlying]
    high = parameters_in_force(ranges, start).portfolio_range[underlying]
    for change in ranges:
        if start < change.effective_at <= at:
            high = max(high, change.value)
    return high


def decide_dynamic_ranges(state: LedgerState, at: datetime, batch_id: str,
                          index_history: Mapping[str, Sequence[tuple[datetime, Decimal]]]
                          ) -> list[NewFact]:
    """The risk job: R follows EWMA volatility up at once, down no faster than the
    anti-procyclical floor (75% of the trailing high) allows."""
    changes = list(state.risk_changes.values())
    params = parameters_in_force(changes, at)
    facts = []
    for underlying in UNDERLYINGS:
        history = [(t, p) for t, p in index_history.get(underlying, ()) if t <= at]
        returns = daily_log_returns(history)
        if len(returns) < RETURNS_MIN:
            continue
        sigma = ewma_volatility(returns, float(params.ewma_lambda))
        decision = dynamic_range(sigma, params, trailing_high(changes, underlying, at))
        current = params.portfolio_range[underlying]
        if decision.value == current:
            continue
        inputs = {k: str(v) for k, v in decision.inputs.items()}
        inputs["returns"] = str(len(returns))
        inputs["raw_range"] = str(decision.raw)
        inputs["floor_applied"] = "true" if decision.floor_applied else "false"
        event = RiskParametersSet(name="portfolio_range", underlying=underlying,
                                  value=decision.value, previous=current, reason="risk job",
                                  inputs=inputs)
        facts.append(NewFact(RISK_STREAM, event, f"{batch_id}:portfolio_range:{underlying}",
                             at))
    return facts
