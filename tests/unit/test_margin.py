"""Margin: collateral value, equity, the standard and portfolio models, and margin states."""

from __future__ import annotations

import ast
import inspect
import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from clearing.domain import margin, risk_measures
from clearing.domain.instruments import Instrument
from clearing.domain.ledger import Mark, Position
from clearing.domain.margin import (
    AccountMargin,
    HeldPosition,
    Market,
    MissingIndexPrice,
    UnknownMarginModel,
    account_margin,
    collateral_value,
    equity,
    margin_ratio,
    margin_status,
    portfolio_requirement,
    portfolio_requirements_many,
    standard_requirement,
)
from clearing.domain.pricing import black76
from clearing.domain.risk_parameters import DEFAULTS

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

D = Decimal
AT = datetime(2026, 6, 1, 8, tzinfo=timezone.utc)
JUN26 = datetime(2026, 6, 26, 8, tzinfo=timezone.utc)  # 25 days after AT
SEP26 = datetime(2026, 9, 25, 8, tzinfo=timezone.utc)  # 116 days after AT
BTC_INDEX = D("100000")
ETH_INDEX = D("2098")


def future(symbol: str = "BTC-26JUN26", expiry: datetime = JUN26) -> Instrument:
    return Instrument(symbol=symbol, kind="future", underlying=symbol.split("-")[0],
                      settlement_asset="USDC", expiry=expiry, multiplier=D(1))


def perpetual(underlying: str = "BTC") -> Instrument:
    return Instrument(symbol=f"{underlying}-PERP", kind="perpetual", underlying=underlying,
                      settlement_asset="USDC", multiplier=D(1))


def option(symbol: str, expiry: datetime = JUN26, multiplier: str = "1") -> Instrument:
    underlying, _, strike, flag = symbol.split("-")
    return Instrument(symbol=symbol, kind="option", underlying=underlying,
                      settlement_asset="USDC", expiry=expiry, strike=D(strike),
                      option_type="call" if flag == "C" else "put", multiplier=D(multiplier))


def mark(price: str | Decimal, iv: str | None = None) -> Mark:
    return Mark(D(price), None if iv is None else D(iv), AT, 1)


def market(marks: dict[str, Mark], at: datetime = AT, **index: Decimal) -> Market:
    return Market(at, {"BTC": BTC_INDEX, "ETH": ETH_INDEX, **index}, marks)


def held(instrument: Instrument, quantity: str, price: str | Decimal) -> HeldPosition:
    """A position opened by one fill at `price` (its settlement basis is q x price)."""
    q = D(quantity)
    return HeldPosition(instrument, q, q * D(price), D(price))


def b76(instrument: Instrument, vol: float, underlying: float = 100_000.0,
        at: datetime = AT) -> Decimal:
    """The option's Black-76 value to the cent, as a mark publisher would quote it."""
    t_years = (instrument.expiry - at).total_seconds() / (365 * 86400)
    value = black76(str(instrument.option_type), underlying, float(instrument.strike), vol,
                    t_years).price
    return D(str(round(value, 2)))


# --- collateral and equity -----------------------------------------------------------------


def test_collateral_haircuts_positive_balances_and_counts_a_debt_in_full():
    balances = {"USDC": D("1000.5"), "BTC": D("0.5"), "ETH": D("-2")}
    value = collateral_value(balances, {"BTC": BTC_INDEX, "ETH": D("2000")}, DEFAULTS)
    # 1000.5 + 0.5 x 100,000 x 0.90 - 2 x 2,000 (no haircut on a debt)
    assert value == D("1000.5") + D("45000") - D("4000")


def test_collateral_uses_the_haircut_in_force():
    params = DEFAULTS.model_copy(update={"haircut": {**DEFAULTS.haircut, "BTC": D("0.25")}})
    assert collateral_value({"BTC": D("2")}, {"BTC": BTC_INDEX}, params) == D("150000")


def test_collateral_needs_a_price_only_for_assets_held():
    assert collateral_value({"USDC": D("5"), "ETH": D("0")}, {}, DEFAULTS) == D("5")
    with pytest.raises(MissingIndexPrice, match="ETH"):
        collateral_value({"ETH": D("1")}, {}, DEFAULTS)


