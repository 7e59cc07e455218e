"""Black-76 pricing: the SPEC's worked example, parity, greeks, limits and implied volatility."""

import ast
import inspect
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clearing.domain import pricing
from clearing.domain.pricing import (
    IMPLIED_VOL_MIN,
    ImpliedVolatilityError,
    OptionValue,
    black76,
    black76_greeks,
    black76_price,
    implied_vol,
)

# Any RuntimeWarning from numpy (overflow, divide by zero, invalid) fails the test.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

ONE_DAY = 1.0 / 365.0

prices_usd = st.floats(min_value=1e-4, max_value=1e7)
vols = st.floats(min_value=0.0, max_value=5.0)
years = st.floats(min_value=-1.0, max_value=30.0)
rates = st.floats(min_value=-0.05, max_value=0.5)
option_types = st.sampled_from(["call", "put"])


def intrinsic(option_type: str, forward: float, strike: float) -> float:
    return max(forward - strike, 0.0) if option_type == "call" else max(strike - forward, 0.0)


def price(option_type, forward, strike, vol, t_years, rate=0.0) -> float:
    return black76(option_type, forward, strike, vol, t_years, rate).price


# --- the worked example ----------------------------------------------------------------------


@pytest.mark.parametrize("option_type", ["call", "put"])
def test_at_the_money_option_on_a_future_matches_the_worked_example(option_type):
    # SPEC / issue: F = K = 20, r = 9%, sigma = 25%, four months -> 1.1166 for call and put.
    value = black76(option_type, forward=20.0, strike=20.0, vol=0.25, t_years=4 / 12, rate=0.09)
    assert round(value.price, 4) == 1.1166


def test_worked_example_greeks_have_screen_conventions():
    call = black76("call", 20.0, 20.0, 0.25, 4 / 12, 0.09)
    put = black76("put", 20.0, 20.0, 0.25, 4 / 12, 0.09)
    discount = math.exp(-0.09 * 4 / 12)
    assert call.delta - put.delta == pytest.approx(discount, rel=1e-12)
    assert call.gamma == put.gamma > 0
    assert call.vega == put.vega
    # A 1-point vol rise is worth about a hundredth of the full vega derivative, here ~0.045.
    assert 0.04 < call.vega < 0.05
    # One day of decay on a 1.12 option with 4 months left: a few tenths of a cent.
    assert -0.01 < call.theta < 0


# --- parity ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(forward=prices_usd, strike=prices_usd, vol=vols, t_years=years, rate=rates)
def test_put_call_parity_holds_everywhere(forward, strike, vol, t_years, rate):
    call = black76("call", forward, strike, vol, t_years, rate)
    put = black76("put", forward, strike, vol, t_years, rate)
    discount = math.exp(-rate * max(t_years, 0.0))
    tolerance = 1e-12 * (forward + strike)
    assert call.price - put.price == pytest.approx(discount * (forward - strike), abs=tolerance)
    assert call.delta - put.delta == pytest.approx(discount, abs=1e-12)
    assert call.gamma == put.gamma
    assert call.vega == put.vega


@settings(max_examples=200, deadline=None)
@given(
    option_type=option_types,
    forward=prices_usd,
    strike=prices_usd,
    vol=vols,
    t_years=years,
    rate=rates,
)
def test_value_is_finite_and_within_no_arbitrage_bounds(
    option_type, forward, strike, vol, t_years, rate
):
    value = black76(option_type, forward, strike, vol, t_years, rate)
    assert all(math.isfinite(getattr(value, name)) for name in OptionValue.__annotations__)
    discount = math.exp(-rate * max(t_years, 0.0))
    ceiling = forward if option_type == "call" else strike
    # 1e-12 of slack: numpy's exp and math's exp may differ in the last bit.
    assert discount * intrinsic(option_type, forward, strike) * (1 - 1e-12) <= value.price
    assert value.price <= discount * ceiling * (1 + 1e-12)
    assert value.price >= price(option_type, forward, strike, 0.0, t_years, rate)
    assert value.gamma >= 0 and value.vega >= 0
    if rate == 0.0:
        # Without carry, time passing never adds value: theta is a difference of two prices,
        # so it may show their rounding (a deep put worth 3.6e6 to the last bit), no more.
        assert value.theta <= 1e-12 * ceiling


