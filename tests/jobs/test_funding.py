"""Funding (`clearing run funding`): perpetual longs pay shorts when the rate is positive.

SPEC section 4: payment = q × multiplier × mark × rate, rate = premium index +
clamp(0.01% − premium index, −0.05%, +0.05%), premium index = (perp mark − index) / index,
then clamped to ±0.75% per period. Each case below works the rate and the payments out by
hand; payouts round down and charges round up to USDC's 6 decimals.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from clearing.domain.events import FundingPaid
from clearing.jobs.catalog import run_job
from tests.ledger.harness import T0, LedgerHarness, leg

PERP = "BTC-PERP"
FUTURE = "BTC-25DEC26"
FUNDING_AT = T0 + timedelta(hours=8)
START = Decimal("1000000")


def perp_book(ledger: LedgerHarness, qty: str, *, index: str, mark: str) -> None:
    """alice long `qty` BTC-PERP against bob at the index price, then the perpetual marked
    at `mark` against a BTC index at `index` just before the funding time."""
    ledger.given_accounts("alice", "bob")
    ledger.list_perpetual(PERP)
    ledger.deposit("alice", "USDC", str(START))
    ledger.deposit("bob", "USDC", str(START))
    ledger.trade("T1", [leg(PERP, buyer="alice", seller="bob", qty=qty, price=index)])
    before = FUNDING_AT - timedelta(minutes=1)
    ledger.mark("BTC", index, at=before)
    ledger.mark(PERP, mark, at=before)


def funding_paid(ledger: LedgerHarness) -> list[FundingPaid]:
    return [e.event for e in ledger.events("batch-funding") if isinstance(e.event, FundingPaid)]


@pytest.mark.parametrize(
    ("index", "mark", "qty", "premium", "rate", "long_pays_exact", "alice", "bob"),
    [
        # (100,500 - 100,000) / 100,000 = 0.005; 0.005 + clamp(0.0001 - 0.005) = 0.005 -
        # 0.0005 = 0.0045; 0.33333333 x 100,500 x 0.0045 = 150.7499984925: alice's charge
        # rounds up, bob's payout rounds down.
        pytest.param("100000", "100500", "0.33333333", "0.005", "0.0045", "150.7499984925",
                     "-150.749999", "150.749998", id="positive premium: longs pay"),
        # (99,500 - 100,000) / 100,000 = -0.005; -0.005 + 0.0005 = -0.0045: shorts pay
        # longs 2 x 99,500 x 0.0045 = 895.5.
        pytest.param("100000", "99500", "2", "-0.005", "-0.0045", "-895.5",
                     "895.5", "-895.5", id="negative premium: shorts pay"),
        # 0.02 - 0.0005 = 0.0195, capped at 0.75%: 1.5 x 102,000 x 0.0075 = 1,147.5.
        pytest.param("100000", "102000", "1.5", "0.02", "0.0075", "1147.5",
                     "-1147.5", "1147.5", id="capped at +0.75%"),
        # -0.03 + 0.0005 = -0.0295, capped at -0.75%: 1.5 x 97,000 x 0.0075 = 1,091.25.
        pytest.param("100000", "97000", "1.5", "-0.03", "-0.0075", "-1091.25",
                     "1091.25", "-1091.25", id="capped at -0.75%"),
        # 0.0003 + clamp(0.0001 - 0.0003 = -0.0002, inside the band) = exactly 0.0001:
        # 3 x 100,030 x 0.0001 = 30.009.
        pytest.param("100000", "100030", "3", "0.0003", "0.0001", "30.009",
                     "-30.009", "30.009", id="inside the band: 0.01%"),
        # -0.0002 + 0.0003 = 0.0001 as well: a perp slightly below the index still pays
        # the interest rate, 3 x 99,980 x 0.0001 = 29.994.
        pytest.param("100000", "99980", "3", "-0.0002", "0.0001", "29.994",
                     "-29.994", "29.994", id="inside the band, below the index: 0.01%"),
        # 200 / 30,000 = 0.00666... rounded half-even to 12 decimals: 0.006666666667;
        # less the 0.0005 clamp, 0.006166666667; 30,200 x 0.006166666667 = 186.2333333434.
        pytest.param("30000", "30200", "1", "0.006666666667", "0.006166666667",
                     "186.2333333434", "-186.233334", "186.233333",
                     id="a repeating premium index"),
    ],
)
def test_funding_rate_and_payments(
    ledger: LedgerHarness, index: str, mark: str, qty: str, premium: str, rate: str,
    long_pays_exact: str, alice: str, bob: str,
) -> None:
    perp_book(ledger, qty, index=index, mark=mark)

    run = run_job(ledger.ledger, "funding", FUNDING_AT)[0]

    exact = Decimal(long_pays_exact)
    [paid] = funding_paid(ledger)
    assert (paid.instrument, paid.mark_price, paid.index_price) == (
        PERP, Decimal(mark), Decimal(index))
    assert (paid.premium_index, paid.rate) == (Decimal(premium), Decimal(rate))
    assert [(p.account_id, p.amount) for p in paid.payments] == [
        ("alice", -exact), ("bob", exact)]
    assert ledger.balance("alice", "USDC") == START + Decimal(alice)
    assert ledger.balance("bob", "USDC") == START + Decimal(bob)
    residual = -(Decimal(alice) + Decimal(bob))
    assert ledger.balance("ccp:rounding", "USDC") == residual
    assert ledger.balance("ccp:settlement", "USDC") == 0
    assert ledger.totals_per_asset()["USDC"] == 0
    assert run.events_written == (3 if residual else 2)  # funding, [sweep,] completion


def test_the_rounding_residual_passes_through_settlement_to_rounding(
    ledger: LedgerHarness,
) -> None:
    perp_book(ledger, "0.33333333", index="100000", mark="100500")

    run_job(ledger.ledger, "funding", FUNDING_AT)

    [paid] = funding_paid(ledger)
    assert {(p.account_id, p.amount) for p in paid.postings} == {
        ("alice", Decimal("-150.749999")), ("bob", Decimal("150.749998")),
        ("ccp:settlement", Decimal("0.000001"))}
    sweep = ledger.events("batch-funding")[-1].event
    assert sweep.type_name == "SettlementResidualSwept"
    assert {(p.account_id, p.amount) for p in sweep.postings} == {
        ("ccp:settlement", Decimal("-0.000001")), ("ccp:rounding", Decimal("0.000001"))}


def test_each_period_pays_again_at_its_own_marks_and_a_rerun_pays_nothing(
    ledger: LedgerHarness,
) -> None:
    perp_book(ledger, "2", index="100000", mark="100500")
    run_job(ledger.ledger, "funding", FUNDING_AT)
    next_period = FUNDING_AT + timedelta(hours=8)
    ledger.mark("BTC", "100000", at=next_period - timedelta(minutes=1))
    ledger.mark(PERP, "99500", at=next_period - timedelta(minutes=1))

    assert run_job(ledger.ledger, "funding", FUNDING_AT)[0].already_done
    run_job(ledger.ledger, "funding", next_period)

    # First period alice pays 2 x 100,500 x 0.0045 = 904.5; second she receives
    # 2 x 99,500 x 0.0045 = 895.5.
    assert [p.rate for p in funding_paid(ledger)] == [Decimal("0.0045"), Decimal("-0.0045")]
    assert ledger.balance("alice", "USDC") == START - Decimal("904.5") + Decimal("895.5")
    assert ledger.balance("bob", "USDC") == START + Decimal("904.5") - Decimal("895.5")
    before = ledger.snapshot()
    again = run_job(ledger.ledger, "funding", next_period)[0]
    assert (again.events_written, again.already_done) == (0, True)
    assert ledger.snapshot() == before


def test_funding_applies_to_perpetuals_only_and_needs_both_marks(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice", "bob")
    ledger.list_instruments(PERP, FUTURE)
    ledger.deposit("alice", "USDC", "100000")
    ledger.deposit("bob", "USDC", "100000")
    ledger.trade("T1", [leg(PERP, buyer="alice", seller="bob", qty="1", price="100000"),
                        leg(FUTURE, buyer="alice", seller="bob", qty="1", price="101000")])
    ledger.mark(PERP, "100500", at=T0)
    ledger.mark(FUTURE, "101500", at=T0)

    no_index = run_job(ledger.ledger, "funding", FUNDING_AT)[0]
    assert no_index.events_written == 1  # the completion: no index, no premium, no funding
    ledger.mark("BTC", "100000", at=T0)
    run_job(ledger.ledger, "funding", FUNDING_AT + timedelta(hours=8))

    assert [p.instrument for p in funding_paid(ledger)] == [PERP]
    assert ledger.balance("alice", "USDC") == Decimal("100000") - Decimal("452.25")
    assert ledger.balance("bob", "USDC") == Decimal("100000") + Decimal("452.25")