def test_equity_adds_a_futures_unrealised_vm_and_subtracts_a_short_options_mark_value():
    fut = future()
    put = option("BTC-26JUN26-90000-P")
    positions = [held(fut, "2", "95000"), held(put, "-3", "400")]
    m = market({fut.symbol: mark("100000"), put.symbol: mark("500")})
    # VM: (2 x 100,000 - 2 x 95,000) x 1 = +10,000; short 3 puts at 500 = -1,500
    assert equity(D("10000"), positions, m) == D("18500")


def test_equity_of_unmarked_positions_uses_last_settlement_and_entry_price():
    fut = future()
    call = option("BTC-26JUN26-110000-C", multiplier="0.1")
    positions = [held(fut, "-1", "95000"), held(call, "4", "2500")]
    # no mark: the future has no VM yet; the long calls count at their entry price
    assert equity(D("0"), positions, market({})) == D("1000")


# --- standard model ------------------------------------------------------------------------


def test_standard_future_worked_example():
    fut = future()
    requirement = standard_requirement([held(fut, "25", "98000")],
                                       market({fut.symbol: mark("100000")}), DEFAULTS)
    assert (requirement.initial, requirement.maintenance) == (D("53125.00"), D("28125.00"))


def test_standard_short_put_worked_example():
    put = option("ETH-26JUN26-1850-P")
    m = market({put.symbol: mark("2.4")})
    one = standard_requirement([held(put, "-1", "2.4")], m, DEFAULTS)
    assert (one.initial, one.maintenance) == (D("212.20"), D("159.75"))
    ten = standard_requirement([held(put, "-10", "2.4")], m, DEFAULTS)
    assert (ten.initial, ten.maintenance) == (D("2122.00"), D("1597.50"))


def test_standard_short_call_out_and_in_the_money():
    otm = option("BTC-26JUN26-110000-C")
    itm = option("BTC-26JUN26-90000-C")
    m = market({otm.symbol: mark("2000"), itm.symbol: mark("11000")})
    # OTM 10,000: max(15,000 - 10,000, 10,000) + 2,000; maintenance 7,500 + 2,000
    assert standard_requirement([held(otm, "-1", "2000")], m, DEFAULTS).initial == D("12000")
    requirement = standard_requirement([held(itm, "-2", "11000")], m, DEFAULTS)
    assert (requirement.initial, requirement.maintenance) == (D("52000"), D("37000"))


def test_standard_long_options_need_nothing_and_contributions_sum():
    fut = future()
    call = option("BTC-26JUN26-110000-C")
    put = option("ETH-26JUN26-1850-P")
    m = market({fut.symbol: mark("100000"), call.symbol: mark("2000"),
                put.symbol: mark("2.4")})
    requirement = standard_requirement(
        [held(call, "5", "2000"), held(fut, "25", "100000"), held(put, "-1", "2.4")],
        m, DEFAULTS)
    assert [c.symbol for c in requirement.contributions] == [call.symbol, fut.symbol,
                                                             put.symbol]
    assert requirement.contributions[0].initial == 0
    assert requirement.initial == D("53125") + D("212.2")
    assert requirement.maintenance == D("28125") + D("159.75")


def test_standard_rounds_each_contribution_up_to_the_cent():
    perp = perpetual()
    requirement = standard_requirement([held(perp, "0.001", "100000.01")],
                                       market({perp.symbol: mark("100000.01")}), DEFAULTS)
    # 100.00001 x (0.02 + 0.00000005) = 2.000005...: rounded up
    assert requirement.initial == D("2.01")


# --- portfolio model -----------------------------------------------------------------------


def hedged_market() -> tuple[dict[str, Instrument], Market]:
    instruments = {i.symbol: i for i in (
        future(), perpetual(), option("BTC-26JUN26-100000-C"),
        option("BTC-26JUN26-105000-C"), option("BTC-26JUN26-100000-P"))}
    marks = {"BTC-26JUN26": mark("100000"), "BTC-PERP": mark("100000")}
    for symbol, instrument in instruments.items():
        if instrument.is_option:
            marks[symbol] = mark(b76(instrument, 0.6), "0.6")
    return instruments, market(marks)


