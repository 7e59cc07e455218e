"""Black-76 valuation of European options on a forward, and its inverse, implied volatility.

SPEC section 5: d1 = (ln(F/K) + sigma^2 T/2)/(sigma sqrt(T)), d2 = d1 - sigma sqrt(T);
call = e^(-rT)(F N(d1) - K N(d2)), put = e^(-rT)(K N(-d2) - F N(-d1)); T in years of 365
days. Greeks are quoted as trading screens show them: delta and gamma per unit of underlying,
vega per volatility point (0.01), theta per calendar day.

This is the risk model, so it works in floats; callers quantise before anything touches money.
The maths lives once, in the vectorised functions; the scalar API validates and delegates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr

OptionType = Literal["call", "put"]

DAYS_PER_YEAR = 365.0
ONE_DAY_YEARS = 1.0 / DAYS_PER_YEAR
VOL_POINT = 0.01
IMPLIED_VOL_MIN = 1e-9
IMPLIED_VOL_XTOL = 1e-12
IMPLIED_VOL_ITERATIONS_MAX = 200
# A premium computed elsewhere as exactly the discounted intrinsic value can land an ulp or two
# below our own float rendering of that bound; rejecting it would be noise, not arbitrage.
BOUND_TOLERANCE_REL = 1e-12
STD_DEV_MIN = 1e-150

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_D1_DENSITY_MAX = 40.0
_OPTION_TYPES = ("call", "put")


@dataclass(frozen=True)
class OptionValue:
    """One option's Black-76 value and its sensitivities, per unit of underlying."""

    price: float
    delta: float  # dPrice/dF per unit of underlying
    gamma: float  # d2Price/dF2 per unit
    vega: float  # price change for +1 volatility point (0.01)
    theta: float  # price change for one calendar day passing (T shrinks by 1/365)


class ImpliedVolatilityError(ValueError):
    """A premium no volatility in the solver's range can produce.

    lower and upper are the premiums this request could have matched: the no-arbitrage bounds,
    or the values at the solver's volatility limits when the premium is inside those bounds
    but beyond what vol_max reaches.
    """

    def __init__(self, premium: float, lower: float, upper: float, reason: str):
        self.premium = premium
        self.lower = lower
        self.upper = upper
        self.reason = reason
        super().__init__(f"{reason}: premium {premium!r}, acceptable [{lower!r}, {upper!r}]")


def _broadcast_inputs(is_call, forward, strike, vol, t_years, rate) -> list[np.ndarray]:
    """One shape for every output, whichever argument carries it."""
    floats = (np.asarray(value, dtype=float) for value in (forward, strike, vol, t_years, rate))
    return np.broadcast_arrays(np.asarray(is_call, dtype=bool), *floats)