def test_volatility_never_makes_an_option_worth_less_than_the_deterministic_forward():
    # Exactly, not within a tolerance: F N(d1) - K N(d2) can round below intrinsic, and an
    # implied volatility solver fed such a price would see an arbitrage that is not there.
    rng = np.random.default_rng(20261227)
    size = 100_000
    forward = 10 ** rng.uniform(-4, 7, size)
    strike = forward * np.exp(rng.uniform(-3, 3, size))
    t_years = rng.uniform(0, 5, size)
    rate = rng.uniform(-0.05, 0.5, size)
    is_call = rng.random(size) < 0.5
    with_vol = black76_price(is_call, forward, strike, rng.uniform(0, 2, size), t_years, rate)
    deterministic = black76_price(is_call, forward, strike, 0.0, t_years, rate)
    assert np.all(with_vol >= deterministic)


# --- greeks against finite differences -------------------------------------------------------

greek_cases = [
    # option_type, forward, strike, vol, t_years, rate
    ("call", 20.0, 20.0, 0.25, 4 / 12, 0.09),
    ("put", 20.0, 20.0, 0.25, 4 / 12, 0.09),
    ("call", 100_000.0, 90_000.0, 0.6, 0.25, 0.0),
    ("put", 100_000.0, 90_000.0, 0.6, 0.25, 0.0),
    ("call", 3_000.0, 4_000.0, 0.8, 2.0, 0.03),
    ("put", 3_000.0, 2_000.0, 1.2, 0.05, -0.01),
]


@pytest.mark.parametrize("option_type, forward, strike, vol, t_years, rate", greek_cases)
def test_delta_and_gamma_match_finite_differences_in_the_forward(
    option_type, forward, strike, vol, t_years, rate
):
    value = black76(option_type, forward, strike, vol, t_years, rate)
    bump = 1e-4 * forward
    up = price(option_type, forward + bump, strike, vol, t_years, rate)
    down = price(option_type, forward - bump, strike, vol, t_years, rate)
    assert value.delta == pytest.approx((up - down) / (2 * bump), rel=1e-6, abs=1e-9)
    bump = 1e-3 * forward
    up = price(option_type, forward + bump, strike, vol, t_years, rate)
    down = price(option_type, forward - bump, strike, vol, t_years, rate)
    second = (up - 2 * value.price + down) / bump**2
    assert value.gamma == pytest.approx(second, rel=1e-4)


@pytest.mark.parametrize("option_type, forward, strike, vol, t_years, rate", greek_cases)
def test_vega_is_the_value_of_one_volatility_point(
    option_type, forward, strike, vol, t_years, rate
):
    value = black76(option_type, forward, strike, vol, t_years, rate)
    bump = 1e-5
    up = price(option_type, forward, strike, vol + bump, t_years, rate)
    down = price(option_type, forward, strike, vol - bump, t_years, rate)
    assert value.vega == pytest.approx((up - down) / (2 * bump) * 0.01, rel=1e-6)


@pytest.mark.parametrize("option_type, forward, strike, vol, t_years, rate", greek_cases)
def test_theta_is_one_calendar_day_of_decay(option_type, forward, strike, vol, t_years, rate):
    value = black76(option_type, forward, strike, vol, t_years, rate)
    tomorrow = price(option_type, forward, strike, vol, t_years - ONE_DAY, rate)
    assert value.theta == pytest.approx(tomorrow - value.price, rel=1e-12, abs=1e-12)
    # Away from expiry the day's change is close to the analytic rate -dV/dT over 365 days.
    bump = 1e-5
    longer = price(option_type, forward, strike, vol, t_years + bump, rate)
    shorter = price(option_type, forward, strike, vol, t_years - bump, rate)
    analytic_per_day = -(longer - shorter) / (2 * bump) / 365
    assert value.theta == pytest.approx(analytic_per_day, rel=3e-2)


def test_vega_at_zero_volatility_is_the_one_sided_derivative_at_the_money():
    value = black76("call", 50.0, 50.0, 0.0, 1.0, 0.02)
    bump = 1e-7
    one_sided = (price("call", 50.0, 50.0, bump, 1.0, 0.02) - value.price) / bump * 0.01
    assert value.vega == pytest.approx(one_sided, rel=1e-6)
    assert black76("call", 50.0, 40.0, 0.0, 1.0, 0.02).vega == 0.0


