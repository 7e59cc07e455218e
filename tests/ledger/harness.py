"""A ledger in a test's own words.

`LedgerHarness` lets a test state a scenario the way the back office would (accounts opened,
collateral deposited, instruments listed, trades cleared and busted, marks published) and
read the outcome as exact Decimals. Every write goes through the real import path: the
harness writes a small CSV file in the shapes of SPEC section 3 and hands it to
`Ledger.import_file`, exactly as `clearing import` does; busts go through `Ledger.bust`, as
`clearing bust` does. Reads come from the back office's queries over the read models, so a
test sees what `clearing balances` and `clearing positions` would show.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from typer.testing import CliRunner, Result

from clearing.app import ImportReport, Ledger
from clearing.backoffice.imports import ImportKind
from clearing.backoffice.queries import ledger_state
from clearing.backoffice.replay import ReplayBounds
from clearing.backoffice.verify import Check, verify
from clearing.cli import app
from clearing.domain.ledger import LedgerState
from clearing.store.database import ensure_schema
from clearing.store.eventstore import RecordedEvent
from clearing.store.tables import events

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
"""The business time scenarios happen at unless they say otherwise."""
EXPIRY_HOUR_UTC = 8
"""Dated instruments expire at 08:00 UTC on the day their symbol names."""
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")

# The input files' columns, as SPEC section 3 gives them (written here, not imported from the
# product, so that the harness notices if the product's idea of a file drifts from the spec).
COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts": ("account_id", "owner", "margin_model"),
    "instruments": ("symbol", "kind", "underlying", "settlement_asset", "expiry", "strike",
                    "option_type", "multiplier"),
    "deposits": ("ref", "account_id", "asset", "amount", "time"),
    "withdrawals": ("ref", "account_id", "asset", "amount", "time"),
    "trades": ("trade_id", "leg", "instrument", "buyer", "seller", "quantity", "price",
               "buyer_fee", "seller_fee", "time"),
    "marks": ("time", "symbol", "price", "iv"),
}


@dataclass(frozen=True)
class Leg:
    """One leg of a trade as the venue reports it."""

    instrument: str
    buyer: str
    seller: str
    qty: str
    price: str
    buyer_fee: str = "0"
    seller_fee: str = "0"


def leg(instrument: str, *, buyer: str, seller: str, qty: str, price: str,
        buyer_fee: str = "0", seller_fee: str = "0") -> Leg:
    return Leg(instrument, buyer, seller, qty, price, buyer_fee, seller_fee)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def listing_row(symbol: str, multiplier: str = "1") -> dict[str, str]:
    """The instruments-file row for a symbol such as `BTC-PERP`, `BTC-27DEC26` or
    `BTC-27DEC26-100000-C`: every field follows from the symbol itself."""
    parts = symbol.split("-")
    row = {"symbol": symbol, "underlying": parts[0], "settlement_asset": "USDC",
           "expiry": "", "strike": "", "option_type": "", "multiplier": multiplier}
    if parts[1] == "PERP":
        return {**row, "kind": "perpetual"}
    text = parts[1]
    day, month, year = int(text[:-5]), MONTHS.index(text[-5:-2]) + 1, 2000 + int(text[-2:])
    row["expiry"] = iso(datetime(year, month, day, EXPIRY_HOUR_UTC, tzinfo=UTC))
    if len(parts) == 2:
        return {**row, "kind": "future"}
    return {**row, "kind": "option", "strike": parts[2],
            "option_type": {"C": "call", "P": "put"}[parts[3]]}


def trade_rows(trade_id: str, legs: Sequence[Leg], at: datetime) -> list[dict[str, str]]:
    return [
        {"trade_id": trade_id, "leg": str(number), "instrument": x.instrument,
         "buyer": x.buyer, "seller": x.seller, "quantity": x.qty, "price": x.price,
         "buyer_fee": x.buyer_fee, "seller_fee": x.seller_fee, "time": iso(at)}
        for number, x in enumerate(legs, start=1)
    ]


class LedgerHarness:
    """One fresh ledger database and the files a scenario feeds it."""

    def __init__(self, url: str, engine: Engine, workdir: Path) -> None:
        ensure_schema(engine)
        self.url = url
        self.engine = engine
        self.ledger = Ledger(engine, actor="test")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.files: list[tuple[str, Path]] = []
        """Every file imported so far, in order, with its kind (for re-imports)."""
        self.tampered = False
        """Set by a test that breaks the ledger on purpose: skips the closing verify."""
        self._refs = 0

    # ------------------------------------------------------------ the input files

    def write_file(self, kind: str, rows: Iterable[dict[str, str]]) -> Path:
        path = self.workdir / f"{len(self.files) + 1:03d}-{kind}.csv"
        while path.exists():
            path = path.with_name("x" + path.name)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS[kind], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return path

    def import_rows(self, kind: str, rows: Iterable[dict[str, str]]) -> ImportReport:
        """Write one file and import it as one atomic append. A refused file raises
        `InputRejected` and is not remembered for re-imports."""
        path = self.write_file(kind, rows)
        report = self.ledger.import_file(ImportKind(kind), path)
        self.files.append((kind, path))
        return report

    def reimport(self, path: Path) -> ImportReport:
        kind = next(k for k, p in self.files if p == path)
        return self.ledger.import_file(ImportKind(kind), path)

    @property
    def last_file(self) -> Path:
        return self.files[-1][1]

    def _ref(self, prefix: str) -> str:
        self._refs += 1
        return f"{prefix}{self._refs}"

    # ------------------------------------------------------------ the scenario

    def given_accounts(self, *account_ids: str, margin_model: str = "standard") -> None:
        self.import_rows("accounts", [
            {"account_id": a, "owner": a.capitalize(), "margin_model": margin_model}
            for a in account_ids])

    def list_instruments(self, *symbols: str, multiplier: str = "1") -> ImportReport:
        return self.import_rows("instruments", [listing_row(s, multiplier) for s in symbols])

    def list_option(self, symbol: str, multiplier: str = "1") -> ImportReport:
        assert listing_row(symbol)["kind"] == "option", symbol
        return self.list_instruments(symbol, multiplier=multiplier)

    def list_future(self, symbol: str, multiplier: str = "1") -> ImportReport:
        assert listing_row(symbol)["kind"] == "future", symbol
        return self.list_instruments(symbol, multiplier=multiplier)

    def list_perpetual(self, symbol: str, multiplier: str = "1") -> ImportReport:
        assert listing_row(symbol)["kind"] == "perpetual", symbol
        return self.list_instruments(symbol, multiplier=multiplier)

    def deposit(self, account_id: str, asset: str, amount: str, *, ref: str | None = None,
                at: datetime = T0) -> ImportReport:
        return self.import_rows("deposits", [
            {"ref": ref or self._ref("D"), "account_id": account_id, "asset": asset,
             "amount": amount, "time": iso(at)}])

    def withdraw(self, account_id: str, asset: str, amount: str, *, ref: str | None = None,
                 at: datetime = T0) -> ImportReport:
        return self.withdrawals((account_id, asset, amount), at=at, refs=[ref] if ref else None)

    def withdrawals(self, *rows: tuple[str, str, str], at: datetime = T0,
                    refs: Sequence[str] | None = None) -> ImportReport:
        """Several withdrawals in one file: (account_id, asset, amount) each."""
        refs = list(refs) if refs else [self._ref("W") for _ in rows]
        return self.import_rows("withdrawals", [
            {"ref": ref, "account_id": a, "asset": asset, "amount": amount, "time": iso(at)}
            for ref, (a, asset, amount) in zip(refs, rows, strict=True)])

    def trade(self, trade_id: str, legs: Sequence[Leg], at: datetime = T0) -> ImportReport:
        return self.import_rows("trades", trade_rows(trade_id, legs, at))

    def trades(self, *trades: tuple[str, Sequence[Leg]], at: datetime = T0) -> ImportReport:
        """Several trades in one file."""
        return self.import_rows("trades", [row for trade_id, legs in trades
                                           for row in trade_rows(trade_id, legs, at)])

    def mark(self, symbol: str, price: str, *, iv: str | None = None,
             at: datetime = T0) -> ImportReport:
        return self.import_rows("marks", [
            {"time": iso(at), "symbol": symbol, "price": price, "iv": iv or ""}])

    def bust(self, trade_id: str, reason: str = "venue error",
             at: datetime | None = None) -> None:
        self.ledger.bust(trade_id, reason, at)

    # ------------------------------------------------------------ what the ledger shows

    def state(self) -> LedgerState:
        return ledger_state(self.ledger, ReplayBounds())

    def balance(self, account_id: str, asset: str) -> Decimal:
        return self.state().balances.get((account_id, asset), Decimal(0))

    def balances(self, state: LedgerState | None = None) -> dict[tuple[str, str], Decimal]:
        """Every non-zero balance, house accounts included."""
        state = state or self.state()
        return {k: v for k, v in state.balances.items() if v != 0}

    def totals_per_asset(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = defaultdict(Decimal)
        for (_, asset), amount in self.state().balances.items():
            totals[asset] += amount
        return dict(totals)

    def position(self, account_id: str, symbol: str) -> Decimal:
        found = self.state().positions.get((account_id, symbol))
        return Decimal(0) if found is None else found.quantity

    def positions(self, state: LedgerState | None = None) -> dict[tuple[str, str], Decimal]:
        """Every open position (non-zero quantity)."""
        state = state or self.state()
        return {k: p.quantity for k, p in state.positions.items() if p.quantity != 0}

    def last_settlement_price(self, account_id: str, symbol: str) -> Decimal | None:
        found = self.state().positions.get((account_id, symbol))
        return None if found is None else found.last_settlement_price

    def event_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(events)).scalar_one())

    def events(self, stream_id: str | None = None) -> list[RecordedEvent]:
        return [r for r in self.ledger.store.read_all()
                if stream_id is None or r.stream_id == stream_id]

    def snapshot(self) -> tuple[int, dict[Any, Decimal], dict[Any, Decimal]]:
        """What a refused or repeated command must leave exactly as it was."""
        state = self.state()
        return self.event_count(), self.balances(state), self.positions(state)

    def verify(self) -> list[Check]:
        return verify(self.ledger)

    def assert_verified(self) -> None:
        failed = [c for c in self.verify() if not c.ok]
        assert not failed, "; ".join(f"{c.name}: {c.detail}" for c in failed)

    def cli(self, *args: str) -> Result:
        """Run `clearing ARGS --db URL` in-process, as an operator would."""
        return CliRunner().invoke(app, [*args, "--db", self.url], catch_exceptions=False)
