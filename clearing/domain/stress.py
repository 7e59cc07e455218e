"""Stress testing: what the book loses if the market gaps, the deleveraging spiral forced
liquidations set off, and what the default waterfall (the insurance fund, then
auto-deleveraging) must absorb, with Cover-1 and Cover-2 (EMIR Art. 43: resources to survive
the default of the two members with the largest exposures in extreme but plausible
conditions). Pure: the caller brings the ledger's state; nothing here writes anything.

1. The shock (round 0)
   A scenario (`stress_scenarios`) moves each underlying's index price U to U x (1 + m) and
   multiplies implied volatilities by f. Instruments are repriced as the portfolio model
   reprices them (`margin.unit_pnl`): a future's or perpetual's mark moves by mark x m; an
   option's mark moves by its Black-76 change from (U, sigma) to (U x (1 + m), f x sigma),
   floored at zero, and its implied volatility becomes f x sigma (never below vol_floor).
   Collateral in BTC or ETH moves with its index. Every member account is then revalued
   with margin's rules: collateral value and equity (SPEC 4), initial and maintenance
   requirement under its model, status (SPEC 5). Losses are equity changes from the
   unshocked book (whose equity comes from `margin.collateral_value` and `margin.equity`).
   An instrument without a mark keeps the price margin falls back to (`position_price`),
   exactly as margin itself would value it at the shocked prices.

2. The cascade (rounds 1, 2, ...)
   An account breaches when its equity is below its maintenance requirement (below zero for
   one with no positions): it is closed out, all its positions and all its non-USDC
   collateral, in one go. (The liquidate job moves positions one at a time and stops at the
   initial requirement; in a gapping market that stop does not hold, and a default is a full
   close-out, so the stress model closes everything.) Its sales move prices, per underlying
   u, in round r:

       S(u) = sum over the breaching accounts' positions on u of  units x delta x U(u, r-1)
            + sum over their balances of asset u of  balance x U(u, r-1)
       impact(u, r) = clamp(-k x S(u) / depth(u), -round_move_max, +round_move_max)
       U(u, r) = U(u, r-1) x (1 + impact(u, r))

   units = signed quantity x multiplier; delta is 1 for futures and perpetuals and the
   Black-76 delta at (U(u, r-1), f x sigma) for options. Closing a long or selling
   collateral (S > 0) pushes the price down; buying back a short pushes it up. k is
   `impact_coefficient`, depth(u) is `depth_usd[u]` (USD): with k = 1, selling 1% of the
   depth moves the price 1%. Defaults (`CascadeParameters`): BTC 10,000,000 and ETH
   4,000,000 USD (another underlying `default_depth_usd`, 4,000,000), k = 1, at most 50% per
   round, at most 50 rounds: selling 100,000 USD of BTC moves BTC 1%. That is a thin, stressed
   book, the liquidity a small venue's liquidator can count on when the market gaps (order
   books thin out exactly then); a clearing house sets them from its own order-book depth
   (`clearing stress --depth BTC=250000000 --impact 1`).

   The close-out executes at the round's post-impact prices U(u, r): the liquidations bear
   their own impact. Derivatives close at their marks repriced at U(r); collateral is sold at
   U(r) x (1 - haircut): the haircut is the fire-sale discount collateral value already
   assumes, the impact the extra loss. So the account's close-out equity is its equity (SPEC
   4) at U(r). A fee of liquidation_fee_rate x sum |units| x mark, capped by that equity if
   positive (nothing if not), goes to the insurance fund, as in the liquidate job. What is
   left below zero is the deficit: the insurance fund covers it as far as it goes (a round's
   fees first, then accounts in account order), the rest falls to auto-deleveraging when the
   account held futures or perpetuals, else it is an uncovered loss (options are not
   deleveraged), as the liquidate job records it. The survivors are revalued at U(r); those
   now breaching make the next round. The cascade ends when a round finds no new breach
   (converged) or after rounds_max rounds (reported as not converged).

3. The cross-margin feedback loop
   A liquidated account's collateral is sold whatever its losses came from, so a loss on ETH
   options forces the sale of BTC collateral and moves BTC. Each collateral sale is reported
   with the underlying of the account's largest derivative loss; a sale of another asset is
   a cross-margin sale.

4. Cover-1 and Cover-2
   An account's uncovered stress loss is its deficit at the end of the scenario (zero for an
   account whose equity stays positive). Cover-1 is the largest, Cover-2 the sum of the two
   largest: the resources needed should those members default. They are compared with the
   insurance fund's balance before the stress: sufficient, or insufficient by the shortfall.

The house's own book: the positions `ccp:liquidation` holds (taken over in liquidations and
not yet closed by a liquidator) are revalued beside the members' and their loss at the final
prices is reported (`house_loss_usd`); the house neither breaches nor defaults.

Prices are carried to PRICE_SCALE (8) decimals, as marks are: a shocked price is U x (1 + m)
or a repriced mark cut there, so that margin, given the same prices as Decimals, computes
exactly what the arrays do (a float like 1740.0000000000002 would otherwise add a cent to a
requirement rounded up).

Revaluation, vectorised. The book is turned into columns once (`margin.exposures_of`, the
portfolio model's own), and every later valuation is array arithmetic over all accounts:
equity as the exact unshocked equity plus sparse products of the price changes; the
standard model per position in numpy (SPEC 5's formulas, each position rounded up to the
cent); the portfolio model with margin's own scenario grid and repricing (`unit_pnl`,
`group_pnl`). The round-0 figures are checked against `margin.account_margins_many` run on
the shocked market, for every account of a book of up to CROSS_CHECK_ACCOUNTS_MAX accounts
and for the ones nearest to breaching in a larger book; a difference beyond rounding stops
the run (`StressModelDisagrees`), so the two can never drift apart unnoticed. Measured on a
2-core machine: 10,000 accounts and 200,000 positions, the book built once in about 1.5 s,
then about 0.6 s per scenario (seven cascade rounds and 4,900 close-outs under crash-30).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

import numpy as np
from scipy import sparse

from clearing.domain.accounts import INSURANCE, LIQUIDATION, is_house
from clearing.domain.instruments import Instrument
from clearing.domain.ledger import LedgerState, Mark
from clearing.domain.margin import (
    PORTFOLIO,
    STANDARD,
    Exposures,
    HeldPosition,
    Market,
    MissingRiskParameter,
    UnknownMarginModel,
    _grid,
    _vol_state_factors,
    account_margins_many,
    collateral_value,
    equity,
    exposures_of,
    group_pnl,
    index_price,
    margin_status,
    option_sigma,
    position_price,
    unit_pnl,
)
from clearing.domain.margin_sweep import books, market_at, params_at
from clearing.domain.money import PRICE_SCALE, SETTLEMENT_ASSET, requirement_usd, usd_cents
from clearing.domain.pricing import black76_greeks
from clearing.domain.risk_parameters import RiskParameters
from clearing.domain.stress_scenarios import Scenario
from clearing.domain.valuation import option_volatility

D = Decimal
ZERO = Decimal(0)
CROSS_CHECK_ACCOUNTS_MAX = 500
"""Accounts whose round-0 figures are recomputed with `margin.account_margins_many`: all of a
book this size or smaller, else the ones nearest to breaching (|equity - maintenance|)."""
CROSS_CHECK_CENTS_PER_POSITION = 1
"""Float and Decimal may round a figure on a cent boundary apart: a cent per position."""
CROSS_CHECK_RELATIVE = 1e-9
ADL = "auto_deleveraging"
UNCOVERED = "uncovered"
SUFFICIENT = "sufficient"
INSUFFICIENT = "insufficient"


class StressModelDisagrees(RuntimeError):
    """The vectorised revaluation and margin's own code give different figures: a broken
    invariant, never a result to report."""

    def __init__(self, account_id: str, figure: str, vectorised: Decimal, margin: Decimal):
        super().__init__(f"stress revaluation of {account_id!r}: {figure} {vectorised} "
                         f"differs from margin's {margin}")
        self.account_id = account_id
        self.figure = figure


@dataclass(frozen=True)
class CascadeParameters:
    """The price-impact rule of the cascade (see the module doc)."""

    depth_usd: Mapping[str, Decimal] = field(default_factory=lambda: {
        "BTC": D("10000000"), "ETH": D("4000000")})
    default_depth_usd: Decimal = D("4000000")
    impact_coefficient: Decimal = D("1")
    round_move_max: Decimal = D("0.5")
    rounds_max: int = 50

    def __post_init__(self) -> None:
        if any(v <= 0 for v in self.depth_usd.values()) or self.default_depth_usd <= 0:
            raise ValueError("depth_usd must be positive")
        if self.impact_coefficient < 0:
            raise ValueError("impact_coefficient must not be negative")
        if not 0 <= self.round_move_max < 1:
            raise ValueError("round_move_max must be at least 0 and below 1")
        if not 0 <= self.rounds_max <= 1000:
            raise ValueError("rounds_max must be from 0 to 1000")

    def depth_of(self, underlying: str) -> Decimal:
        return self.depth_usd.get(underlying, self.default_depth_usd)


DEFAULT_CASCADE = CascadeParameters()


@dataclass(frozen=True)
class StressAccount:
    """One account's book as the stress sees it."""

    account_id: str
    model: str
    balances: Mapping[str, Decimal]
    positions: Sequence[HeldPosition]


