"""SPEC invariant 7: SQLite and PostgreSQL fed the same files show the same ledger, byte for
byte, through the command line an operator uses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clearing.app import Ledger
from clearing.cli import app
from clearing.store.database import create_engine_for
from clearing.store.eventstore import EventStore
from tests.conftest import Backend, make_backend
from tests.ledger.harness import COLUMNS, iso, listing_row

CALL = "BTC-27DEC26-100000-C"
PUT = "BTC-27DEC26-90000-P"
FUTURE = "BTC-27DEC26"
PERP = "ETH-PERP"
VALUED_AT = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
"""The valuation time of position queries: greeks depend on it, so it is fixed."""

FILES: dict[str, list[list[str]]] = {
    "accounts": [["alice", "Alice", "standard"], ["bob", "Bob", "portfolio"],
                 ["carol", "Carol", "standard"]],
    "instruments": [[listing_row(s, multiplier)[c] for c in COLUMNS["instruments"]]
                    for s, multiplier in ((CALL, "1"), (PUT, "1"), (FUTURE, "1"),
                                          (PERP, "0.1"))],
    "deposits": [["D1", "alice", "USDC", "50000", "2026-11-01T09:00:00Z"],
                 ["D2", "bob", "USDC", "50000", "2026-11-01T09:00:00Z"],
                 ["D3", "carol", "BTC", "1.25", "2026-11-01T09:30:00Z"],
                 ["D4", "carol", "USDC", "20000.5", "2026-11-01T09:30:00Z"]],
    "trades": [
        # A risk reversal in two option legs with fees, one premium finer than USDC.
        ["S1", "1", CALL, "alice", "bob", "2", "1200.1234567", "2", "1", "2026-11-02T10:00:00Z"],
        ["S1", "2", PUT, "bob", "alice", "1.5", "850", "1.5", "0.75", "2026-11-02T10:00:00Z"],
        ["F1", "1", FUTURE, "carol", "alice", "0.5", "95000", "0.5", "0.5",
         "2026-11-02T11:00:00Z"],
        ["P1", "1", PERP, "bob", "carol", "10", "3400.25", "0.1", "0.1", "2026-11-02T12:00:00Z"],
        ["X1", "1", CALL, "carol", "bob", "1", "1250", "1", "1", "2026-11-02T13:00:00Z"],
    ],
    "marks": [
        ["2026-11-03T00:00:00Z", "BTC", "96000", ""],
        ["2026-11-03T00:00:00Z", "ETH", "3450", ""],
        ["2026-11-03T00:00:00Z", CALL, "1320.5", "0.55"],
        ["2026-11-03T00:00:00Z", PUT, "790", "0.6"],
        ["2026-11-03T00:00:00Z", FUTURE, "96150", ""],
        ["2026-11-03T00:00:00Z", PERP, "3451.5", ""],
        ["2026-11-03T08:00:00Z", CALL, "1333", "0.56"],
    ],
}
BUST = ("X1", "2026-11-02T14:00:00Z")
WITHDRAWALS = [["W1", "carol", "BTC", "0.25", "2026-11-03T09:00:00Z"]]
ACCOUNTS = ("alice", "bob", "carol", "ccp:fees", "ccp:rounding", "ccp:external")


def write_files(directory: Path) -> dict[str, Path]:
    directory.mkdir()
    paths = {}
    for kind, rows in [*FILES.items(), ("withdrawals", WITHDRAWALS)]:
        path = directory / f"{kind}.csv"
        lines = [",".join(COLUMNS[kind]), *(",".join(row) for row in rows)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[kind] = path
    return paths


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"clearing {' '.join(args)}: {result.output}"
    return result.stdout


@pytest.fixture
def both(tmp_path: Path) -> Iterator[list[Backend]]:
    backends = [make_backend("sqlite", tmp_path), make_backend("postgresql", tmp_path)]
    try:
        yield backends
    finally:
        for backend in backends:
            backend.close()


def feed(backend: Backend, files: dict[str, Path]) -> None:
    db = ("--db", backend.url)
    for kind in ("accounts", "instruments", "deposits", "trades", "marks"):
        run("import", kind, str(files[kind]), *db)
    run("bust", BUST[0], "--reason", "price out of range", "--at", BUST[1], *db)
    run("import", "withdrawals", str(files["withdrawals"]), *db)
    run("import", "trades", str(files["trades"]), *db)  # again: changes nothing


def queries(url: str) -> dict[str, str]:
    db = ("--db", url)
    outputs = {
        "balances": run("balances", "--json", *db),
        "balances --as-of": run("balances", "--json", "--as-of", "2026-11-02T12:30:00Z", *db),
        "positions --as-of": run("positions", "--json", "--as-of", iso(VALUED_AT), *db),
    }
    for account in ACCOUNTS:
        outputs[f"statement {account}"] = run("statement", account, "--json", *db)
    return outputs


def test_sqlite_and_postgresql_show_the_same_ledger(both: list[Backend], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_files(tmp_path / "files")
    for backend in both:
        feed(backend, files)

    shown = [queries(backend.url) for backend in both]
    # Without --as-of, positions are valued now: give both the same "now".
    opened = Ledger.open.__func__  # type: ignore[attr-defined]
    with monkeypatch.context() as patch:
        patch.setattr(Ledger, "open", classmethod(
            lambda cls, url=None, clock=None: opened(cls, url, clock=lambda: VALUED_AT)))
        for backend, outputs in zip(both, shown, strict=True):
            outputs["positions"] = run("positions", "--json", "--db", backend.url)

    sqlite, postgresql = shown
    for name in sqlite:
        assert sqlite[name] == postgresql[name], f"clearing {name} differs between backends"

    # The comparison means something: the ledger holds what was fed, in the promised shapes.
    balances = json.loads(sqlite["balances"])
    assert {"account_id", "asset", "balance"} == set(balances[0])
    assert {"alice", "bob", "carol", "ccp:fees", "ccp:rounding"} <= {
        b["account_id"] for b in balances}
    positions = json.loads(sqlite["positions"])
    assert {(p["account_id"], p["instrument"]) for p in positions} == {
        ("alice", CALL), ("bob", CALL), ("bob", PUT), ("alice", PUT), ("carol", FUTURE),
        ("alice", FUTURE), ("bob", PERP), ("carol", PERP)}
    assert sqlite["positions"] == sqlite["positions --as-of"]
    assert any(p["vega"] != "0" for p in positions)
    statement = json.loads(sqlite["statement alice"])
    assert [line["type"] for line in statement] == ["CollateralDeposited", "TradeCleared",
                                                    "TradeCleared"]
    assert "TradeBusted" in sqlite["statement bob"]

    # And it is not vacuous: the two logs were recorded at different wall-clock times.
    recorded = []
    for backend in both:
        engine = create_engine_for(backend.url)
        recorded.append([r.recorded_at for r in EventStore(engine).read_all()])
        engine.dispose()
    assert len(recorded[0]) == len(recorded[1])
    assert recorded[0] != recorded[1]
