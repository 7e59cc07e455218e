"""Liquidation, the insurance fund and auto-deleveraging, computed by hand."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from clearing.domain.margin_sweep import all_margins
from clearing.jobs.catalog import run_job, run_jobs
from tests.ledger.harness import T0, LedgerHarness, leg

PERP = "BTC-PERP"
T1 = T0 + timedelta(hours=1)
D = Decimal


def crash_to(ledger: LedgerHarness, price: str, at=T1) -> None:  # type: ignore[no-untyped-def]
    ledger.mark("BTC", price, at=at)
    ledger.mark(PERP, price, at=at)


def events_of(ledger: LedgerHarness, type_name: str) -> list:
    return [e.event for e in ledger.events() if e.type == type_name]


def bankrupt_long_against_three_shorts(ledger: LedgerHarness, insurance: str) -> None:
    """dan is long 10 BTC-PERP bought from s1 (4 at 110,000), s2 (3 at 105,000) and s3 (3 at
    101,000); BTC then crashes to 90,000: dan has lost 158,000 on 150,000 of collateral."""
    ledger.given_accounts("dan", "s1", "s2", "s3")
    ledger.list_perpetual(PERP)
    for account, amount in (("dan", "150000"), ("s1", "400000"), ("s2", "20000"),
                            ("s3", "30000"), ("ccp:insurance", insurance)):
        ledger.deposit(account, "USDC", amount)
    ledger.trades(("T1", [leg(PERP, buyer="dan", seller="s1", qty="4", price="110000")]),
                  ("T2", [leg(PERP, buyer="dan", seller="s2", qty="3", price="105000")]),
                  ("T3", [leg(PERP, buyer="dan", seller="s3", qty="3", price="101000")]))
    crash_to(ledger, "90000")


def test_bankruptcy_is_covered_by_the_insurance_fund_then_by_adl_in_score_order(
    ledger: LedgerHarness,
) -> None:
    bankrupt_long_against_three_shorts(ledger, insurance="3000")
    run = run_job(ledger.ledger, "liquidate", T1)[0]
    assert not run.already_done

    moved = events_of(ledger, "PositionLiquidated")
    assert len(moved) == 1
    assert (moved[0].account_id, moved[0].quantity, moved[0].mark_price) == ("dan", D(10),
                                                                            D(90000))
    assert moved[0].equity_before == D("-8000.00")
    assert moved[0].fee == 0  # capped by the equity left, which is below zero

    insured = events_of(ledger, "InsuranceFundPaid")
    assert [(e.deficit, e.amount) for e in insured] == [(D("8000.00"), D("3000.000000"))]

    # Bankruptcy price: 90,000 + 8,000 / 10 = 90,800; each unit closed recovers 800.
    # Scores (profit% x leverage): s2 0.5934 > s3 0.4668 > s1 0.1364. 5,000 to recover:
    # s2 closes 3 (2,400), s3 closes 3 (2,400), s1 only 0.25 (200).
    adl = events_of(ledger, "AutoDeleveraged")
    assert [(e.counterparty, e.quantity, e.amount) for e in adl] == [
        ("s2", D(3), D("2400")), ("s3", D(3), D("2400")), ("s1", D("0.25"), D("200"))]
    assert {e.bankruptcy_price for e in adl} == {D(90800)}
    assert [e.score for e in adl] == sorted((e.score for e in adl), reverse=True)

    assert ledger.balance("dan", "USDC") == 0
    assert ledger.balance("ccp:insurance", "USDC") == 0
    assert ledger.position("dan", PERP) == 0
    assert ledger.position("s1", PERP) == D("-3.75")
    assert ledger.position("s2", PERP) == 0 and ledger.position("s3", PERP) == 0
    assert ledger.position("ccp:liquidation", PERP) == D("3.75")

    # The next mark-to-market pays each short its profit less what ADL took: s2 had 45,000
    # of profit and gave up 2,400.
    before = ledger.balance("s2", "USDC")
    run_job(ledger.ledger, "mtm", T1)
    assert ledger.balance("s2", "USDC") - before == D("42600")
    assert ledger.balance("dan", "USDC") == 0
    for account in ("s1", "s2", "s3"):
        assert ledger.balance(account, "USDC") > 0
    assert ledger.balance("ccp:settlement", "USDC") == 0


def test_a_large_enough_insurance_fund_means_no_adl(ledger: LedgerHarness) -> None:
    bankrupt_long_against_three_shorts(ledger, insurance="10000")
    run_job(ledger.ledger, "liquidate", T1)
    assert events_of(ledger, "AutoDeleveraged") == []
    assert ledger.balance("dan", "USDC") == 0
    assert ledger.balance("ccp:insurance", "USDC") == D("2000")
    assert ledger.position("s1", PERP) == D(-4)


def test_liquidation_moves_the_largest_requirement_first_and_stops_at_initial(
    ledger: LedgerHarness,
) -> None:
    """erin holds a big and a small perp position; after a dip she is below maintenance.
    Moving the big one (largest requirement) restores initial margin, so the small stays."""
    ledger.given_accounts("erin", "mm")
    ledger.list_perpetual(PERP)
    ledger.list_perpetual("ETH-PERP")
    ledger.deposit("erin", "USDC", "30000")
    ledger.deposit("mm", "USDC", "1000000")
    ledger.trades(("T1", [leg(PERP, buyer="erin", seller="mm", qty="10", price="100000")]),
                  ("T2", [leg("ETH-PERP", buyer="erin", seller="mm", qty="1", price="4000")]))
    ledger.mark("ETH", "4000", at=T1)
    ledger.mark("ETH-PERP", "4000", at=T1)
    crash_to(ledger, "98000")
    # erin: equity 30,000 - 20,000 = 10,000; maintenance on 980,000 + 4,000 notional is
    # about 10,290 + 40: below it, she is liquidated.
    run_job(ledger.ledger, "liquidate", T1)
    moved = events_of(ledger, "PositionLiquidated")
    assert [m.instrument for m in moved] == [PERP]
    fee = D("0.005") * 980000
    assert moved[0].fee == fee
    assert ledger.balance("ccp:insurance", "USDC") == fee
    assert ledger.position("erin", "ETH-PERP") == 1
    assert ledger.position("ccp:liquidation", PERP) == 10
    # Realised at the mark: -20,000 of variation margin and the fee.
    assert ledger.balance("erin", "USDC") == D(30000) - 20000 - fee


def test_healthy_accounts_are_left_alone_and_reruns_change_nothing(
    ledger: LedgerHarness,
) -> None:
    bankrupt_long_against_three_shorts(ledger, insurance="3000")
    crash_to(ledger, "109000", at=T1 + timedelta(minutes=1))
    later = T1 + timedelta(minutes=2)
    assert run_job(ledger.ledger, "liquidate", later)[0].events_written == 1  # completion
    count = ledger.event_count()
    assert run_job(ledger.ledger, "liquidate", later)[0].already_done
    assert ledger.event_count() == count


def test_margin_after_liquidate_in_one_run_sees_what_liquidation_changed(
    ledger: LedgerHarness,
) -> None:
    """In one run, `margin` reuses the margins `liquidate` computed for the accounts it left
    alone, and computes afresh those it moved: erin, liquidating before, healthy after."""
    ledger.given_accounts("erin", "mm")
    ledger.list_perpetual(PERP)
    ledger.deposit("erin", "USDC", "30000")
    ledger.deposit("mm", "USDC", "1000000")
    ledger.trades(("T1", [leg(PERP, buyer="erin", seller="mm", qty="10", price="100000")]))
    crash_to(ledger, "98000")
    before = all_margins(ledger.ledger.state_at(T1), T1)
    assert before["erin"].status == "liquidating"

    run_jobs(ledger.ledger, ("liquidate", "margin"), T1)

    assert [m.account_id for m in events_of(ledger, "PositionLiquidated")] == ["erin"]
    state = ledger.ledger.state_at(T1)
    fresh = all_margins(state, T1)
    assert fresh["erin"].status == "healthy"
    for account_id, margin in fresh.items():
        recorded = state.margin_states.get(account_id)
        assert margin.status == (recorded.status if recorded else "healthy"), account_id
    assert events_of(ledger, "MarginStatusChanged") == []