# ------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CollateralSale:
    """Collateral sold in a close-out, at U(r) x (1 - haircut)."""

    round: int
    account_id: str
    asset: str
    amount: Decimal
    proceeds_usd: Decimal
    loss_underlying: str | None
    """The underlying of the account's largest derivative loss (None without one)."""
    loss_usd: Decimal

    @property
    def cross_margin(self) -> bool:
        """Sold because of losses on another underlying: the feedback loop."""
        return self.loss_underlying is not None and self.loss_underlying != self.asset


@dataclass(frozen=True)
class CascadeRound:
    """One round: 0 is the shock; from 1 on, the close-out of the previous round's breaches."""

    round: int
    prices: Mapping[str, Decimal]
    impact: Mapping[str, Decimal]
    """This round's relative price move per underlying (the scenario's own in round 0)."""
    accounts_liquidated: tuple[str, ...]
    positions_notional_usd: Decimal
    """Gross delta-equivalent notional closed: sum |units x delta| x U(r-1)."""
    net_sold_usd: Mapping[str, Decimal]
    """S(u): what pushed each price (positions and collateral, signed, sold > 0)."""
    collateral_sold: Mapping[str, Decimal]
    collateral_sold_usd: Mapping[str, Decimal]
    cross_margin_sold_usd: Mapping[str, Decimal]
    fees_usd: Decimal
    deficit_usd: Decimal
    insurance_paid_usd: Decimal
    adl_usd: Decimal
    uncovered_usd: Decimal
    insurance_fund_left: Decimal
    breaching: int
    """Accounts breaching at this round's prices: the next round's close-outs."""


