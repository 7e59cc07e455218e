"""Risk parameters: every number margin depends on, as data with SPEC section 5's defaults.

A parameter changes only through a `RiskParametersSet` event, so margin at any past moment is
computed with the parameters then in force, and a replay reproduces it. Per-underlying
parameters (haircuts, portfolio price ranges) are keyed by asset.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict

D = Decimal


class RiskParameters(BaseModel):
    """The parameters in force at one moment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    haircut: dict[str, Decimal] = {"USDC": D("0"), "BTC": D("0.10"), "ETH": D("0.15")}
    """Collateral haircut per asset: a positive balance counts at price × (1 − haircut)."""
    futures_initial_rate: Decimal = D("0.02")
    futures_maintenance_rate: Decimal = D("0.01")
    futures_size_rate: Decimal = D("0.00005")
    """Added to both rates per unit of position size in the underlying (0.005%)."""
    short_call_initial_rate: Decimal = D("0.15")
    short_option_initial_floor_rate: Decimal = D("0.10")
    short_option_maintenance_rate: Decimal = D("0.075")
    short_put_initial_rate: Decimal = D("0.15")
    portfolio_range: dict[str, Decimal] = {"BTC": D("0.16"), "ETH": D("0.18")}
    """R: the largest price move of the portfolio grid, per underlying."""
    portfolio_steps: int = 4
    """Grid steps each side of zero (9 moves with 4)."""
    vol_up_factor: Decimal = D("0.5")
    vol_down_factor: Decimal = D("0.25")
    vol_short_dated_exponent: Decimal = D("0.3")
    vol_long_dated_exponent: Decimal = D("0.13")
    vol_short_dated_days: Decimal = D("30")
    vol_floor: Decimal = D("0.01")
    extreme_move_multiple: Decimal = D("2")
    extreme_move_weight: Decimal = D("0.35")
    short_option_minimum_rate: Decimal = D("0.005")
    maintenance_factor: Decimal = D("0.8")
    liquidation_fee_rate: Decimal = D("0.005")
    range_floor: Decimal = D("0.08")
    range_cap: Decimal = D("0.50")
    range_anti_procyclical_floor: Decimal = D("0.75")
    """EMIR anti-procyclicality: R never falls below 75% of its trailing 365-day high."""
    ewma_lambda: Decimal = D("0.94")
    range_confidence_z: Decimal = D("2.576")
    margin_period_of_risk_days: Decimal = D("2")


PER_ASSET = ("haircut", "portfolio_range")
DEFAULTS = RiskParameters()


class UnknownRiskParameter(ValueError):
    def __init__(self, name: str):
        super().__init__(f"unknown risk parameter {name!r} (known: "
                         f"{', '.join(sorted(RiskParameters.model_fields))})")
        self.name = name


@dataclass(frozen=True)
class ParameterChange:
    """One parameter's new value from an effective time on (what the event records)."""

    name: str
    underlying: str | None
    value: Decimal
    effective_at: datetime
    position: int


def check_change(name: str, underlying: str | None, value: Decimal) -> None:
    """Refuse a change that names no parameter, misuses `--underlying`, or is out of range."""
    if name not in RiskParameters.model_fields:
        raise UnknownRiskParameter(name)
    if (name in PER_ASSET) != (underlying is not None):
        raise ValueError(f"{name} {'needs' if name in PER_ASSET else 'takes no'} --underlying")
    if name == "portfolio_steps":
        if value != value.to_integral_value() or not 1 <= value <= 20:
            raise ValueError("portfolio_steps must be a whole number from 1 to 20")
        return
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    if name in ("haircut", "maintenance_factor", "extreme_move_weight", "ewma_lambda",
                "range_anti_procyclical_floor") and value > 1:
        raise ValueError(f"{name} must be at most 1")


def parameters_in_force(changes: Iterable[ParameterChange],
                        at: datetime | None = None) -> RiskParameters:
    """Defaults overlaid with every change effective at or before `at`, in log order."""
    values = DEFAULTS.model_dump()
    for change in sorted(changes, key=lambda c: (c.effective_at, c.position)):
        if at is not None and change.effective_at > at:
            continue
        if change.underlying is None:
            values[change.name] = (int(change.value) if change.name == "portfolio_steps"
                                   else change.value)
        else:
            values[change.name] = {**values[change.name], change.underlying: change.value}
    return RiskParameters(**values)
