"""Audit replay: what the ledger showed at a past moment, as it knew it then, is reproduced
exactly by a replay bounded by that moment, however the ledger went on afterwards (late
trades effective in the past, busts, jobs)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from clearing.backoffice.replay import ReplayBounds, differences, replay
from clearing.jobs.catalog import run_job
from clearing.projections import tables as t
from clearing.projections.ledger import load_full_state
from tests.ledger.conftest import ledger  # noqa: F401 - the fixture
from tests.ledger.harness import T0, LedgerHarness, leg

PERP = "BTC-PERP"
FUTURE = "BTC-27NOV26"


def stored_state(ledger: LedgerHarness):  # type: ignore[no-untyped-def]
    """The read models exactly as they stand now."""
    ledger.ledger.refresh()
    with ledger.ledger.engine.connect() as conn:
        return load_full_state(conn, {x.name: x for x in t.LEDGER_TABLES})


def moment() -> datetime:
    """A recorded-at bound strictly after everything recorded so far, and before anything
    recorded next."""
    time.sleep(0.002)
    now = datetime.now(UTC)
    time.sleep(0.002)
    return now


def test_replay_known_at_each_earlier_moment_reproduces_the_read_models_taken_then(
    ledger: LedgerHarness,  # noqa: F811
) -> None:
    taken = []
    ledger.given_accounts("alice", "bob", "carol")
    ledger.list_perpetual(PERP)
    ledger.list_future(FUTURE)
    for account in ("alice", "bob", "carol"):
        ledger.deposit(account, "USDC", "100000")
    ledger.mark("BTC", "100000")
    ledger.mark(PERP, "100000")
    ledger.trade("T1", [leg(PERP, buyer="alice", seller="bob", qty="1", price="100000")])
    taken.append((moment(), stored_state(ledger)))

    ledger.trade("T2", [leg(PERP, buyer="bob", seller="carol", qty="2", price="100500"),
                        leg(FUTURE, buyer="carol", seller="bob", qty="2", price="100800")],
                 at=T0 + timedelta(hours=2))
    ledger.mark(PERP, "101000", at=T0 + timedelta(hours=3))
    run_job(ledger.ledger, "mtm", T0 + timedelta(hours=3))
    taken.append((moment(), stored_state(ledger)))

    # A trade arrives late: effective before the first moment, recorded after the second.
    ledger.trade("T0-late", [leg(PERP, buyer="carol", seller="alice", qty="0.5",
                                 price="99900")], at=T0 - timedelta(hours=1))
    ledger.bust("T2", at=T0 + timedelta(hours=4))
    ledger.withdraw("carol", "USDC", "1000", at=T0 + timedelta(hours=4))
    run_job(ledger.ledger, "mtm", T0 + timedelta(hours=5))
    taken.append((moment(), stored_state(ledger)))

    ledger.deposit("alice", "USDC", "5", at=T0 - timedelta(days=1))  # very late, very early
    final = stored_state(ledger)

    for known_at, then in taken:
        replayed = replay(ledger.ledger.store, ReplayBounds(known_at=known_at))
        assert differences(then, replayed) == [], known_at
    # And the moments really differ from one another and from the end.
    states = [then for _, then in taken] + [final]
    for a, b in zip(states, states[1:]):
        assert differences(a, b) != []
    # The late trade is in the first moment's business time but was not known then.
    late_view = replay(ledger.ledger.store, ReplayBounds(as_of=T0))
    assert ("carol", PERP) in late_view.positions
    assert ("carol", PERP) not in taken[0][1].positions