@dataclass(frozen=True)
class AccountOutcome:
    account_id: str
    model: str
    equity_before: Decimal
    equity_shocked: Decimal
    initial_shocked: Decimal
    maintenance_shocked: Decimal
    status_shocked: str
    liquidated_in_round: int | None
    equity_final: Decimal
    """Close-out equity after the fee for a liquidated account, else equity at the final
    prices."""
    deficit: Decimal
    insurance_paid: Decimal
    adl: Decimal
    uncovered: Decimal
    collateral_sold: Mapping[str, Decimal]
    loss_underlying: str | None

    @property
    def loss(self) -> Decimal:
        return self.equity_before - self.equity_final

    @property
    def shock_loss(self) -> Decimal:
        return self.equity_before - self.equity_shocked


@dataclass(frozen=True)
class Cover:
    """Cover-1 and Cover-2 against the insurance fund's balance before the stress."""

    cover_1: Decimal
    cover_1_accounts: tuple[str, ...]
    cover_2: Decimal
    cover_2_accounts: tuple[str, ...]
    insurance_fund: Decimal

    @property
    def sufficient(self) -> bool:
        return self.insurance_fund >= self.cover_2

    @property
    def shortfall(self) -> Decimal:
        """What the fund lacks, rounded up to the cent (zero when it suffices)."""
        return requirement_usd(max(self.cover_2 - self.insurance_fund, ZERO))

    @property
    def verdict(self) -> str:
        return SUFFICIENT if self.sufficient else INSUFFICIENT

    def sentence(self) -> str:
        if self.sufficient:
            return (f"sufficient: the insurance fund of {self.insurance_fund:,.2f} covers "
                    f"Cover-2 of {self.cover_2:,.2f}")
        return (f"insufficient by {self.shortfall:,.2f}: Cover-2 needs {self.cover_2:,.2f}, "
                f"the insurance fund holds {self.insurance_fund:,.2f}")


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    base_prices: Mapping[str, Decimal]
    rounds: tuple[CascadeRound, ...]
    """Round 0 (the shock) and every cascade round."""
    converged: bool
    accounts: tuple[AccountOutcome, ...]
    sales: tuple[CollateralSale, ...]
    cover: Cover
    house_loss_usd: Decimal
    """What the positions `ccp:liquidation` already holds lose at the final prices."""

    @property
    def final_prices(self) -> Mapping[str, Decimal]:
        return self.rounds[-1].prices

    @property
    def cascade_rounds(self) -> int:
        """Rounds with close-outs (round 0, the shock, not counted)."""
        return len(self.rounds) - 1

    @property
    def loss_usd(self) -> Decimal:
        """Sum of the losing accounts' equity losses, cascade included."""
        return sum((max(a.loss, ZERO) for a in self.accounts), ZERO)

    @property
    def shock_loss_usd(self) -> Decimal:
        return sum((max(a.shock_loss, ZERO) for a in self.accounts), ZERO)

    @property
    def below_maintenance(self) -> int:
        """Accounts breaching at the shock (round 0)."""
        return self.rounds[0].breaching

    @property
    def bankrupt_at_shock(self) -> int:
        return sum(1 for a in self.accounts if a.equity_shocked < 0)

    @property
    def liquidated(self) -> int:
        return sum(1 for a in self.accounts if a.liquidated_in_round is not None)

    @property
    def bankrupt(self) -> int:
        return sum(1 for a in self.accounts if a.deficit > 0)

    def _total(self, name: str) -> Decimal:
        return sum((getattr(r, name) for r in self.rounds), ZERO)

    @property
    def deficit_usd(self) -> Decimal:
        return self._total("deficit_usd")

    @property
    def insurance_paid_usd(self) -> Decimal:
        return self._total("insurance_paid_usd")

    @property
    def adl_usd(self) -> Decimal:
        return self._total("adl_usd")

    @property
    def uncovered_usd(self) -> Decimal:
        return self._total("uncovered_usd")

    @property
    def fees_usd(self) -> Decimal:
        return self._total("fees_usd")

    @property
    def cross_margin_sales(self) -> tuple[CollateralSale, ...]:
        return tuple(s for s in self.sales if s.cross_margin)


@dataclass(frozen=True)
class StressReport:
    at: datetime
    insurance_fund: Decimal
    cascade: CascadeParameters
    accounts: int
    positions: int
    scenarios: tuple[ScenarioResult, ...]

    @property
    def worst(self) -> ScenarioResult | None:
        """The scenario needing the most default resources (Cover-2, then total deficit)."""
        if not self.scenarios:
            return None
        return max(self.scenarios, key=lambda s: (s.cover.cover_2, s.deficit_usd))


# ------------------------------------------------------------------------- money helpers


def ceil_cents(value: np.ndarray) -> np.ndarray:
    """Up to the cent, after cutting float noise at a micro-dollar (as margin does)."""
    return np.ceil(np.round(np.asarray(value, dtype=float) * 100.0, 4)) / 100.0


def floor_cents(value: np.ndarray) -> np.ndarray:
    return np.floor(np.round(np.asarray(value, dtype=float) * 100.0, 4)) / 100.0


def usd(value: float) -> Decimal:
    """A float figure as a Decimal to the cent (nearest)."""
    text = f"{float(value):.2f}"
    return D("0.00") if text == "-0.00" else D(text)


def _price_text(value: float) -> Decimal:
    return D(f"{float(value):.8g}") if value < 1 else D(f"{float(value):.2f}")


def _ratio(value: float) -> Decimal:
    text = f"{float(value):.6f}"
    return D("0.000000") if text == "-0.000000" else D(text)


# ------------------------------------------------------------------------- the book


@dataclass(frozen=True)
class Valuation:
    """Every account at one set of prices (floats; requirements to the cent)."""

    prices: np.ndarray
    row_price: np.ndarray
    row_sigma: np.ndarray
    underlying_prices: np.ndarray
    equity: np.ndarray
    initial: np.ndarray
    maintenance: np.ndarray

    @property
    def equity_cents(self) -> np.ndarray:
        return floor_cents(self.equity)


