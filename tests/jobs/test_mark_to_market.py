"""Mark-to-market (`clearing run mtm`): a day of variation margin for futures, to the micro-USDC.

VM = q × multiplier × (mark − last settlement price), paid through `ccp:settlement`; payouts
round down and charges round up to USDC's 6 decimals, and what rounding leaves goes to
`ccp:rounding` (SPEC section 4). Every figure below is worked out by hand.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal

from clearing.jobs.catalog import run_job
from tests.ledger.harness import T0, LedgerHarness, iso, leg

FUTURE = "BTC-25DEC26"
PERP = "BTC-PERP"
OPTION = "BTC-25DEC26-100000-C"
DAY1 = T0 + timedelta(days=1)
DAY2 = T0 + timedelta(days=2)


def micro_future_book(ledger: LedgerHarness) -> None:
    """alice buys 7 BTC-25DEC26 (multiplier 0.001: a thousandth of a bitcoin each) from bob at
    100,000; both hold 10,000 USDC."""
    ledger.given_accounts("alice", "bob")
    ledger.list_future(FUTURE, multiplier="0.001")
    ledger.deposit("alice", "USDC", "10000")
    ledger.deposit("bob", "USDC", "10000")
    ledger.trade("T1", [leg(FUTURE, buyer="alice", seller="bob", qty="7", price="100000")])


def run_json(ledger: LedgerHarness, job: str, at: datetime) -> dict:
    result = ledger.cli("run", job, "--at", iso(at), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def positions_json(ledger: LedgerHarness, at: datetime) -> dict[tuple[str, str], dict]:
    result = ledger.cli("positions", "--json", "--as-of", iso(at))
    assert result.exit_code == 0, result.output
    return {(r["account_id"], r["instrument"]): r for r in json.loads(result.stdout)}


def test_a_day_of_variation_margin_rounds_in_the_houses_favour_to_the_micro(
    ledger: LedgerHarness,
) -> None:
    micro_future_book(ledger)
    ledger.mark(FUTURE, "100123.45678", at=DAY1)

    run = run_json(ledger, "mtm", DAY1)

    assert run == {"job": "mtm", "batch_id": "mtm:2026-11-03T12:00:00.000000Z",
                   "at": "2026-11-03T12:00:00Z", "events_written": 3,
                   "already_done": False}  # the VM, the residual sweep, the completion
    # 7 x 0.001 x (100,123.45678 - 100,000) = 0.86419746 USDC, exactly, each way:
    # alice's payout rounds down to 0.864197, bob's charge rounds up to 0.864198.
    vm = ledger.events("batch-mtm")[0].event
    assert vm.type_name == "VariationMarginSettled"
    assert (vm.instrument, vm.mark_price, vm.batch_id) == (
        FUTURE, Decimal("100123.45678"), run["batch_id"])
    assert [(m.account_id, m.amount, m.basis_change) for m in vm.movements] == [
        ("alice", Decimal("0.86419746"), Decimal("864.19746")),
        ("bob", Decimal("-0.86419746"), Decimal("-864.19746")),
    ]
    assert {(p.account_id, p.amount) for p in vm.postings} == {
        ("alice", Decimal("0.864197")), ("bob", Decimal("-0.864198")),
        ("ccp:settlement", Decimal("0.000001"))}
    sweep = ledger.events("batch-mtm")[1].event
    assert sweep.type_name == "SettlementResidualSwept"
    assert {(p.account_id, p.amount) for p in sweep.postings} == {
        ("ccp:settlement", Decimal("-0.000001")), ("ccp:rounding", Decimal("0.000001"))}

    assert ledger.balance("alice", "USDC") == Decimal("10000.864197")
    assert ledger.balance("bob", "USDC") == Decimal("9999.135802")
    assert ledger.balance("ccp:rounding", "USDC") == Decimal("0.000001")
    assert ledger.balance("ccp:settlement", "USDC") == 0
    assert (Decimal("0.864197") + Decimal("-0.864198")
            + ledger.balance("ccp:rounding", "USDC")) == 0
    assert ledger.totals_per_asset()["USDC"] == 0
    shown = positions_json(ledger, DAY1)
    assert shown[("alice", FUTURE)]["last_settlement_price"] == "100123.45678"
    assert shown[("bob", FUTURE)]["last_settlement_price"] == "100123.45678"
    assert shown[("alice", FUTURE)]["quantity"] == "7"
    assert shown[("bob", FUTURE)]["quantity"] == "-7"


def test_the_next_days_variation_margin_pays_only_the_change_since_the_last_mark(
    ledger: LedgerHarness,
) -> None:
    micro_future_book(ledger)
    ledger.mark(FUTURE, "100123.45678", at=DAY1)
    run_job(ledger.ledger, "mtm", DAY1)
    ledger.mark(FUTURE, "99999.99999999", at=DAY2)

    second = run_job(ledger.ledger, "mtm", DAY2)[0]

    assert (second.events_written, second.already_done) == (3, False)
    # 7 x 0.001 x (99,999.99999999 - 100,123.45678) = -0.86419746007: alice is charged
    # 0.864198 (rounded up), bob is paid 0.864197 (rounded down). Measured from the trade
    # price instead it would have been a mere -0.00000007.
    vm = [e.event for e in ledger.events("batch-mtm")
          if e.event.type_name == "VariationMarginSettled"][-1]
    assert vm.batch_id == second.batch_id
    assert [(m.account_id, m.amount) for m in vm.movements] == [
        ("alice", Decimal("-0.86419746007")), ("bob", Decimal("0.86419746007"))]
    assert ledger.balance("alice", "USDC") == Decimal("10000.864197") - Decimal("0.864198")
    assert ledger.balance("bob", "USDC") == Decimal("9999.135802") + Decimal("0.864197")
    assert ledger.balance("ccp:rounding", "USDC") == Decimal("0.000002")
    assert ledger.balance("ccp:settlement", "USDC") == 0
    assert ledger.totals_per_asset()["USDC"] == 0
    shown = positions_json(ledger, DAY2)
    assert shown[("alice", FUTURE)]["last_settlement_price"] == "99999.99999999"
    assert shown[("bob", FUTURE)]["last_settlement_price"] == "99999.99999999"


def test_rerunning_the_same_batch_writes_nothing_and_says_already_done(
    ledger: LedgerHarness,
) -> None:
    micro_future_book(ledger)
    ledger.mark(FUTURE, "100123.45678", at=DAY1)
    run_json(ledger, "mtm", DAY1)
    before = ledger.snapshot()

    again = run_json(ledger, "mtm", DAY1)

    assert again == {"job": "mtm", "batch_id": "mtm:2026-11-03T12:00:00.000000Z",
                     "at": "2026-11-03T12:00:00Z", "events_written": 0, "already_done": True}
    assert ledger.snapshot() == before
    in_process = run_job(ledger.ledger, "mtm", DAY1)[0]
    assert (in_process.events_written, in_process.already_done) == (0, True)
    assert ledger.snapshot() == before


def test_a_new_batch_with_no_new_mark_pays_nothing(ledger: LedgerHarness) -> None:
    micro_future_book(ledger)
    ledger.mark(FUTURE, "100123.45678", at=DAY1)
    run_job(ledger.ledger, "mtm", DAY1)
    _, balances, positions = ledger.snapshot()

    later = run_job(ledger.ledger, "mtm", DAY1 + timedelta(hours=1))[0]

    assert (later.events_written, later.already_done) == (1, False)  # the completion only
    assert ledger.snapshot()[1:] == (balances, positions)


def test_a_position_closed_before_the_mark_is_paid_its_trading_profit_and_then_nothing(
    ledger: LedgerHarness,
) -> None:
    micro_future_book(ledger)
    ledger.given_accounts("carol")
    ledger.deposit("carol", "USDC", "10000")
    # alice sells her 7 to carol at 100,050.5 the same day: she is flat, with a basis of
    # 7 x 100,000 - 7 x 100,050.5 = -353.5 still to be paid out.
    ledger.trade("T2", [leg(FUTURE, buyer="carol", seller="alice", qty="7",
                            price="100050.5")], at=T0 + timedelta(hours=1))
    ledger.mark(FUTURE, "100100", at=DAY1)

    run_job(ledger.ledger, "mtm", DAY1)

    # alice: (0 x 100,100 + 353.5) x 0.001 = 0.3535; bob: -7 x 0.001 x 100 = -0.7;
    # carol: 7 x 0.001 x 49.5 = 0.3465. Exact sum zero, every amount a whole micro-USDC.
    assert ledger.balance("alice", "USDC") == Decimal("10000.3535")
    assert ledger.balance("bob", "USDC") == Decimal("9999.3")
    assert ledger.balance("carol", "USDC") == Decimal("10000.3465")
    assert ledger.balance("ccp:rounding", "USDC") == 0
    assert ledger.balance("ccp:settlement", "USDC") == 0
    assert ledger.state().positions[("alice", FUTURE)].settlement_basis == 0
    ledger.mark(FUTURE, "100200", at=DAY2)
    run_job(ledger.ledger, "mtm", DAY2)
    assert ledger.balance("alice", "USDC") == Decimal("10000.3535")  # flat: nothing more


def test_mtm_pays_futures_and_perpetuals_but_never_options(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice", "bob")
    ledger.list_instruments(PERP, OPTION)
    ledger.deposit("alice", "USDC", "100000")
    ledger.deposit("bob", "USDC", "100000")
    ledger.trade("T1", [leg(PERP, buyer="alice", seller="bob", qty="0.33333333",
                            price="100000"),
                        leg(OPTION, buyer="alice", seller="bob", qty="1", price="2500")])
    ledger.mark(PERP, "100000.5", at=DAY1)
    ledger.mark(OPTION, "3000", at=DAY1)
    after_premium = ledger.balance("alice", "USDC")
    assert after_premium == Decimal("97500")

    run_job(ledger.ledger, "mtm", DAY1)

    # Perpetual: 0.33333333 x 1 x 0.5 = 0.166666665; alice is paid 0.166666 and bob is
    # charged 0.166667. The option's mark moves no cash (its premium was paid in full).
    assert ledger.balance("alice", "USDC") == after_premium + Decimal("0.166666")
    assert ledger.balance("bob", "USDC") == Decimal("102500") - Decimal("0.166667")
    assert ledger.balance("ccp:rounding", "USDC") == Decimal("0.000001")
    assert ledger.balance("ccp:settlement", "USDC") == 0
    paid = {e.event.instrument for e in ledger.events("batch-mtm")
            if e.event.type_name == "VariationMarginSettled"}
    assert paid == {PERP}