# --- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("t_years", [0.0, -ONE_DAY, -3.0])
@pytest.mark.parametrize(
    "option_type, forward, strike, expected_price, expected_delta",
    [
        ("call", 110.0, 100.0, 10.0, 1.0),
        ("call", 90.0, 100.0, 0.0, 0.0),
        ("call", 100.0, 100.0, 0.0, 0.5),
        ("put", 90.0, 100.0, 10.0, -1.0),
        ("put", 110.0, 100.0, 0.0, 0.0),
        ("put", 100.0, 100.0, 0.0, -0.5),
    ],
)
def test_expired_option_is_worth_its_intrinsic_value(
    t_years, option_type, forward, strike, expected_price, expected_delta
):
    value = black76(option_type, forward, strike, vol=0.5, t_years=t_years, rate=0.05)
    assert value == OptionValue(
        price=expected_price, delta=expected_delta, gamma=0.0, vega=0.0, theta=0.0
    )


@pytest.mark.parametrize("vol", [0.0, -0.2])
@pytest.mark.parametrize(
    "option_type, forward, strike, expected_intrinsic, expected_step",
    [
        ("call", 110.0, 100.0, 10.0, 1.0),
        ("call", 90.0, 100.0, 0.0, 0.0),
        ("call", 100.0, 100.0, 0.0, 0.5),
        ("put", 90.0, 100.0, 10.0, -1.0),
        ("put", 110.0, 100.0, 0.0, 0.0),
        ("put", 100.0, 100.0, 0.0, -0.5),
    ],
)
def test_zero_volatility_prices_the_deterministic_forward(
    vol, option_type, forward, strike, expected_intrinsic, expected_step
):
    discount = math.exp(-0.05 * 0.5)
    value = black76(option_type, forward, strike, vol=vol, t_years=0.5, rate=0.05)
    assert value.price == pytest.approx(discount * expected_intrinsic, rel=1e-15)
    assert value.delta == pytest.approx(discount * expected_step, rel=1e-15)
    assert value.gamma == 0.0
    carry = (math.exp(-0.05 * (0.5 - ONE_DAY)) - discount) * expected_intrinsic
    assert value.theta == pytest.approx(carry, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("rate", [0.0, 0.07])
@pytest.mark.parametrize("moneyness", [1e6, 1e-6, 1e150, 1e-150])
def test_deep_in_and_out_of_the_money_options_are_intrinsic(rate, moneyness):
    strike = 1_000.0
    forward = strike * moneyness
    discount = math.exp(-rate * 1.0)
    for option_type in ("call", "put"):
        value = black76(option_type, forward, strike, vol=0.8, t_years=1.0, rate=rate)
        assert all(math.isfinite(getattr(value, name)) for name in OptionValue.__annotations__)
        expected = discount * intrinsic(option_type, forward, strike)
        # Far out of the money the time value survives as a tiny positive number (1e-68 here):
        # right, but invisible next to the notional.
        assert value.price == pytest.approx(expected, rel=1e-12, abs=1e-15 * strike)
        in_the_money = (forward > strike) == (option_type == "call")
        sign = 1.0 if option_type == "call" else -1.0
        assert value.delta == pytest.approx(sign * discount if in_the_money else 0.0, abs=1e-12)
        assert value.gamma == pytest.approx(0.0, abs=1e-15 / strike)
        assert value.vega == pytest.approx(0.0, abs=1e-12 * forward)


@pytest.mark.parametrize(
    "forward, vol, t_years",
    [(1e9, 0.1, 1.0), (150.0, 0.0, 1.0), (150.0, 0.8, 0.0), (150.0, 0.8, -1.0)],
)
def test_a_worthless_put_reports_zeros_not_negative_zeros(forward, vol, t_years):
    # Decimal(-0.0) renders as "-0": a screen would show a short put with a delta of -0.
    value = black76("put", forward, 100.0, vol, t_years, rate=0.05)
    for name in OptionValue.__annotations__:
        assert math.copysign(1.0, getattr(value, name)) == 1.0, name


@pytest.mark.parametrize("option_type, ceiling", [("call", 100.0), ("put", 80.0)])
def test_absurd_volatility_prices_at_the_discounted_ceiling_without_overflow(
    option_type, ceiling
):
    value = black76(option_type, 100.0, 80.0, vol=1e160, t_years=1.0, rate=0.05)
    assert value.price == pytest.approx(math.exp(-0.05) * ceiling, rel=1e-12)
    assert value.gamma == value.vega == 0.0


@pytest.mark.parametrize("hours_left", [23.0, 6.0, 1.0, 1 / 60])
def test_theta_on_the_last_day_is_the_rest_of_the_time_value(hours_left):
    t_years = hours_left / 24 / 365
    value = black76("call", 100.0, 100.0, 0.9, t_years)
    assert value.theta == pytest.approx(0.0 - value.price, rel=1e-12)
    assert value.theta < 0
    assert math.isfinite(value.gamma)


def test_theta_shrinks_to_zero_as_the_at_the_money_option_expires():
    thetas = [abs(black76("put", 100.0, 100.0, 0.9, minutes / 60 / 24 / 365).theta)
              for minutes in (60.0, 1.0, 1e-6)]
    assert thetas == sorted(thetas, reverse=True)
    assert thetas[-1] < 1e-4


# --- vectorised against scalar ---------------------------------------------------------------


def test_vectorised_greeks_equal_scalar_values_element_by_element():
    grid = np.meshgrid(
        np.array([True, False]),
        np.array([50.0, 99.0, 100.0, 101.0, 250.0]),
        np.array([100.0]),
        np.array([0.0, 0.3, 1.5]),
        np.array([-0.1, 0.0, 0.5 * ONE_DAY, 0.25, 3.0]),
        np.array([0.0, 0.05]),
        indexing="ij",
    )
    is_call, forward, strike, vol, t_years, rate = grid
    vectorised = black76_greeks(is_call, forward, strike, vol, t_years, rate)
    prices_only = black76_price(is_call, forward, strike, vol, t_years, rate)
    np.testing.assert_array_equal(prices_only, vectorised["price"])
    for index in np.ndindex(is_call.shape):
        scalar = black76(
            "call" if is_call[index] else "put",
            float(forward[index]),
            float(strike[index]),
            float(vol[index]),
            float(t_years[index]),
            float(rate[index]),
        )
        for name in ("price", "delta", "gamma", "vega", "theta"):
            assert vectorised[name][index] == getattr(scalar, name), (name, index)


def test_vectorised_inputs_broadcast_to_one_shape():
    strikes = np.array([80.0, 100.0, 120.0])
    result = black76_greeks(np.array([[True], [False]]), 100.0, strikes, 0.5, 1.0)
    assert {name: array.shape for name, array in result.items()} == dict.fromkeys(
        result, (2, 3)
    )
    assert black76_price(True, 100.0, strikes, 0.5, 1.0).shape == (3,)
    assert isinstance(black76_price(True, 100.0, 100.0, 0.5, 1.0), np.ndarray)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, named",
    [
        (dict(forward=0.0), "forward"),
        (dict(forward=-5.0), "forward"),
        (dict(forward=math.nan), "forward"),
        (dict(strike=0.0), "strike"),
        (dict(strike=-1.0), "strike"),
        (dict(strike=math.inf), "strike"),
        (dict(vol=math.nan), "vol"),
        (dict(t_years=math.inf), "t_years"),
        (dict(rate=math.nan), "rate"),
        (dict(option_type="straddle"), "option_type"),
    ],
)
def test_bad_inputs_are_refused_naming_the_argument(arguments, named):
    call = dict(option_type="call", forward=100.0, strike=100.0, vol=0.5, t_years=1.0) | arguments
    with pytest.raises(ValueError, match=named):
        black76(**call)