class StressBook:
    """The accounts' books as columns, built once and revalued at any prices.

    Prices are per name (`names`: every underlying held or traded and every collateral asset
    other than USDC). Instrument rows are margin's `Exposures` rows (one per marked
    instrument, one per (instrument, fallback price) otherwise); position rows are its
    (book, instrument, units) rows.
    """

    def __init__(self, accounts: Sequence[StressAccount], market: Market,
                 params: RiskParameters, house: Sequence[bool] | None = None) -> None:
        self.accounts = list(accounts)
        self.market = market
        self.params = params
        n = len(self.accounts)
        self.n = n
        for account in self.accounts:
            if account.model not in (STANDARD, PORTFOLIO):
                raise UnknownMarginModel(account.model)
        self.ids = [a.account_id for a in self.accounts]
        self.is_portfolio = np.array([a.model == PORTFOLIO for a in self.accounts], dtype=bool)
        self.is_house = np.zeros(n, dtype=bool) if house is None else np.array(house, bool)
        book_positions = [a.positions for a in self.accounts]
        self.exposures = exposures_of(book_positions, market)
        exposures = self.exposures
        self.row_instruments, self.row_marked = self._rows(book_positions, market)
        assert len(self.row_instruments) == exposures.price.size

        assets = sorted({asset for a in self.accounts for asset, amount in a.balances.items()
                         if amount != 0})
        self.assets = tuple(assets)
        names = sorted(set(exposures.underlyings)
                       | {a for a in assets if a != SETTLEMENT_ASSET})
        self.names = tuple(names)
        self.name_index = {name: i for i, name in enumerate(names)}
        self.base_prices = np.array([float(index_price(market.index_prices, name))
                                     for name in names], dtype=float)
        self.base_prices_exact = {name: index_price(market.index_prices, name)
                                  for name in names}
        self.underlying_name = np.array([self.name_index[u] for u in exposures.underlyings],
                                        dtype=np.intp)

        self.balance = np.zeros((n, len(assets)), dtype=float)
        for i, account in enumerate(self.accounts):
            for asset, amount in account.balances.items():
                if amount != 0:
                    self.balance[i, assets.index(asset)] = float(amount)
        haircuts = []
        for asset in assets:
            value = params.haircut.get(asset)
            held_long = bool((self.balance[:, assets.index(asset)] > 0).any())
            if value is None and held_long:
                raise MissingRiskParameter("haircut", asset)
            haircuts.append(float(value or 0))
        self.haircut = np.array(haircuts, dtype=float)
        self.asset_name = np.array([-1 if a == SETTLEMENT_ASSET else self.name_index[a]
                                    for a in assets], dtype=np.intp)

        # The unshocked equity, exactly as margin computes it.
        self.equity_before_exact = []
        for account in self.accounts:
            collateral = collateral_value(account.balances, market.index_prices, params)
            self.equity_before_exact.append(equity(collateral, account.positions, market))
        self.equity_before = np.array([float(e) for e in self.equity_before_exact])
        self.collateral_base = self._collateral(self.base_prices)

        units = exposures.units
        rows = exposures.price.size
        self.position_count = np.bincount(exposures.book, minlength=n)
        self.has_positions = self.position_count > 0
        self.has_delta_one = np.bincount(
            exposures.book, weights=(~exposures.is_option[exposures.instrument]).astype(float),
            minlength=n) > 0
        self.units_matrix = sparse.csr_matrix((units, (exposures.book, exposures.instrument)),
                                              shape=(n, rows))
        self.abs_units_matrix = sparse.csr_matrix(
            (np.abs(units), (exposures.book, exposures.instrument)), shape=(n, rows))
        self.position_name = self.underlying_name[
            exposures.instrument_underlying[exposures.instrument]] if units.size else \
            np.zeros(0, dtype=np.intp)
        self.option_rows = np.flatnonzero(exposures.is_option)
        self.base_sigma = option_sigma(exposures, float(params.vol_floor))
        self._grid = _grid(params)

    @staticmethod
    def _rows(books_: Sequence[Sequence[HeldPosition]], market: Market
              ) -> tuple[list[Instrument], np.ndarray]:
        """The instrument of each `exposures_of` row, in its order (first appearance of each
        (symbol, fallback price) key), and whether it has a mark."""
        marks = market.marks
        seen: set[tuple[str, Decimal | None]] = set()
        instruments: list[Instrument] = []
        marked: list[bool] = []
        for book in books_:
            for held in book:
                if held.quantity == 0:
                    continue
                symbol = held.instrument.symbol
                mark = marks.get(symbol)
                key = (symbol, None if mark is not None else position_price(held, {}))
                if key in seen:
                    continue
                seen.add(key)
                instruments.append(held.instrument)
                marked.append(mark is not None)
        return instruments, np.array(marked, dtype=bool)

    # ------------------------------------------------------------------ valuation

    def _collateral(self, prices: np.ndarray) -> np.ndarray:
        """SPEC 4 collateral value of every account at `prices` (floats)."""
        if not self.assets:
            return np.zeros(self.n)
        asset_prices = np.where(self.asset_name < 0, 1.0,
                                prices[np.maximum(self.asset_name, 0)])
        factor = np.where(self.balance > 0, 1.0 - self.haircut[None, :], 1.0)
        return (self.balance * asset_prices[None, :] * factor).sum(axis=1)

    def vol_factors(self, scenario: Scenario) -> np.ndarray:
        """f per exposure underlying."""
        return np.array([float(scenario.vol_factor_of(u)) for u in self.exposures.underlyings],
                        dtype=float)

    def value(self, prices: np.ndarray, vol_factors: np.ndarray) -> Valuation:
        """Every account at `prices` (per name) with implied volatilities x vol_factors."""
        exposures = self.exposures
        vol_floor = float(self.params.vol_floor)
        prices = np.round(prices, PRICE_SCALE)
        underlying_prices = prices[self.underlying_name]
        moves = underlying_prices / exposures.underlying_prices - 1.0
        sigma = np.full(exposures.price.size, np.nan)
        if self.option_rows.size:
            factor = vol_factors[exposures.instrument_underlying[self.option_rows]]
            shocked = np.maximum(self.base_sigma * factor, vol_floor)
            unmarked = ~self.row_marked[self.option_rows]
            if unmarked.any():  # margin implies an unmarked option's sigma from its fallback
                shocked = shocked.copy()
                for k in np.flatnonzero(unmarked):
                    row = self.option_rows[k]
                    u = exposures.instrument_underlying[row]
                    found = option_volatility(
                        self.row_instruments[row],
                        Mark(D(repr(float(exposures.price[row]))), None, self.market.at, -1),
                        D(repr(float(underlying_prices[u]))), self.market.at)
                    shocked[k] = vol_floor if found is None else max(found, vol_floor)
            sigma[self.option_rows] = shocked
        row_price = exposures.price.copy()
        if row_price.size:
            change = unit_pnl(exposures, moves[:, None],
                              None if not self.option_rows.size
                              else sigma[self.option_rows][:, None], vol_floor)[:, 0]
            moved = np.round(np.maximum(exposures.price + change, 0.0), PRICE_SCALE)
            row_price = np.where(self.row_marked, moved, exposures.price)
        equity_now = (self.equity_before + self._collateral(prices) - self.collateral_base
                      + self.units_matrix @ (row_price - exposures.price))
        shocked_exposures = replace(exposures, underlying_prices=underlying_prices,
                                    price=row_price, sigma=sigma)
        std_initial, std_maintenance = self._standard(shocked_exposures)
        port_initial, port_maintenance = self._portfolio(shocked_exposures)
        return Valuation(
            prices=prices.copy(), row_price=row_price, row_sigma=sigma,
            underlying_prices=underlying_prices, equity=np.asarray(equity_now, dtype=float),
            initial=np.where(self.is_portfolio, port_initial, std_initial),
            maintenance=np.where(self.is_portfolio, port_maintenance, std_maintenance))

    def _standard(self, e: Exposures) -> tuple[np.ndarray, np.ndarray]:
        """SPEC 5 standard model, per position (`margin._standard_per_position`'s formulas),
        each rounded up to the cent, summed per account."""
        n = self.n
        if e.units.size == 0:
            return np.zeros(n), np.zeros(n)
        p = self.params
        row = e.instrument
        units = e.units
        size = np.abs(units)
        price = e.price[row]
        underlying = e.underlying_prices[e.instrument_underlying[row]]
        strike = e.strike[row]
        size_rate = float(p.futures_size_rate) * size
        future_initial = size * price * (float(p.futures_initial_rate) + size_rate)
        future_maintenance = size * price * (float(p.futures_maintenance_rate) + size_rate)
        floor = float(p.short_option_initial_floor_rate) * underlying
        rate_m = float(p.short_option_maintenance_rate)
        call_initial = np.maximum(float(p.short_call_initial_rate) * underlying
                                  - np.maximum(strike - underlying, 0.0), floor) + price
        call_maintenance = rate_m * underlying + price
        put_maintenance = np.maximum(rate_m * underlying, rate_m * price) + price
        put_initial = np.maximum(np.maximum(float(p.short_put_initial_rate) * underlying
                                            - np.maximum(underlying - strike, 0.0), floor)
                                 + price, put_maintenance)
        is_call = e.is_call[row]
        option_initial = np.where(is_call, call_initial, put_initial) * size
        option_maintenance = np.where(is_call, call_maintenance, put_maintenance) * size
        is_option = e.is_option[row]
        short_option = is_option & (units < 0)
        initial = np.where(is_option, np.where(short_option, option_initial, 0.0),
                           future_initial)
        maintenance = np.where(is_option, np.where(short_option, option_maintenance, 0.0),
                               future_maintenance)
        return (np.round(np.bincount(e.book, ceil_cents(initial), minlength=n), 2),
                np.round(np.bincount(e.book, ceil_cents(maintenance), minlength=n), 2))

    def _portfolio(self, e: Exposures) -> tuple[np.ndarray, np.ndarray]:
        """SPEC 5 portfolio model with margin's own grid and repricing
        (`portfolio_requirements_many`'s steps, on the shocked columns)."""
        n = self.n
        if e.units.size == 0 or not self.is_portfolio.any():
            return np.zeros(n), np.zeros(n)
        p = self.params
        vol_floor = float(p.vol_floor)
        grid = self._grid
        n_underlyings = len(e.underlyings)
        group = e.group
        in_portfolio = self.is_portfolio[e.book]
        held = np.bincount(group[in_portfolio], minlength=e.n_groups) > 0
        ranges = np.full(n_underlyings, np.nan)
        for u, name in enumerate(e.underlyings):
            value = p.portfolio_range.get(name)
            if value is not None:
                ranges[u] = float(value)
            elif held.reshape(-1, n_underlyings)[:, u].any():
                raise MissingRiskParameter("portfolio_range", name)
        ranges = np.nan_to_num(ranges)
        fractions = np.array([float(f) for f in grid.fractions])
        moves = ranges[:, None] * fractions[None, :]
        option_vols = option_sigma(e, vol_floor)[:, None] * _vol_state_factors(e, grid, p)
        pnl = group_pnl(e, unit_pnl(e, moves, option_vols, vol_floor))
        worst = (-pnl * grid.weights[None, :]).max(axis=1)
        units = e.units
        underlying_of_position = e.instrument_underlying[e.instrument]
        short_usd = np.where(e.is_option[e.instrument] & (units < 0), -units, 0.0) \
            * e.underlying_prices[underlying_of_position]
        minimum = float(p.short_option_minimum_rate) \
            * np.bincount(group, weights=short_usd, minlength=e.n_groups)
        initial = ceil_cents(np.maximum(worst, 0.0) + minimum)
        maintenance = ceil_cents(float(p.maintenance_factor) * initial)
        book_of_group = np.arange(e.n_groups) // n_underlyings
        return (np.round(np.bincount(book_of_group[held], initial[held], minlength=n), 2),
                np.round(np.bincount(book_of_group[held], maintenance[held], minlength=n), 2))

    def breaching(self, valuation: Valuation, alive: np.ndarray) -> np.ndarray:
        """Equity below maintenance (below zero without positions), among `alive`."""
        equity_cents = valuation.equity_cents
        with_positions = equity_cents < valuation.maintenance
        without = equity_cents < 0
        return alive & ~self.is_house & np.where(self.has_positions, with_positions, without)

    def deltas(self, valuation: Valuation) -> np.ndarray:
        """Per instrument row: 1 for futures and perpetuals, the Black-76 delta of options at
        the valuation's prices and volatilities."""
        e = self.exposures
        delta = np.ones(e.price.size)
        if self.option_rows.size:
            rows = self.option_rows
            delta[rows] = black76_greeks(
                e.is_call[rows], valuation.underlying_prices[e.instrument_underlying[rows]],
                e.strike[rows], valuation.row_sigma[rows], e.t_years[rows])["delta"]
        return delta

    def derivative_pnl(self, valuation: Valuation) -> np.ndarray:
        """(account x exposure underlying): derivative P&L from the unshocked marks."""
        e = self.exposures
        if e.units.size == 0:
            return np.zeros((self.n, 0))
        change = (valuation.row_price - e.price)[:, None]
        return group_pnl(e, change)[:, 0].reshape(self.n, len(e.underlyings))

    # ------------------------------------------------------------------ the margin check

    def shocked_market(self, valuation: Valuation) -> Market:
        """The market margin would see at the valuation's prices: index prices, and every
        marked instrument's mark (its repriced price, an option's shocked volatility)."""
        index_prices = dict(self.market.index_prices)
        for name, i in self.name_index.items():
            index_prices[name] = D(repr(float(valuation.prices[i])))
        marks = dict(self.market.marks)
        for row, instrument in enumerate(self.row_instruments):
            if not self.row_marked[row]:
                continue
            old = marks[instrument.symbol]
            sigma = valuation.row_sigma[row]
            iv = None if math.isnan(sigma) else D(repr(float(sigma)))
            marks[instrument.symbol] = Mark(D(repr(float(valuation.row_price[row]))), iv,
                                            old.marked_at, old.position)
        return Market(self.market.at, index_prices, marks)

    def cross_check(self, valuation: Valuation,
                    accounts_max: int = CROSS_CHECK_ACCOUNTS_MAX) -> int:
        """Recompute the valuation's figures with `margin.account_margins_many` for the
        accounts nearest to breaching (all of a small book); raise `StressModelDisagrees`
        on a difference beyond rounding. Returns how many accounts were checked."""
        if self.n == 0:
            return 0
        chosen = np.arange(self.n)
        if self.n > accounts_max:
            distance = np.abs(valuation.equity_cents - valuation.maintenance)
            chosen = np.sort(np.argsort(distance, kind="stable")[:accounts_max])
        market = self.shocked_market(valuation)
        accounts = [self.accounts[i] for i in chosen]
        margins = account_margins_many([a.model for a in accounts],
                                       [a.balances for a in accounts],
                                       [a.positions for a in accounts], market, self.params)
        for i, margin in zip(chosen, margins, strict=True):
            slack = (CROSS_CHECK_CENTS_PER_POSITION * (int(self.position_count[i]) + 1)
                     / 100.0)
            for figure, ours, theirs in (
                    ("equity", valuation.equity_cents[i], margin.equity),
                    ("initial", valuation.initial[i], margin.initial),
                    ("maintenance", valuation.maintenance[i], margin.maintenance)):
                if abs(float(ours) - float(theirs)) > slack + CROSS_CHECK_RELATIVE * abs(
                        float(theirs)):
                    raise StressModelDisagrees(self.ids[i], figure, usd(ours), theirs)
        return len(chosen)


