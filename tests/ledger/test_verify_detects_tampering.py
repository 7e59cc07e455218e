"""`clearing verify` notices a forged read model or a forged event, and says which check and
where; `clearing projections rebuild` repairs a forged read model from the log."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text

from tests.ledger.harness import LedgerHarness, leg
from tests.store.test_eventstore import tamper_payload

CALL = "BTC-27DEC26-100000-C"
CHECK_NAMES = ["append_only", "hash_chain", "balances_zero_sum", "open_interest_nets_to_zero",
               "projections_equal_replay", "idempotency_keys_unique"]


@pytest.fixture
def small_ledger(ledger: LedgerHarness) -> LedgerHarness:
    ledger.given_accounts("alice", "bob")
    ledger.list_option(CALL)
    ledger.deposit("alice", "USDC", "10000", ref="D-ALICE")
    ledger.deposit("bob", "USDC", "10000", ref="D-BOB")
    ledger.trade("T1", [leg(CALL, buyer="alice", seller="bob", qty="1", price="1200",
                            buyer_fee="2", seller_fee="1")])
    ledger.mark(CALL, "1300", iv="0.6")
    return ledger


def verify_json(ledger: LedgerHarness) -> tuple[int, dict[str, Any]]:
    result = ledger.cli("verify", "--json")
    return result.exit_code, json.loads(result.stdout)


def checks_by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in document["checks"]}


def test_verify_passes_on_an_honest_ledger(small_ledger: LedgerHarness) -> None:
    exit_code, document = verify_json(small_ledger)

    assert exit_code == 0
    assert document["ok"] is True
    assert [c["name"] for c in document["checks"]] == CHECK_NAMES
    for check in document["checks"]:
        assert set(check) == {"name", "ok", "detail"}
        assert check["ok"] is True and isinstance(check["detail"], str) and check["detail"]


def test_a_forged_balance_fails_verify_and_a_rebuild_repairs_it(
    small_ledger: LedgerHarness,
) -> None:
    assert verify_json(small_ledger)[0] == 0
    honest = small_ledger.balance("alice", "USDC")

    with small_ledger.engine.begin() as conn:
        changed = conn.execute(text(
            "UPDATE balances SET balance = balance + 1 "
            "WHERE account_id = 'alice' AND asset = 'USDC'")).rowcount
    assert changed == 1
    assert small_ledger.balance("alice", "USDC") == honest + 1

    exit_code, document = verify_json(small_ledger)
    assert exit_code == 1
    assert document["ok"] is False
    assert [c["name"] for c in document["checks"]] == CHECK_NAMES
    checks = checks_by_name(document)
    failed = {name for name, c in checks.items() if not c["ok"]}
    assert failed == {"projections_equal_replay", "balances_zero_sum"}
    assert "alice/USDC" in checks["projections_equal_replay"]["detail"]
    assert "USDC" in checks["balances_zero_sum"]["detail"]
    assert "1" in checks["balances_zero_sum"]["detail"]

    human = small_ledger.cli("verify")
    assert human.exit_code == 1
    assert "projections_equal_replay" in human.stdout and "FAIL" in human.stdout

    rebuilt = small_ledger.cli("projections", "rebuild")
    assert rebuilt.exit_code == 0, rebuilt.output

    exit_code, document = verify_json(small_ledger)
    assert (exit_code, document["ok"]) == (0, True)
    assert small_ledger.balance("alice", "USDC") == honest


def test_a_forged_position_fails_open_interest_and_replay(small_ledger: LedgerHarness) -> None:
    with small_ledger.engine.begin() as conn:
        conn.execute(text("UPDATE positions SET quantity = 5 "
                          "WHERE account_id = 'alice' AND instrument = :s"), {"s": CALL})

    exit_code, document = verify_json(small_ledger)

    assert exit_code == 1
    failed = {c["name"] for c in document["checks"] if not c["ok"]}
    assert failed == {"projections_equal_replay", "open_interest_nets_to_zero"}
    assert CALL in checks_by_name(document)["open_interest_nets_to_zero"]["detail"]

    assert small_ledger.cli("projections", "rebuild").exit_code == 0
    assert verify_json(small_ledger)[0] == 0
    assert small_ledger.position("alice", CALL) == Decimal("1")


def test_a_forged_event_breaks_the_hash_chain_at_its_position(
    small_ledger: LedgerHarness, backend: Any,
) -> None:
    (deposit,) = [r for r in small_ledger.events() if r.idempotency_key == "deposit:D-ALICE"]
    with small_ledger.engine.connect() as conn:
        payload = conn.execute(text("SELECT payload FROM events WHERE position = :p"),
                               {"p": deposit.position}).scalar_one()
    # Still a valid, balanced event, only for more money: the forger's best attempt.
    forged = payload.replace("10000.000000", "99999.000000")
    assert forged != payload
    small_ledger.tampered = True

    tamper_payload(small_ledger.engine, backend.kind, deposit.position, forged)

    exit_code, document = verify_json(small_ledger)
    assert exit_code == 1 and document["ok"] is False
    checks = checks_by_name(document)
    assert checks["hash_chain"]["ok"] is False
    assert str(deposit.position) in checks["hash_chain"]["detail"]
    # The triggers are back in place: the guard itself still holds.
    assert checks["append_only"]["ok"] is True
    # A rebuild cannot launder a forged event: the chain still names it.
    assert small_ledger.cli("projections", "rebuild").exit_code == 0
    exit_code, document = verify_json(small_ledger)
    assert exit_code == 1
    assert str(deposit.position) in checks_by_name(document)["hash_chain"]["detail"]
