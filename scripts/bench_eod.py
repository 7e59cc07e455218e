"""The end-of-day batch figure (issue 5): a whole book through `run_job(ledger, "eod", at)`.

The book: `accounts` member accounts of `positions_per_account` positions each (100,000 x 10
at full scale: 1,000,000 positions), built from two-leg trades in rounds. In each round every
account trades once with a random partner, both legs from that round's group of instruments,
and the groups are disjoint, so every (account, instrument) is a position of its own:

  round 0  BTC-PERP against a BTC future (a calendar spread)
  round 1  ETH-PERP against an ETH future
  round 2  two BTC calls (a call spread)        round 3  two BTC puts (a put spread)
  round 4  two ETH options
  (further rounds, for more than 10 positions per account, cycle through the same groups)

`at` is the first listed expiry (2026-12-25 08:00 UTC), so about a third of the futures and
options expire then and `settle` has work; every instrument has a mark a minute before, the
BTC and ETH indexes one a minute through the 30-minute TWAP window (and a daily close for 60
days before, so the risk job has returns to estimate from). 30% of accounts are on the
portfolio model; one account in `THIN_EVERY` gets a thin deposit, so that it is below
maintenance and `liquidate` has work; the insurance fund is seeded.

Set-up (not timed) decides every fact with the domain's own `decide_*` functions, appends
them through `EventStore.append` in batches of `SETUP_BATCH`, then lets the read models catch
up (`Ledger.refresh`): the same facts the CSV imports would record. Measured at full scale on
the 2-core machine: 450,365 events in about 120 s (decide 24, append 23, catch-up 74), where
the import path alone clears about 2,100 trades/s (the clear_trades figure), i.e. about 120 s
for the 250,000 trades before the accounts and deposits, each file one transaction.

The timed part runs in a child process (`python scripts/bench_eod.py child ...`), which opens
the ledger as `clearing run eod` does and calls `run_job(ledger, "eod", at)`: wall time of
that call, and the child's peak RSS (its VmHWM; `ru_maxrss` and `RUSAGE_CHILDREN` are
reported too, but on Linux they start from the forking bench's own RSS, see `_vm_hwm_kb`).
The raw side is the database's floor for writing what the batch wrote: the very rows the
eod appended (read back after it: same payloads, metadata and envelope) COPYed into a bare
table in one transaction (executemany on SQLite).

`python scripts/bench_eod.py --db URL [--scale small|full] [--profile FILE [--top 25]]
[--gc-off]` sets up a fresh book and runs the child once, printing its report (per-job split,
time in the garbage collector, peak RSS after each job); with `--profile`, under cProfile
(the `run_job` call only), then prints the top entries by cumulative and by total time;
`--gc-off` is an experiment (the collector disabled for the run), never the figure.
"""

from __future__ import annotations

# The set-up's imports live in the functions that use them, so that the child process loads
# what `clearing run eod` loads and little else (its peak memory is part of the figure).

import argparse
import gc
import io
import json
import os
import pstats
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

D = Decimal
EOD_AT = datetime(2026, 12, 25, 8, tzinfo=UTC)
"""The batch time: the first expiry of the bench universe (bench_ledger.EXPIRIES[0])."""
SETUP_BATCH = 10_000
"""Events per append while setting up the book."""
THIN_EVERY = 997
"""One account in this many gets THIN_DEPOSIT_USDC instead of a full deposit."""
FULL_DEPOSIT_USDC = D("10000000")
THIN_DEPOSIT_USDC = D("1500")
INSURANCE_SEED_USDC = D("50000000")
PORTFOLIO_SHARE_PERCENT = 30
TWAP_MARKS = 30
"""Index marks one minute apart, the last at `at`: the 30-minute settlement window."""
DAILY_CLOSES = 60
CHILD_TIMEOUT_S = 3_600


@dataclass(frozen=True)
class EodScale:
    accounts: int
    positions_per_account: int

    @property
    def positions(self) -> int:
        return self.accounts * self.positions_per_account