# ------------------------------------------------------------------------- the cascade


def run_scenario(book: StressBook, scenario: Scenario, insurance_fund: Decimal,
                 cascade: CascadeParameters = DEFAULT_CASCADE,
                 cross_check: bool = True) -> ScenarioResult:
    """The shock, the cascade until no new breach, the waterfall and Cover-1/Cover-2."""
    names = book.names
    vol_factors = book.vol_factors(scenario)
    scenario_moves = np.array([float(scenario.move_of(name)) for name in names])
    prices = book.base_prices * (1.0 + scenario_moves)
    valuation = book.value(prices, vol_factors)
    if cross_check:
        book.cross_check(valuation)
    shocked = valuation
    alive = np.ones(book.n, dtype=bool)
    breaching = book.breaching(valuation, alive)
    fund = float(floor_cents(float(insurance_fund)))  # the cascade counts in cents
    depth = np.array([float(cascade.depth_of(name)) for name in names])
    coefficient = float(cascade.impact_coefficient)
    move_max = float(cascade.round_move_max)
    fee_rate = float(book.params.liquidation_fee_rate)

    rounds = [_round_zero(book, scenario, prices, breaching, fund)]
    liquidated_in = np.full(book.n, -1, dtype=np.int64)
    final_equity = np.zeros(book.n)
    deficit = np.zeros(book.n)
    paid = np.zeros(book.n)
    adl = np.zeros(book.n)
    uncovered = np.zeros(book.n)
    sold: dict[int, dict[str, float]] = {}
    sales: list[CollateralSale] = []
    e = book.exposures

    round_no = 0
    while breaching.any() and round_no < cascade.rounds_max:
        round_no += 1
        closing = np.flatnonzero(breaching)
        previous = valuation
        in_close = breaching[e.book] if e.units.size else np.zeros(0, dtype=bool)
        exposure = (e.units * book.deltas(previous)[e.instrument]
                    * previous.underlying_prices[e.instrument_underlying[e.instrument]]
                    ) if e.units.size else np.zeros(0)
        net_sold = np.bincount(book.position_name[in_close], weights=exposure[in_close],
                               minlength=len(names)).astype(float)
        gross = float(np.abs(exposure[in_close]).sum())
        collateral_usd_before = np.zeros(len(names))
        for k, asset in enumerate(book.assets):
            i = book.asset_name[k]
            if i >= 0:
                collateral_usd_before[i] += float(book.balance[closing, k].sum()) \
                    * previous.prices[i]
        net_sold += collateral_usd_before
        impact = np.clip(-coefficient * net_sold / depth, -move_max, move_max)
        prices = previous.prices * (1.0 + impact)
        valuation = book.value(prices, vol_factors)

        close_equity = valuation.equity_cents[closing]
        notional = np.asarray(book.abs_units_matrix[closing] @ valuation.row_price).ravel()
        fees = np.minimum(ceil_cents(fee_rate * notional), np.maximum(close_equity, 0.0))
        fund = round(fund + float(fees.sum()), 2)
        final = np.round(close_equity - fees, 2)
        round_deficit = np.maximum(-final, 0.0)
        round_paid = round_adl = round_uncovered = 0.0
        for j, i in enumerate(closing):
            need = float(round_deficit[j])
            cover = min(need, max(fund, 0.0))
            fund = round(fund - cover, 2)
            paid[i] = cover
            rest = round(need - cover, 2)
            if book.has_delta_one[i]:
                adl[i] = rest
                round_adl += rest
            else:
                uncovered[i] = rest
                round_uncovered += rest
            round_paid += cover
        deficit[closing] = round_deficit
        final_equity[closing] = final
        liquidated_in[closing] = round_no
        alive[closing] = False

        pnl = book.derivative_pnl(valuation)[closing]
        sold_amounts: dict[str, float] = {}
        sold_usd: dict[str, float] = {}
        cross_usd: dict[str, float] = {}
        for j, i in enumerate(closing):
            driver, driver_loss = None, 0.0
            if pnl.shape[1]:
                u = int(np.argmin(pnl[j]))
                if pnl[j, u] < 0:
                    driver, driver_loss = e.underlyings[u], float(-pnl[j, u])
            sold[int(i)] = {}
            for k, asset in enumerate(book.assets):
                name = book.asset_name[k]
                amount = float(book.balance[i, k])
                if name < 0 or amount == 0:
                    continue
                proceeds = amount * valuation.prices[name] * (
                    1.0 - book.haircut[k] if amount > 0 else 1.0)
                sold[int(i)][asset] = amount
                sale = CollateralSale(round_no, book.ids[i], asset, _amount(amount),
                                      usd(proceeds), driver, usd(driver_loss))
                sales.append(sale)
                sold_amounts[asset] = sold_amounts.get(asset, 0.0) + amount
                sold_usd[asset] = sold_usd.get(asset, 0.0) + proceeds
                if sale.cross_margin:
                    cross_usd[asset] = cross_usd.get(asset, 0.0) + proceeds
        breaching = book.breaching(valuation, alive)
        rounds.append(CascadeRound(
            round=round_no,
            prices={name: _price_text(prices[i]) for i, name in enumerate(names)},
            impact={name: _ratio(impact[i]) for i, name in enumerate(names)},
            accounts_liquidated=tuple(book.ids[i] for i in closing),
            positions_notional_usd=usd(gross),
            net_sold_usd={name: usd(net_sold[i]) for i, name in enumerate(names)},
            collateral_sold={a: _amount(v) for a, v in sorted(sold_amounts.items())},
            collateral_sold_usd={a: usd(v) for a, v in sorted(sold_usd.items())},
            cross_margin_sold_usd={a: usd(v) for a, v in sorted(cross_usd.items())},
            fees_usd=usd(float(fees.sum())), deficit_usd=usd(float(round_deficit.sum())),
            insurance_paid_usd=usd(round_paid), adl_usd=usd(round_adl),
            uncovered_usd=usd(round_uncovered), insurance_fund_left=usd(fund),
            breaching=int(breaching.sum())))

    converged = not breaching.any()
    survivors = alive & ~book.is_house
    final_equity[survivors] = valuation.equity[survivors]
    # An account still breaching when the rounds ran out: its deficit counts for Cover-N.
    deficit[survivors] = np.maximum(-valuation.equity[survivors], 0.0)
    house_loss = float((book.equity_before[book.is_house]
                        - valuation.equity[book.is_house]).sum())
    outcomes = _outcomes(book, shocked, valuation, liquidated_in, final_equity, deficit,
                         paid, adl, uncovered, sold)
    return ScenarioResult(
        scenario=scenario,
        base_prices={name: book.base_prices_exact[name] for name in names},
        rounds=tuple(rounds), converged=converged, accounts=outcomes, sales=tuple(sales),
        cover=_cover(outcomes, insurance_fund), house_loss_usd=usd(house_loss))


