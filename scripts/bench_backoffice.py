"""Back-office figures: reconciling a balances statement, and rebuilding the read models.

`reconcile_balances`: a custodian's balances statement of N rows (`account_id,asset,balance`)
through `reconcile(ledger, BALANCES, path, sink)` against a ledger holding exactly those N
balances (N/3 accounts, each with a USDC, a BTC and an ETH deposit), one row in
`BREAK_EVERY` off by one quantum so that breaks are found and written (to a sink that counts
them: the figure is the engine, not a terminal). The statement's lines are shuffled, as a
custodian's export need not follow our key order. Timed: the whole call (read, validate and
sort the statement on disk, bring the read models up to date, the streamed ledger query, the
merge, recording the `ReconciliationRun`). Raw: the bare driver's floor for the same
comparison, reading the same CSV with the csv module, then the balances table through a
server-side cursor (sqlite3 cursor on SQLite) in the same key order the reconciliation reads
it (`ORDER BY account_id COLLATE "C", asset COLLATE "C"` on PostgreSQL).

`rebuild`: `ProjectionRunner.rebuild()` (what `clearing projections rebuild` runs) of the
ledger's read models after the clear_trades figure's import (accounts, instruments,
deposits and the trades), through a fresh store, so no event is served from the importing
process's memory. Raw: every event read in log order through a server-side cursor with
json.loads of its payload, and COPYed (executemany on SQLite) as one row into a bare table of
the events' shape, a page per transaction as the rebuild commits a page at a time: the least
a rebuild can do (read the log, decode it, write a row per fact). Ours writes more than one
row per fact (balances, positions, statement lines, trade legs), which is its own cost.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench_events import RAW_COLUMNS
from bench_ledger import SEED, Figure
from clearing.app import Ledger
from clearing.backoffice.reconcile import BALANCES, LEDGER_PAGE_ROWS, reconcile
from clearing.domain.accounts import MarginModel
from clearing.domain.commands import (
    MoveCollateral,
    OpenAccount,
    decide_deposit,
    decide_open_account,
)
from clearing.domain.money import asset_spec
from clearing.projections.runner import PAGE_SIZE, ProjectionRunner
from clearing.store.database import create_engine_for, upgrade
from clearing.store.eventstore import EventStore, forget_decoded_events, PendingEvent

D = Decimal
RECONCILE_AT = datetime(2026, 11, 2, 7, tzinfo=UTC)
STATEMENT_ASSETS = ("USDC", "BTC", "ETH")
BREAK_EVERY = 1_000
"""One statement row in this many disagrees with the ledger (by one quantum)."""
SETUP_BATCH = 10_000


@dataclass(frozen=True)
class ReconcileScale:
    rows: int


RECONCILE_SCALES = {"small": ReconcileScale(20_000), "full": ReconcileScale(1_000_000)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- reconcile


def balances_book(rows: int) -> list[tuple[str, str, Decimal]]:
    """`rows` (account, asset, amount), three assets per account (the last may have fewer)."""
    rng = random.Random(SEED)
    book = []
    for index in range(math.ceil(rows / len(STATEMENT_ASSETS))):
        for asset in STATEMENT_ASSETS:
            if len(book) == rows:
                break
            quantum = asset_spec(asset).quantum
            whole = {"USDC": 1_000_000, "BTC": 50, "ETH": 500}[asset]
            amount = (D(rng.randint(1, whole * 10**6)) / 10**6).quantize(quantum)
            book.append((f"r{index:07d}", asset, amount))
    return book


def _facts(book: Sequence[tuple[str, str, Decimal]]) -> Iterator[list[Any]]:
    accounts = sorted({account for account, _, _ in book})
    members = set(accounts)
    batch: list[Any] = []
    for account in accounts:
        batch += decide_open_account(OpenAccount(account, f"Holder {account}",
                                                 MarginModel.STANDARD), None, RECONCILE_AT)
    for account, asset, amount in book:
        batch += decide_deposit(MoveCollateral(f"dep-{account}-{asset}", account, asset,
                                               amount, RECONCILE_AT), members)
        if len(batch) >= SETUP_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_statement(path: Path, book: Sequence[tuple[str, str, Decimal]]) -> int:
    """The custodian's statement of `book`, shuffled, one row in BREAK_EVERY off by one
    quantum; returns the number of rows written that disagree."""
    rng = random.Random(SEED + 7)
    lines = []
    breaks = 0
    for index, (account, asset, amount) in enumerate(book):
        if index % BREAK_EVERY == BREAK_EVERY - 1:
            amount += asset_spec(asset).quantum
            breaks += 1
        lines.append((account, asset, format(amount, "f")))
    rng.shuffle(lines)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(BALANCES.columns)
        writer.writerows(lines)
    return breaks


class CountingSink:
    """Breaks counted as they are found (a real sink renders them: not the engine's cost)."""

    def __init__(self) -> None:
        self.breaks = 0
        self.report: Any = None

    def write(self, found: Any) -> None:
        self.breaks += 1

    def finish(self, report: Any) -> None:
        self.report = report


def _raw_balances_query(kind: str) -> str:
    if kind == "postgresql":
        return ('SELECT account_id, asset, balance FROM balances '
                'ORDER BY account_id COLLATE "C", asset COLLATE "C"')
    return "SELECT account_id, asset, balance FROM balances ORDER BY account_id, asset"


def reconcile_balances(place: Any, scale: ReconcileScale) -> tuple[list[Figure], dict[str, Any]]:
    """Statement rows reconciled per second, against reading the same CSV and the balances
    table with the bare driver."""
    directory = Path(tempfile.mkdtemp(prefix="bench_reconcile_"))
    engine = create_engine_for(place.store_url)
    try:
        upgrade(engine)
        ledger = Ledger(engine, actor="bench")
        began = time.perf_counter()
        book = balances_book(scale.rows)
        events = 0
        for batch in _facts(book):
            ledger.store.append([PendingEvent(f.stream_id, f.event, f.idempotency_key,
                                              f.effective_at, {"actor": "bench"})
                                 for f in batch])
            events += len(batch)
        ledger.refresh()
        path = directory / "balances.csv"
        expected_breaks = _write_statement(path, book)
        setup_s = time.perf_counter() - began
        _log(f"  set-up: {len(book):,} balances, {events:,} events, statement "
             f"{path.stat().st_size:,} bytes in {setup_s:.1f} s")
        engine.dispose()
        # A fresh ledger: the one that set up keeps its appended events in memory.
        engine = create_engine_for(place.store_url)
        ledger = Ledger(engine, actor="bench")
        sink = CountingSink()
        began = time.perf_counter()
        report = reconcile(ledger, BALANCES, path, sink)
        ours_s = time.perf_counter() - began
        if (report.rows, report.breaks, report.matched) != (
                scale.rows, expected_breaks, scale.rows - expected_breaks):
            raise RuntimeError(f"reconcile_balances: {report.rows} rows, {report.matched} "
                               f"matched, {report.breaks} breaks; expected {scale.rows} rows "
                               f"and {expected_breaks} breaks")
        began = time.perf_counter()
        with path.open(newline="", encoding="utf-8") as handle:
            csv_rows = sum(1 for _ in csv.reader(handle)) - 1
        csv_s = time.perf_counter() - began
        began = time.perf_counter()
        ledger_rows = sum(1 for _ in place.raw_stream(_raw_balances_query(place.kind),
                                                      LEDGER_PAGE_ROWS))
        cursor_s = time.perf_counter() - began
        # The balances table also holds the house accounts' rows (ccp:external paid every
        # deposit), which the reconciliation reads too and leaves out.
        if csv_rows != scale.rows or ledger_rows < scale.rows:
            raise RuntimeError(f"reconcile_balances raw: {csv_rows} csv rows, {ledger_rows} "
                               f"ledger rows, expected {scale.rows}")
        file_bytes = path.stat().st_size
    finally:
        engine.dispose()
        for item in directory.iterdir():
            item.unlink()
        directory.rmdir()
    raw_s = csv_s + cursor_s
    n = scale.rows
    figures = [Figure("reconcile_balances", "rows/s", n, n / ours_s, n / raw_s, True)]
    notes = {
        "rows": n, "ledger_rows": ledger_rows, "breaks": report.breaks,
        "statement_bytes": file_bytes,
        "setup_events": events, "setup_s": round(setup_s, 1),
        "ours_s": round(ours_s, 3), "raw_s": round(raw_s, 3),
        "raw_split_s": {"csv": round(csv_s, 3), "cursor": round(cursor_s, 3)},
        "raw": ("csv.reader over the same file, then the balances table through a "
                "server-side cursor (sqlite3 cursor on SQLite) in the reconciliation's key "
                f"order, {LEDGER_PAGE_ROWS:,} rows per fetch"),
    }
    return figures, notes


# ---------------------------------------------------------------------------- rebuild


def _raw_rebuild(place: Any) -> tuple[int, float]:
    """Every event in log order, json.loads of its payload, one row per event written to a
    bare table a page per transaction. Returns (events, seconds)."""
    place.create_raw_table("raw_rebuild")
    query = f"SELECT {', '.join(RAW_COLUMNS)} FROM events ORDER BY txid, position"
    write = place.raw_copy_batch if place.supports_copy else place.raw_insert_batch
    payload_at = RAW_COLUMNS.index("payload")
    count = 0
    began = time.perf_counter()
    page: list[tuple[Any, ...]] = []
    for row in place.raw_stream(query, PAGE_SIZE):
        json.loads(row[payload_at])
        page.append(row)
        if len(page) == PAGE_SIZE:
            write("raw_rebuild", page)
            count += len(page)
            page = []
    if page:
        write("raw_rebuild", page)
        count += len(page)
    return count, time.perf_counter() - began


def rebuild(place: Any) -> tuple[list[Figure], dict[str, Any]]:
    """Events folded per second by a full rebuild of the read models (see module docstring)."""
    engine = create_engine_for(place.store_url)
    try:
        store = EventStore(engine)
        n = store.count()
        runner = ProjectionRunner(store)
        forget_decoded_events()  # a rebuild parses the log from storage, not from memory
        began = time.perf_counter()
        folded = runner.rebuild()
        ours_s = time.perf_counter() - began
    finally:
        engine.dispose()
    if folded != n:
        raise RuntimeError(f"rebuild folded {folded} events, the log holds {n}")
    raw_n, raw_s = _raw_rebuild(place)
    if raw_n != n:
        raise RuntimeError(f"rebuild raw read {raw_n} events, the log holds {n}")
    figures = [Figure("rebuild", "events/s", n, n / ours_s, n / raw_s, True)]
    notes = {
        "events": n, "ours_s": round(ours_s, 3), "raw_s": round(raw_s, 3),
        "page_size": PAGE_SIZE,
        "raw": ("server-side cursor over the events table in log order + json.loads of each "
                "payload + COPY (executemany on SQLite) of each event's row into a bare "
                f"table of the events' shape, {PAGE_SIZE:,} rows per transaction"),
    }
    return figures, notes


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from bench import open_place

    parser = argparse.ArgumentParser(description="Run the reconcile_balances figure alone.")
    parser.add_argument("--db", required=True)
    parser.add_argument("--scale", choices=sorted(RECONCILE_SCALES), default="small")
    args = parser.parse_args(argv)
    with open_place(args.db) as place:
        figures, notes = reconcile_balances(place, RECONCILE_SCALES[args.scale])
    print(figures, json.dumps(notes, indent=1), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