def test_pricing_module_stays_pure():
    allowed = {"__future__", "math", "dataclasses", "typing", "numpy", "scipy"}
    tree = ast.parse(inspect.getsource(pricing))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= allowed


# --- implied volatility ----------------------------------------------------------------------


def test_implied_vol_recovers_the_worked_example():
    premium = black76("call", 20.0, 20.0, 0.25, 4 / 12, 0.09).price
    assert implied_vol("call", 20.0, 20.0, premium, 4 / 12, 0.09) == pytest.approx(0.25, abs=1e-10)


@settings(max_examples=150, deadline=None)
@given(
    option_type=option_types,
    forward=st.floats(min_value=1e-2, max_value=1e6),
    log_moneyness=st.floats(min_value=-2.0, max_value=2.0),
    vol=st.floats(min_value=0.01, max_value=5.0),
    t_years=st.floats(min_value=1.0 / 365 / 24, max_value=10.0),
    rate=rates,
)
def test_implied_vol_round_trips_black76(option_type, forward, log_moneyness, vol, t_years, rate):
    strike = forward * math.exp(log_moneyness)
    value = black76(option_type, forward, strike, vol, t_years, rate)
    # Where a vol point moves the premium by less than a millionth of it, any solver is
    # answering a question the float premium cannot pose.
    assume(value.vega > 1e-6 * value.price and value.vega > 1e-9 * forward)
    solved = implied_vol(option_type, forward, strike, value.price, t_years, rate)
    assert solved == pytest.approx(vol, rel=1e-6, abs=1e-8)