def _amount(value: float) -> Decimal:
    return D(f"{value:.8f}").normalize() if value else ZERO


def _round_zero(book: StressBook, scenario: Scenario, prices: np.ndarray,
                breaching: np.ndarray, fund: float) -> CascadeRound:
    names = book.names
    return CascadeRound(
        round=0, prices={name: _price_text(prices[i]) for i, name in enumerate(names)},
        impact={name: scenario.move_of(name) for name in names}, accounts_liquidated=(),
        positions_notional_usd=D("0.00"), net_sold_usd={}, collateral_sold={},
        collateral_sold_usd={}, cross_margin_sold_usd={}, fees_usd=D("0.00"),
        deficit_usd=D("0.00"), insurance_paid_usd=D("0.00"), adl_usd=D("0.00"),
        uncovered_usd=D("0.00"), insurance_fund_left=usd(fund),
        breaching=int(breaching.sum()))


def _outcomes(book: StressBook, shocked: Valuation, final: Valuation,
              liquidated_in: np.ndarray, final_equity: np.ndarray, deficit: np.ndarray,
              paid: np.ndarray, adl: np.ndarray, uncovered: np.ndarray,
              sold: Mapping[int, Mapping[str, float]]) -> tuple[AccountOutcome, ...]:
    equity_shocked = shocked.equity_cents
    equity_final = floor_cents(final_equity)
    deficit_cents = ceil_cents(deficit)
    pnl = book.derivative_pnl(final)
    underlyings = book.exposures.underlyings
    drivers: list[str | None] = [None] * book.n
    if pnl.shape[1]:
        worst = np.argmin(pnl, axis=1)
        for i in np.flatnonzero(pnl[np.arange(book.n), worst] < 0):
            drivers[i] = underlyings[worst[i]]
    outcomes = []
    for i, account_id in enumerate(book.ids):
        if book.is_house[i]:
            continue
        equity_now = usd(equity_shocked[i])
        initial, maintenance = usd(shocked.initial[i]), usd(shocked.maintenance[i])
        round_no = int(liquidated_in[i])
        outcomes.append(AccountOutcome(
            account_id=account_id, model=book.accounts[i].model,
            equity_before=usd_cents(book.equity_before_exact[i]),
            equity_shocked=equity_now, initial_shocked=initial,
            maintenance_shocked=maintenance,
            status_shocked=margin_status(equity_now, initial, maintenance,
                                         bool(book.has_positions[i])),
            liquidated_in_round=None if round_no < 0 else round_no,
            equity_final=usd(equity_final[i]), deficit=usd(deficit_cents[i]),
            insurance_paid=usd(paid[i]), adl=usd(adl[i]), uncovered=usd(uncovered[i]),
            collateral_sold={a: _amount(v) for a, v in sorted(sold.get(i, {}).items())},
            loss_underlying=drivers[i]))
    return tuple(outcomes)


