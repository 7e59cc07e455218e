"""The book a process keeps between commands (`clearing.projections.kept`) is always exactly
the read models' state: moved forward by the facts recorded since, never stale, never
changed by what a caller does with its copy, and read afresh when the log is not the one it
was kept from."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from clearing.app import Ledger
from clearing.domain.ledger import LedgerState
from clearing.jobs.catalog import run_job
from clearing.projections import kept
from clearing.projections import tables as t
from clearing.projections.ledger import load_full_state
from tests.ledger.harness import T0, LedgerHarness, leg

FUTURE = "BTC-27DEC26"
CALL = "BTC-27DEC26-100000-C"
PERP = "BTC-PERP"
MODELS = ("accounts", "instruments", "balances", "positions", "marks", "risk_changes",
          "margin_states", "settlements")


def exact(state: LedgerState) -> dict[str, Any]:
    """Every model of `state` with each value as its repr, so 1.5 and 1.50 differ."""
    return {name: sorted((repr(k), repr(v)) for k, v in getattr(state, name).items())
            for name in MODELS}


def stored(ledger: LedgerHarness) -> LedgerState:
    with ledger.engine.connect() as conn:
        return load_full_state(conn, {x.name: x for x in t.LEDGER_TABLES},
                               with_statement=False, with_trades=False)


def test_the_kept_book_follows_every_fact_exactly(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice", "bob", "carol")
    ledger.list_instruments(FUTURE, CALL, PERP)
    ledger.deposit("alice", "USDC", "100000")
    ledger.deposit("bob", "USDC", "100000.50")
    ledger.mark("BTC", "95000")
    ledger.mark(FUTURE, "95000")
    ledger.mark(CALL, "1500", iv="0.55")
    ledger.mark(PERP, "95000")
    first = ledger.ledger.state_at(T0)
    assert exact(first) == exact(stored(ledger))

    ledger.trade("T1", [leg(FUTURE, buyer="alice", seller="bob", qty="1.5", price="95000")])
    ledger.trade("T2", [leg(CALL, buyer="bob", seller="alice", qty="2", price="1500.10"),
                        leg(PERP, buyer="alice", seller="carol", qty="0.25", price="95010")])
    ledger.bust("T1", at=T0 + timedelta(minutes=30))
    ledger.mark(FUTURE, "96000.5", at=T0 + timedelta(hours=1))
    ledger.withdraw("bob", "USDC", "10.25")
    run_job(Ledger(ledger.engine, actor="test"), "mtm", T0 + timedelta(hours=1))

    later = Ledger(ledger.engine, actor="test").state_at(T0 + timedelta(hours=1))
    assert exact(later) == exact(stored(ledger))
    assert kept._KEPT[ledger.engine].at == Ledger(ledger.engine).runner.checkpoint("ledger")
    assert later.positions[("alice", FUTURE)].quantity == 0  # the bust reached it


def test_a_caller_changing_its_copy_changes_nothing_kept(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice", "bob")
    ledger.list_instruments(FUTURE)
    ledger.deposit("alice", "USDC", "1000")
    ledger.trade("T1", [leg(FUTURE, buyer="alice", seller="bob", qty="1", price="95000")])
    mine = ledger.ledger.state_at(T0)
    mine.balances[("alice", "USDC")] = mine.balances[("alice", "USDC")] * 1000
    mine.positions[("alice", FUTURE)].quantity += 7
    mine.accounts.clear()

    again = Ledger(ledger.engine, actor="test").state_at(T0)

    assert exact(again) == exact(stored(ledger))


def test_a_log_that_no_longer_holds_the_kept_fact_is_read_afresh(
        ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice", "bob")
    ledger.deposit("alice", "USDC", "1000")
    ledger.ledger.state_at(T0)
    # As if the database had been recreated under the same engine with another history.
    kept._KEPT[ledger.engine].last_hash = "0" * 64
    kept._KEPT[ledger.engine].state.balances[("alice", "USDC")] += 1
    ledger.deposit("bob", "USDC", "5")

    state = Ledger(ledger.engine, actor="test").state_at(T0)

    assert exact(state) == exact(stored(ledger))
