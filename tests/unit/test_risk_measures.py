"""Risk measures: daily returns, EWMA volatility, historical VaR / ES and the dynamic range."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal

import pytest

from clearing.domain.instruments import Instrument
from clearing.domain.ledger import Mark
from clearing.domain.margin import HeldPosition, Market
from clearing.domain.pricing import black76
from clearing.domain.risk_measures import (
    NaiveTimestamp,
    RangeDecision,
    ValueAtRisk,
    daily_log_returns,
    dynamic_range,
    ewma_volatility,
    historical_var,
)
from clearing.domain.risk_parameters import DEFAULTS

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

D = Decimal
UTC = timezone.utc
AT = datetime(2026, 6, 1, 8, tzinfo=UTC)
JUN26 = datetime(2026, 6, 26, 8, tzinfo=UTC)
CET = timezone(timedelta(hours=2))

PERP = Instrument(symbol="BTC-PERP", kind="perpetual", underlying="BTC",
                  settlement_asset="USDC", multiplier=D(1))
ETH_PERP = Instrument(symbol="ETH-PERP", kind="perpetual", underlying="ETH",
                      settlement_asset="USDC", multiplier=D(1))
PUT = Instrument(symbol="BTC-26JUN26-100000-P", kind="option", underlying="BTC",
                 settlement_asset="USDC", expiry=JUN26, strike=D(100000), option_type="put",
                 multiplier=D(1))
MARKET = Market(AT, {"BTC": D(100000), "ETH": D(2000)}, {
    "BTC-PERP": Mark(D(100000), None, AT, 1),
    "ETH-PERP": Mark(D(2000), None, AT, 2),
    PUT.symbol: Mark(D(6000), D("0.6"), AT, 3),
})


def held(instrument: Instrument, quantity: str) -> HeldPosition:
    price = MARKET.marks[instrument.symbol].price
    return HeldPosition(instrument, D(quantity), D(quantity) * price, price)


def cents_up(value: float) -> Decimal:
    return D(repr(value)).quantize(D("0.01"), rounding=ROUND_CEILING)


# --- daily returns -------------------------------------------------------------------------


def test_daily_log_returns_take_each_utc_days_last_mark():
    marks = [
        (datetime(2026, 5, 2, 23, 0, tzinfo=UTC), D("110")),
        (datetime(2026, 5, 1, 9, 0, tzinfo=UTC), D("90")),
        (datetime(2026, 5, 1, 23, 59, tzinfo=UTC), D("100")),  # 1 May close
        (datetime(2026, 5, 3, 1, 30, tzinfo=CET), D("999")),  # 2 May 23:30 UTC: 2 May close
        (datetime(2026, 5, 3, 12, 0, tzinfo=UTC), D("99")),
        (datetime(2026, 5, 5, 12, 0, tzinfo=UTC), D("108.9")),  # 4 May missing: spans 2 days
    ]
    returns = daily_log_returns(marks)
    assert returns == pytest.approx([math.log(9.99), math.log(99 / 999), math.log(1.1)])


def test_daily_log_returns_need_two_days_and_zoned_times():
    assert daily_log_returns([(AT, D(1)), (AT + timedelta(hours=1), D(2))]) == []
    with pytest.raises(NaiveTimestamp):
        daily_log_returns([(datetime(2026, 5, 1), D(1))])


# --- EWMA volatility -----------------------------------------------------------------------


def test_ewma_volatility_by_hand():
    # seed 0.01^2 = 1e-4; then 0.94 x 1e-4 + 0.06 x 4e-4 = 1.18e-4;
    # then 0.94 x 1.18e-4 + 0.06 x 9e-4 = 1.6492e-4
    assert ewma_volatility([0.01, -0.02, 0.03]) == pytest.approx(math.sqrt(1.6492e-4))
    assert ewma_volatility([0.05]) == pytest.approx(0.05)
    assert ewma_volatility([0.01, -0.02], lam=0.5) == pytest.approx(math.sqrt(2.5e-4))


def test_ewma_volatility_needs_returns():
    with pytest.raises(ValueError):
        ewma_volatility([])


# --- historical VaR and expected shortfall -------------------------------------------------


def test_var_of_a_long_perpetual_is_its_second_worst_day_of_two_hundred():
    returns = [0.0] * 200
    returns[17], returns[50], returns[120] = -0.10, -0.05, -0.02
    result = historical_var([held(PERP, "2")], MARKET, {"BTC": returns})
    losses = [2 * 100_000 * -math.expm1(r) for r in (-0.10, -0.05)]
    # k = ceil(1% x 200) = 2 worst days: VaR is the 2nd worst loss, ES their mean; x sqrt(2)
    assert result == ValueAtRisk(cents_up(losses[1] * math.sqrt(2)),
                                 cents_up(sum(losses) / 2 * math.sqrt(2)))


def test_var_of_a_short_is_set_by_the_rallies_and_one_day_needs_no_scaling():
    returns = [0.01 * (i % 7 - 3) for i in range(100)]  # worst rally +3%
    var, expected_shortfall = historical_var([held(PERP, "-1")], MARKET, {"BTC": returns},
                                             horizon_days=1)
    assert var == expected_shortfall == cents_up(100_000 * math.expm1(0.03))


def test_var_aligns_underlyings_by_their_latest_days():
    # BTC has a long history; ETH only the last 100 days. The old BTC crash is dropped, and on
    # the joint days BTC's -4% comes with ETH's +10%, which the short ETH loses more on.
    btc = [-0.5] + [0.0] * 99 + [0.0] * 99 + [-0.04]
    eth = [0.0] * 99 + [0.10]
    result = historical_var([held(PERP, "1"), held(ETH_PERP, "-100")], MARKET,
                            {"BTC": btc, "ETH": eth})
    joint_loss = 100_000 * -math.expm1(-0.04) + 100 * 2000 * math.expm1(0.10)
    assert result is not None
    assert result.var == cents_up(joint_loss * math.sqrt(2))


def test_var_revalues_options_with_black_76():
    returns = [0.0] * 99 + [-0.2]
    var, _ = historical_var([held(PUT, "-1")], MARKET, {"BTC": returns})
    t_years = 25 / 365
    base = black76("put", 100_000.0, 100_000.0, 0.6, t_years).price
    crashed = black76("put", 100_000.0 * math.exp(-0.2), 100_000.0, 0.6, t_years).price
    assert abs(var - cents_up((crashed - base) * math.sqrt(2))) <= D("0.01")


def test_var_needs_history_for_every_underlying_held():
    assert historical_var([held(PERP, "1")], MARKET, {"BTC": [0.01]}) is None
    assert historical_var([held(PERP, "1"), held(ETH_PERP, "1")], MARKET,
                          {"BTC": [0.01] * 50}) is None
    assert historical_var([], MARKET, {}) == ValueAtRisk(D("0.00"), D("0.00"))


# --- dynamic range -------------------------------------------------------------------------


def test_dynamic_range_from_volatility_rounded_up():
    decision = dynamic_range(0.03, DEFAULTS, None)
    raw = 2.576 * 0.03 * math.sqrt(2)  # 0.10929...
    assert decision.value == D("0.1093")
    assert decision.raw == D(repr(raw)).quantize(D("0.00000001"))
    assert not decision.floor_applied
    assert decision.inputs["sigma_daily"] == "0.03"


def test_dynamic_range_is_clamped_between_floor_and_cap():
    assert dynamic_range(0.001, DEFAULTS, None).value == D("0.0800")
    assert dynamic_range(0.5, DEFAULTS, None).value == D("0.5000")


def test_dynamic_range_follows_volatility_up_at_once_and_down_slowly():
    sigmas = [0.03, 0.08, 0.02, 0.02, 0.065]
    trailing_max: Decimal | None = None
    decisions: list[RangeDecision] = []
    for sigma in sigmas:
        decision = dynamic_range(sigma, DEFAULTS, trailing_max)
        decisions.append(decision)
        trailing_max = decision.value if trailing_max is None \
            else max(trailing_max, decision.value)
    values = [d.value for d in decisions]
    assert values[1] == D("0.2915")  # 2.576 x 0.08 x sqrt(2) = 0.29144...: up at once
    assert values[2] == values[3] == D("0.2187")  # 75% of 0.2915 = 0.218625, rounded up
    assert [d.floor_applied for d in decisions] == [False, False, True, True, False]
    assert values[4] == D("0.2368")  # 2.576 x 0.065 x sqrt(2) = 0.23679...: above the floor