@pytest.mark.parametrize("book", [
    pytest.param([("BTC-PERP", "10"), ("BTC-26JUN26-100000-C", "-10")], id="covered-call"),
    pytest.param([("BTC-26JUN26-100000-C", "10"), ("BTC-26JUN26-105000-C", "-10")],
                 id="call-spread"),
    # a short at-the-money put, delta-hedged (delta about -0.5) with a short future
    pytest.param([("BTC-26JUN26", "-5"), ("BTC-26JUN26-100000-P", "-10")],
                 id="future-against-its-option"),
])
def test_a_hedged_book_needs_less_under_portfolio_than_standard(book):
    instruments, m = hedged_market()
    positions = [held(instruments[s], q, m.marks[s].price) for s, q in book]
    standard = standard_requirement(positions, m, DEFAULTS)
    portfolio = portfolio_requirement(positions, m, DEFAULTS)
    assert portfolio.initial < standard.initial
    assert portfolio.maintenance < standard.maintenance
    # the hedge is what makes it cheaper: the short option alone needs more than the book
    alone = portfolio_requirement(
        [p for p in positions if p.instrument.is_option and p.quantity < 0], m, DEFAULTS)
    assert portfolio.initial < alone.initial


def test_portfolio_future_loses_the_full_range():
    fut = future()
    m = market({fut.symbol: mark("100000")})
    requirement = portfolio_requirement([held(fut, "1", "100000")], m, DEFAULTS)
    assert (requirement.initial, requirement.maintenance) == (D("16000.00"), D("12800.00"))
    [worst] = requirement.worst
    assert (worst.underlying, worst.move, worst.loss) == ("BTC", -0.16, D("16000.00"))


def test_portfolio_extreme_move_counts_at_35_percent():
    # A short put 25% out of the money loses little within +-16% but much at -32%.
    put = option("BTC-26JUN26-75000-P")
    m = market({put.symbol: mark("5", "0.2")})
    requirement = portfolio_requirement([held(put, "-1", "5")], m, DEFAULTS)
    [worst] = requirement.worst
    assert (worst.move, worst.vol_state) == (-0.32, "extreme")
    t_years = 25 / 365
    base = black76("put", 100_000.0, 75_000.0, 0.2, t_years).price
    crashed = black76("put", 68_000.0, 75_000.0, 0.2, t_years).price
    expected = D(str(0.35 * (crashed - base))).quantize(D("0.01"), rounding="ROUND_CEILING")
    assert abs(worst.loss - expected) <= D("0.01")
    assert requirement.initial == worst.loss + D("500")  # + 0.5% x 100,000 x 1 short unit


@pytest.mark.parametrize("expiry, exponent", [(JUN26, 0.3), (SEP26, 0.13)])
def test_portfolio_vol_states_follow_days_to_expiry(expiry, exponent):
    """An independent scalar computation of the whole grid for one short straddle leg."""
    symbol = f"BTC-{'26JUN26' if expiry == JUN26 else '25SEP26'}-100000-C"
    call = option(symbol, expiry)
    m = market({symbol: mark(b76(call, 0.5), "0.5")})
    requirement = portfolio_requirement([held(call, "-2", m.marks[symbol].price)], m, DEFAULTS)
    dte = (expiry - AT).total_seconds() / 86400
    t_years = dte / 365
    term = (30 / dte) ** exponent
    base = black76("call", 100_000.0, 100_000.0, 0.5, t_years).price
    losses = []
    for vol in (0.5 * (1 + 0.5 * term), 0.5, 0.5 * (1 - 0.25 * term)):
        for step in range(-4, 5):
            new = black76("call", 100_000.0 * (1 + 0.04 * step), 100_000.0, vol, t_years)
            losses.append(2 * (new.price - base))
    for move in (-0.32, 0.32):
        new = black76("call", 100_000.0 * (1 + move), 100_000.0, 0.5, t_years)
        losses.append(0.35 * 2 * (new.price - base))
    expected = D(str(max(losses) + 0.005 * 100_000 * 2))
    assert abs(requirement.initial - expected) <= D("0.01")
    assert requirement.worst[0].vol_state == "up"


