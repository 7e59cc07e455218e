"""The shock, the deleveraging cascade, the waterfall and Cover-1/Cover-2 on books small
enough to compute by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from clearing.domain.pricing import black76
from clearing.domain.stress import (
    CascadeParameters,
    StressModelDisagrees,
    run_scenario,
)
from clearing.domain.stress_scenarios import Scenario, custom_scenario
from tests.stress.books import (
    AT,
    BTC_PERP,
    D,
    EXPIRY,
    account,
    book,
    cascade,
    held,
    market,
    option,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def btc_market(price: str = "100000") -> object:
    return market({"BTC": price, "ETH": "3000"}, {"BTC-PERP": (price, None)})


def test_two_liquidations_push_the_price_through_a_third_account() -> None:
    """alice and bob are long 10 BTC-PERP each on 100,000 of collateral, carol on 120,000;
    a market maker is short the 30. BTC -10% takes alice and bob to zero equity, below
    their maintenance of 900,000 x (1% + 10 x 0.005%) = 9,450. Selling their 20 BTC
    (1,800,000) into a depth of 36,000,000 moves BTC -5% to 85,500, where carol's equity is
    120,000 - 145,000 < 0: she is closed out too, and her 10 BTC (855,000) move BTC
    -2.375% to 83,469.375. The market maker, short, only gains: the cascade stops."""
    accounts = [
        account("alice", {"USDC": "100000"}, held(BTC_PERP, "10", "100000")),
        account("bob", {"USDC": "100000"}, held(BTC_PERP, "10", "100000")),
        account("carol", {"USDC": "120000"}, held(BTC_PERP, "10", "100000")),
        account("mm", {"USDC": "10000000"}, held(BTC_PERP, "-30", "100000")),
    ]
    result = run_scenario(book(accounts, btc_market()),
                          custom_scenario({"BTC": D("-0.10")}), D("50000"),
                          cascade(BTC="36000000"))

    shock, first, second = result.rounds
    assert shock.prices["BTC"] == D("90000.00") and shock.breaching == 2
    assert first.accounts_liquidated == ("alice", "bob")
    assert first.impact["BTC"] == D("-0.050000") and first.prices["BTC"] == D("85500.00")
    assert first.net_sold_usd["BTC"] == D("1800000.00")
    assert first.positions_notional_usd == D("1800000.00")
    assert first.breaching == 1
    assert second.accounts_liquidated == ("carol",)
    assert second.impact["BTC"] == D("-0.023750")
    assert second.prices["BTC"] == D("83469.38")  # 83,469.375
    assert second.breaching == 0 and result.converged and result.cascade_rounds == 2

    outcomes = {a.account_id: a for a in result.accounts}
    # Closed out at the round's post-impact price; a bankrupt account pays no fee.
    assert outcomes["alice"].equity_final == D("-45000.00")
    assert outcomes["carol"].equity_final == D("-45306.25")  # 120,000 - 10 x 16,530.625
    assert outcomes["carol"].equity_shocked == D("20000.00")
    assert outcomes["carol"].status_shocked == "healthy"  # initial 18,450 at 90,000
    assert outcomes["mm"].liquidated_in_round is None
    assert outcomes["mm"].equity_final == D("10000000") + 30 * (D("100000") - D("83469.375"))
    # The fund's 50,000 covers alice in full and 5,000 of bob; the rest is deleveraged.
    assert (first.deficit_usd, first.insurance_paid_usd, first.adl_usd) == (
        D("90000.00"), D("50000.00"), D("40000.00"))
    assert (outcomes["bob"].insurance_paid, outcomes["bob"].adl) == (D("5000.00"),
                                                                     D("40000.00"))
    assert second.adl_usd == D("45306.25") and second.insurance_fund_left == D("0.00")
    assert result.deficit_usd == D("135306.25") and result.uncovered_usd == 0
    # Losses run to the close-out: alice and bob 100,000 + 45,000 each, carol 165,306.25.
    assert result.loss_usd == 2 * D("145000") + D("165306.25")

    # Cover-1: carol's 45,306.25. Cover-2: carol and the larger of alice and bob (a tie,
    # settled by account order).
    assert result.cover.cover_1 == D("45306.25")
    assert result.cover.cover_1_accounts == ("carol",)
    assert result.cover.cover_2 == D("90306.25")
    assert result.cover.cover_2_accounts == ("carol", "alice")
    assert not result.cover.sufficient and result.cover.shortfall == D("40306.25")
    assert result.cover.sentence().startswith("insufficient by 40,306.25")


def test_an_eth_option_loss_forces_a_sale_of_btc_collateral_that_breaches_a_btc_long() -> None:
    """xena's only collateral is 2 BTC; she is short 200 ETH calls struck at 3,000. ETH
    +30% (BTC unchanged) costs her more than the BTC is worth: she is closed out, which
    buys the calls back (ETH's depth here is deep enough not to move it) and sells her
    2 BTC: 200,000 into a BTC depth of 10,000,000 moves BTC -2% to 98,000. yann, long 10
    BTC-PERP on 11,000 of margin and untouched by the ETH move, now has 11,000 - 20,000 <
    0: he is closed out in round 2, and his 980,000 moves BTC a further -9.8%."""
    call = option("ETH-2DEC26-3000-C")
    t_years = (EXPIRY - AT).total_seconds() / (365 * 86400)
    premium = D(f"{black76('call', 3000.0, 3000.0, 0.5, t_years).price:.2f}")
    accounts = [
        account("mm", {"USDC": "10000000"}, held(call, "200", str(premium)),
                held(BTC_PERP, "-10", "100000")),
        account("xena", {"BTC": "2"}, held(call, "-200", str(premium))),
        account("yann", {"USDC": "11000"}, held(BTC_PERP, "10", "100000")),
    ]
    at_market = market({"BTC": "100000", "ETH": "3000"},
                       {"BTC-PERP": ("100000", None), call.symbol: (str(premium), "0.5")})
    result = run_scenario(book(accounts, at_market), custom_scenario({"ETH": D("0.30")}),
                          D("0"), cascade(BTC="10000000", ETH="1e18"))

    shock, first, second = result.rounds
    assert shock.breaching == 1
    assert first.accounts_liquidated == ("xena",)
    assert first.prices["BTC"] == D("98000.00") and first.impact["BTC"] == D("-0.020000")
    assert first.prices["ETH"] == D("3900.00")  # the buy-back barely moves a deep market
    assert first.collateral_sold == {"BTC": D("2")}
    # Sold at 98,000 less the 10% haircut the collateral value already assumed.
    assert first.collateral_sold_usd == {"BTC": D("176400.00")}
    assert first.cross_margin_sold_usd == {"BTC": D("176400.00")}
    (sale,) = result.sales
    assert (sale.account_id, sale.asset, sale.loss_underlying, sale.cross_margin) == (
        "xena", "BTC", "ETH", True)
    # The calls' mark moved by their Black-76 change from ETH 3,000 to 3,900.
    change = black76("call", 3900.0, 3000.0, 0.5, t_years).price \
        - black76("call", 3000.0, 3000.0, 0.5, t_years).price
    value = premium + D(f"{change:.6f}")
    xena = next(a for a in result.accounts if a.account_id == "xena")
    assert abs(xena.equity_final - (D("176400") - 200 * value)) < D("0.02")
    assert xena.uncovered == xena.deficit  # options are not auto-deleveraged
    assert xena.deficit == -xena.equity_final > 0

    assert second.accounts_liquidated == ("yann",)
    assert second.prices["BTC"] == D("88396.00")  # 98,000 x (1 - 980,000 / 10,000,000)
    yann = next(a for a in result.accounts if a.account_id == "yann")
    assert yann.equity_shocked == D("11000.00") and yann.status_shocked == "restricted"
    assert yann.equity_final == D("11000") - 10 * (D("100000") - D("88396"))
    assert yann.loss_underlying == "BTC" and yann.collateral_sold == {}
    assert result.converged and result.cascade_rounds == 2


def test_cover_2_is_the_two_largest_deficits_against_the_fund() -> None:
    """BTC -20% without price impact: ann, ben and cat, long 10 BTC each on 170,000,
    180,000 and 190,000, lose 200,000 and end 30,000, 20,000 and 10,000 short; dov, on
    400,000, is fine. Cover-1 = 30,000 (ann), Cover-2 = 30,000 + 20,000 = 50,000: a fund of
    40,000 is short by 10,000, one of 50,000 is sufficient."""
    accounts = [
        account("ann", {"USDC": "170000"}, held(BTC_PERP, "10", "100000")),
        account("ben", {"USDC": "180000"}, held(BTC_PERP, "10", "100000")),
        account("cat", {"USDC": "190000"}, held(BTC_PERP, "10", "100000")),
        account("dov", {"USDC": "400000"}, held(BTC_PERP, "10", "100000")),
        account("mm", {"USDC": "10000000"}, held(BTC_PERP, "-40", "100000")),
    ]
    still = CascadeParameters(impact_coefficient=D(0))
    stressed = book(accounts, btc_market())
    scenario = custom_scenario({"BTC": D("-0.20")})
    result = run_scenario(stressed, scenario, D("40000"), still)

    assert [r.prices["BTC"] for r in result.rounds] == [D("80000.00"), D("80000.00")]
    assert result.rounds[1].accounts_liquidated == ("ann", "ben", "cat")
    cover = result.cover
    assert (cover.cover_1, cover.cover_1_accounts) == (D("30000.00"), ("ann",))
    assert (cover.cover_2, cover.cover_2_accounts) == (D("50000.00"), ("ann", "ben"))
    assert cover.verdict == "insufficient" and cover.shortfall == D("10000.00")
    # The waterfall: the fund pays ann's 30,000 and 10,000 of ben's; the rest is ADL.
    assert (result.deficit_usd, result.insurance_paid_usd, result.adl_usd) == (
        D("60000.00"), D("40000.00"), D("20000.00"))
    assert result.below_maintenance == 3 and result.bankrupt == 3
    assert result.bankrupt_at_shock == 3 and result.liquidated == 3

    enough = run_scenario(stressed, scenario, D("50000"), still).cover
    assert enough.cover_2 == D("50000.00") and enough.sufficient and enough.shortfall == 0
    assert enough.sentence().startswith("sufficient")


def test_buying_back_a_short_pushes_the_price_up() -> None:
    """A rally breaches a short: closing it is a purchase, so the impact is upward."""
    accounts = [
        account("shorty", {"USDC": "50000"}, held(BTC_PERP, "-10", "100000")),
        account("mm", {"USDC": "10000000"}, held(BTC_PERP, "10", "100000")),
    ]
    result = run_scenario(book(accounts, btc_market()), custom_scenario({"BTC": D("0.05")}),
                          D("0"), cascade(BTC="21000000"))
    assert result.rounds[1].net_sold_usd["BTC"] == D("-1050000.00")
    assert result.rounds[1].impact["BTC"] == D("0.050000")
    assert result.rounds[1].prices["BTC"] == D("110250.00")


def test_a_cascade_cut_short_by_its_round_limit_says_so_and_counts_the_rest() -> None:
    accounts = [
        account("alice", {"USDC": "100000"}, held(BTC_PERP, "10", "100000")),
        account("carol", {"USDC": "120000"}, held(BTC_PERP, "10", "100000")),
        account("mm", {"USDC": "10000000"}, held(BTC_PERP, "-20", "100000")),
    ]
    one_round = CascadeParameters(depth_usd={"BTC": D("9000000")}, rounds_max=1)
    result = run_scenario(book(accounts, btc_market()), custom_scenario({"BTC": D("-0.10")}),
                          D("0"), one_round)
    # alice's 900,000 moves BTC -10% to 81,000: carol now breaches, with no round left.
    assert result.cascade_rounds == 1 and not result.converged
    assert result.rounds[-1].breaching == 1
    carol = next(a for a in result.accounts if a.account_id == "carol")
    assert carol.liquidated_in_round is None
    assert carol.deficit == D("70000.00")  # 120,000 - 10 x 19,000
    assert result.cover.cover_2_accounts == ("alice", "carol")


def test_losses_are_equity_changes_and_the_unshocked_scenario_changes_nothing() -> None:
    accounts = [
        account("alice", {"USDC": "300000", "BTC": "1"}, held(BTC_PERP, "2", "95000")),
        account("mm", {"USDC": "10000000"}, held(BTC_PERP, "-2", "95000")),
    ]
    stressed = book(accounts, btc_market())
    nothing = run_scenario(stressed, Scenario("flat", "", {}), D("0"))
    assert nothing.cascade_rounds == 0 and nothing.loss_usd == 0
    assert all(a.equity_final == a.equity_before for a in nothing.accounts)
    down = run_scenario(stressed, custom_scenario({"BTC": D("-0.1")}), D("0"))
    alice = next(a for a in down.accounts if a.account_id == "alice")
    # 2 BTC-PERP lose 20,000; 1 BTC of collateral loses 10,000 x (1 - 10% haircut).
    assert alice.equity_before == D("300000") + 90000 + 2 * 5000
    assert alice.loss == alice.shock_loss == D("29000.00")


def test_a_revaluation_that_strays_from_margins_own_figures_stops_the_run() -> None:
    accounts = [account("alice", {"USDC": "300000"}, held(BTC_PERP, "2", "95000"))]
    stressed = book(accounts, btc_market())
    valuation = stressed.value(stressed.base_prices, stressed.vol_factors(
        Scenario("flat", "", {})))
    assert stressed.cross_check(valuation) == 1
    with pytest.raises(StressModelDisagrees, match="maintenance"):
        stressed.cross_check(replace(valuation, maintenance=valuation.maintenance + 1.0))
    with pytest.raises(StressModelDisagrees, match="equity"):
        stressed.cross_check(replace(valuation, equity=valuation.equity - 1.0))
