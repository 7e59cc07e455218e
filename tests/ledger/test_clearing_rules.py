"""SPEC section 4, clearing a trade, as small ledgers with exact amounts.

Every scenario runs on SQLite and PostgreSQL and ends with `clearing verify`'s checks passing
(the `ledger` fixture checks them after each test).
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from clearing.backoffice.csvinput import InputRejected
from clearing.domain.rejections import TradeAlreadyBusted, TradeNotFound
from tests.ledger.harness import T0, LedgerHarness, leg

CALL = "BTC-27DEC26-100000-C"
PUT = "BTC-27DEC26-90000-P"
FUTURE = "BTC-27DEC26"
PERP = "BTC-PERP"
EXPIRED_FUTURE = "BTC-26JUN26"
"""Expired on 26 June 2026, months before the scenarios' trades."""
HOUSE = ("ccp:external", "ccp:fees", "ccp:insurance", "ccp:liquidation", "ccp:rounding")


@pytest.fixture
def funded(ledger: LedgerHarness) -> LedgerHarness:
    """alice and bob with 10,000 USDC each; a call, a put, a future and a perpetual listed."""
    ledger.given_accounts("alice", "bob", "carol")
    ledger.list_instruments(CALL, PUT, FUTURE, PERP, EXPIRED_FUTURE)
    ledger.deposit("alice", "USDC", "10000")
    ledger.deposit("bob", "USDC", "10000")
    return ledger


# ------------------------------------------------------------------ novation and cash


def test_option_premium_moves_from_buyer_to_seller(funded: LedgerHarness) -> None:
    funded.trade("T1", [leg(CALL, buyer="alice", seller="bob", qty="2", price="1200")])

    assert funded.balance("alice", "USDC") == Decimal("10000") - Decimal("2400")
    assert funded.balance("bob", "USDC") == Decimal("10000") + Decimal("2400")
    assert funded.position("alice", CALL) == Decimal("2")
    assert funded.position("bob", CALL) == Decimal("-2")


