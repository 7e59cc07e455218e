"""Expiry settlement (`clearing run settle`): one price, every leg settled, one posting each.

SPEC section 4: the settlement price is the time-weighted average of the underlying's index
marks in the 30 minutes before expiry (each mark holds until the next, so a mark from before
the window prices the window's first minutes); the last mark before expiry if none falls in
the window; refused if there is none in the last 24 hours. Futures pay a final variation
margin at that price, options their intrinsic value; each account's cash is netted per asset
into one posting, and settled positions close. Every figure below is worked out by hand.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from clearing.domain.events import ExpirySettled, InstrumentSettled
from clearing.domain.expiry import NoSettlementPrice
from clearing.jobs.catalog import run_job
from tests.ledger.harness import LedgerHarness, iso, leg

EXPIRY = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
"""08:00 UTC on the day the symbols name."""
FUTURE = "BTC-27NOV26"
CALL_95K = "BTC-27NOV26-95000-C"
CALL_100K = "BTC-27NOV26-100000-C"
PUT_105K = "BTC-27NOV26-105000-P"
PUT_90K = "BTC-27NOV26-90000-P"
EVE = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
"""The last mark-to-market before expiry."""
SETTLE_AT = EXPIRY + timedelta(minutes=10)
START = Decimal("100000")


def at(hh_mm: str, day: datetime = EXPIRY) -> datetime:
    hours, minutes = (int(x) for x in hh_mm.split(":"))
    return day.replace(hour=hours, minute=minutes)


def index_marks(ledger: LedgerHarness, *marks: tuple[datetime, str]) -> None:
    """BTC index marks, one file."""
    ledger.import_rows("marks", [{"time": iso(t), "symbol": "BTC", "price": p, "iv": ""}
                                 for t, p in marks])


def accounts_with_cash(ledger: LedgerHarness, *account_ids: str) -> None:
    ledger.given_accounts(*account_ids)
    for account_id in account_ids:
        ledger.deposit(account_id, "USDC", str(START))


def expiry_book(ledger: LedgerHarness) -> None:
    """alice: long the 95k/100k call spread (2 lots) and long 1 future, all from bob;
    carol: long 3 of the 105k put from dave, and short 1 of the 90k put to dave.

    Premiums: alice pays 2 x 6,000 and receives 2 x 2,500 (net -7,000, to bob); carol pays
    3 x 5,500 and receives 300 (net -16,200, to dave). The future trades at 99,000 and is
    marked to 100,200 the evening before expiry: alice +1,200, bob -1,200."""
    accounts_with_cash(ledger, "alice", "bob", "carol", "dave")
    ledger.list_instruments(FUTURE, CALL_95K, CALL_100K, PUT_105K, PUT_90K)
    ledger.trades(
        ("SPREAD", [leg(CALL_95K, buyer="alice", seller="bob", qty="2", price="6000"),
                    leg(CALL_100K, buyer="bob", seller="alice", qty="2", price="2500")]),
        ("FUT", [leg(FUTURE, buyer="alice", seller="bob", qty="1", price="99000")]),
        ("PUTS", [leg(PUT_105K, buyer="carol", seller="dave", qty="3", price="5500"),
                  leg(PUT_90K, buyer="dave", seller="carol", qty="1", price="300")]),
    )
    ledger.mark(FUTURE, "100200", at=EVE)
    run_job(ledger.ledger, "mtm", EVE)
    assert ledger.balance("alice", "USDC") == START - 7000 + 1200
    assert ledger.balance("carol", "USDC") == START - 16200


def settle_events(ledger: LedgerHarness) -> tuple[list[InstrumentSettled], list[ExpirySettled]]:
    facts = [e.event for e in ledger.events()]
    return ([e for e in facts if isinstance(e, InstrumentSettled)],
            [e for e in facts if isinstance(e, ExpirySettled)])


def test_a_call_spread_a_put_and_a_future_settle_in_one_netted_posting_per_account(
    ledger: LedgerHarness,
) -> None:
    expiry_book(ledger)
    index_marks(
        ledger,
        (at("07:00"), "99000"),   # before the window: holds 07:30-07:40 (600 s)
        (at("07:40"), "100800"),  # 07:40-07:52 (720 s)
        (at("07:52"), "102000"),  # 07:52-08:00 (480 s)
        (at("08:00"), "110000"),  # at expiry: holds for no time at all
        (at("08:05"), "150000"),  # after expiry: not part of the price
    )
    # (99,000 x 600 + 100,800 x 720 + 102,000 x 480) / 1,800 = 180,936,000 / 1,800
    settlement = Decimal("100520")
    # After expiry, before settlement: mtm leaves the expired future to the settlement.
    ledger.mark(FUTURE, "130000", at=at("08:01"))
    late_mtm = run_job(ledger.ledger, "mtm", at("08:05"))[0]
    assert late_mtm.events_written == 1  # the completion only
    assert ledger.last_settlement_price("alice", FUTURE) == Decimal("100200")

    run = ledger.cli("run", "settle", "--at", iso(SETTLE_AT), "--json")

    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["events_written"] == 7  # 5 prices, 1 settlement, completion
    prices, settled = settle_events(ledger)
    assert sorted((p.symbol, p.settlement_price, p.method, p.marks_used, p.expiry)
                  for p in prices) == sorted(
        (s, settlement, "twap", 3, EXPIRY)
        for s in (FUTURE, CALL_95K, CALL_100K, PUT_105K, PUT_90K))
    [event] = settled
    # alice: calls 2 x (100,520 - 95,000) - 2 x (100,520 - 100,000) = 11,040 - 1,040,
    #        future 1 x (100,520 - 100,200) = 320: +10,320; bob the opposite.
    # carol: 105k put 3 x (105,000 - 100,520) = 13,440, 90k put worthless: +13,440;
    # dave the opposite. Exact sum zero: nothing passes through ccp:settlement.
    assert sorted((p.account_id, p.asset, p.amount) for p in event.postings) == [
        ("alice", "USDC", Decimal("10320")), ("bob", "USDC", Decimal("-10320")),
        ("carol", "USDC", Decimal("13440")), ("dave", "USDC", Decimal("-13440"))]
    assert event.expiry == EXPIRY
    legs = {(m.account_id, m.instrument): (m.quantity_change, m.price, m.amount)
            for m in event.movements}
    assert legs == {
        ("alice", CALL_95K): (Decimal("-2"), Decimal("5520"), Decimal("11040")),
        ("alice", CALL_100K): (Decimal("2"), Decimal("520"), Decimal("-1040")),
        ("alice", FUTURE): (Decimal("-1"), settlement, Decimal("320")),
        ("bob", CALL_95K): (Decimal("2"), Decimal("5520"), Decimal("-11040")),
        ("bob", CALL_100K): (Decimal("-2"), Decimal("520"), Decimal("1040")),
        ("bob", FUTURE): (Decimal("1"), settlement, Decimal("-320")),
        ("carol", PUT_105K): (Decimal("-3"), Decimal("4480"), Decimal("13440")),
        ("carol", PUT_90K): (Decimal("1"), Decimal("0"), Decimal("0")),
        ("dave", PUT_105K): (Decimal("3"), Decimal("4480"), Decimal("-13440")),
        ("dave", PUT_90K): (Decimal("-1"), Decimal("0"), Decimal("0")),
    }
    assert ledger.balance("alice", "USDC") == START - 7000 + 1200 + 10320
    assert ledger.balance("bob", "USDC") == START + 7000 - 1200 - 10320
    assert ledger.balance("carol", "USDC") == START - 16200 + 13440
    assert ledger.balance("dave", "USDC") == START + 16200 - 13440
    assert ledger.balance("ccp:settlement", "USDC") == 0
    assert ledger.balance("ccp:rounding", "USDC") == 0
    assert ledger.totals_per_asset()["USDC"] == 0
    state = ledger.state()
    for (account_id, symbol), position in state.positions.items():
        assert (position.quantity, position.settlement_basis) == (0, 0), (account_id, symbol)
    shown = ledger.cli("positions", "--json", "--as-of", iso(SETTLE_AT))
    assert json.loads(shown.stdout) == []


def test_settling_again_changes_nothing_and_a_settled_trade_cannot_be_busted(
    ledger: LedgerHarness,
) -> None:
    expiry_book(ledger)
    index_marks(ledger, (at("07:00"), "99000"), (at("07:40"), "100800"),
                (at("07:52"), "102000"))
    run_job(ledger.ledger, "settle", SETTLE_AT)
    _, balances, positions = before = ledger.snapshot()

    same = ledger.cli("run", "settle", "--at", iso(SETTLE_AT), "--json")
    assert json.loads(same.stdout)["already_done"] is True
    assert ledger.snapshot() == before
    later = run_job(ledger.ledger, "settle", SETTLE_AT + timedelta(hours=1))[0]
    assert later.events_written == 1  # its completion: nothing is left to settle
    assert ledger.snapshot()[1:] == (balances, positions)
    assert [len(found) for found in settle_events(ledger)] == [5, 1]

    count = ledger.event_count()
    for trade_id in ("SPREAD", "FUT", "PUTS"):
        refused = ledger.cli("bust", trade_id, "--reason", "venue error")
        assert refused.exit_code == 2, refused.output
        assert "has settled" in refused.stderr
    assert ledger.event_count() == count


def test_settlement_nets_each_accounts_legs_before_rounding(ledger: LedgerHarness) -> None:
    accounts_with_cash(ledger, "alice", "bob")
    ledger.list_instruments(CALL_95K, CALL_100K)
    ledger.trade("SPREAD", [
        leg(CALL_95K, buyer="alice", seller="bob", qty="0.33333333", price="6000"),
        leg(CALL_100K, buyer="bob", seller="alice", qty="0.33333333", price="2500")])
    index_marks(ledger, (at("07:00"), "100520"))
    before = {a: ledger.balance(a, "USDC") for a in ("alice", "bob", "ccp:rounding")}

    run_job(ledger.ledger, "settle", SETTLE_AT)

    # alice: 0.33333333 x 5,520 - 0.33333333 x 520 = 1,839.9999816 - 173.3333316 =
    # 1,666.66665 exactly. Rounded leg by leg it would be 1,839.999981 - 173.333332 =
    # 1,666.666649; netted first, it is paid in full with nothing left for ccp:rounding.
    [event] = settle_events(ledger)[1]
    assert sorted((p.account_id, p.amount) for p in event.postings) == [
        ("alice", Decimal("1666.66665")), ("bob", Decimal("-1666.66665"))]
    assert ledger.balance("alice", "USDC") == before["alice"] + Decimal("1666.66665")
    assert ledger.balance("bob", "USDC") == before["bob"] - Decimal("1666.66665")
    assert ledger.balance("ccp:rounding", "USDC") == before["ccp:rounding"]
    assert before["alice"] == START - Decimal("1166.666655")  # 0.33333333 x (6,000 - 2,500)


def test_with_no_mark_in_the_window_the_last_mark_before_expiry_settles(
    ledger: LedgerHarness,
) -> None:
    accounts_with_cash(ledger, "alice", "bob")
    ledger.list_future(FUTURE)
    ledger.trade("FUT", [leg(FUTURE, buyer="alice", seller="bob", qty="2", price="99000")])
    index_marks(ledger, (at("03:00"), "98000"), (at("07:29"), "99500"),
                (at("08:01"), "200000"))  # the last one comes after expiry

    run_job(ledger.ledger, "settle", SETTLE_AT)

    [price] = settle_events(ledger)[0]
    assert (price.settlement_price, price.method, price.marks_used) == (
        Decimal("99500"), "last_mark", 1)
    assert ledger.balance("alice", "USDC") == START + 2 * 500  # 2 x (99,500 - 99,000)
    assert ledger.balance("bob", "USDC") == START - 2 * 500
    assert ledger.position("alice", FUTURE) == 0


def test_settlement_without_an_index_mark_in_the_last_24_hours_is_refused_and_writes_nothing(
    ledger: LedgerHarness,
) -> None:
    accounts_with_cash(ledger, "alice", "bob")
    ledger.list_future(FUTURE)
    ledger.trade("FUT", [leg(FUTURE, buyer="alice", seller="bob", qty="2", price="99000")])
    index_marks(ledger, (EXPIRY - timedelta(hours=24, seconds=1), "99000"))
    before = ledger.snapshot()

    refused = ledger.cli("run", "settle", "--at", iso(SETTLE_AT), "--json")

    assert refused.exit_code == 2
    assert "no BTC index mark in the 24 hours before expiry 2026-11-27T08:00:00Z" \
        in refused.stderr
    assert FUTURE in refused.stderr
    assert ledger.snapshot() == before
    with pytest.raises(NoSettlementPrice) as raised:
        run_job(ledger.ledger, "settle", SETTLE_AT)
    assert (raised.value.symbol, raised.value.expiry) == (FUTURE, EXPIRY)
    assert ledger.snapshot() == before
    assert ledger.position("alice", FUTURE) == 2

    # The index arrives late, effective 07:45: the same batch now settles. The old mark
    # holds 07:30-07:45 and the late one 07:45-08:00: (99,000 + 101,000) / 2 = 100,000.
    index_marks(ledger, (at("07:45"), "101000"))
    run_job(ledger.ledger, "settle", SETTLE_AT)
    [price] = settle_events(ledger)[0]
    assert (price.settlement_price, price.method) == (Decimal("100000"), "twap")
    assert ledger.balance("alice", "USDC") == START + 2 * 1000
    assert ledger.position("alice", FUTURE) == 0