def test_portfolio_short_option_minimum_alone_when_no_scenario_loses():
    # Far out of the money at a low volatility: worth nothing in every scenario.
    call = option("BTC-26JUN26-300000-C")
    m = market({call.symbol: mark("0.01", "0.2")})
    requirement = portfolio_requirement([held(call, "-3", "0.01")], m, DEFAULTS)
    assert requirement.initial == D("1500.00")  # 0.5% x 100,000 x 3 units
    assert requirement.maintenance == D("1200.00")


def test_portfolio_maintenance_is_80_percent_of_initial_per_underlying():
    instruments, m = hedged_market()
    put = option("ETH-26JUN26-1850-P", multiplier="10")
    m = Market(m.at, m.index_prices, {**m.marks, put.symbol: mark("2.4")})
    positions = [held(instruments["BTC-PERP"], "0.3", "100000"),
                 held(instruments["BTC-26JUN26-100000-C"], "-1", m.marks[
                     "BTC-26JUN26-100000-C"].price),
                 held(put, "-7", "2.4")]
    requirement = portfolio_requirement(positions, m, DEFAULTS)
    assert [c.symbol for c in requirement.contributions] == ["BTC", "ETH"]
    for contribution in requirement.contributions:
        assert contribution.maintenance == \
            (contribution.initial * D("0.8")).quantize(D("0.01"), rounding="ROUND_CEILING")
    assert requirement.initial == sum(c.initial for c in requirement.contributions)
    assert requirement.maintenance == sum(c.maintenance for c in requirement.contributions)


def test_portfolio_prices_an_unmarked_option_at_its_entry_price():
    call = option("BTC-26JUN26-100000-C")
    entry = b76(call, 0.6)
    marked = portfolio_requirement([held(call, "-1", entry)],
                                   market({call.symbol: mark(entry)}), DEFAULTS)
    unmarked = portfolio_requirement([held(call, "-1", entry)], market({}), DEFAULTS)
    assert unmarked == marked


def test_portfolio_expired_unsettled_option_is_priced_at_intrinsic():
    put = option("BTC-26JUN26-110000-P")
    after_expiry = JUN26 + timedelta(hours=1)
    m = market({put.symbol: mark("10000")}, at=after_expiry)
    requirement = portfolio_requirement([held(put, "-1", "10000")], m, DEFAULTS)
    # intrinsic 10,000 grows by 16,000 at -16%; 32,000 x 0.35 = 11,200 at -32% is less
    assert requirement.initial == D("16000.00") + D("500.00")


def test_portfolio_extreme_range_beyond_minus_100_percent_stays_finite():
    params = DEFAULTS.model_copy(update={"portfolio_range": {"BTC": D("0.5"), "ETH": D("0.5")},
                                         "extreme_move_multiple": D("3")})
    put = option("BTC-26JUN26-100000-P")
    m = market({put.symbol: mark(b76(put, 0.6), "0.6")})
    requirement = portfolio_requirement([held(put, "-1", m.marks[put.symbol].price)], m,
                                        params)
    assert D("0") < requirement.initial < D("100000")


def test_portfolio_of_no_open_position_is_zero():
    fut = future()
    requirement = portfolio_requirement([held(fut, "0", "1")], market({}), DEFAULTS)
    assert (requirement.initial, requirement.maintenance, requirement.contributions) == \
        (D("0"), D("0"), ())


def random_books(count: int, seed: int) -> tuple[list[list[HeldPosition]], Market]:
    rng = random.Random(seed)
    instruments = [future(), perpetual(), perpetual("ETH"), future("ETH-25SEP26", SEP26)]
    for strike in ("80000", "95000", "100000", "120000"):
        for flag in ("C", "P"):
            instruments.append(option(f"BTC-25SEP26-{strike}-{flag}", SEP26))
    for strike in ("1800", "2100", "2500"):
        instruments.append(option(f"ETH-26JUN26-{strike}-C", multiplier="10"))
    marks = {}
    for instrument in instruments:
        index = 100_000.0 if instrument.underlying == "BTC" else 2098.0
        if instrument.is_option:
            with_iv = rng.random() < 0.5  # half the marks give no iv: it is implied
            marks[instrument.symbol] = mark(b76(instrument, 0.55, index),
                                            "0.55" if with_iv else None)
        else:
            marks[instrument.symbol] = mark(str(round(index * 1.01, 2)))
    del marks[instruments[-1].symbol]  # one instrument has no mark yet
    books = []
    for _ in range(count):
        chosen = rng.sample(instruments, rng.randint(0, 6))
        books.append([held(i, str(rng.choice([-3, -1, 1, 2])), D("1000")) for i in chosen])
    return books, market(marks)