def test_option_premium_is_price_times_quantity_times_multiplier(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice", "bob")
    ledger.list_option("ETH-27DEC26-3000-P", multiplier="0.1")
    ledger.deposit("alice", "USDC", "1000")
    ledger.trade("T1", [leg("ETH-27DEC26-3000-P", buyer="alice", seller="bob",
                            qty="3", price="120.5")])

    premium = Decimal("120.5") * 3 * Decimal("0.1")  # 36.15
    assert ledger.balance("alice", "USDC") == Decimal("1000") - premium
    assert ledger.balance("bob", "USDC") == premium
    assert ledger.position("alice", "ETH-27DEC26-3000-P") == Decimal("3")


def test_fees_go_to_the_fee_account(funded: LedgerHarness) -> None:
    funded.trade("T1", [leg(CALL, buyer="alice", seller="bob", qty="1", price="1200",
                            buyer_fee="2", seller_fee="1")])

    assert funded.balance("alice", "USDC") == Decimal("10000") - Decimal("1200") - Decimal("2")
    assert funded.balance("bob", "USDC") == Decimal("10000") + Decimal("1200") - Decimal("1")
    assert funded.balance("ccp:fees", "USDC") == Decimal("3")


@pytest.mark.parametrize("symbol", [FUTURE, PERP])
def test_futures_and_perpetuals_move_no_cash_at_clearing(funded: LedgerHarness,
                                                         symbol: str) -> None:
    funded.trade("T1", [leg(symbol, buyer="alice", seller="bob", qty="2", price="95000",
                            buyer_fee="0.5", seller_fee="0.25")])

    assert funded.balance("alice", "USDC") == Decimal("10000") - Decimal("0.5")
    assert funded.balance("bob", "USDC") == Decimal("10000") - Decimal("0.25")
    assert funded.balance("ccp:fees", "USDC") == Decimal("0.75")
    assert funded.position("alice", symbol) == Decimal("2")
    assert funded.position("bob", symbol) == Decimal("-2")
    assert funded.last_settlement_price("alice", symbol) == Decimal("95000")
    assert funded.last_settlement_price("bob", symbol) == Decimal("95000")


def test_last_settlement_price_of_two_fills_is_their_quantity_weighted_price(
    funded: LedgerHarness,
) -> None:
    funded.trade("T1", [leg(FUTURE, buyer="alice", seller="bob", qty="1", price="95000")])
    funded.trade("T2", [leg(FUTURE, buyer="alice", seller="carol", qty="3", price="96000")])

    assert funded.position("alice", FUTURE) == Decimal("4")
    assert funded.last_settlement_price("alice", FUTURE) == Decimal("95750")
    assert funded.last_settlement_price("carol", FUTURE) == Decimal("96000")
    assert funded.balance("alice", "USDC") == Decimal("10000")


def test_premium_finer_than_usdc_rounds_in_the_clearing_houses_favour(
    funded: LedgerHarness,
) -> None:
    # 1200.1234567 has seven decimals; USDC has six.
    funded.trade("T1", [leg(CALL, buyer="alice", seller="bob", qty="1", price="1200.1234567")])

    assert funded.balance("alice", "USDC") == Decimal("10000") - Decimal("1200.123457")
    assert funded.balance("bob", "USDC") == Decimal("10000") + Decimal("1200.123456")
    assert funded.balance("ccp:rounding", "USDC") == Decimal("0.000001")


def test_rounding_residuals_accumulate_leg_by_leg(funded: LedgerHarness) -> None:
    # Each leg's premium is 0.3 x 0.33333333 = 0.099999999: pay 0.100000, receive 0.099999.
    funded.trade("T1", [
        leg(CALL, buyer="alice", seller="bob", qty="0.3", price="0.33333333"),
        leg(PUT, buyer="alice", seller="bob", qty="0.3", price="0.33333333"),
    ])

    assert funded.balance("alice", "USDC") == Decimal("10000") - Decimal("0.2")
    assert funded.balance("bob", "USDC") == Decimal("10000") + Decimal("0.199998")
    assert funded.balance("ccp:rounding", "USDC") == Decimal("0.000002")


def test_multi_leg_strategy_nets_premiums_and_fees_per_account(funded: LedgerHarness) -> None:
    # A risk reversal: alice buys the call from bob and sells him the put, and hedges with
    # a short future against carol.
    funded.trade("S1", [
        leg(CALL, buyer="alice", seller="bob", qty="1", price="1200", buyer_fee="1",
            seller_fee="1"),
        leg(PUT, buyer="bob", seller="alice", qty="1", price="900", buyer_fee="1",
            seller_fee="1"),
        leg(FUTURE, buyer="carol", seller="alice", qty="0.5", price="95000",
            buyer_fee="0.5", seller_fee="0.5"),
    ])

    assert funded.balance("alice", "USDC") == Decimal("10000") - 1200 + 900 - 1 - 1 - \
        Decimal("0.5")
    assert funded.balance("bob", "USDC") == Decimal("10000") + 1200 - 900 - 1 - 1
    assert funded.balance("carol", "USDC") == Decimal("-0.5")
    assert funded.balance("ccp:fees", "USDC") == Decimal("5")
    assert funded.positions() == {
        ("alice", CALL): Decimal("1"), ("bob", CALL): Decimal("-1"),
        ("bob", PUT): Decimal("1"), ("alice", PUT): Decimal("-1"),
        ("carol", FUTURE): Decimal("0.5"), ("alice", FUTURE): Decimal("-0.5"),
    }
    cleared = [r.event for r in funded.events("trade-S1")]
    assert len(cleared) == 1 and len(cleared[0].legs) == 3


# ------------------------------------------------------------------ all or nothing


BAD_SECOND_LEGS = {
    "unknown instrument": leg("BTC-27DEC26-100000-X", buyer="alice", seller="bob",
                              qty="1", price="10"),
    "unlisted instrument": leg("ETH-27DEC26", buyer="alice", seller="bob", qty="1",
                               price="3000"),
    "same account on both sides": leg(PUT, buyer="bob", seller="bob", qty="1", price="900"),
    "expired instrument": leg(EXPIRED_FUTURE, buyer="bob", seller="alice", qty="1",
                              price="95000"),
    "unknown account": leg(PUT, buyer="bob", seller="mallory", qty="1", price="900"),
    "zero quantity": leg(PUT, buyer="bob", seller="alice", qty="0", price="900"),
    "negative price": leg(PUT, buyer="bob", seller="alice", qty="1", price="-900"),
    "fee finer than USDC": leg(PUT, buyer="bob", seller="alice", qty="1", price="900",
                               buyer_fee="0.0000001"),
}


@pytest.mark.parametrize("why", list(BAD_SECOND_LEGS))
def test_a_multi_leg_trade_with_one_bad_leg_writes_nothing(funded: LedgerHarness,
                                                           why: str) -> None:
    before = funded.snapshot()

    with pytest.raises(InputRejected) as refused:
        funded.trade("S1", [
            leg(CALL, buyer="alice", seller="bob", qty="1", price="1200", buyer_fee="2"),
            BAD_SECOND_LEGS[why],
        ])

    assert funded.snapshot() == before
    assert funded.events("trade-S1") == []
    (problem,) = refused.value.problems
    assert problem.line == 3, f"{why}: the problem is on leg 2's line, got {problem}"


def test_a_bad_trade_refuses_the_whole_file_even_its_good_trades(funded: LedgerHarness) -> None:
    before = funded.snapshot()

    with pytest.raises(InputRejected):
        funded.trades(("T1", [leg(CALL, buyer="alice", seller="bob", qty="1", price="1200")]),
                      ("T2", [leg(CALL, buyer="alice", seller="alice", qty="1", price="1")]))

    assert funded.snapshot() == before


def test_a_trade_at_the_instant_of_expiry_is_refused(funded: LedgerHarness) -> None:
    expiry = T0.replace(year=2026, month=12, day=27, hour=8)
    before = funded.snapshot()

    with pytest.raises(InputRejected):
        funded.trade("T1", [leg(FUTURE, buyer="alice", seller="bob", qty="1", price="95000")],
                      at=expiry)
    funded.trade("T2", [leg(FUTURE, buyer="alice", seller="bob", qty="1", price="95000")],
                 at=expiry - timedelta(seconds=1))

    assert funded.event_count() == before[0] + 1


# ------------------------------------------------------------------ busts


def test_a_bust_undoes_positions_premium_and_fees_exactly(funded: LedgerHarness) -> None:
    funded.mark("BTC", "96000")
    before_trade = funded.balances()
    funded.trade("S1", [
        leg(CALL, buyer="alice", seller="bob", qty="1", price="1200.1234567", buyer_fee="2",
            seller_fee="1"),
        leg(FUTURE, buyer="bob", seller="carol", qty="2", price="95000", buyer_fee="0.5",
            seller_fee="0.5"),
    ])
    assert funded.balance("ccp:rounding", "USDC") == Decimal("0.000001")

    funded.bust("S1", reason="fat finger")

    assert funded.balances() == before_trade
    assert funded.positions() == {}
    for account in ("alice", "bob", "carol"):
        assert funded.position(account, CALL) == 0
        assert funded.position(account, FUTURE) == 0
    assert [r.type for r in funded.events("trade-S1")] == ["TradeCleared", "TradeBusted"]
    busted = funded.events("trade-S1")[1].event
    assert busted.reason == "fat finger"
    assert busted.legs == funded.events("trade-S1")[0].event.legs


def test_a_bust_leaves_other_trades_alone(funded: LedgerHarness) -> None:
    funded.trade("T1", [leg(CALL, buyer="alice", seller="bob", qty="1", price="1200",
                            buyer_fee="1")])
    after_t1 = funded.balances(), funded.positions()
    funded.trade("T2", [leg(CALL, buyer="alice", seller="carol", qty="2", price="1300",
                            buyer_fee="1", seller_fee="1")])

    funded.bust("T2")

    assert (funded.balances(), funded.positions()) == after_t1


def test_busting_twice_is_refused(funded: LedgerHarness) -> None:
    funded.trade("T1", [leg(CALL, buyer="alice", seller="bob", qty="1", price="1200")])
    funded.bust("T1")
    before = funded.snapshot()

    with pytest.raises(TradeAlreadyBusted):
        funded.bust("T1", reason="again")

    assert funded.snapshot() == before


def test_busting_an_unknown_trade_is_refused(funded: LedgerHarness) -> None:
    before = funded.snapshot()

    with pytest.raises(TradeNotFound):
        funded.bust("NOPE")

    assert funded.snapshot() == before


def test_a_busted_trade_id_cannot_be_cleared_again(funded: LedgerHarness) -> None:
    trade = [leg(CALL, buyer="alice", seller="bob", qty="1", price="1200")]
    funded.trade("T1", trade)
    funded.bust("T1")
    before = funded.snapshot()

    report = funded.reimport(funded.files[-1][1])  # the trades file again: nothing new
    assert report.written == 0
    with pytest.raises(InputRejected):  # the same id with other terms: refused
        funded.trade("T1", [leg(CALL, buyer="alice", seller="bob", qty="2", price="1200")])

    assert funded.snapshot() == before


# ------------------------------------------------------------------ idempotency


def test_reimporting_a_trades_file_writes_nothing(funded: LedgerHarness) -> None:
    funded.trades(
        ("T1", [leg(CALL, buyer="alice", seller="bob", qty="1", price="1200", buyer_fee="1")]),
        ("T2", [leg(FUTURE, buyer="bob", seller="alice", qty="1", price="95000"),
                leg(PERP, buyer="alice", seller="bob", qty="1", price="95100")]),
    )
    trades_file = funded.last_file
    before = funded.snapshot()

    report = funded.reimport(trades_file)

    assert (report.facts, report.written) == (2, 0)
    assert report.already_imported
    assert funded.snapshot() == before


@pytest.mark.parametrize("kind", ["accounts", "instruments", "deposits", "marks"])
def test_reimporting_any_file_writes_nothing(funded: LedgerHarness, kind: str) -> None:
    funded.mark(CALL, "1300", iv="0.55")
    path = next(p for k, p in reversed(funded.files) if k == kind)
    before = funded.snapshot()

    assert funded.reimport(path).written == 0
    assert funded.snapshot() == before


def test_reimporting_a_withdrawals_file_writes_nothing(funded: LedgerHarness) -> None:
    funded.withdraw("alice", "USDC", "4000")
    path = funded.last_file
    before = funded.snapshot()

    assert funded.reimport(path).written == 0
    assert funded.snapshot() == before


def test_reimporting_a_withdrawals_file_after_the_money_left_writes_nothing(
    funded: LedgerHarness,
) -> None:
    funded.withdrawals(("alice", "USDC", "6000"), ("alice", "USDC", "4000"))
    path = funded.last_file
    assert funded.balance("alice", "USDC") == 0
    before = funded.snapshot()

    assert funded.reimport(path).written == 0
    assert funded.snapshot() == before


# ------------------------------------------------------------------ collateral


def test_deposit_then_withdrawal(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice")
    ledger.deposit("alice", "USDC", "10000")
    ledger.deposit("alice", "BTC", "1.5")
    ledger.mark("BTC", "96000")  # margin values BTC collateral at its index price
    ledger.withdraw("alice", "USDC", "2500.25")
    ledger.withdraw("alice", "BTC", "0.00000001")

    assert ledger.balance("alice", "USDC") == Decimal("7499.75")
    assert ledger.balance("alice", "BTC") == Decimal("1.49999999")
    assert ledger.balance("ccp:external", "USDC") == Decimal("-7499.75")
    assert ledger.balance("ccp:external", "BTC") == Decimal("-1.49999999")


def test_withdrawing_the_whole_balance_is_allowed(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice")
    ledger.deposit("alice", "ETH", "2")
    ledger.withdraw("alice", "ETH", "2")

    assert ledger.balance("alice", "ETH") == 0
    assert ledger.balance("ccp:external", "ETH") == 0


def test_a_withdrawal_above_the_balance_is_refused(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice")
    ledger.deposit("alice", "USDC", "100")
    before = ledger.snapshot()

    with pytest.raises(InputRejected) as refused:
        ledger.withdraw("alice", "USDC", "100.000001")

    assert ledger.snapshot() == before
    assert "exceeds its balance" in str(refused.value)


def test_withdrawals_in_one_file_count_against_the_balance_together(
    ledger: LedgerHarness,
) -> None:
    ledger.given_accounts("alice")
    ledger.deposit("alice", "USDC", "100")
    before = ledger.snapshot()

    with pytest.raises(InputRejected) as refused:
        ledger.withdrawals(("alice", "USDC", "60"), ("alice", "USDC", "60"))

    assert ledger.snapshot() == before
    assert [p.line for p in refused.value.problems] == [3]


def test_a_withdrawal_of_money_owed_in_another_asset_is_refused(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice")
    ledger.deposit("alice", "USDC", "100")
    before = ledger.snapshot()

    with pytest.raises(InputRejected):
        ledger.withdraw("alice", "BTC", "0.1")

    assert ledger.snapshot() == before


# ------------------------------------------------------------------ the books close


def test_house_accounts_make_every_asset_sum_to_zero(funded: LedgerHarness) -> None:
    funded.deposit("carol", "BTC", "0.5")
    funded.trade("S1", [
        leg(CALL, buyer="alice", seller="bob", qty="0.3", price="0.33333333", buyer_fee="1"),
        leg(FUTURE, buyer="bob", seller="carol", qty="1", price="95000", seller_fee="0.5"),
    ])
    funded.trade("T2", [leg(PUT, buyer="carol", seller="alice", qty="1", price="900")])
    funded.bust("T2")
    for symbol, price in (("BTC", "96000"), (CALL, "1300"), (FUTURE, "96100")):
        funded.mark(symbol, price)  # what margin needs to let bob withdraw
    funded.withdraw("bob", "USDC", "50")

    balances = funded.balances()
    assert {account for account, _ in balances} >= {"ccp:external", "ccp:fees", "ccp:rounding"}
    assert set(funded.totals_per_asset()) == {"USDC", "BTC"}
    assert all(total == 0 for total in funded.totals_per_asset().values())
    members = sum(v for (a, asset), v in balances.items()
                  if asset == "USDC" and a not in HOUSE)
    house = sum(v for (a, asset), v in balances.items() if asset == "USDC" and a in HOUSE)
    assert members != 0 and members + house == 0


def test_a_bust_restores_the_positions_entry_price_and_realised_pnl(
    funded: LedgerHarness,
) -> None:
    funded.trade("T1", [leg(CALL, buyer="alice", seller="bob", qty="2", price="1200")])
    before = funded.state().positions[("bob", CALL)]
    funded.trade("T2", [leg(CALL, buyer="carol", seller="bob", qty="1", price="1500")])

    funded.bust("T2")

    assert funded.state().positions[("bob", CALL)] == before