EOD_SCALES = {
    "small": EodScale(accounts=2_000, positions_per_account=10),
    "full": EodScale(accounts=100_000, positions_per_account=10),
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the book


def _groups(instruments: Sequence[Any]) -> list[list[Any]]:
    """The instrument groups of the rounds (see the module docstring), disjoint."""
    by_symbol = {i.symbol: i for i in instruments}

    def pick(underlying: str, test: Callable[[Any], bool]) -> list[Any]:
        return [i for i in instruments if i.underlying == underlying and test(i)]

    return [
        [by_symbol["BTC-PERP"], *pick("BTC", lambda i: str(i.kind) == "future")],
        [by_symbol["ETH-PERP"], *pick("ETH", lambda i: str(i.kind) == "future")],
        pick("BTC", lambda i: i.is_option and str(i.option_type) == "call"),
        pick("BTC", lambda i: i.is_option and str(i.option_type) == "put"),
        pick("ETH", lambda i: i.is_option),
    ]


def book_account_id(index: int) -> str:
    return f"e{index:06d}"


def _random_walk(rng: random.Random, start: Decimal, steps: int, step_bp: int,
                 quantum: Decimal) -> list[Decimal]:
    prices, price = [], start
    for _ in range(steps):
        price = (price * (1 + D(rng.randint(-step_bp, step_bp)) / 10_000)).quantize(quantum)
        prices.append(price)
    return prices


def book_facts(scale: EodScale, at: datetime = EOD_AT) -> Iterator[list[Any]]:
    """Every fact of the book, in batches of about SETUP_BATCH, decided by the domain."""
    from bench_ledger import INDEX, FEE, SEED, TRADE_TIME, marks_at, universe
    from clearing.domain.accounts import INSURANCE, MarginModel
    from clearing.domain.commands import (
        ClearTrade,
        MoveCollateral,
        OpenAccount,
        PublishMark,
        decide_clear_trade,
        decide_deposit,
        decide_list_instrument,
        decide_mark,
        decide_open_account,
    )
    from clearing.domain.events import TradeLeg

    rng = random.Random(SEED)
    instruments = universe()
    listed = {i.symbol: i for i in instruments}
    accounts = [book_account_id(i) for i in range(scale.accounts)]
    members = set(accounts)
    setup_at = TRADE_TIME - timedelta(hours=1)
    yield [f for i in instruments for f in decide_list_instrument(i, None, setup_at)]
    batch: list[Any] = []
    for index, account in enumerate(accounts):
        model = (MarginModel.PORTFOLIO if index % 100 < PORTFOLIO_SHARE_PERCENT
                 else MarginModel.STANDARD)
        batch += decide_open_account(OpenAccount(account, f"Member {index}", model), None,
                                     setup_at)
        amount = THIN_DEPOSIT_USDC if index % THIN_EVERY == THIN_EVERY - 1 \
            else FULL_DEPOSIT_USDC
        batch += decide_deposit(MoveCollateral(f"dep-{account}", account, "USDC", amount,
                                               setup_at), members)
        if len(batch) >= SETUP_BATCH:
            yield batch
            batch = []
    batch += decide_deposit(MoveCollateral("seed-insurance", INSURANCE, "USDC",
                                           INSURANCE_SEED_USDC, setup_at), members)
    marks = marks_at(instruments, TRADE_TIME)
    groups = _groups(instruments)
    number = 0
    for round_ in range(scale.positions_per_account // 2):
        group = groups[round_ % len(groups)]
        order = accounts[:]
        rng.shuffle(order)
        for first in range(0, len(order) - 1, 2):
            buyer, seller = order[first], order[first + 1]
            if str(group[0].kind) == "perpetual":
                pair = (group[0], rng.choice(group[1:]))
            else:
                pair = tuple(rng.sample(group, 2))
            legs = []
            for leg_number, instrument in enumerate(pair, start=1):
                price = marks[instrument.symbol].price * D(rng.randint(995, 1005)) / 1000
                price = price.quantize(D("0.01") if instrument.is_option else D("0.5"))
                quantity = D(rng.randint(1, 50)) / 10
                leg_buyer, leg_seller = (buyer, seller) if leg_number == 1 else (seller, buyer)
                legs.append(TradeLeg(leg=leg_number, instrument=instrument.symbol,
                                     buyer=leg_buyer, seller=leg_seller, quantity=quantity,
                                     price=price, buyer_fee=D(FEE), seller_fee=D(FEE)))
            batch += decide_clear_trade(ClearTrade(f"E{number:08d}", tuple(legs), TRADE_TIME),
                                        members, listed)
            number += 1
            if len(batch) >= SETUP_BATCH:
                yield batch
                batch = []
    # Index: a daily close for DAILY_CLOSES days, then a mark a minute through the window.
    for underlying, start in INDEX.items():
        quantum = D("0.01")
        closes = _random_walk(rng, start, DAILY_CLOSES, 150, quantum)
        for days, price in zip(range(DAILY_CLOSES, 0, -1), closes, strict=True):
            batch += decide_mark(PublishMark(underlying, price, None,
                                             at - timedelta(days=days)), listed)
        window = _random_walk(rng, start, TWAP_MARKS, 5, quantum)
        for minutes, price in zip(range(TWAP_MARKS - 1, -1, -1), window, strict=True):
            batch += decide_mark(PublishMark(underlying, price, None,
                                             at - timedelta(minutes=minutes)), listed)
    marked_at = at - timedelta(minutes=1)
    for symbol, mark in marks_at(instruments, marked_at).items():
        batch += decide_mark(PublishMark(symbol, mark.price, mark.iv, marked_at), listed)
    yield batch


@dataclass
class BookSetUp:
    events: int
    decide_s: float
    append_s: float
    catch_up_s: float
    positions: int
    open_positions: int


def set_up_book(ledger: Any, scale: EodScale, at: datetime = EOD_AT) -> BookSetUp:
    """Decide and append the book's facts, then bring the read models up to date."""
    from sqlalchemy import func, select

    from clearing.projections import tables as t
    from clearing.store.eventstore import PendingEvent

    metadata = {"actor": "bench", "correlation_id": "bench:eod-book"}
    decide_s = append_s = 0.0
    events = 0
    facts = book_facts(scale, at)
    while True:
        began = time.perf_counter()
        batch = next(facts, None)
        decide_s += time.perf_counter() - began
        if batch is None:
            break
        pending = [PendingEvent(f.stream_id, f.event, f.idempotency_key, f.effective_at,
                                metadata) for f in batch]
        began = time.perf_counter()
        result = ledger.store.append(pending)
        append_s += time.perf_counter() - began
        if result.written != len(pending):
            raise RuntimeError(f"eod set-up: wrote {result.written} of {len(pending)} facts")
        events += result.written
    began = time.perf_counter()
    ledger.refresh()
    catch_up_s = time.perf_counter() - began
    with ledger.engine.connect() as conn:
        positions = conn.execute(select(func.count()).select_from(t.positions)).scalar_one()
        open_positions = conn.execute(select(func.count()).select_from(t.positions).where(
            t.positions.c.quantity != 0)).scalar_one()
    if open_positions != scale.positions:
        raise RuntimeError(f"eod set-up: {open_positions} open positions, expected "
                           f"{scale.positions}")
    return BookSetUp(events, decide_s, append_s, catch_up_s, positions, open_positions)


# ---------------------------------------------------------------------------- the child


def child_main(db: str, at_text: str, profile: str | None, gc_off: bool = False) -> int:
    """Run `eod` as `clearing run eod --at AT --db URL` does, timed job by job; print one
    JSON document (wall time, per-job split, peak RSS). `gc_off` (an experiment, never the
    figure) disables the cyclic garbage collector for the run, to show what it costs."""
    import cProfile

    from clearing.app import Ledger
    from clearing.domain.clock import parse_time
    from clearing.jobs import batches, catalog

    at = parse_time(at_text)
    jobs: list[dict[str, Any]] = []
    state_s: list[float] = []
    real_run_batch, real_state = catalog.run_batch, batches.decision_state

    def timed_state(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return real_state(*args, **kwargs)
        finally:
            state_s.append(time.perf_counter() - began)

    def timed_run_batch(ledger: Any, job: str, when: datetime, decide: Any,
                        **kwargs: Any) -> Any:
        began = time.perf_counter()
        state_before = len(state_s)
        run = real_run_batch(ledger, job, when, decide, **kwargs)
        jobs.append({"job": job, "s": round(time.perf_counter() - began, 3),
                     "state_s": round(sum(state_s[state_before:]), 3),
                     "events_written": run.events_written,
                     "already_done": run.already_done,
                     "peak_rss_mb_after": round((_vm_hwm_kb() or 0) / 1024, 1)})
        return run

    catalog.run_batch = timed_run_batch  # type: ignore[assignment]
    batches.decision_state = timed_state  # type: ignore[assignment]
    collections = {"s": 0.0, "began": 0.0, "full": 0}

    def gc_timer(phase: str, info: dict[str, Any]) -> None:
        """Time spent in the cyclic garbage collector (full collections walk the whole
        book, millions of objects)."""
        if phase == "start":
            collections["began"] = time.perf_counter()
            return
        collections["s"] += time.perf_counter() - collections["began"]
        collections["full"] += info["generation"] == 2

    gc.callbacks.append(gc_timer)
    opened = time.perf_counter()
    ledger = Ledger.open(db)
    open_s = time.perf_counter() - opened
    profiler = cProfile.Profile() if profile else None
    if gc_off:
        gc.disable()
    began = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    runs = catalog.run_job(ledger, "eod", at)
    if profiler is not None:
        profiler.disable()
    run_s = time.perf_counter() - began
    gc.callbacks.remove(gc_timer)
    if profiler is not None:
        profiler.dump_stats(profile)
    ledger.engine.dispose()
    print(json.dumps({
        "run_s": round(run_s, 3),
        "open_s": round(open_s, 3),
        "jobs": jobs,
        "events_written": sum(r.events_written for r in runs),
        "already_done": any(r.already_done for r in runs),
        "gc_s": round(collections["s"], 3),
        "gc_full_collections": collections["full"],
        "peak_rss_kb": _vm_hwm_kb(),
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))
    return 0


def _vm_hwm_kb() -> int | None:
    """This process's peak resident set (VmHWM) since its exec. Not `ru_maxrss`: Linux
    carries the RSS the process had before execve into it (the forked copy of the bench,
    often larger than the child will ever be), so ru_maxrss and RUSAGE_CHILDREN report at
    least the parent's size at the time of the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class ChildRun:
    report: dict[str, Any]
    process_s: float
    children_maxrss_kb: int


def run_child(store_url: str, at: datetime, profile: Path | None = None,
              gc_off: bool = False) -> ChildRun:
    from clearing.domain.clock import format_time

    command = [sys.executable, str(Path(__file__).resolve()), "child", "--db", store_url,
               "--at", format_time(at)]
    if profile is not None:
        command += ["--profile", str(profile)]
    if gc_off:
        command.append("--gc-off")
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          env={**os.environ, "PYTHONHASHSEED": "0"}, check=False)
    process_s = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"eod child failed ({done.returncode}): {done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["already_done"]:
        raise RuntimeError("eod child: the batch was already done; the book is not fresh")
    return ChildRun(report, process_s,
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


# ---------------------------------------------------------------------------- figure


def _eod_rows(ledger: Any, at: datetime, timestamp: Callable[[datetime], Any]) -> list[tuple]:
    """The rows the eod wrote, as the raw table takes them (RAW_COLUMNS order): every event
    effective at `at` keyed under one of its batch ids."""
    from sqlalchemy import select

    from bench_events import RAW_COLUMNS
    from clearing.jobs.batches import batch_id_for
    from clearing.jobs.catalog import EOD_ORDER
    from clearing.store.tables import events

    prefixes = tuple(batch_id_for(job, at) + ":" for job in EOD_ORDER)
    columns = [events.c["meta" if name == "metadata" else name] for name in RAW_COLUMNS]
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(*columns).where(events.c.effective_at == at)
                            .order_by(events.c.position)).all()
    key_at = RAW_COLUMNS.index("idempotency_key")
    times = RAW_COLUMNS.index("effective_at"), RAW_COLUMNS.index("recorded_at")
    return [tuple(timestamp(v) if i in times and isinstance(v, datetime) else v
                  for i, v in enumerate(row))
            for row in rows if row[key_at].startswith(prefixes)]


def eod(place: Any, scale: EodScale) -> tuple[list[Any], dict[str, Any]]:
    """The eod figure on a fresh place: set up the book, run the child, raw COPY."""
    from bench_ledger import Figure
    from clearing.app import Ledger
    from clearing.store.database import create_engine_for, upgrade

    engine = create_engine_for(place.store_url)
    try:
        upgrade(engine)
        ledger = Ledger(engine, actor="bench")
        began = time.perf_counter()
        book = set_up_book(ledger, scale)
        setup_s = time.perf_counter() - began
        _log(f"  set-up: {scale.accounts:,} accounts, {book.open_positions:,} positions, "
             f"{book.events:,} events in {setup_s:.1f} s (decide {book.decide_s:.1f}, "
             f"append {book.append_s:.1f}, catch-up {book.catch_up_s:.1f})")
        engine.dispose()  # the child must not wait on this process's connections
        child = run_child(place.store_url, EOD_AT)
        report = child.report
        rows = _eod_rows(ledger, EOD_AT, place.timestamp)
        if len(rows) != report["events_written"]:
            raise RuntimeError(f"eod: {len(rows)} rows read back, the child wrote "
                               f"{report['events_written']}")
        place.create_raw_table("raw_eod")
        write = place.raw_copy_batch if place.supports_copy else place.raw_insert_batch
        began = time.perf_counter()
        write("raw_eod", rows)
        raw_s = time.perf_counter() - began
    finally:
        engine.dispose()
    payload_bytes = sum(len(r[6].encode()) for r in rows)
    peak_kb = report["peak_rss_kb"] or report["ru_maxrss_kb"]
    figures = [Figure("eod", "s", scale.positions, report["run_s"], raw_s, False)]
    notes = {
        "accounts": scale.accounts,
        "positions": book.open_positions,
        "at": EOD_AT.isoformat(),
        "setup_events": book.events,
        "setup_s": {"total": round(setup_s, 1), "decide": round(book.decide_s, 1),
                    "append": round(book.append_s, 1),
                    "catch_up": round(book.catch_up_s, 1)},
        "eod_s": report["run_s"],
        "eod_process_s": round(child.process_s, 2),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_rss_how": ("the child's VmHWM (/proc/self/status) at its end; its ru_maxrss "
                         "and the parent's RUSAGE_CHILDREN (below) include the RSS the bench "
                         "process had when it forked, which Linux carries across execve"),
        "ru_maxrss_mb": round(report["ru_maxrss_kb"] / 1024, 1),
        "rusage_children_maxrss_mb": round(child.children_maxrss_kb / 1024, 1),
        "events_written": report["events_written"],
        "events_payload_bytes": payload_bytes,
        "jobs": report["jobs"],
        "gc_s": report["gc_s"],
        "gc_full_collections": report["gc_full_collections"],
        "raw_s": round(raw_s, 3),
        "raw": ("COPY (PostgreSQL; executemany on SQLite) of the rows the eod appended, read "
                "back after it, into a bare table in one transaction"),
        "targets": "under 60 s and under 2 GiB for 1,000,000 positions (PostgreSQL)",
        "how": ("child process: Ledger.open + run_job(ledger, 'eod', at), as `clearing run "
                "eod`; eod_s is the run_job call"),
    }
    return figures, notes


# ---------------------------------------------------------------------------- profile


def profile_eod(db: str, scale_name: str, output: Path | None, top: int,
                gc_off: bool = False) -> None:
    """Set up a fresh book and run the child once (under cProfile when `output` is given),
    printing its report, then the top entries of the profile."""
    from bench import open_place
    from clearing.app import Ledger
    from clearing.store.database import create_engine_for, upgrade

    scale = EOD_SCALES[scale_name]
    with open_place(db) as place:
        engine = create_engine_for(place.store_url)
        upgrade(engine)
        began = time.perf_counter()
        book = set_up_book(Ledger(engine, actor="bench"), scale)
        engine.dispose()
        _log(f"set-up: {book.events:,} events, {book.open_positions:,} positions in "
             f"{time.perf_counter() - began:.1f} s")
        child = run_child(place.store_url, EOD_AT, profile=output, gc_off=gc_off)
    _log(json.dumps(child.report, indent=1))
    if output is None:
        return
    _log(f"profile written to {output}")
    for order in ("cumulative", "tottime"):
        stream = io.StringIO()
        pstats.Stats(str(output), stream=stream).sort_stats(order).print_stats(top)
        print(stream.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["child"]:
        parser = argparse.ArgumentParser(prog="bench_eod.py child")
        parser.add_argument("--db", required=True)
        parser.add_argument("--at", required=True)
        parser.add_argument("--profile")
        parser.add_argument("--gc-off", action="store_true")
        child = parser.parse_args(args[1:])
        return child_main(child.db, child.at, child.profile, child.gc_off)
    parser = argparse.ArgumentParser(description="Run (and profile) the eod batch alone on a "
                                                 "fresh book.")
    parser.add_argument("--db", required=True)
    parser.add_argument("--scale", choices=sorted(EOD_SCALES), default="small")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="cProfile the run_job call into FILE and print its top entries")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--gc-off", action="store_true",
                        help="experiment: run with the cyclic garbage collector disabled")
    parsed = parser.parse_args(args)
    profile_eod(parsed.db, parsed.scale, parsed.profile, parsed.top, parsed.gc_off)
    return 0


if __name__ == "__main__":
    sys.exit(main())
