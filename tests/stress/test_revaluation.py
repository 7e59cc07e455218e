"""The vectorised revaluation gives margin's own figures, whatever the book and the shock."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from clearing.domain.instruments import Instrument
from clearing.domain.margin import HeldPosition, account_margins_many
from clearing.domain.pricing import black76
from clearing.domain.stress import usd
from clearing.domain.stress_scenarios import SHIPPED, Scenario
from tests.stress.books import (
    AT,
    BTC_PERP,
    ETH_PERP,
    EXPIRY,
    D,
    StressAccount,
    book,
    market,
    option,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

INDEX = {"BTC": 100_000.0, "ETH": 3_000.0}
SHORT = AT + timedelta(days=3)
FUTURE = Instrument(symbol="BTC-2DEC26", kind="future", underlying="BTC",
                    settlement_asset="USDC", expiry=EXPIRY, multiplier=D(1))
UNMARKED_FUTURE = Instrument(symbol="ETH-2DEC26", kind="future", underlying="ETH",
                             settlement_asset="USDC", expiry=EXPIRY, multiplier=D(1))


def _options() -> list[Instrument]:
    found = []
    for underlying, strikes in (("BTC", (80_000, 100_000, 120_000)), ("ETH", (2_500, 3_500))):
        for strike in strikes:
            for flag in ("C", "P"):
                found.append(option(f"{underlying}-2DEC26-{strike}-{flag}"))
    found.append(option("BTC-5NOV26-95000-P", SHORT))
    found.append(option("ETH-5NOV26-3000-C", SHORT))
    return found


def mixed_book(seed: int, accounts: int = 40):  # type: ignore[no-untyped-def]
    """Standard and portfolio accounts holding perpetuals, futures (one never marked, one
    closed with variation margin still owed) and calls and puts, long and short, on both
    underlyings, with USDC, BTC and ETH collateral (a BTC debt included)."""
    rng = random.Random(seed)
    options = _options()
    marks: dict[str, tuple[str, str | None]] = {"BTC-PERP": ("100050", None),
                                                "ETH-PERP": ("2999.5", None),
                                                "BTC-2DEC26": ("100400", None)}
    for instrument in options:
        spot = INDEX[instrument.underlying]
        vol = 0.45 + 0.3 * rng.random()
        t_years = (instrument.expiry - AT).total_seconds() / (365 * 86400)
        price = black76(str(instrument.option_type), spot, float(instrument.strike), vol,
                        t_years).price
        # Some marks carry no iv: margin implies it from the price.
        marks[instrument.symbol] = (f"{max(price, 0.5):.2f}",
                                    None if rng.random() < 0.3 else f"{vol:.4f}")
    unmarked = options.pop()  # ETH-5NOV26-3000-C trades but has no mark yet
    del marks[unmarked.symbol]
    found = []
    for n in range(accounts):
        balances = {"USDC": D(rng.randint(20_000, 2_000_000))}
        if rng.random() < 0.4:
            balances["BTC"] = D(rng.randint(-50, 300)) / 100
        if rng.random() < 0.3:
            balances["ETH"] = D(rng.randint(0, 4000)) / 100
        positions = []
        for instrument in rng.sample([BTC_PERP, ETH_PERP, FUTURE, UNMARKED_FUTURE, unmarked,
                                      *options], 6):
            quantity = D(rng.randint(1, 40)) / 4 * rng.choice((1, -1))
            mark = marks.get(instrument.symbol)
            entry = D(mark[0]) if mark else D(str(INDEX[instrument.underlying]
                                                  if not instrument.is_option else 120))
            entry = (entry * D(rng.randint(95, 105)) / 100).quantize(D("0.01"))
            positions.append(HeldPosition(instrument, quantity, quantity * entry, entry))
        if rng.random() < 0.2:  # a closed future whose variation margin is not yet paid
            positions.append(HeldPosition(FUTURE, D(0), D("-150.5"), D(0)))
        found.append(StressAccount(f"m{n:03d}", rng.choice(("standard", "portfolio")),
                                   balances, positions))
    at_market = market({"BTC": "100000", "ETH": "3000"}, marks)
    return book(found, at_market)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_scenario_revalues_every_account_as_margin_does(seed: int) -> None:
    stressed = mixed_book(seed)
    scenarios = [*SHIPPED, Scenario("vol-only", "", {}, D("3")),
                 Scenario("split-vol", "", {"BTC": D("-0.5"), "ETH": D("0.8")},
                          vol_factors={"BTC": D("0.5"), "ETH": D("4")})]
    for scenario in scenarios:
        prices = stressed.base_prices * [1 + float(scenario.move_of(n)) for n in stressed.names]
        valuation = stressed.value(prices, stressed.vol_factors(scenario))
        assert stressed.cross_check(valuation) == stressed.n, scenario.name
        # and to the cent, every figure of every account:
        margins = account_margins_many(
            [a.model for a in stressed.accounts], [a.balances for a in stressed.accounts],
            [a.positions for a in stressed.accounts], stressed.shocked_market(valuation),
            stressed.params)
        ours = [(usd(valuation.equity_cents[i]), usd(valuation.initial[i]),
                 usd(valuation.maintenance[i])) for i in range(stressed.n)]
        assert ours == [(m.equity, m.initial, m.maintenance) for m in margins], scenario.name


def test_the_unshocked_book_has_margins_own_equity_to_the_cent() -> None:
    stressed = mixed_book(4)
    valuation = stressed.value(stressed.base_prices, stressed.vol_factors(
        Scenario("flat", "", {})))
    margins = account_margins_many(
        [a.model for a in stressed.accounts], [a.balances for a in stressed.accounts],
        [a.positions for a in stressed.accounts], stressed.market, stressed.params)
    assert [usd(e) for e in valuation.equity_cents] == [m.equity for m in margins]
