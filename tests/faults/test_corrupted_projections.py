"""A read model corrupted by hand is detected by `clearing verify` and repaired by `clearing
projections rebuild`, which ends where the uncorrupted ledger was.

tests/ledger/test_verify_detects_tampering.py covers a forged balance, a forged position
quantity and a forged event (which a rebuild cannot launder: the hash chain still names it).
Here: a deleted statement row, a duplicated position row (the literal duplicate is refused by
the table's primary key; a copy under another member is what a hand edit can leave), and a
statement row duplicated at a position that never moved that account.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.ledger.harness import LedgerHarness, leg

PERP = "BTC-PERP"


@pytest.fixture
def book(ledger: LedgerHarness) -> LedgerHarness:
    ledger.given_accounts("alice", "bob", "carol")
    ledger.list_perpetual(PERP)
    for account in ("alice", "bob", "carol"):
        ledger.deposit(account, "USDC", "50000", ref=f"D-{account}")
    ledger.mark(PERP, "100000")
    ledger.trade("T1", [leg(PERP, buyer="alice", seller="bob", qty="0.5", price="100000",
                            buyer_fee="2", seller_fee="1")])
    return ledger


def shown(ledger: LedgerHarness) -> tuple[str, ...]:
    """What the commands show of the ledger (each reads the read models)."""
    outputs = []
    for args in (("balances",), ("positions",), ("statement", "alice"), ("statement", "bob"),
                 ("statement", "carol")):
        result = ledger.cli(*args, "--json")
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout)
    return tuple(outputs)


def failed_checks(ledger: LedgerHarness) -> dict[str, str]:
    result = ledger.cli("verify", "--json")
    document: dict[str, Any] = json.loads(result.stdout)
    assert result.exit_code == (0 if document["ok"] else 1)
    return {c["name"]: c["detail"] for c in document["checks"] if not c["ok"]}


def rebuild_repairs(ledger: LedgerHarness, honest: tuple[str, ...]) -> None:
    rebuilt = ledger.cli("projections", "rebuild")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert failed_checks(ledger) == {}
    assert shown(ledger) == honest


def test_a_deleted_statement_row_is_detected_and_rebuilt(book: LedgerHarness) -> None:
    honest = shown(book)
    with book.engine.begin() as conn:
        position = conn.execute(text(
            "SELECT max(position) FROM statement WHERE account_id = 'alice'")).scalar_one()
        assert conn.execute(text("DELETE FROM statement WHERE account_id = 'alice' "
                                 "AND position = :p"), {"p": position}).rowcount == 1

    failed = failed_checks(book)
    assert set(failed) == {"projections_equal_replay"}
    detail = failed["projections_equal_replay"]
    assert f"statement[{position}/alice/USDC].(row): stored 'missing'" in detail
    rebuild_repairs(book, honest)


def test_a_duplicated_position_row_is_detected_and_rebuilt(book: LedgerHarness) -> None:
    honest = shown(book)
    copy = ("INSERT INTO positions (account_id, instrument, quantity, average_entry_price, "
            "settlement_basis, realised_pnl) SELECT :to, instrument, quantity, "
            "average_entry_price, settlement_basis, realised_pnl FROM positions "
            "WHERE account_id = 'alice' AND instrument = :s")
    with pytest.raises(IntegrityError), book.engine.begin() as conn:
        conn.execute(text(copy), {"to": "alice", "s": PERP})  # the primary key refuses it
    with book.engine.begin() as conn:
        assert conn.execute(text(copy), {"to": "carol", "s": PERP}).rowcount == 1

    failed = failed_checks(book)
    assert set(failed) == {"projections_equal_replay", "open_interest_nets_to_zero"}
    assert f"{PERP} positions sum to 0.5" in failed["open_interest_nets_to_zero"]
    detail = failed["projections_equal_replay"]
    assert f"positions[carol/{PERP}].(row): stored 'present'" in detail
    rebuild_repairs(book, honest)


def test_a_statement_row_duplicated_onto_another_position_is_detected_and_rebuilt(
    book: LedgerHarness,
) -> None:
    honest = shown(book)
    with book.engine.begin() as conn:
        top = conn.execute(text("SELECT max(position) FROM events")).scalar_one()
        assert conn.execute(text(
            "INSERT INTO statement (position, account_id, asset, effective_at, type, "
            "reference, amount, balance) SELECT :p, account_id, asset, effective_at, type, "
            "reference, amount, balance FROM statement WHERE account_id = 'carol'"),
            {"p": top + 1000}).rowcount == 1

    failed = failed_checks(book)
    assert set(failed) == {"projections_equal_replay"}
    detail = failed["projections_equal_replay"]
    assert f"statement[{top + 1000}/carol/USDC].(row): stored 'present'" in detail
    rebuild_repairs(book, honest)
