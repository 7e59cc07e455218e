"""Margin: collateral value, equity, the two requirement models and an account's margin state.

SPEC sections 4 and 5. Everything here is pure: the caller brings the balances, the positions
and a `Market` (index prices and the latest marks at one valuation time) and gets back exact
figures. Money rules: collateral value and equity are exact Decimals, reported rounded down to
the cent; requirements are rounded up to the cent (`requirement_usd`). Both rules favour the
clearing house.

Prices a position is valued at (`position_price`): its instrument's mark; without a mark, a
future or perpetual falls back to its last settlement price (so its unrealised VM is 0) and an
option to the average price it was entered at (so clearing a trade moves no equity until the
first mark). These fallbacks exist for the moments between a trade and the next mark; the
mark-to-market job makes them rare.

The standard model is exact Decimal arithmetic per position. The portfolio model is a float
risk model, vectorised with numpy: it prices each distinct instrument once under every
scenario (instrument x scenario), then one sparse product with the (account, underlying) x
instrument exposure matrix gives every book's P&L under every scenario at once. Its outputs
are quantised to Decimal before they leave this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from functools import lru_cache

import numpy as np
from scipy import sparse

from clearing.domain.instruments import Instrument, OptionType
from clearing.domain.ledger import Mark, Position
from clearing.domain.money import SETTLEMENT_ASSET, requirement_usd, usd_cents
from clearing.domain.pricing import DAYS_PER_YEAR, black76_price
from clearing.domain.risk_parameters import RiskParameters
from clearing.domain.valuation import option_volatility, years_to_expiry

ZERO = Decimal(0)
ONE = Decimal(1)

STANDARD = "standard"
PORTFOLIO = "portfolio"
MODELS = (STANDARD, PORTFOLIO)

HEALTHY = "healthy"
RESTRICTED = "restricted"
LIQUIDATING = "liquidating"
BANKRUPT = "bankrupt"

VOL_UP = "up"
VOL_UNCHANGED = "unchanged"
VOL_DOWN = "down"
EXTREME = "extreme"

MARGIN_RATIO_QUANTUM = Decimal("0.000001")
FLOAT_MONEY_QUANTUM = Decimal("0.000001")
"""Float results are cut to a micro-dollar (half-even) before any cent rounding, so that float
noise (around 1e-9 relative) can never add a cent to a requirement."""
DTE_FOR_VOL_STATES_MIN = 1.0
"""The vol-state term (30/dte)^p uses dte of at least one day: 30/dte is capped at 30, so an
option in its last day (or expired and awaiting settlement) does not get an unbounded shock."""
MOVE_FACTOR_MIN = 1e-12
"""1 + m for an option's forward is floored here: a move of -100% or beyond (possible when
extreme_move_multiple x R >= 1) prices the option at an underlying of almost zero."""
VOLATILITY_CACHE_SIZE = 4096


class MissingIndexPrice(ValueError):
    """Margin needs the index price of an asset the account holds or trades, and has none."""

    def __init__(self, asset: str):
        super().__init__(f"no index price for {asset!r}")
        self.asset = asset


class MissingRiskParameter(ValueError):
    """A per-asset risk parameter (haircut, portfolio range) has no value for this asset."""

    def __init__(self, name: str, asset: str):
        super().__init__(f"risk parameter {name!r} has no value for {asset!r}")
        self.name = name
        self.asset = asset


class UnknownMarginModel(ValueError):
    def __init__(self, model: str):
        super().__init__(f"unknown margin model {model!r} (known: {', '.join(MODELS)})")
        self.model = model


@dataclass(frozen=True)
class Market:
    """What margin is computed against: index prices and the latest marks at one moment."""

    at: datetime
    index_prices: Mapping[str, Decimal]
    """Asset -> USD price ("BTC", "ETH"); USDC is always 1 and need not be given."""
    marks: Mapping[str, Mark]
    """Instrument symbol -> its latest mark (price, iv)."""


@dataclass(frozen=True)
class HeldPosition:
    instrument: Instrument
    quantity: Decimal
    settlement_basis: Decimal
    average_entry_price: Decimal

    @classmethod
    def of(cls, instrument: Instrument, position: Position) -> HeldPosition:
        return cls(instrument, position.quantity, position.settlement_basis,
                   position.average_entry_price)


@dataclass(frozen=True)
class Contribution:
    """One position's share (standard model) or one underlying's (portfolio model)."""

    symbol: str
    initial: Decimal
    maintenance: Decimal


@dataclass(frozen=True)
class WorstScenario:
    """The scenario that sets an underlying's portfolio requirement.

    loss is the weighted loss (an extreme move's loss counts at extreme_move_weight); it is
    negative when the book gains in every scenario.
    """

    underlying: str
    move: float
    vol_state: str  # "up" | "unchanged" | "down" | "extreme" (+-2R at unchanged volatility)
    loss: Decimal


@dataclass(frozen=True)
class Requirement:
    """initial and maintenance are the sums of the contributions, each rounded up to cents."""

    initial: Decimal
    maintenance: Decimal
    contributions: tuple[Contribution, ...]
    worst: tuple[WorstScenario, ...]


NO_REQUIREMENT = Requirement(ZERO, ZERO, (), ())


@dataclass(frozen=True)
class AccountMargin:
    model: str
    collateral_value: Decimal  # rounded down to cents
    equity: Decimal  # rounded down to cents
    initial: Decimal
    maintenance: Decimal
    margin_ratio: Decimal | None
    status: str
    requirement: Requirement


# --- prices, collateral, equity ------------------------------------------------------------


def index_price(index_prices: Mapping[str, Decimal], asset: str) -> Decimal:
    if asset == SETTLEMENT_ASSET:
        return ONE
    try:
        return index_prices[asset]
    except KeyError:
        raise MissingIndexPrice(asset) from None


def _per_asset(values: Mapping[str, Decimal], name: str, asset: str) -> Decimal:
    try:
        return values[asset]
    except KeyError:
        raise MissingRiskParameter(name, asset) from None


def collateral_value(balances: Mapping[str, Decimal], index_prices: Mapping[str, Decimal],
                     params: RiskParameters) -> Decimal:
    """SPEC 4: sum of positive balances x price x (1 - haircut) plus negative balances x price
    (debts count in full). Exact; a zero balance needs no price."""
    total = ZERO
    for asset, amount in balances.items():
        if amount == 0:
            continue
        price = index_price(index_prices, asset)
        if amount > 0:
            total += amount * price * (ONE - _per_asset(params.haircut, "haircut", asset))
        else:
            total += amount * price
    return total


def position_price(held: HeldPosition, marks: Mapping[str, Mark]) -> Decimal:
    """The price a position is valued at: its mark, else the fallback in the module doc."""
    mark = marks.get(held.instrument.symbol)
    if mark is not None:
        return mark.price
    if held.instrument.is_linear_delta_one:
        if held.quantity == 0:  # closed, only its unsettled basis is left: price irrelevant
            return Decimal(0)
        return held.settlement_basis / held.quantity
    return held.average_entry_price


def equity(collateral: Decimal, positions: Sequence[HeldPosition], market: Market) -> Decimal:
    """SPEC 4: collateral + unrealised VM of futures and perpetuals since their last settlement,
    (q x mark - settlement_basis) x multiplier, + options' mark value q x multiplier x mark
    (long +, short -). Exact. Unmarked positions: see `position_price` (a future's VM is 0)."""
    total = collateral
    marks = market.marks
    for held in positions:
        if held.quantity == 0:
            continue
        instrument = held.instrument
        mark = marks.get(instrument.symbol)
        if instrument.is_linear_delta_one:
            if mark is not None:
                total += (held.quantity * mark.price - held.settlement_basis) \
                    * instrument.multiplier
        else:
            price = mark.price if mark is not None else position_price(held, marks)
            total += held.quantity * instrument.multiplier * price
    return total


# --- standard model ------------------------------------------------------------------------


def _standard_per_position(held: HeldPosition, market: Market,
                           params: RiskParameters) -> tuple[Decimal, Decimal]:
    """Exact (initial, maintenance) of one position, SPEC 5 standard model."""
    instrument = held.instrument
    units = abs(held.quantity) * instrument.multiplier
    price = position_price(held, market.marks)
    if instrument.is_linear_delta_one:
        notional = units * price
        size_rate = params.futures_size_rate * units
        return (notional * (params.futures_initial_rate + size_rate),
                notional * (params.futures_maintenance_rate + size_rate))
    if held.quantity > 0:
        return ZERO, ZERO  # a long option's premium is paid: nothing more can be lost
    underlying = index_price(market.index_prices, instrument.underlying)
    strike = instrument.strike
    assert strike is not None
    floor = params.short_option_initial_floor_rate * underlying
    maintenance_rate = params.short_option_maintenance_rate
    if instrument.option_type is OptionType.CALL:
        otm = max(strike - underlying, ZERO)
        # max(0.15 - OTM/U, 0.1) x U, written without the division so that it stays exact.
        initial = max(params.short_call_initial_rate * underlying - otm, floor) + price
        maintenance = maintenance_rate * underlying + price
    else:
        otm = max(underlying - strike, ZERO)
        maintenance = max(maintenance_rate * underlying, maintenance_rate * price) + price
        initial = max(max(params.short_put_initial_rate * underlying - otm, floor) + price,
                      maintenance)
    return initial * units, maintenance * units


def standard_requirement(positions: Sequence[HeldPosition], market: Market,
                         params: RiskParameters,
                         known: dict[tuple[str, Decimal, Decimal],
                                     tuple[Instrument, Contribution]] | None = None
                         ) -> Requirement:
    """SPEC 5 standard model: per position, each contribution rounded up to cents, summed.

    `known` (for many books against one market and one set of parameters) remembers each
    contribution by what it depends on: the instrument, the quantity and the price it is
    valued at. A book of a million positions repeats few of those (quantities and marks are
    shared), and a contribution is rounded to the cent from exact products, so equal values
    give the same contribution to the digit. It is keyed by symbol and kept with its
    instrument, which must be the very one held (hashing an instrument costs more than the
    contribution)."""
    contributions = []
    marks = market.marks
    for held in positions:
        if held.quantity == 0:
            continue
        if known is None:
            contributions.append(_standard_contribution(held, market, params))
            continue
        instrument = held.instrument
        key = (instrument.symbol, held.quantity, position_price(held, marks))
        entry = known.get(key)
        if entry is None or entry[0] is not instrument:
            entry = known[key] = (instrument, _standard_contribution(held, market, params))
        contributions.append(entry[1])
    return Requirement(sum((c.initial for c in contributions), ZERO),
                       sum((c.maintenance for c in contributions), ZERO),
                       tuple(contributions), ())


def _standard_contribution(held: HeldPosition, market: Market,
                           params: RiskParameters) -> Contribution:
    initial, maintenance = _standard_per_position(held, market, params)
    return Contribution(held.instrument.symbol, requirement_usd(initial),
                        requirement_usd(maintenance))


# --- scenario revaluation (the portfolio model's engine; VaR uses it too) ------------------


@lru_cache(maxsize=VOLATILITY_CACHE_SIZE)
def _implied_volatility(instrument: Instrument, price: Decimal, underlying: Decimal,
                        at: datetime) -> float | None:
    """The volatility implied by an option's price (valuation.option_volatility), memoised:
    it is a root search, and one option is priced again and again against one market."""
    return option_volatility(instrument, Mark(price, None, at, -1), underlying, at)


@dataclass(frozen=True)
class Exposures:
    """The positions of many books as flat columns, ready for scenario revaluation.

    Instruments (the things priced) are deduplicated: one per marked instrument, one per
    (instrument, fallback price) for unmarked positions. Each has an underlying, a price
    (per unit: the mark or its fallback) and, for options, a strike, a volatility (NaN when
    it cannot be determined) and a time to expiry in years. Each position is a (book,
    instrument, units) row, units = signed quantity x multiplier.
    """

    n_books: int
    underlyings: tuple[str, ...]
    underlying_prices: np.ndarray  # U per underlying
    instrument_underlying: np.ndarray
    is_option: np.ndarray
    is_call: np.ndarray
    strike: np.ndarray
    price: np.ndarray
    sigma: np.ndarray
    t_years: np.ndarray
    book: np.ndarray
    instrument: np.ndarray
    units: np.ndarray

    @property
    def group(self) -> np.ndarray:
        """Each position's (book, underlying) group: book x number of underlyings + u."""
        return self.book * len(self.underlyings) + self.instrument_underlying[self.instrument]

    @property
    def n_groups(self) -> int:
        return self.n_books * len(self.underlyings)


def _instrument_row(instrument: Instrument, mark: Mark | None, price: Decimal, u: int,
                    underlying: Decimal, at: datetime) -> tuple:
    """One priced instrument's columns: underlying, is_option, is_call, strike, price, sigma,
    t_years (sigma NaN and t_years 0 for futures and perpetuals, sigma NaN when unknown)."""
    sigma, t_years = math.nan, 0.0
    if instrument.is_option:
        t_years = years_to_expiry(instrument, at)
        if mark is not None and mark.iv is not None:
            sigma = float(mark.iv)
        else:
            vol = _implied_volatility(instrument, price, underlying, at)
            sigma = math.nan if vol is None else vol
    strike = 1.0 if instrument.strike is None else float(instrument.strike)
    return (u, instrument.is_option, instrument.option_type is OptionType.CALL, strike,
            float(price), sigma, t_years)


def exposures_of(books: Sequence[Sequence[HeldPosition]], market: Market) -> Exposures:
    """One pass over the positions (closed ones skipped) builds the columns."""
    marks = market.marks
    underlyings: dict[str, int] = {}
    underlying_prices: list[float] = []
    columns: dict[tuple[str, Decimal | None], int] = {}
    rows: list[tuple] = []
    multipliers: list[float] = []
    book_of: list[int] = []
    instrument_of: list[int] = []
    units_of: list[float] = []

    for book_index, book in enumerate(books):
        for held in book:
            if held.quantity == 0:
                continue
            instrument = held.instrument
            mark = marks.get(instrument.symbol)
            fallback = None if mark is not None else position_price(held, {})
            key = (instrument.symbol, fallback)
            column = columns.get(key)
            if column is None:
                name = instrument.underlying
                underlying = index_price(market.index_prices, name)
                u = underlyings.get(name)
                if u is None:
                    u = underlyings[name] = len(underlyings)
                    underlying_prices.append(float(underlying))
                price = position_price(held, marks)
                rows.append(_instrument_row(instrument, mark, price, u, underlying, market.at))
                multipliers.append(float(instrument.multiplier))
                column = columns[key] = len(columns)
            book_of.append(book_index)
            instrument_of.append(column)
            units_of.append(float(held.quantity) * multipliers[column])

    underlying_of, is_option, is_call, strike, price_of, sigma_of, t_years_of = \
        zip(*rows) if rows else ((),) * 7
    return Exposures(
        n_books=len(books),
        underlyings=tuple(underlyings),
        underlying_prices=np.asarray(underlying_prices, dtype=float),
        instrument_underlying=np.asarray(underlying_of, dtype=np.intp),
        is_option=np.asarray(is_option, dtype=bool),
        is_call=np.asarray(is_call, dtype=bool),
        strike=np.asarray(strike, dtype=float),
        price=np.asarray(price_of, dtype=float),
        sigma=np.asarray(sigma_of, dtype=float),
        t_years=np.asarray(t_years_of, dtype=float),
        book=np.asarray(book_of, dtype=np.intp),
        instrument=np.asarray(instrument_of, dtype=np.intp),
        units=np.asarray(units_of, dtype=float),
    )


def unit_pnl(exposures: Exposures, underlying_moves: np.ndarray,
             option_vols: np.ndarray | None, vol_floor: float) -> np.ndarray:
    """P&L per unit of each instrument (rows) under each scenario (columns).

    underlying_moves is (underlying x scenario): the relative move m of each underlying.
    Futures and perpetuals gain price x m. Options are repriced with Black-76 at
    F = U x (1 + m), r = 0, T unchanged, and gain new value - value at m = 0 with unchanged
    sigma; option_vols (option x scenario, options in instrument order) gives the volatility
    of each scenario, None for unchanged volatility. Every volatility, the unchanged one
    included, is floored at vol_floor; an option whose volatility cannot be determined (no iv,
    and its price cannot be inverted) is priced at vol_floor, so its scenarios still charge
    its intrinsic-value risk. An expired option (T = 0) is worth its intrinsic value.
    """
    moves = underlying_moves[exposures.instrument_underlying]
    pnl = exposures.price[:, None] * moves
    options = np.flatnonzero(exposures.is_option)
    if options.size == 0:
        return pnl
    t_years = exposures.t_years[options]
    sigma = option_sigma(exposures, vol_floor)
    vols = sigma[:, None] if option_vols is None else np.maximum(option_vols, vol_floor)
    forward = exposures.underlying_prices[exposures.instrument_underlying[options]]
    is_call = exposures.is_call[options]
    strike = exposures.strike[options]
    base = black76_price(is_call, forward, strike, sigma, t_years)
    shocked_forward = forward[:, None] * np.maximum(1.0 + moves[options], MOVE_FACTOR_MIN)
    shocked = black76_price(is_call[:, None], shocked_forward, strike[:, None], vols,
                            t_years[:, None])
    pnl[options] = shocked - base[:, None]
    return pnl


def option_sigma(exposures: Exposures, vol_floor: float) -> np.ndarray:
    """The options' unchanged volatility: their own, vol_floor when unknown or below it."""
    sigma = exposures.sigma[exposures.is_option]
    return np.maximum(np.where(np.isnan(sigma), vol_floor, sigma), vol_floor)


def group_pnl(exposures: Exposures, pnl_per_unit: np.ndarray) -> np.ndarray:
    """(book, underlying) x scenario P&L: the sparse exposure matrix (group x instrument,
    units summed) times the per-unit P&L matrix (instrument x scenario)."""
    exposure = sparse.csr_matrix(
        (exposures.units, (exposures.group, exposures.instrument)),
        shape=(exposures.n_groups, pnl_per_unit.shape[0]))
    return np.asarray(exposure @ pnl_per_unit)


# --- portfolio model -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """The scenarios: 2 x steps + 1 moves x 3 vol states, then the 2 extreme moves."""

    fractions: tuple[Decimal, ...]  # the move as a multiple of R
    vol_states: tuple[str, ...]
    weights: np.ndarray  # the share of each scenario's loss that counts


def _grid(params: RiskParameters) -> _Grid:
    steps = params.portfolio_steps
    moves = [Decimal(i) / Decimal(steps) for i in range(-steps, steps + 1)]
    fractions: list[Decimal] = []
    states: list[str] = []
    for state in (VOL_UP, VOL_UNCHANGED, VOL_DOWN):
        fractions += moves
        states += [state] * len(moves)
    extreme = params.extreme_move_multiple
    fractions += [-extreme, extreme]
    states += [EXTREME, EXTREME]
    weights = np.array([float(params.extreme_move_weight) if s == EXTREME else 1.0
                        for s in states])
    return _Grid(tuple(fractions), tuple(states), weights)


def _vol_state_factors(exposures: Exposures, grid: _Grid, params: RiskParameters) -> np.ndarray:
    """(option x scenario) multipliers of sigma: up 1 + 0.5 x (30/dte)^p, down
    1 - 0.25 x (30/dte)^p, p = 0.3 under 30 days to expiry else 0.13; dte (fractional days)
    is taken as at least DTE_FOR_VOL_STATES_MIN."""
    t_years = exposures.t_years[exposures.is_option]
    dte = np.maximum(t_years * DAYS_PER_YEAR, DTE_FOR_VOL_STATES_MIN)
    short_dated_days = float(params.vol_short_dated_days)
    exponent = np.where(dte < short_dated_days, float(params.vol_short_dated_exponent),
                        float(params.vol_long_dated_exponent))
    term = (short_dated_days / dte) ** exponent
    by_state = {
        VOL_UP: 1.0 + float(params.vol_up_factor) * term,
        VOL_UNCHANGED: np.ones_like(term),
        VOL_DOWN: 1.0 - float(params.vol_down_factor) * term,
        EXTREME: np.ones_like(term),
    }
    return np.stack([by_state[state] for state in grid.vol_states], axis=1)


def _float_money(value: float) -> Decimal:
    return Decimal(value).quantize(FLOAT_MONEY_QUANTUM, rounding=ROUND_HALF_EVEN)


def portfolio_requirements_many(books: Sequence[Sequence[HeldPosition]], market: Market,
                                params: RiskParameters) -> list[Requirement]:
    """SPEC 5 portfolio model for many accounts at once (one book per account).

    The distinct instruments are priced once under every scenario; one sparse product gives
    every (book, underlying)'s P&L in every scenario. Per (book, underlying):
    initial = max(worst weighted loss, 0) + short option minimum (rate x U x sum of |short
    option units|), rounded up to cents; maintenance = maintenance_factor x that initial,
    rounded up to cents. A book's requirement is the sum over its underlyings.
    """
    exposures = exposures_of(books, market)
    if exposures.units.size == 0:
        return [NO_REQUIREMENT for _ in books]
    grid = _grid(params)
    vol_floor = float(params.vol_floor)
    ranges = [_per_asset(params.portfolio_range, "portfolio_range", name)
              for name in exposures.underlyings]
    fractions = np.array([float(f) for f in grid.fractions])
    underlying_moves = np.array([float(r) for r in ranges])[:, None] * fractions[None, :]
    option_vols = option_sigma(exposures, vol_floor)[:, None] \
        * _vol_state_factors(exposures, grid, params)
    pnl = group_pnl(exposures, unit_pnl(exposures, underlying_moves, option_vols, vol_floor))

    n_groups = exposures.n_groups
    weighted_loss = -pnl * grid.weights[None, :]
    worst_scenario = np.argmax(weighted_loss, axis=1)
    worst_loss = weighted_loss[np.arange(n_groups), worst_scenario]

    group = exposures.group
    units = exposures.units
    position_underlying = exposures.instrument_underlying[exposures.instrument]
    is_short_option = exposures.is_option[exposures.instrument] & (units < 0)
    short_usd = np.where(is_short_option, -units, 0.0) \
        * exposures.underlying_prices[position_underlying]
    minimum = float(params.short_option_minimum_rate) \
        * np.bincount(group, weights=short_usd, minlength=n_groups)
    initial = np.maximum(worst_loss, 0.0) + minimum
    present = np.bincount(group, minlength=n_groups) > 0

    n_underlyings = len(exposures.underlyings)
    order = sorted(range(n_underlyings), key=lambda u: exposures.underlyings[u])
    factor = params.maintenance_factor
    results = []
    for book_index in range(exposures.n_books):
        contributions = []
        worst = []
        for u in order:
            g = book_index * n_underlyings + u
            if not present[g]:
                continue
            name = exposures.underlyings[u]
            initial_usd = requirement_usd(_float_money(float(initial[g])))
            contributions.append(
                Contribution(name, initial_usd, requirement_usd(factor * initial_usd)))
            s = int(worst_scenario[g])
            worst.append(WorstScenario(name, float(ranges[u] * grid.fractions[s]),
                                       grid.vol_states[s],
                                       requirement_usd(_float_money(float(worst_loss[g])))))
        if not contributions:
            results.append(NO_REQUIREMENT)
            continue
        results.append(Requirement(sum((c.initial for c in contributions), ZERO),
                                   sum((c.maintenance for c in contributions), ZERO),
                                   tuple(contributions), tuple(worst)))
    return results


def portfolio_requirement(positions: Sequence[HeldPosition], market: Market,
                          params: RiskParameters) -> Requirement:
    """SPEC 5 portfolio model for one account: the batch computation with one book."""
    return portfolio_requirements_many([positions], market, params)[0]


# --- an account's margin -------------------------------------------------------------------


def margin_status(equity: Decimal, initial: Decimal, maintenance: Decimal,
                  has_open_positions: bool) -> str:
    """SPEC 5 margin states, tested in this order:

    - no open positions: `bankrupt` if equity < 0 (a debt nothing is left to liquidate),
      else `healthy` (nothing is required);
    - `healthy` if equity >= initial;
    - `restricted` if equity >= maintenance (no withdrawals, a margin call);
    - `liquidating` otherwise, negative equity included while positions remain.
    """
    if not has_open_positions:
        return BANKRUPT if equity < 0 else HEALTHY
    if equity >= initial:
        return HEALTHY
    if equity >= maintenance:
        return RESTRICTED
    return LIQUIDATING


def margin_ratio(maintenance: Decimal, equity: Decimal) -> Decimal | None:
    """maintenance / equity, rounded up to 6 decimals; 1 or more means liquidation. None when
    equity <= 0: the ratio has no meaning there (and the status already says everything)."""
    if equity <= 0:
        return None
    return (maintenance / equity).quantize(MARGIN_RATIO_QUANTUM, rounding=ROUND_CEILING)


def account_margin(model: str, balances: Mapping[str, Decimal],
                   positions: Sequence[HeldPosition], market: Market, params: RiskParameters,
                   has_positions: bool | None = None) -> AccountMargin:
    """One account's margin under its model. The status and the ratio compare the reported
    figures (equity rounded down, requirements rounded up), so a reader can check them.
    has_positions defaults to whether any position is open."""
    if model == STANDARD:  # MarginModel members compare equal to their values
        requirement = standard_requirement(positions, market, params)
    elif model == PORTFOLIO:
        requirement = portfolio_requirement(positions, market, params)
    else:
        raise UnknownMarginModel(model)
    collateral = collateral_value(balances, market.index_prices, params)
    reported_equity = usd_cents(equity(collateral, positions, market))
    if has_positions is None:
        has_positions = any(held.quantity != 0 for held in positions)
    return AccountMargin(
        model=str(model),
        collateral_value=usd_cents(collateral),
        equity=reported_equity,
        initial=requirement.initial,
        maintenance=requirement.maintenance,
        margin_ratio=margin_ratio(requirement.maintenance, reported_equity),
        status=margin_status(reported_equity, requirement.initial, requirement.maintenance,
                             has_positions),
        requirement=requirement,
    )


def account_margins_many(models: Sequence[str], balances: Sequence[Mapping[str, Decimal]],
                         books: Sequence[Sequence[HeldPosition]], market: Market,
                         params: RiskParameters) -> list[AccountMargin]:
    """`account_margin` for many accounts: the portfolio model's repricing runs once, batched,
    over every portfolio account; the results equal account-by-account computation."""
    portfolio_index = [i for i, model in enumerate(models) if model == PORTFOLIO]
    batched = portfolio_requirements_many([books[i] for i in portfolio_index], market, params)
    requirements: dict[int, Requirement] = dict(zip(portfolio_index, batched, strict=True))
    known: dict[tuple[str, Decimal, Decimal], tuple[Instrument, Contribution]] = {}
    results = []
    for i, model in enumerate(models):
        if model == STANDARD:
            requirement = standard_requirement(books[i], market, params, known)
        elif model == PORTFOLIO:
            requirement = requirements[i]
        else:
            raise UnknownMarginModel(model)
        collateral = collateral_value(balances[i], market.index_prices, params)
        reported_equity = usd_cents(equity(collateral, books[i], market))
        has_positions = any(held.quantity != 0 for held in books[i])
        results.append(AccountMargin(
            model=str(model), collateral_value=usd_cents(collateral), equity=reported_equity,
            initial=requirement.initial, maintenance=requirement.maintenance,
            margin_ratio=margin_ratio(requirement.maintenance, reported_equity),
            status=margin_status(reported_equity, requirement.initial,
                                 requirement.maintenance, has_positions),
            requirement=requirement))
    return results
