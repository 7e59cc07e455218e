"""`clearing reconcile balances|trades FILE.csv`: the ledger against an external statement.

Each scenario builds a small ledger through the real import path (the ledger harness), writes
the custodian's or venue's statement, runs the command as an operator would, and checks the
breaks exactly, with both values. Every scenario runs on SQLite and PostgreSQL and ends with
`clearing verify`'s checks passing, reconciliation runs in the log included.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from clearing.backoffice import external_sort, reconcile
from clearing.backoffice.external_sort import Codec, sort_records
from clearing.domain.events import ReconciliationRun
from tests.conftest import Backend
from tests.ledger.harness import LedgerHarness, leg

PERP = "BTC-PERP"
CALL = "BTC-27DEC26-100000-C"
EXIT_OK, EXIT_BREAKS, EXIT_BAD_INPUT = 0, 1, 2
PROBLEM_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+): (?P<field>[^:]+): (?P<reason>.+)$")
BALANCES_HEADER = "account_id,asset,balance"
TRADES_HEADER = "trade_id,leg,instrument,buyer,seller,quantity,price"


@pytest.fixture
def ledger(backend: Backend, tmp_path: Path) -> Iterator[LedgerHarness]:
    """A fresh ledger per test and backend; `clearing verify` must pass at the end."""
    harness = LedgerHarness(backend.url, backend.engine(), tmp_path / "files")
    yield harness
    harness.assert_verified()


@pytest.fixture
def books(ledger: LedgerHarness) -> LedgerHarness:
    """alice holds 9,999 USDC (10,000 deposited, a 1 USDC fee paid), bob 2 BTC; alice bought
    1 BTC-PERP from bob at 100,000 (T1) and 2 calls at 1,500 from bob in a two-leg trade
    with a perpetual leg (T2). House accounts hold the other side."""
    ledger.given_accounts("alice", "bob")
    ledger.list_instruments(PERP, CALL)
    ledger.deposit("alice", "USDC", "13000")
    ledger.deposit("bob", "BTC", "2")
    ledger.trade("T1", [leg(PERP, buyer="alice", seller="bob", qty="1", price="100000",
                            buyer_fee="1")])
    ledger.trade("T2", [leg(CALL, buyer="alice", seller="bob", qty="2", price="1500"),
                        leg(PERP, buyer="bob", seller="alice", qty="0.5", price="100100")])
    assert ledger.balance("alice", "USDC") == Decimal("9999")
    assert ledger.balance("bob", "USDC") == Decimal("3000")
    return ledger


CLEAN_BALANCES = (BALANCES_HEADER, "alice,USDC,9999", "bob,BTC,2", "bob,USDC,3000")
CLEAN_TRADES = (TRADES_HEADER,
                "T1,1,BTC-PERP,alice,bob,1,100000",
                f"T2,1,{CALL},alice,bob,2,1500",
                "T2,2,BTC-PERP,bob,alice,0.5,100100")


def statement(ledger: LedgerHarness, *lines: str, name: str = "statement.csv") -> Path:
    path = ledger.workdir / name
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def run(ledger: LedgerHarness, kind: str, path: Path, *options: str) -> Result:
    return ledger.cli("reconcile", kind, str(path), *options)


def run_json(ledger: LedgerHarness, kind: str, path: Path, *options: str,
             exit_code: int) -> dict[str, Any]:
    result = run(ledger, kind, path, "--json", *options)
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    document = json.loads(result.stdout)
    assert set(document) == {"matched", "breaks"}
    for found in document["breaks"]:
        assert list(found) == ["kind", "key", "ours", "theirs"]
    return document  # type: ignore[no-any-return]


def brk(kind: str, key: str, ours: str | None, theirs: str | None) -> dict[str, str | None]:
    return {"kind": kind, "key": key, "ours": ours, "theirs": theirs}


def last_fact_position(ledger: LedgerHarness) -> int:
    """The position of the last fact that is not itself a reconciliation run."""
    return [r.position for r in ledger.events() if r.type != "ReconciliationRun"][-1]


def runs_recorded(ledger: LedgerHarness) -> list[ReconciliationRun]:
    return [r.event for r in ledger.events("reconciliations")]  # type: ignore[misc]


# ------------------------------------------------------------------ a clean statement


def test_a_statement_that_agrees_has_no_breaks_and_exit_0(books: LedgerHarness) -> None:
    result = run(books, "balances", statement(books, *CLEAN_BALANCES))
    assert result.exit_code == EXIT_OK, result.stderr
    assert "matched 3, breaks 0" in result.stdout

    assert run_json(books, "balances", statement(books, *CLEAN_BALANCES),
                    exit_code=EXIT_OK) == {"matched": 3, "breaks": []}


def test_a_trades_statement_that_agrees_has_no_breaks(books: LedgerHarness) -> None:
    assert run_json(books, "trades", statement(books, *CLEAN_TRADES),
                    exit_code=EXIT_OK) == {"matched": 3, "breaks": []}


def test_statement_order_does_not_matter_and_keys_compare_by_code_point(
        ledger: LedgerHarness) -> None:
    """Ids that a locale collation orders differently from Python (case, punctuation) still
    pair up: the ledger side is read in code-point order, even from a PostgreSQL whose
    columns sort by a locale (here ICU's root collation)."""
    ids = ["Zed", "alice", "a-b", "a.b", "a_b", "a@b", "a1", "B2", "b"]
    ledger.given_accounts(*ids)
    ledger.list_instruments(PERP)
    for account_id in ids:
        ledger.deposit(account_id, "USDC", "10")
    ledger.trades(*((f"{a}-t", [leg(PERP, buyer=a, seller="Zed" if a != "Zed" else "b",
                                      qty="1", price="100")]) for a in ids))
    if ledger.engine.dialect.name == "postgresql":
        _collate_by_locale(ledger, {"balances": "account_id", "trade_legs": "trade_id"})
    rows = [f"{a},USDC,10" for a in reversed(ids)]
    assert run_json(ledger, "balances", statement(ledger, BALANCES_HEADER, *rows),
                    exit_code=EXIT_OK) == {"matched": len(ids), "breaks": []}
    legs = [f"{a}-t,1,{PERP},{a},{'Zed' if a != 'Zed' else 'b'},1,100" for a in ids]
    assert run_json(ledger, "trades", statement(ledger, TRADES_HEADER, *legs, name="t.csv"),
                    exit_code=EXIT_OK) == {"matched": len(ids), "breaks": []}


def _collate_by_locale(ledger: LedgerHarness, columns: dict[str, str]) -> None:
    with ledger.engine.begin() as conn:
        if conn.exec_driver_sql("SELECT count(*) FROM pg_collation "
                                "WHERE collname = 'und-x-icu'").scalar_one() == 0:
            pytest.skip("this PostgreSQL has no ICU collations")
        for table, column in columns.items():
            conn.exec_driver_sql(f'ALTER TABLE {table} ALTER COLUMN {column} '
                                 'TYPE text COLLATE "und-x-icu"')
        ordered = conn.exec_driver_sql("SELECT account_id FROM balances WHERE asset = 'USDC' "
                                       "ORDER BY account_id").scalars().all()
    assert ordered != sorted(ordered), "the locale collation should order differently"


# ------------------------------------------------------------------ balance breaks


def test_every_kind_of_balance_break_with_both_values(books: LedgerHarness) -> None:
    path = statement(books, BALANCES_HEADER,
                     "alice,USDC,9998.5",     # ours 9999: amount mismatch
                     "bob,BTC,2",             # agrees
                     "carol,ETH,0.25",        # unknown to the ledger
                     "alice,BTC,-1")          # ledger has none: missing, negative kept
    # bob's 3,000 USDC is not on the statement.
    document = run_json(books, "balances", path, exit_code=EXIT_BREAKS)
    assert document == {"matched": 1, "breaks": [
        brk("missing_in_ledger", "alice/BTC", None, "-1.00000000"),
        brk("amount_mismatch", "alice/USDC", "9999.000000", "9998.500000"),
        brk("missing_in_statement", "bob/USDC", "3000.000000", None),
        brk("missing_in_ledger", "carol/ETH", None, "0.25000000"),
    ]}


def test_breaks_as_csv(books: LedgerHarness) -> None:
    path = statement(books, BALANCES_HEADER, "alice,USDC,1", "bob,BTC,2", "bob,USDC,3000")
    result = run(books, "balances", path, "--csv")
    assert result.exit_code == EXIT_BREAKS
    assert result.stdout == ("kind,key,ours,theirs\n"
                             "amount_mismatch,alice/USDC,9999.000000,1.000000\n")


def test_a_person_sees_a_table_and_a_summary(books: LedgerHarness) -> None:
    path = statement(books, BALANCES_HEADER, "alice,USDC,1", "bob,BTC,2")
    result = run(books, "balances", path)
    assert result.exit_code == EXIT_BREAKS
    assert "amount_mismatch" in result.stdout and "alice/USDC" in result.stdout
    assert "missing_in_statement" in result.stdout and "bob/USDC" in result.stdout
    assert "matched 1, breaks 2" in result.stdout


def test_decimals_compare_by_value(books: LedgerHarness) -> None:
    path = statement(books, BALANCES_HEADER, "alice,USDC,9999.000000", "bob,BTC,2.0",
                     "bob,USDC,3000.00")
    assert run_json(books, "balances", path, exit_code=EXIT_OK)["breaks"] == []
    trades = statement(books, TRADES_HEADER, "T1,1,BTC-PERP,alice,bob,1.00000000,100000.0",
                       f"T2,1,{CALL},alice,bob,2.0,1500.00",
                       "T2,2,BTC-PERP,bob,alice,.5,100100", name="trades.csv")
    assert run_json(books, "trades", trades, exit_code=EXIT_OK) == {"matched": 3, "breaks": []}


def test_tolerance_is_absolute_and_inclusive(books: LedgerHarness) -> None:
    path = statement(books, BALANCES_HEADER, "alice,USDC,9999.01", "bob,BTC,2.00000002",
                     "bob,USDC,3000", "carol,USDC,0.005")
    assert run_json(books, "balances", path, exit_code=EXIT_BREAKS)["breaks"] == [
        brk("amount_mismatch", "alice/USDC", "9999.000000", "9999.010000"),
        brk("amount_mismatch", "bob/BTC", "2.00000000", "2.00000002"),
        brk("missing_in_ledger", "carol/USDC", None, "0.005000"),
    ]
    within = run_json(books, "balances", path, "--tolerance", "0.01", exit_code=EXIT_OK)
    assert within == {"matched": 4, "breaks": []}
    tight = run_json(books, "balances", path, "--tolerance", "0.009999", exit_code=EXIT_BREAKS)
    assert tight["breaks"] == [
        brk("amount_mismatch", "alice/USDC", "9999.000000", "9999.010000")]


@pytest.mark.parametrize("tolerance", ["-1", "abc", "1e-3", "0.000000001"])
def test_a_bad_tolerance_is_refused(books: LedgerHarness, tolerance: str) -> None:
    before = books.event_count()
    result = run(books, "balances", statement(books, *CLEAN_BALANCES), "--tolerance",
                 tolerance)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--tolerance" in result.stderr
    assert books.event_count() == before


def test_zero_balances_absent_from_the_statement_are_not_breaks(ledger: LedgerHarness) -> None:
    ledger.given_accounts("alice")
    ledger.deposit("alice", "USDC", "100")
    ledger.deposit("alice", "BTC", "1")
    ledger.withdraw("alice", "BTC", "1")
    assert ("alice", "BTC") in ledger.state().balances  # a stored zero
    path = statement(ledger, BALANCES_HEADER, "alice,USDC,100", "dave,ETH,0")
    assert run_json(ledger, "balances", path, exit_code=EXIT_OK) == {"matched": 2,
                                                                      "breaks": []}


def test_house_accounts_are_compared_only_when_the_statement_lists_them(
        books: LedgerHarness) -> None:
    # The house side: ccp:external -13,000 USDC and -2 BTC, ccp:fees 1 USDC.
    assert run_json(books, "balances", statement(books, *CLEAN_BALANCES),
                    exit_code=EXIT_OK)["breaks"] == []
    listed = statement(books, *CLEAN_BALANCES, "ccp:external,USDC,-13000", "ccp:fees,USDC,2")
    assert run_json(books, "balances", listed, exit_code=EXIT_BREAKS)["breaks"] == [
        brk("missing_in_statement", "ccp:external/BTC", "-2.00000000", None),
        brk("amount_mismatch", "ccp:fees/USDC", "1.000000", "2.000000"),
    ]


# ------------------------------------------------------------------ trade breaks


def test_every_kind_of_trade_break_with_both_values(books: LedgerHarness) -> None:
    path = statement(books, TRADES_HEADER,
                     "T1,1,BTC-PERP,alice,carol,1,100000.5",   # seller and price differ
                     "T2,1,BTC-27DEC26-100000-C,alice,bob,3,1500",  # quantity differs
                     "T3,1,BTC-PERP,alice,bob,1,99000")        # unknown trade
    # T2 leg 2 is not on the statement.
    document = run_json(books, "trades", path, exit_code=EXIT_BREAKS)
    assert document == {"matched": 0, "breaks": [
        brk("field_mismatch", "T1/1/seller", "bob", "carol"),
        brk("field_mismatch", "T1/1/price", "100000", "100000.5"),
        brk("field_mismatch", "T2/1/quantity", "2", "3"),
        brk("missing_in_statement", "T2/2", "instrument=BTC-PERP buyer=bob seller=alice "
                                            "quantity=0.5 price=100100", None),
        brk("missing_in_ledger", "T3/1", None, "instrument=BTC-PERP buyer=alice seller=bob "
                                               "quantity=1 price=99000"),
    ]}


def test_an_instrument_or_buyer_mismatch_is_named(books: LedgerHarness) -> None:
    path = statement(books, TRADES_HEADER, "T1,1,BTC-27DEC26-100000-C,bob,alice,1,100000",
                     *CLEAN_TRADES[2:])
    assert run_json(books, "trades", path, exit_code=EXIT_BREAKS) == {"matched": 2, "breaks": [
        brk("field_mismatch", "T1/1/instrument", "BTC-PERP", CALL),
        brk("field_mismatch", "T1/1/buyer", "alice", "bob"),
        brk("field_mismatch", "T1/1/seller", "bob", "alice"),
    ]}


def test_a_busted_trade_no_longer_stands(books: LedgerHarness) -> None:
    books.bust("T1", "fat finger")
    document = run_json(books, "trades", statement(books, *CLEAN_TRADES),
                        exit_code=EXIT_BREAKS)
    assert document == {"matched": 2, "breaks": [
        brk("missing_in_ledger", "T1/1", None, "instrument=BTC-PERP buyer=alice seller=bob "
                                               "quantity=1 price=100000"),
    ]}
    without = statement(books, *CLEAN_TRADES[:1], *CLEAN_TRADES[2:], name="after-bust.csv")
    assert run_json(books, "trades", without, exit_code=EXIT_OK)["breaks"] == []


# ------------------------------------------------------------------ bad statements


def _problems(result: Result) -> list[tuple[str, int, str, str]]:
    found = []
    for line in result.stderr.splitlines():
        match = PROBLEM_LINE.match(line)
        if match:
            found.append((Path(match["file"]).name, int(match["line"]), match["field"],
                          match["reason"]))
    return found


@pytest.mark.parametrize(("kind", "lines", "problem"), [
    ("balances", (BALANCES_HEADER, "alice,USDC,1", "bob,BTC,2", "alice,USDC,1"),
     (4, "account_id,asset", "alice/USDC already appears on line 2")),
    ("trades", (*CLEAN_TRADES, "T1,1,BTC-PERP,alice,bob,1,100000"),
     (5, "trade_id,leg", "T1/1 already appears on line 2")),
    ("balances", (BALANCES_HEADER, "alice,USDC,1", "bob,BTC,2.123456789"),
     (3, "balance", "has more than 8 decimals")),
    ("balances", (BALANCES_HEADER, "alice,USDC,1.0000001"),
     (2, "balance", "has more than 6 decimals")),
    ("balances", (BALANCES_HEADER, "alice,DOGE,1"), (2, "asset", "unknown asset 'DOGE'")),
    ("balances", (BALANCES_HEADER, "alice,USDC,"), (2, "balance", "is required")),
    ("balances", (BALANCES_HEADER, "alice,USDC,1e3"), (2, "balance", "without an exponent")),
    ("balances", (BALANCES_HEADER, "alice,USDC,1,2"), (2, "row", "has 4 cells")),
    ("balances", (BALANCES_HEADER, "ccp:nobody,USDC,1"),
     (2, "account_id", "is not a house account")),
    ("balances", ("account_id,asset,balance,note", "alice,USDC,1,x"),
     (1, "note", "unexpected column")),
    ("balances", ("account_id,balance", "alice,1"), (1, "asset", "missing column")),
    ("balances", (), (1, "header", "the file is empty")),
    ("trades", (TRADES_HEADER, "T1,0,BTC-PERP,alice,bob,1,100000"),
     (2, "leg", "is not a leg number")),
    ("trades", (TRADES_HEADER, "T1,1,BTC-PERP,alice,bob,-1,100000"),
     (2, "quantity", "must be greater than zero")),
    ("trades", (TRADES_HEADER, "T1,1,BTC-PERP,alice,bob,1,100000.000000001"),
     (2, "price", "has more than 8 decimals")),
    ("trades", (TRADES_HEADER, "T1,1,,alice,bob,1,100000"), (2, "instrument", "is required")),
], ids=["duplicate-balance", "duplicate-leg", "btc-decimals", "usdc-decimals", "asset",
        "empty-balance", "exponent", "extra-cell", "house-id", "extra-column",
        "missing-column", "empty-file", "leg-zero", "negative-quantity", "price-decimals",
        "no-instrument"])
def test_a_malformed_statement_is_refused_with_file_and_line(
        books: LedgerHarness, kind: str, lines: tuple[str, ...],
        problem: tuple[int, str, str]) -> None:
    before = books.event_count()
    path = statement(books, *lines, name="bad.csv")
    result = run(books, kind, path)
    assert result.exit_code == EXIT_BAD_INPUT, (result.stdout, result.stderr)
    assert result.stdout == ""
    line, field, reason = problem
    found = _problems(result)
    assert len(found) == 1, result.stderr
    assert found[0][:3] == ("bad.csv", line, field)
    assert reason in found[0][3]
    assert "nothing was written" in result.stderr
    assert books.event_count() == before


def test_every_duplicate_is_reported_at_its_own_line(books: LedgerHarness) -> None:
    path = statement(books, BALANCES_HEADER, "bob,BTC,1", "alice,USDC,1", "bob,BTC,1",
                     "alice,USDC,2", "bob,BTC,3", name="dups.csv")
    result = run(books, "balances", path)
    assert result.exit_code == EXIT_BAD_INPUT
    assert [(p[1], p[3]) for p in _problems(result)] == [
        (4, "bob/BTC already appears on line 2"),
        (5, "alice/USDC already appears on line 3"),
        (6, "bob/BTC already appears on line 2"),
    ]


def test_a_byte_that_is_not_utf8_is_reported_at_its_line(books: LedgerHarness) -> None:
    path = books.workdir / "latin1.csv"
    path.write_bytes(f"{BALANCES_HEADER}\nalice,USDC,9999\n\nz\xfcrich,USDC,1\n"
                     .encode("latin-1"))
    result = run(books, "balances", path)
    assert result.exit_code == EXIT_BAD_INPUT
    assert _problems(result) == [("latin1.csv", 4, "file", "is not valid UTF-8 (byte 1 of "
                                                           "the line)")]


def test_blank_lines_are_skipped_and_a_header_alone_is_an_empty_statement(
        books: LedgerHarness) -> None:
    """A custodian with nothing to report sends the header alone: every member balance of
    the ledger is then missing from the statement (house accounts are not listed)."""
    spaced = statement(books, "", BALANCES_HEADER, "", *CLEAN_BALANCES[1:], "  ", name="s.csv")
    result = run(books, "balances", spaced, "--json")
    assert result.exit_code == EXIT_BAD_INPUT  # a blank first line: the header is not there
    assert _problems(result)[0][1:3] == (1, "account_id")

    spaced = statement(books, BALANCES_HEADER, "", *CLEAN_BALANCES[1:], "  ", "")
    assert run_json(books, "balances", spaced, exit_code=EXIT_OK) == {"matched": 3,
                                                                       "breaks": []}
    document = run_json(books, "balances", statement(books, BALANCES_HEADER, name="e.csv"),
                        exit_code=EXIT_BREAKS)
    assert document == {"matched": 0, "breaks": [
        brk("missing_in_statement", "alice/USDC", "9999.000000", None),
        brk("missing_in_statement", "bob/BTC", "2.00000000", None),
        brk("missing_in_statement", "bob/USDC", "3000.000000", None),
    ]}


def test_a_missing_file_is_bad_input(books: LedgerHarness) -> None:
    result = run(books, "balances", books.workdir / "nowhere.csv")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "nowhere.csv:0: file:" in result.stderr


# ------------------------------------------------------------------ the audit trail


def test_each_run_is_recorded_once_per_statement_and_ledger(books: LedgerHarness) -> None:
    path = statement(books, BALANCES_HEADER, "alice,USDC,9999", "bob,BTC,2.5",
                     "bob,USDC,3000")
    head = last_fact_position(books)
    run_json(books, "balances", path, exit_code=EXIT_BREAKS)
    (recorded,) = runs_recorded(books)
    assert recorded.kind == "balances"
    assert recorded.file_name == "statement.csv"
    assert (recorded.rows, recorded.matched, recorded.breaks) == (3, 2, 1)
    assert recorded.tolerance == 0
    assert recorded.ledger_position == head  # the last fact folded into what was compared
    assert len(recorded.file_sha256) == 64

    # The same statement against the same ledger, in any output mode: nothing new.
    run_json(books, "balances", path, exit_code=EXIT_BREAKS)
    assert run(books, "balances", path, "--csv").exit_code == EXIT_BREAKS
    again = run(books, "balances", path)
    assert "already recorded" in again.stdout
    renamed = statement(books, *path.read_text().splitlines(), name="copy.csv")
    run_json(books, "balances", renamed, exit_code=EXIT_BREAKS)
    assert len(runs_recorded(books)) == 1

    # Another tolerance, another trades statement, or a ledger that moved: a new run each.
    run_json(books, "balances", path, "--tolerance", "0.5", exit_code=EXIT_OK)
    run_json(books, "trades", statement(books, *CLEAN_TRADES, name="t.csv"),
             exit_code=EXIT_OK)
    books.deposit("bob", "BTC", "0.5")
    run_json(books, "balances", path, exit_code=EXIT_OK)
    runs = runs_recorded(books)
    assert [(r.kind, r.tolerance, r.matched, r.breaks) for r in runs] == [
        ("balances", 0, 2, 1), ("balances", Decimal("0.5"), 3, 0), ("trades", 0, 3, 0),
        ("balances", 0, 3, 0)]
    assert runs[-1].ledger_position == last_fact_position(books) > head


def test_a_refused_statement_records_nothing(books: LedgerHarness) -> None:
    before = books.event_count()
    run(books, "balances", statement(books, BALANCES_HEADER, "alice,USDC,x"))
    assert books.event_count() == before
    assert runs_recorded(books) == []


# ------------------------------------------------------------------ bounded memory, by parts


def test_statements_larger_than_one_sort_run_are_merged_from_disk(
        books: LedgerHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """With runs of 2 rows and merges of 2 runs, a statement goes through several rounds of
    merging on disk; the breaks, and the duplicate check across runs, are the same."""
    monkeypatch.setattr(external_sort, "RUN_ROWS", 2)
    monkeypatch.setattr(external_sort, "FAN_IN", 2)
    monkeypatch.setattr(reconcile, "sort_records", _tiny_runs_sort)
    lines = ["zed,USDC,5", "bob,USDC,3000", "alice,ETH,1", "bob,BTC,2", "alice,USDC,9999",
             "amy,BTC,0", "ccp:fees,USDC,1"]
    document = run_json(books, "balances", statement(books, BALANCES_HEADER, *lines),
                        exit_code=EXIT_BREAKS)
    assert document == {"matched": 5, "breaks": [
        brk("missing_in_ledger", "alice/ETH", None, "1.00000000"),
        brk("missing_in_ledger", "zed/USDC", None, "5.000000"),
    ]}
    duplicated = statement(books, BALANCES_HEADER, *lines, "alice,ETH,1", name="dup.csv")
    result = run(books, "balances", duplicated)
    assert result.exit_code == EXIT_BAD_INPUT
    assert _problems(result) == [("dup.csv", 9, "account_id,asset",
                                  "alice/ETH already appears on line 4")]


def _tiny_runs_sort(records, key, codec, workdir):  # type: ignore[no-untyped-def]
    return sort_records(records, key, codec, workdir, run_rows=2, fan_in=2)


def test_external_sort_is_a_stable_sort(tmp_path: Path) -> None:
    rng = random.Random(5)
    records = [(rng.choice("abcdef"), rng.randint(1, 3), str(i)) for i in range(997)]
    codec = Codec(encode=lambda r: f"{r[0]}\t{r[1]}\t{r[2]}",
                  decode=lambda s: (lambda p: (p[0], int(p[1]), p[2]))(s.split("\t")))

    def key(r: tuple[Any, ...]) -> tuple[Any, ...]:
        return r[:2]

    for run_rows, fan_in in ((1, 2), (10, 3), (100, 64), (997, 2), (5_000, 2)):
        workdir = tmp_path / f"{run_rows}-{fan_in}"
        workdir.mkdir()
        result = sort_records(iter(records), key, codec, workdir, run_rows=run_rows,
                              fan_in=fan_in)
        assert list(result) == sorted(records, key=key)
        assert list(result) == list(result)  # may be read twice
        assert len(list(workdir.iterdir())) <= 1  # runs are removed once merged


def test_the_ledger_side_must_be_in_key_order() -> None:
    """A backend returning rows out of order would silently pair the wrong keys; the merge
    refuses instead."""
    ours = [("bob", "USDC", Decimal(1)), ("alice", "USDC", Decimal(1))]
    with pytest.raises(reconcile.InvariantViolation, match="ledger side is not in key order"):
        list(reconcile.compare_balances(ours, [], reconcile.Tally()))


# ------------------------------------------------------------------ a million rows


MILLION = 1_000_000
LEDGER_ACCOUNTS = 2_000
SPACING = 500
RSS_BOUND_MB = 200
"""Peak resident memory of the whole command, interpreter and libraries included."""
GROWTH_BOUND_MB = 64
"""Peak resident memory above what the process holds once its modules are imported: what
the statement itself costs, whatever its size."""
MEASURED = textwrap.dedent("""
    import json, resource, sys, time

    def peak_rss_mb():
        # VmHWM is this program's own peak: ru_maxrss would include the forking parent's.
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from clearing.cli import app
    url, path, out_path = sys.argv[1:4]
    imported_mb = peak_rss_mb()
    started = time.perf_counter()
    with open(out_path, "w", encoding="utf-8") as out:
        sys.stdout = out
        try:
            app(["reconcile", "balances", path, "--db", url, "--json"])
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stdout = sys.__stdout__
    print(json.dumps({"exit": code, "seconds": time.perf_counter() - started,
                      "imported_mb": imported_mb, "peak_mb": peak_rss_mb()}))
""")


def _measure(url: str, path: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", MEASURED, url, str(path), str(out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_a_million_row_statement_in_bounded_memory(ledger: LedgerHarness) -> None:
    """1,000,000 statement rows in random order against 2,000 accounts, through the real
    command in a process of its own: peak RSS under 200 MB (under 64 MB above the imports').
    Its time is printed, not asserted: speed is measured in scripts/bench.py. On both backends: the statement side is the same code, the ledger side
    streams through a server-side cursor on PostgreSQL.
    """
    in_ledger = [i * SPACING for i in range(LEDGER_ACCOUNTS)]
    dropped = {0, SPACING, 2 * SPACING}            # in the ledger, not on the statement
    mismatched = {i for i in in_ledger if i % 100_000 == 0} - dropped
    ledger.given_accounts(*(f"m{i:07d}" for i in in_ledger))
    ledger.import_rows("deposits", (
        {"ref": f"D{i}", "account_id": f"m{i:07d}", "asset": "USDC", "amount": "100.5",
         "time": "2026-11-02T12:00:00Z"} for i in in_ledger))

    numbers = [i for i in range(MILLION + len(dropped)) if i not in dropped]
    random.Random(7).shuffle(numbers)
    members = set(in_ledger)
    expected = {"matched": 0, "missing_in_ledger": 0}
    path = ledger.workdir / "million.csv"
    with path.open("w", encoding="utf-8") as handle:
        handle.write(BALANCES_HEADER + "\n")
        for i in numbers:
            if i in members:
                balance = "100.6" if i in mismatched else "100.50"
                expected["matched"] += i not in mismatched
            elif i % 10 == 1:
                balance = "1.25"
                expected["missing_in_ledger"] += 1
            else:
                balance = "0"
                expected["matched"] += 1
            handle.write(f"m{i:07d},USDC,{balance}\n")
    del numbers

    out = ledger.workdir / "breaks.json"
    started = time.perf_counter()
    measured = _measure(ledger.url, path, out)
    wall_s = time.perf_counter() - started
    growth_mb = measured["peak_mb"] - measured["imported_mb"]
    print(f"\nmillion-row statement: {measured['seconds']:.1f} s in the command, "
          f"{wall_s:.1f} s with start-up; peak RSS {measured['peak_mb']:.0f} MB, "
          f"{growth_mb:.0f} MB above the {measured['imported_mb']:.0f} MB of the imports")

    assert measured["exit"] == EXIT_BREAKS
    assert growth_mb < GROWTH_BOUND_MB
    assert measured["peak_mb"] < RSS_BOUND_MB, "imports alone now take " \
        f"{measured['imported_mb']:.0f} MB"
    with out.open(encoding="utf-8") as handle:
        document = json.load(handle)
    kinds: dict[str, int] = {}
    for found in document["breaks"]:
        kinds[found["kind"]] = kinds.get(found["kind"], 0) + 1
    assert kinds == {"missing_in_ledger": expected["missing_in_ledger"],
                     "amount_mismatch": len(mismatched), "missing_in_statement": len(dropped)}
    assert document["matched"] == expected["matched"]
    assert [b for b in document["breaks"] if b["kind"] != "missing_in_ledger"] == sorted(
        [brk("amount_mismatch", f"m{i:07d}/USDC", "100.500000", "100.600000")
         for i in mismatched]
        + [brk("missing_in_statement", f"m{i:07d}/USDC", "100.500000", None)
           for i in dropped], key=lambda b: str(b["key"]))
    (recorded,) = runs_recorded(ledger)
    assert (recorded.rows, recorded.matched) == (MILLION, expected["matched"])
