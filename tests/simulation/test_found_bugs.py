"""Product bugs the simulation found, each minimised to a small scenario on both backends.

Each test names the seed and step where the simulation first met the bug.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from clearing.backoffice.csvinput import InputRejected
from clearing.jobs.catalog import run_job
from tests.ledger.harness import LedgerHarness, iso, leg

AT = datetime(2026, 11, 2, 0, 15, tzinfo=UTC)


def test_a_risk_parameter_change_replayed_is_recognised_not_refused(
        ledger: LedgerHarness) -> None:
    """Found by seed 1, step 189: `clearing risk set haircut 0.17 --underlying BTC --at T`
    run a second time was refused as an idempotency conflict. The replayed command decided
    its `previous` value from the parameters in force at T, which by then included its own
    first recording, so the same command produced other content under the same key.
    SPEC section 6, invariant 6: replaying any command changes nothing."""
    first = ledger.ledger.set_risk_parameter("haircut", "BTC", Decimal("0.17"), AT)
    again = ledger.ledger.set_risk_parameter("haircut", "BTC", Decimal("0.17"), AT)
    assert (first.written, again.written) == (1, 0)
    assert again.positions == first.positions


def test_a_risk_parameter_change_replayed_at_the_command_line_says_already_recorded(
        ledger: LedgerHarness) -> None:
    command = ["risk", "set", "haircut", "0.17", "--underlying", "BTC",
               "--at", "2026-11-02T00:15:00Z"]
    assert ledger.cli(*command).exit_code == 0
    again = ledger.cli(*command)
    assert again.exit_code == 0, again.output
    assert "already recorded" in again.output


def test_an_accounts_file_imported_again_after_a_margin_model_change_changes_nothing(
        ledger: LedgerHarness) -> None:
    """Found by seed 21, step 365: an accounts file imported again was refused ("account
    'm00011' already exists with other details") because the account had since moved to
    portfolio margin. The opening was judged against the account as it stands, not as it was
    opened. SPEC section 2: re-importing the same file changes nothing (and is not an
    error)."""
    ledger.given_accounts("carol")
    opening = ledger.last_file
    ledger.ledger.change_margin_model("carol", "portfolio")
    before = ledger.event_count()
    assert ledger.reimport(opening).written == 0
    assert ledger.event_count() == before
    assert ledger.ledger.account("carol").margin_model == "portfolio"


EXPIRY = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
FUTURE = "BTC-27NOV26"


def test_a_late_trade_in_an_instrument_already_settled_leaves_no_open_position(
        ledger: LedgerHarness) -> None:
    """Found by seed 302, step 1872: a trade effective an hour before its future's expiry,
    delivered after the future had settled, was cleared. Its positions stay open in a settled
    instrument for good: settlement has run for that expiry (running it again changes
    nothing), so no final variation margin is ever paid on them and mark-to-market skips a
    settled instrument. SPEC section 4: settled positions close (a bust is refused once the
    trade's instrument has settled; a late trade in it should be too, or be settled)."""
    ledger.given_accounts("alice", "bob")
    ledger.deposit("alice", "USDC", "100000")
    ledger.deposit("bob", "USDC", "100000")
    ledger.list_future(FUTURE)
    ledger.import_rows("marks", [
        {"time": iso(EXPIRY - timedelta(minutes=m)), "symbol": "BTC", "price": "100000",
         "iv": ""} for m in (45, 15)])
    ledger.trade("T1", [leg(FUTURE, buyer="alice", seller="bob", qty="1", price="99000")],
                 at=EXPIRY - timedelta(hours=3))
    run_job(ledger.ledger, "settle", EXPIRY + timedelta(minutes=10))
    assert ledger.positions() == {}

    before = ledger.event_count()
    with pytest.raises(InputRejected, match="has already settled"):
        ledger.trade("T2", [leg(FUTURE, buyer="alice", seller="bob", qty="1",
                                price="99500")], at=EXPIRY - timedelta(hours=1))
    run_job(ledger.ledger, "settle", EXPIRY + timedelta(hours=1))

    assert ledger.event_count() == before + 1  # only the second settle batch's completion
    assert ledger.positions() == {}


def test_a_trades_file_imported_again_after_its_instrument_settled_changes_nothing(
        ledger: LedgerHarness) -> None:
    """Found by seeds 320-325 on the commit that refuses late trades in settled instruments:
    `clearing import trades FILE` run again for a file already imported was refused ("has
    already settled; a trade reported after its settlement cannot be cleared") once the
    trade's instrument had settled. The trades in it are already recorded: they are not late
    trades but the same facts delivered again. SPEC section 2: re-importing the same file
    changes nothing (withdrawals already are recognised, not re-judged)."""
    ledger.given_accounts("alice", "bob")
    ledger.list_future(FUTURE)
    ledger.import_rows("marks", [
        {"time": iso(EXPIRY - timedelta(minutes=15)), "symbol": "BTC", "price": "100000",
         "iv": ""}])
    ledger.trade("T1", [leg(FUTURE, buyer="alice", seller="bob", qty="1", price="99000")],
                 at=EXPIRY - timedelta(hours=3))
    traded = ledger.last_file
    run_job(ledger.ledger, "settle", EXPIRY + timedelta(minutes=10))
    before = ledger.event_count()

    assert ledger.reimport(traded).written == 0
    assert ledger.event_count() == before


# Two found while raising the CI set to 200 seeds, replayed from their seeds up to the step
# that broke (the harness stops at the first broken invariant, naming it).

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_late_liquidation_leaves_positions_settled_since_where_they_are(backend: str) -> None:
    """Found by seed 165, step 510: `clearing run liquidate` for 07:51, run after the 08:00
    expiry settlement was recorded, decided from the ledger as of 07:51, where the expiring
    put was still open, and moved it to ccp:liquidation, which then held a position in an
    instrument that had settled (SPEC section 4: settled positions close)."""
    from tests.simulation.runner import run_seed

    result = run_seed(165, backend, 511)
    assert result.failure is None, result.failure


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_stored_row_equal_in_value_is_rewritten_when_its_text_changes(backend: str) -> None:
    """Found by seed 154, step 999: a position whose quantity went from 2.30 to 2.3 kept
    the stored 2.30 (rows equal in value were skipped as unchanged), so the read models
    differed in text from the fold of the log, and from the book the process keeps."""
    from tests.simulation.runner import run_seed

    result = run_seed(154, backend, 1000)
    assert result.failure is None, result.failure