def test_premium_at_intrinsic_value_implies_the_minimum_volatility():
    solved = implied_vol("put", 100.0, 120.0, 20.0 * math.exp(-0.02), 1.0, 0.02)
    assert solved == IMPLIED_VOL_MIN
    assert price("put", 100.0, 120.0, solved, 1.0, 0.02) == pytest.approx(20.0 * math.exp(-0.02))


def test_premium_a_rounding_error_below_intrinsic_is_not_an_arbitrage():
    lower = 20.0 * math.exp(-0.02)
    solved = implied_vol("put", 100.0, 120.0, lower * (1 - 1e-14), 1.0, 0.02)
    assert solved == IMPLIED_VOL_MIN


@pytest.mark.parametrize(
    "option_type, forward, strike, premium, lower, upper, reason",
    [
        ("call", 120.0, 100.0, 19.0, 20.0, 120.0, "below intrinsic"),
        ("call", 100.0, 120.0, -0.01, 0.0, 100.0, "below intrinsic"),
        ("call", 100.0, 120.0, 100.5, 0.0, 100.0, "above the discounted forward"),
        ("put", 100.0, 120.0, 19.5, 20.0, 120.0, "below intrinsic"),
        ("put", 100.0, 120.0, 121.0, 20.0, 120.0, "above the discounted strike"),
    ],
)
def test_premium_outside_no_arbitrage_bounds_is_rejected_with_the_evidence(
    option_type, forward, strike, premium, lower, upper, reason
):
    with pytest.raises(ImpliedVolatilityError, match=reason) as rejection:
        implied_vol(option_type, forward, strike, premium, t_years=0.5)
    assert isinstance(rejection.value, ValueError)
    assert (rejection.value.premium, rejection.value.lower, rejection.value.upper) == (
        premium,
        lower,
        upper,
    )


def test_no_arbitrage_bounds_are_discounted():
    discount = math.exp(-0.1 * 2.0)
    with pytest.raises(ImpliedVolatilityError) as rejection:
        implied_vol("call", 120.0, 100.0, 16.0, t_years=2.0, rate=0.1)
    assert rejection.value.lower == pytest.approx(20.0 * discount)
    assert rejection.value.upper == pytest.approx(120.0 * discount)
    # 17 is below undiscounted intrinsic but above the discounted one: it is a fair premium.
    assert 0 < implied_vol("call", 120.0, 100.0, 17.0, t_years=2.0, rate=0.1) < 1


@pytest.mark.parametrize("t_years", [0.0, -0.5])
def test_expired_option_has_no_implied_volatility(t_years):
    with pytest.raises(ImpliedVolatilityError, match="expired") as rejection:
        implied_vol("call", 100.0, 90.0, 10.0, t_years)
    assert rejection.value.premium == 10.0
    assert rejection.value.lower == rejection.value.upper == 10.0


def test_premium_needing_more_than_vol_max_is_rejected():
    premium = black76("call", 100.0, 100.0, 3.0, 1.0).price
    with pytest.raises(ImpliedVolatilityError, match="vol_max") as rejection:
        implied_vol("call", 100.0, 100.0, premium, 1.0, vol_max=2.0)
    assert rejection.value.premium == premium
    assert rejection.value.upper == pytest.approx(black76("call", 100.0, 100.0, 2.0, 1.0).price)
    assert implied_vol("call", 100.0, 100.0, premium, 1.0) == pytest.approx(3.0, rel=1e-9)


@pytest.mark.parametrize(
    "arguments, named",
    [
        (dict(forward=0.0), "forward"),
        (dict(strike=-1.0), "strike"),
        (dict(premium=math.nan), "premium"),
        (dict(vol_max=0.0), "vol_max"),
    ],
)
def test_implied_vol_refuses_bad_inputs_naming_the_argument(arguments, named):
    call = dict(option_type="call", forward=100.0, strike=100.0, premium=5.0, t_years=1.0)
    with pytest.raises(ValueError, match=named) as rejection:
        implied_vol(**(call | arguments))
    assert not isinstance(rejection.value, ImpliedVolatilityError)