def test_batch_equals_one_account_at_a_time():
    books, m = random_books(60, seed=7)
    batch = portfolio_requirements_many(books, m, DEFAULTS)
    assert batch == [portfolio_requirement(book, m, DEFAULTS) for book in books]
    assert any(r.initial > 0 for r in batch) and any(r.initial == 0 for r in batch)


def test_portfolio_needs_the_index_price_of_each_underlying():
    fut = future()
    with pytest.raises(MissingIndexPrice, match="BTC"):
        portfolio_requirement([held(fut, "1", "1")], Market(AT, {}, {}), DEFAULTS)


# --- margin states -------------------------------------------------------------------------


@pytest.mark.parametrize("equity_usd, has_positions, status", [
    ("1000.00", True, "healthy"),  # equity = initial
    ("999.99", True, "restricted"),
    ("800.00", True, "restricted"),  # equity = maintenance
    ("799.99", True, "liquidating"),
    ("-5.00", True, "liquidating"),  # positions left to liquidate
    ("-0.01", False, "bankrupt"),
    ("0.00", False, "healthy"),
])
def test_margin_status_thresholds(equity_usd, has_positions, status):
    initial, maintenance = (D("1000"), D("800")) if has_positions else (D("0"), D("0"))
    assert margin_status(D(equity_usd), initial, maintenance, has_positions) == status


def test_margin_ratio_is_maintenance_over_equity_and_none_without_equity():
    assert margin_ratio(D("800"), D("3000")) == D("0.266667")  # rounded up
    assert margin_ratio(D("0"), D("10")) == D("0")
    assert margin_ratio(D("800"), D("0")) is None
    assert margin_ratio(D("800"), D("-1")) is None


def test_account_margin_reports_rounded_figures_and_the_status():
    fut = future()
    positions = [held(fut, "25", "99000")]
    m = market({fut.symbol: mark("100000")})
    balances = {"USDC": D("20000.009"), "BTC": D("0.3")}
    result = account_margin("standard", balances, positions, m, DEFAULTS)
    assert result == AccountMargin(
        model="standard",
        collateral_value=D("47000.00"),  # 20,000.009 + 0.3 x 100,000 x 0.9, rounded down
        equity=D("72000.00"),  # + VM 25 x (100,000 - 99,000)
        initial=D("53125.00"),
        maintenance=D("28125.00"),
        margin_ratio=D("0.390625"),
        status="healthy",
        requirement=result.requirement,
    )
    # the same book under the portfolio model must cover a 16% move: 25 x 16,000
    portfolio = account_margin("portfolio", balances, positions, m, DEFAULTS)
    assert (portfolio.initial, portfolio.maintenance) == (D("400000.00"), D("320000.00"))
    assert portfolio.status == "liquidating"


def test_account_margin_without_positions_and_a_debt_is_bankrupt():
    result = account_margin("portfolio", {"USDC": D("-12.5")}, [], market({}), DEFAULTS)
    assert (result.status, result.initial, result.margin_ratio) == ("bankrupt", D("0"), None)


def test_account_margin_refuses_an_unknown_model():
    with pytest.raises(UnknownMarginModel):
        account_margin("gross", {}, [], market({}), DEFAULTS)


def test_held_position_from_a_ledger_position():
    fut = future()
    position = Position(D("2"), D("100"), D("210"))
    assert HeldPosition.of(fut, position) == HeldPosition(fut, D("2"), D("210"), D("100"))


@pytest.mark.parametrize("module", [margin, risk_measures])
def test_margin_modules_are_pure(module):
    tree = ast.parse(inspect.getsource(module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    forbidden = ("sqlalchemy", "psycopg", "apscheduler", "typer", "clearing.store",
                 "clearing.projections", "clearing.app", "clearing.domain.clock")
    assert not [m for m in imported if m and m.startswith(forbidden)]
