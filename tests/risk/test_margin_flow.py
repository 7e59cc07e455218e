"""Margin as the back office meets it: withdrawals held to initial margin, margin calls from
the sweep, parameters that change over time, and replay of any past moment."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import func, select

from clearing.jobs.catalog import run_job
from clearing.store.tables import events
from tests.ledger.harness import T0, LedgerHarness, leg

PERP = "BTC-PERP"


def long_perp_book(ledger: LedgerHarness, qty: str = "10", price: str = "100000") -> None:
    """alice is long `qty` BTC-PERP against bob, both with 30,000 USDC, BTC marked at price."""
    ledger.given_accounts("alice", "bob")
    ledger.list_perpetual(PERP)
    ledger.deposit("alice", "USDC", "30000")
    ledger.deposit("bob", "USDC", "30000")
    ledger.trade("T1", [leg(PERP, buyer="alice", seller="bob", qty=qty, price=price)])
    ledger.mark("BTC", price)
    ledger.mark(PERP, price)


def margin_json(ledger: LedgerHarness, *args: str) -> list[dict]:
    result = ledger.cli("margin", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_standard_margin_of_a_perpetual_position(ledger: LedgerHarness) -> None:
    long_perp_book(ledger)
    rows = {r["account_id"]: r for r in margin_json(ledger, "--as-of", (T0 + timedelta(
        hours=1)).isoformat())}
    # notional 1,000,000; initial 2% + 0.005% x 10 = 2.05% -> 20,500; maintenance 1.05%
    assert rows["alice"]["initial"] == "20500.00"
    assert rows["alice"]["maintenance"] == "10500.00"
    assert rows["alice"]["equity"] == "30000.00"
    assert rows["alice"]["status"] == "healthy"


def test_withdrawal_that_would_break_initial_margin_is_refused_and_writes_nothing(
    ledger: LedgerHarness,
) -> None:
    long_perp_book(ledger)
    before = ledger.event_count()
    path = ledger.write_file("withdrawals", [{"ref": "W-big", "account_id": "alice",
                                              "asset": "USDC", "amount": "10000",
                                              "time": T0.isoformat()}])
    result = ledger.cli("import", "withdrawals", str(path))
    assert result.exit_code == 2
    assert "initial margin requirement of 20500.00 USD" in result.stderr
    assert "equity 20000.00" in result.stderr
    assert ledger.event_count() == before
    assert ledger.balance("alice", "USDC") == Decimal("30000")
    ledger.withdraw("alice", "USDC", "9500")  # leaves 20,500: exactly the requirement
    assert ledger.balance("alice", "USDC") == Decimal("20500")


def test_several_withdrawals_in_one_file_are_judged_together(ledger: LedgerHarness) -> None:
    long_perp_book(ledger)
    before = ledger.event_count()
    path = ledger.write_file("withdrawals", [
        {"ref": f"W{i}", "account_id": "alice", "asset": "USDC", "amount": "5000",
         "time": T0.isoformat()} for i in range(2)])
    result = ledger.cli("import", "withdrawals", str(path))
    assert result.exit_code == 2 and ":3: amount:" in result.stderr
    assert ledger.event_count() == before


def test_sweep_issues_a_margin_call_on_entering_restricted_and_reruns_are_no_ops(
    ledger: LedgerHarness,
) -> None:
    long_perp_book(ledger)
    day1 = T0 + timedelta(days=1)
    ledger.mark("BTC", "99000", at=day1)
    ledger.mark(PERP, "99000", at=day1)  # alice loses 10,000: equity 20,000 < 20,295 initial
    first = run_job(ledger.ledger, "margin", day1)[0]
    assert (first.events_written, first.already_done) == (3, False)  # status, call, completion
    kinds = [e.type for e in ledger.events("account-alice")]
    assert kinds[-2:] == ["MarginStatusChanged", "MarginCallIssued"]
    call = ledger.events("account-alice")[-1].event
    assert call.shortfall == call.initial - call.equity > 0
    again = run_job(ledger.ledger, "margin", day1)[0]
    assert again.already_done and again.events_written == 0
    result = ledger.cli("run", "margin", "--at", day1.isoformat(), "--json")
    assert json.loads(result.stdout)["already_done"] is True


def test_margin_at_a_past_moment_replays_identically_after_parameters_change(
    ledger: LedgerHarness,
) -> None:
    long_perp_book(ledger)
    moment = (T0 + timedelta(hours=1)).isoformat()
    then = margin_json(ledger, "--as-of", moment)
    ledger.cli("risk", "set", "futures_initial_rate", "0.05", "--at",
               (T0 + timedelta(days=2)).isoformat())
    ledger.cli("risk", "set", "haircut", "0.5", "--underlying", "BTC", "--at",
               (T0 + timedelta(days=2)).isoformat())
    run_job(ledger.ledger, "margin", T0 + timedelta(days=3))
    assert margin_json(ledger, "--as-of", moment) == then
    later = {r["account_id"]: r for r in margin_json(
        ledger, "--as-of", (T0 + timedelta(days=3)).isoformat())}
    assert later["alice"]["initial"] == "50500.00"  # 5% + size term on 1,000,000
    assert later["alice"]["status"] == "liquidating" or later["alice"]["status"] == "restricted"


def test_risk_set_is_an_event_and_risk_show_reports_it(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice")
    before = ledger.event_count()
    result = ledger.cli("risk", "set", "haircut", "0.2", "--underlying", "ETH")
    assert result.exit_code == 0, result.output
    assert ledger.event_count() == before + 1
    shown = json.loads(ledger.cli("risk", "show", "--json").stdout)
    assert {"name": "haircut", "underlying": "ETH", "value": "0.2"} in shown
    bad = ledger.cli("risk", "set", "haircut", "0.2")
    assert bad.exit_code == 2 and "needs --underlying" in bad.stderr
    unknown = ledger.cli("risk", "set", "no_such_thing", "1")
    assert unknown.exit_code == 2 and "unknown risk parameter" in unknown.stderr
    assert ledger.event_count() == before + 1


def _daily_marks(ledger: LedgerHarness, prices: list[str], start_day: int = 0) -> None:
    for i, price in enumerate(prices):
        ledger.mark("BTC", price, at=T0 + timedelta(days=start_day + i))


def _range_changes(ledger: LedgerHarness) -> list[Decimal]:
    return [e.event.value for e in ledger.events("risk-parameters")
            if e.event.name == "portfolio_range" and e.event.underlying == "BTC"]


def test_dynamic_range_rises_with_volatility_at_once_and_falls_no_faster_than_the_floor(
    ledger: LedgerHarness,
) -> None:
    ledger.given_accounts("alice")
    # Violent days: +-10% swings, daily EWMA sigma far above 16% / (2.576 x sqrt 2).
    wild = ["100000", "110000", "99000", "109000", "98000", "108000", "97000"]
    _daily_marks(ledger, wild)
    run_job(ledger.ledger, "risk", T0 + timedelta(days=6, hours=1))
    high = _range_changes(ledger)[-1]
    assert high > Decimal("0.16")
    assert high <= Decimal("0.50")
    # Then a long calm: sigma collapses, but R may not fall below 75% of its trailing high.
    calm = [str(97000 + i) for i in range(1, 60)]
    _daily_marks(ledger, calm, start_day=7)
    run_job(ledger.ledger, "risk", T0 + timedelta(days=66, hours=1))
    after_calm = _range_changes(ledger)[-1]
    assert after_calm < high
    assert after_calm == (high * Decimal("0.75")).quantize(Decimal("0.0001"))
    inputs = ledger.events("risk-parameters")[-1].event.inputs
    assert inputs["floor_applied"].lower() == "true"
    with ledger.ledger.engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(events)).scalar()
    assert run_job(ledger.ledger, "risk", T0 + timedelta(days=66, hours=1))[0].already_done
    with ledger.ledger.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar() == count