def _cover(outcomes: Sequence[AccountOutcome], insurance_fund: Decimal) -> Cover:
    """Cover-1 and Cover-2: the largest and the two largest uncovered stress losses."""
    ranked = sorted((o for o in outcomes if o.deficit > 0),
                    key=lambda o: (-o.deficit, o.account_id))
    top1, top2 = ranked[:1], ranked[:2]
    return Cover(cover_1=sum((o.deficit for o in top1), D("0.00")),
                 cover_1_accounts=tuple(o.account_id for o in top1),
                 cover_2=sum((o.deficit for o in top2), D("0.00")),
                 cover_2_accounts=tuple(o.account_id for o in top2),
                 insurance_fund=insurance_fund)


# ------------------------------------------------------------------------- from the ledger


def stress_accounts(state: LedgerState) -> tuple[list[StressAccount], list[StressAccount]]:
    """The member accounts' books (margin's `books`), and the house's own positions
    (`ccp:liquidation`, which holds what liquidations took over) valued beside them."""
    members = [StressAccount(account_id, state.accounts[account_id].margin_model,
                             book.balances, book.positions)
               for account_id, book in sorted(books(state).items())]
    held = []
    for (account_id, symbol), position in sorted(state.positions.items()):
        if account_id == LIQUIDATION and position.quantity != 0:
            held.append(HeldPosition(state.instruments[symbol], position.quantity,
                                     position.settlement_basis, position.average_entry_price))
    house = [StressAccount(LIQUIDATION, STANDARD, {}, held)] if held else []
    return members, house


def insurance_fund_of(state: LedgerState) -> Decimal:
    return state.balances.get((INSURANCE, SETTLEMENT_ASSET), ZERO)


def stress_book(state: LedgerState, at: datetime) -> StressBook:
    members, house = stress_accounts(state)
    assert all(not is_house(a.account_id) for a in members)
    return StressBook([*members, *house], market_at(state, at), params_at(state, at),
                      house=[False] * len(members) + [True] * len(house))


def stress_test(state: LedgerState, at: datetime, scenarios: Sequence[Scenario],
                cascade: CascadeParameters = DEFAULT_CASCADE,
                cross_check: bool = True) -> StressReport:
    """Every scenario against the ledger's state as of `at`."""
    book = stress_book(state, at)
    fund = insurance_fund_of(state)
    results = tuple(run_scenario(book, s, fund, cascade, cross_check) for s in scenarios)
    members = int((~book.is_house).sum())
    positions = int(np.count_nonzero(~book.is_house[book.exposures.book]))
    return StressReport(at, fund, cascade, members, positions, results)