def _d1_and_std_dev(
    forward: np.ndarray, strike: np.ndarray, vol: np.ndarray, t_years: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """d1 and the total standard deviation s = sigma sqrt(T), with the degenerate limits.

    With s = 0 (expired, or zero volatility) the forward is deterministic: d1 is +inf in the
    money, -inf out of it and 0 at the money, which makes N(d1) the 1 / 0 / 0.5 step delta and
    the price the discounted intrinsic value without a special case downstream.
    An s below STD_DEV_MIN counts as 0: the time value (about 0.4 F s) is already lost to float
    rounding long before, and the floor keeps ln(F/K)/s, d1^2 and gamma (1/s) from overflowing.
    d1 is computed as ln(F/K)/s + s/2 so that neither F/K nor s^2 can overflow either.
    """
    std_dev = np.maximum(vol, 0.0) * np.sqrt(np.maximum(t_years, 0.0))
    has_std_dev = std_dev >= STD_DEV_MIN
    std_dev = np.where(has_std_dev, std_dev, 0.0)
    std_dev_safe = np.where(has_std_dev, std_dev, 1.0)
    log_moneyness = np.log(forward) - np.log(strike)
    d1_diffusive = log_moneyness / std_dev_safe + 0.5 * std_dev_safe
    d1_step = np.where(log_moneyness > 0.0, np.inf, np.where(log_moneyness < 0.0, -np.inf, 0.0))
    return np.where(has_std_dev, d1_diffusive, d1_step), std_dev


def _price(
    is_call: np.ndarray,
    forward: np.ndarray,
    strike: np.ndarray,
    vol: np.ndarray,
    t_years: np.ndarray,
    rate: np.ndarray,
) -> np.ndarray:
    """Black-76 price; an expired option (T <= 0) is worth its undiscounted intrinsic value.

    The result is floored at the discounted intrinsic value, which the exact price always
    exceeds (Jensen); the floor only removes float cancellation in F N(d1) - K N(d2).
    """
    d1, std_dev = _d1_and_std_dev(forward, strike, vol, t_years)
    d2 = d1 - std_dev
    discount = np.exp(-rate * np.maximum(t_years, 0.0))
    call = forward * ndtr(d1) - strike * ndtr(d2)
    put = strike * ndtr(-d2) - forward * ndtr(-d1)
    intrinsic = np.maximum(np.where(is_call, forward - strike, strike - forward), 0.0)
    return discount * np.maximum(np.where(is_call, call, put), intrinsic)


def black76_price(is_call, forward, strike, vol, t_years, rate=0.0) -> np.ndarray:
    """Vectorised: all args broadcast numpy arrays (is_call a bool array). Price only.

    Assumes forward and strike are positive; the scalar black76 checks that for its callers.
    """
    return np.asarray(_price(*_broadcast_inputs(is_call, forward, strike, vol, t_years, rate)))


def black76_greeks(is_call, forward, strike, vol, t_years, rate=0.0) -> dict[str, np.ndarray]:
    """Vectorised price, delta, gamma, vega, theta with the same conventions.

    delta, gamma and vega are analytic derivatives of the formula (vega scaled to one
    volatility point). At zero volatility vega is the one-sided derivative, nonzero at the
    money, because that is what a first volatility point adds. Gamma is 0 whenever the
    distribution has collapsed (T <= 0 or vol <= 0): the true value there is a Dirac mass.

    theta is the finite difference value(max(T - 1/365, 0)) - value(T), not the analytic
    derivative / 365: near expiry the analytic rate diverges like 1/sqrt(T), while the
    difference is what a day really costs and converges to intrinsic - value for T < 1 day.
    For T <= 0 both terms are the expiry value, so theta is exactly 0.
    """
    is_call_b, forward_a, strike_a, vol_a, t_a, rate_a = _broadcast_inputs(
        is_call, forward, strike, vol, t_years, rate
    )

    d1, std_dev = _d1_and_std_dev(forward_a, strike_a, vol_a, t_a)
    t_live = np.maximum(t_a, 0.0)
    discount = np.exp(-rate_a * t_live)
    # Clipping at |d1| = 40 changes nothing (exp(-800) is already 0.0) but keeps d1^2 finite.
    d1_clipped = np.clip(d1, -_D1_DENSITY_MAX, _D1_DENSITY_MAX)
    density = _INV_SQRT_2PI * np.exp(-0.5 * d1_clipped * d1_clipped)
    # Only a forward below ~1e-150, no real price, can push gamma past the float range.
    with np.errstate(over="ignore"):
        gamma_diffusive = discount * density / forward_a / np.where(std_dev > 0.0, std_dev, 1.0)

    price = _price(is_call_b, forward_a, strike_a, vol_a, t_a, rate_a)
    t_tomorrow = np.maximum(t_a - ONE_DAY_YEARS, 0.0)
    price_tomorrow = _price(is_call_b, forward_a, strike_a, vol_a, t_tomorrow, rate_a)
    return {
        "price": np.asarray(price),
        # 0.0 - x rather than -x: a worthless put's delta is 0, not -0 (which prints as "-0").
        "delta": np.asarray(np.where(is_call_b, discount * ndtr(d1), 0.0 - discount * ndtr(-d1))),
        "gamma": np.asarray(np.where(std_dev > 0.0, gamma_diffusive, 0.0)),
        "vega": np.asarray(discount * forward_a * density * np.sqrt(t_live) * VOL_POINT),
        "theta": np.asarray(price_tomorrow - price),
    }


def _require_option_type(option_type: str) -> bool:
    if option_type not in _OPTION_TYPES:
        raise ValueError(f"option_type must be 'call' or 'put', got {option_type!r}")
    return option_type == "call"


def _require_finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _require_positive(name: str, value: float) -> float:
    if not (_require_finite(name, value) > 0.0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def black76(
    option_type: OptionType,
    forward: float,
    strike: float,
    vol: float,
    t_years: float,
    rate: float = 0.0,
) -> OptionValue:
    """Price and greeks of one option; the entry point for positions and `clearing price`.

    Raises ValueError naming the argument for a non-positive forward or strike and for any
    non-finite input. vol <= 0 and t_years <= 0 are valid limits (deterministic forward,
    expired option), not errors.
    """
    is_call = _require_option_type(option_type)
    values = black76_greeks(
        is_call,
        _require_positive("forward", forward),
        _require_positive("strike", strike),
        _require_finite("vol", vol),
        _require_finite("t_years", t_years),
        _require_finite("rate", rate),
    )
    return OptionValue(**{name: float(value) for name, value in values.items()})


def implied_vol(
    option_type: OptionType,
    forward: float,
    strike: float,
    premium: float,
    t_years: float,
    rate: float = 0.0,
    vol_max: float = 10.0,
) -> float:
    """The Black-76 volatility that reproduces premium, solved by Brent on [1e-9, vol_max].

    The premium must respect the no-arbitrage bounds: a call between e^(-rT) max(F - K, 0)
    and e^(-rT) F, a put between e^(-rT) max(K - F, 0) and e^(-rT) K. Outside them, for an
    expired option (whose volatility is undetermined), or beyond what vol_max can produce,
    ImpliedVolatilityError carries the premium and the range it had to fall in.
    A premium at (or within float noise of) the lower bound returns IMPLIED_VOL_MIN: every
    volatility that small prices to intrinsic, and the smallest is the honest answer.
    """
    is_call = _require_option_type(option_type)
    forward = _require_positive("forward", forward)
    strike = _require_positive("strike", strike)
    premium = _require_finite("premium", premium)
    t_years = _require_finite("t_years", t_years)
    rate = _require_finite("rate", rate)
    vol_max = _require_finite("vol_max", vol_max)
    if vol_max <= IMPLIED_VOL_MIN:
        raise ValueError(f"vol_max must be > {IMPLIED_VOL_MIN!r}, got {vol_max!r}")

    intrinsic = max(forward - strike, 0.0) if is_call else max(strike - forward, 0.0)
    if t_years <= 0.0:
        raise ImpliedVolatilityError(
            premium, intrinsic, intrinsic, "option expired (t_years <= 0): volatility undefined"
        )
    discount = math.exp(-rate * t_years)
    lower = discount * intrinsic
    upper = discount * (forward if is_call else strike)
    tolerance = BOUND_TOLERANCE_REL * upper
    if premium < lower - tolerance:
        raise ImpliedVolatilityError(premium, lower, upper, "premium below intrinsic value")
    if premium > upper + tolerance:
        ceiling = "discounted forward" if is_call else "discounted strike"
        raise ImpliedVolatilityError(premium, lower, upper, f"premium above the {ceiling}")

    def premium_gap(vol: float) -> float:
        return float(black76_price(is_call, forward, strike, vol, t_years, rate)) - premium

    gap_at_min = premium_gap(IMPLIED_VOL_MIN)
    if gap_at_min >= 0.0:
        return IMPLIED_VOL_MIN
    gap_at_max = premium_gap(vol_max)
    if gap_at_max < 0.0:
        raise ImpliedVolatilityError(
            premium,
            gap_at_min + premium,
            gap_at_max + premium,
            f"premium needs a volatility above vol_max={vol_max!r}",
        )
    return float(
        brentq(
            premium_gap,
            IMPLIED_VOL_MIN,
            vol_max,
            xtol=IMPLIED_VOL_XTOL,
            maxiter=IMPLIED_VOL_ITERATIONS_MAX,
        )
    )
