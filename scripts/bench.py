"""Benchmark the event store and the ledger against the bare driver on the same database
(SPEC section 7).

Every store figure does the same work twice in one run on one database: through the store
(`EventStore.append`, `EventStore.read_all`) and with the bare driver (psycopg 3 or sqlite3)
on a plain table of the same shape. The ratio is what the store's guarantees cost:
idempotency checks, stream locks and versions, the hash chain, gap-free log order and typed
decoding. Inputs (events, raw rows) are built outside the timed regions on both sides.

The ledger figures (bench_ledger.py) follow: `clear_trades`, a whole trades file through
`Ledger.import_file` on a second fresh place, against the bare driver appending the same rows,
and against the bare driver writing every row the import stored (its events and streams and
the read models' rows: `clear_trades_vs_stored_rows`, the database's limit for that work);
`rebuild` of that ledger's read models (bench_backoffice.py); the portfolio margin figures,
pure computation against a bare numpy Black-76 repricing of the same positions (there is no
database in them, see bench_ledger.py); `eod`, the end-of-day batch over a book of accounts x
positions in a child process, wall time and peak memory, against a COPY of what it wrote
(bench_eod.py); and `reconcile_balances`, a balances statement against the ledger, against
reading the same CSV and the balances table with the bare driver (bench_backoffice.py).
Each ledger figure has a fresh place of its own, except `rebuild`, which folds the log the
`clear_trades` import left. `--only NAME,...` runs a subset (see GROUPS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
import sqlalchemy
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from bench_events import RAW_COLUMNS, Workload, bench_catalogue, payload_bytes
from bench_backoffice import RECONCILE_SCALES, rebuild, reconcile_balances
from bench_contention import CONTENTION_SCALES, contention
from bench_eod import EOD_SCALES, eod
from bench_ledger import LEDGER_SCALES, Figure, clear_trades, margin
from clearing.domain.clock import storage_time
from clearing.store.database import create_engine_for, upgrade
from clearing.store.eventstore import EventStore, forget_decoded_events

BATCH_SIZE = 1_000
"""Events per append (store) and per executemany/COPY transaction (raw)."""
STREAMS = 100
"""Streams the events are spread over, round-robin."""
READ_PAGE_SIZE = 1_000
"""Store page size and raw server-side cursor fetch size for read_all. Swept 1,000 to
50,000 on 200,000 events: 1,000 was fastest on both backends (PostgreSQL ~64k/s against
~55k/s at 5,000), because a larger page keeps more objects alive for the cyclic GC."""
READ_REPEATS = 3
"""Reads per side in read_all; the best of each counts."""
VISIBILITY_WAIT_S = 60.0
"""Bound on waiting for the last append to become readable (PostgreSQL readers stop at the
oldest transaction still in flight on the server, which may be someone else's)."""
RATE = "events/s"


@dataclass(frozen=True)
class Scale:
    events: int
    """N: events appended in batches and then read back."""
    single_events: int
    """Events appended one per transaction."""


SCALES = {
    "small": Scale(events=20_000, single_events=500),
    "full": Scale(events=1_000_000, single_events=5_000),
}


class BenchError(RuntimeError):
    """The benchmark could not measure what it claims to (e.g. a read saw too few events)."""


@dataclass(frozen=True)
class Result:
    name: str
    unit: str
    n: int
    ours: float
    raw: float
    ratio: float


def rate_result(name: str, n: int, ours_s: float, raw_s: float) -> Result:
    """Rates: higher is better, so ratio = ours / raw (below 1: the store is slower)."""
    ours, raw = n / ours_s, n / raw_s
    return Result(name, RATE, n, round(ours, 1), round(raw, 1), round(ours / raw, 3))


def figure_result(figure: Figure) -> Result:
    """A ledger figure as a report row: ratio ours / raw for rates, raw / ours for times."""
    if figure.rate:
        return Result(figure.name, figure.unit, figure.n, round(figure.ours, 1),
                      round(figure.raw, 1), round(figure.ours / figure.raw, 3))
    return Result(figure.name, figure.unit, figure.n, round(figure.ours, 4),
                  round(figure.raw, 4), round(figure.raw / figure.ours, 3))


def log(message: str) -> None:
    """Progress goes to stderr so that --json leaves stdout as one JSON document."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- places


class Place(Protocol):
    """A fresh, isolated database for one run, with the bare driver beside the store."""

    kind: str
    store_url: str
    supports_copy: bool

    def server_version(self) -> str: ...
    def timestamp(self, value: datetime) -> Any: ...
    def create_raw_table(self, table: str) -> None: ...
    def raw_insert_batch(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None: ...
    def raw_copy_batch(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None: ...
    def raw_insert_one(self, table: str, row: tuple[Any, ...]) -> None: ...
    def raw_read_all(self, table: str, page_size: int) -> int: ...
    def raw_stream(self, query: str, page_size: int) -> Iterator[tuple[Any, ...]]: ...
    def settle(self, tables: Sequence[str]) -> None: ...
    def create_table_like(self, source: str, table: str) -> None: ...
    def raw_write_tables(self, batches: Sequence[RawBatch]) -> None: ...


RawBatch = tuple[str, Sequence[str], Sequence[tuple[Any, ...]]]
"""A bare table's name, its columns, and the rows to write into it."""


def _libpq_params(url: URL) -> dict[str, Any]:
    params: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    params.update({key: str(value) for key, value in url.query.items()})
    params["application_name"] = "clearing-bench"
    return params


class PostgresPlace:
    """A schema `bench_<hex>` on the given server; the store and the raw tables live in it."""

    kind = "postgresql"
    supports_copy = True

    def __init__(self, url: URL, schema: str, params: dict[str, Any]) -> None:
        options = f"{params.get('options', '')} -csearch_path={schema}".strip()
        self.schema = schema
        self.store_url = url.set(
            drivername="postgresql+psycopg", query={**url.query, "options": options}
        ).render_as_string(hide_password=False)
        self._params = {**params, "options": options}
        self._raw = psycopg.connect(**self._params)

    def close(self) -> None:
        self._raw.close()

    def server_version(self) -> str:
        return str(self._raw.execute("SELECT version()").fetchone()[0])  # type: ignore[index]

    def timestamp(self, value: datetime) -> datetime:
        return value

    def create_raw_table(self, table: str) -> None:
        self._raw.execute(sql.SQL(
            "CREATE TABLE {} (position bigint PRIMARY KEY, stream_id text NOT NULL, "
            "stream_version integer NOT NULL, event_id text NOT NULL, type text NOT NULL, "
            "schema_version integer NOT NULL, payload text NOT NULL, metadata text NOT NULL, "
            "effective_at timestamptz NOT NULL, recorded_at timestamptz NOT NULL, "
            "idempotency_key text NOT NULL UNIQUE, hash text NOT NULL)"
        ).format(sql.Identifier(table)))
        self._raw.commit()

    def _insert(self, table: str) -> sql.Composed:
        return sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(table),
            sql.SQL(", ").join(map(sql.Identifier, RAW_COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(RAW_COLUMNS)),
        )

    def raw_insert_batch(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        with self._raw.cursor() as cur:
            cur.executemany(self._insert(table), rows)
        self._raw.commit()

    def raw_copy_batch(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        self.raw_write_tables([(table, RAW_COLUMNS, rows)])

    def raw_insert_one(self, table: str, row: tuple[Any, ...]) -> None:
        self._raw.execute(self._insert(table), row)
        self._raw.commit()

    def raw_read_all(self, table: str, page_size: int) -> int:
        """A server-side (named) cursor fetching `page_size` rows per round trip; the
        transaction it needs is ended at once, so it never holds back the store's readers."""
        count = 0
        query = sql.SQL("SELECT {} FROM {} ORDER BY position").format(
            sql.SQL(", ").join(map(sql.Identifier, RAW_COLUMNS)), sql.Identifier(table)
        )
        payload_at = RAW_COLUMNS.index("payload")
        try:
            with self._raw.cursor(name="bench_read_all") as cur:
                cur.itersize = page_size
                cur.execute(query)
                for row in cur:
                    json.loads(row[payload_at])
                    count += 1
        finally:
            self._raw.commit()
        return count

    def raw_stream(self, query: str, page_size: int) -> Iterator[tuple[Any, ...]]:
        """The rows of a fixed query (no parameters) through a server-side cursor,
        `page_size` rows per round trip, on a connection of its own (so the raw side can
        write on its main connection meanwhile), closed when the rows are exhausted."""
        with psycopg.connect(**self._params) as conn, conn.cursor(name="bench_stream") as cur:
            cur.itersize = page_size
            cur.execute(query)
            yield from cur

    def create_table_like(self, source: str, table: str) -> None:
        """A bare table with `source`'s columns, keys, constraints and indexes (what storing
        its rows costs the server), without its triggers or grants."""
        self._raw.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
            sql.Identifier(table), sql.Identifier(source)))
        self._raw.commit()

    def raw_write_tables(self, batches: Sequence[RawBatch]) -> None:
        """COPY (`write_row`, the driver formatting each value) into each table in turn,
        one transaction and one commit for all of them."""
        with self._raw.cursor() as cur:
            for table, columns, rows in batches:
                statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)))
                with cur.copy(statement) as copy:
                    for row in rows:
                        copy.write_row(row)
        self._raw.commit()

    def settle(self, tables: Sequence[str]) -> None:
        """VACUUM ANALYZE before reading, so hint bits, the visibility map and statistics
        are in the same state for both tables whatever autovacuum happened to reach."""
        with psycopg.connect(**self._params, autocommit=True) as conn:
            for table in tables:
                conn.execute(sql.SQL("VACUUM (ANALYZE) {}.{}").format(
                    sql.Identifier(self.schema), sql.Identifier(table)))


class SqlitePlace:
    """A fresh temporary database file; the raw side opens it with sqlite3 and the store's
    durability settings (WAL, synchronous=NORMAL), so both commit the same way."""

    kind = "sqlite"
    supports_copy = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store_url = f"sqlite:///{path}"
        self._raw = sqlite3.connect(path)
        self._raw.execute("PRAGMA journal_mode=WAL")
        self._raw.execute("PRAGMA synchronous=NORMAL")
        self._raw.execute("PRAGMA busy_timeout=30000")

    def close(self) -> None:
        self._raw.close()

    def server_version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version}"

    def timestamp(self, value: datetime) -> str:
        return storage_time(value)

    def create_raw_table(self, table: str) -> None:
        self._raw.execute(
            f'CREATE TABLE "{table}" (position INTEGER PRIMARY KEY, stream_id TEXT NOT NULL, '
            "stream_version INTEGER NOT NULL, event_id TEXT NOT NULL, type TEXT NOT NULL, "
            "schema_version INTEGER NOT NULL, payload TEXT NOT NULL, metadata TEXT NOT NULL, "
            "effective_at TEXT NOT NULL, recorded_at TEXT NOT NULL, "
            "idempotency_key TEXT NOT NULL UNIQUE, hash TEXT NOT NULL)"
        )
        self._raw.commit()

    def _insert(self, table: str, columns: Sequence[str] = RAW_COLUMNS) -> str:
        marks = ", ".join("?" * len(columns))
        return f'INSERT INTO "{table}" ({", ".join(columns)}) VALUES ({marks})'

    def raw_insert_batch(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        self.raw_write_tables([(table, RAW_COLUMNS, rows)])

    def raw_copy_batch(self, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        raise NotImplementedError("SQLite has no COPY")

    def raw_insert_one(self, table: str, row: tuple[Any, ...]) -> None:
        self._raw.execute(self._insert(table), row)
        self._raw.commit()

    def raw_read_all(self, table: str, page_size: int) -> int:
        """sqlite3 steps the statement row by row; `page_size` has no equivalent here."""
        count = 0
        payload_at = RAW_COLUMNS.index("payload")
        query = f'SELECT {", ".join(RAW_COLUMNS)} FROM "{table}" ORDER BY position'
        for row in self._raw.execute(query):
            json.loads(row[payload_at])
            count += 1
        return count

    def raw_stream(self, query: str, page_size: int) -> Iterator[tuple[Any, ...]]:
        """sqlite3 steps the statement row by row, on a connection of its own."""
        conn = sqlite3.connect(self.path)
        try:
            yield from conn.execute(query)
        finally:
            conn.close()

    def create_table_like(self, source: str, table: str) -> None:
        """A bare table with `source`'s columns, keys and indexes: its stored CREATE
        statements with the names changed (SQLite has no CREATE TABLE ... LIKE), triggers
        left out."""
        found = self._raw.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
            "AND type IN ('table', 'index') ORDER BY type = 'index'", (source,)).fetchall()
        as_word = re.compile(rf'"{re.escape(source)}"|(?<![\w"]){re.escape(source)}(?![\w"])')
        for kind, name, ddl in found:
            renamed = as_word.sub(f'"{table}"', ddl, count=1)  # the table, or ON <table>
            if kind == "index":
                renamed = renamed.replace(name, f"{table}_{name}", 1)
            self._raw.execute(renamed)
        self._raw.commit()

    def raw_write_tables(self, batches: Sequence[RawBatch]) -> None:
        """executemany into each table in turn, one transaction and one commit."""
        for table, columns, rows in batches:
            self._raw.executemany(self._insert(table, columns), rows)
        self._raw.commit()

    def settle(self, tables: Sequence[str]) -> None:
        """Nothing to settle: SQLite keeps no visibility state that a first read must set."""


@contextmanager
def postgres_place(url: URL) -> Iterator[PostgresPlace]:
    """A new schema, dropped with everything in it when the run ends, also on error."""
    params = _libpq_params(url)
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(**params, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            place = PostgresPlace(url, schema, params)
            try:
                yield place
            finally:
                place.close()
        finally:
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))
            log(f"dropped schema {schema}")


def _sqlite_directory_hint(url: URL) -> str | None:
    """The directory a sqlite:/// URL names (the file itself is never touched), if any."""
    if not url.database or url.database == ":memory:":
        return None
    named = Path(url.database).expanduser()
    if named.is_dir():
        return str(named)
    return str(named.parent) if named.parent.is_dir() else None


@contextmanager
def sqlite_place(url: URL) -> Iterator[SqlitePlace]:
    """A new temporary directory holding a new database file, removed when the run ends."""
    directory = Path(tempfile.mkdtemp(prefix="bench_", dir=_sqlite_directory_hint(url)))
    try:
        place = SqlitePlace(directory / "ledger.db")
        try:
            yield place
        finally:
            place.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def open_place(db: str) -> Iterator[Place]:
    url = make_url(db)
    backend = url.get_backend_name()
    if backend == "postgresql":
        with postgres_place(url) as place:
            yield place
    elif backend == "sqlite":
        with sqlite_place(url) as place:
            yield place
    else:
        raise BenchError(f"unsupported database {backend!r}: use sqlite or postgresql")


# ---------------------------------------------------------------------------- figures


@dataclass
class Bench:
    """One run: the place, the store on it, and what earlier figures left behind."""

    place: Place
    store: EventStore
    scale: Scale
    run_id: str
    last_batched_position: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def _time_raw_batch(bench: Bench, workload: Workload, start: int, count: int, table: str,
                    write: Callable[[str, Sequence[tuple[Any, ...]]], None]) -> float:
    rows = workload.raw_rows(
        start, count, first_position=start + 1,
        recorded_at=datetime.now(UTC), timestamp=bench.place.timestamp,
    )
    began = time.perf_counter()
    write(table, rows)
    return time.perf_counter() - began


def append_batched(bench: Bench) -> list[Result]:
    """The bulk path (imports, replays into a new database, busy jobs): N events in appends
    of BATCH_SIZE over STREAMS streams. Raw is executemany of the same rows with one commit
    per batch, so both sides commit equally often; the ratio is the cost of the store's
    per-append checks (idempotency lookup, stream locks and heads, hash chain). COPY of the
    same rows, in the same batches, is reported as the floor of bulk loading.

    The sides take turns batch by batch (store, executemany, COPY, next batch), so that
    whatever else loads the machine during the run weighs on each side alike."""
    n = bench.scale.events
    workload = Workload(f"{bench.run_id}-batched", STREAMS)
    ours_s = raw_s = copy_s = 0.0
    for start in range(0, n, BATCH_SIZE):
        count = min(BATCH_SIZE, n - start)
        batch = workload.batch(start, count)
        began = time.perf_counter()
        appended = bench.store.append(batch)
        ours_s += time.perf_counter() - began
        if appended.written != len(batch):
            raise BenchError(f"append at {start} wrote {appended.written} of {len(batch)}")
        bench.last_batched_position = appended.positions[-1]
        raw_s += _time_raw_batch(bench, workload, start, count, "raw_events",
                                 bench.place.raw_insert_batch)
        if bench.place.supports_copy:
            copy_s += _time_raw_batch(bench, workload, start, count, "raw_events_copy",
                                      bench.place.raw_copy_batch)
    results = [rate_result("append_batched", n, ours_s, raw_s)]
    if bench.place.supports_copy:
        results.append(rate_result("append_copy_raw_reference", n, copy_s, copy_s))
    return results


def _wait_until_visible(store: EventStore, position: int) -> None:
    target = store.log_position_of(position)
    deadline = time.monotonic() + VISIBILITY_WAIT_S
    while store.head() < target:
        if time.monotonic() > deadline:
            raise BenchError(
                f"position {position} not readable after {VISIBILITY_WAIT_S:.0f} s: a "
                "transaction older than it is still open on the server")
        time.sleep(0.1)


def read_all(bench: Bench) -> Result:
    """A full replay (projections rebuilt, verification, statements): every event read in
    log order and decoded to its typed event. Raw is a server-side cursor over the raw table
    in position order with json.loads of each payload, the least a replay must do.

    A read changes nothing, so each side reads READ_REPEATS times, the two sides taking
    turns, and the best time of each counts (as `timeit` does): on a shared 2-core machine
    a single read is mostly a measure of what else ran at that moment."""
    n = bench.scale.events
    bench.place.settle(["events", "raw_events"])
    _wait_until_visible(bench.store, bench.last_batched_position)
    ours_times: list[float] = []
    raw_times: list[float] = []
    for _ in range(READ_REPEATS):
        forget_decoded_events()  # each read parses every payload from storage
        began = time.perf_counter()
        # A fresh store: the one that appended keeps its just-written events in memory, and
        # a replay must pay for parsing them from storage. Touch every typed event: the
        # store decodes lazily, and the figure must include it.
        reader = EventStore(bench.store.engine, event_catalogue=bench.store.catalogue)
        ours_count = sum(1 for r in reader.read_all(page_size=READ_PAGE_SIZE)
                         if r.event is not None)
        ours_times.append(time.perf_counter() - began)
        began = time.perf_counter()
        raw_count = bench.place.raw_read_all("raw_events", READ_PAGE_SIZE)
        raw_times.append(time.perf_counter() - began)
        if (ours_count, raw_count) != (n, n):
            raise BenchError(f"read_all saw {ours_count} events (store), {raw_count} (raw), "
                             f"expected {n}")
    return rate_result("read_all", n, min(ours_times), min(raw_times))


def append_single(bench: Bench) -> Result:
    """The live path (one deposit, one trade at a time): one event per transaction into a
    log that already holds N events. Raw is one INSERT and one commit per row, so the ratio
    is mostly the store's extra round trips per append."""
    count = bench.scale.single_events
    workload = Workload(f"{bench.run_id}-single", STREAMS)
    ours_s = 0.0
    for index in range(count):
        pending = [workload.pending(index)]
        began = time.perf_counter()
        bench.store.append(pending)
        ours_s += time.perf_counter() - began
    raw_s = 0.0
    first_position = bench.scale.events + 1
    for index in range(count):
        (row,) = workload.raw_rows(
            index, 1, first_position=first_position + index,
            recorded_at=datetime.now(UTC), timestamp=bench.place.timestamp,
        )
        began = time.perf_counter()
        bench.place.raw_insert_one("raw_events", row)
        raw_s += time.perf_counter() - began
    return rate_result("append_single", count, ours_s, raw_s)


FIGURES: tuple[Callable[[Bench], Result | list[Result]], ...] = (
    append_batched, read_all, append_single,
)
"""In this order: read_all reads exactly the N events append_batched wrote."""


# ---------------------------------------------------------------------------- report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info(kind: str, server_version: str, run: dict[str, Any]) -> dict[str, Any]:
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "database": server_version,
        "driver": (f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__})"
                   if kind == "postgresql" else f"sqlite3 {sqlite3.sqlite_version}"),
        "sqlalchemy": sqlalchemy.__version__,
        "run": {**run, "peak_rss_mb": round(peak_rss_kb / 1024, 1)},
    }


def _number(value: float) -> str:
    """Rates as whole numbers; times in ms (below 100) with three decimals."""
    return f"{value:,.0f}" if value >= 100 else f"{value:,.3f}"


def render_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    run = report["machine"]["run"]
    table = Table(title=f"clearing bench: {run['backend']}, scale {run['scale']}")
    for column in ("figure", "unit", "n", "ours", "raw", "ratio"):
        table.add_column(column, justify="left" if column in ("figure", "unit") else "right")
    for r in report["results"]:
        table.add_row(r["name"], r["unit"], f"{r['n']:,}", _number(r["ours"]),
                      _number(r["raw"]), f"{r['ratio']:.3f}")
    console.print(table)
    machine = Table(show_header=False, box=None)
    for key, value in report["machine"].items():
        if key != "run":
            machine.add_row(key, str(value))
    for key, value in run.items():
        machine.add_row(f"run.{key}", str(value))
    console.print(machine)


def markdown(report: dict[str, Any]) -> str:
    """The results table, the machine, and the run's scalar settings; the figures' own
    notes (splits, raw definitions) stay in --json, except the eod's wall time and peak
    memory, which the issue asks to see beside each other."""
    run = report["machine"]["run"]
    lines = [
        f"### Benchmark: {run['backend']}, scale {run['scale']}",
        "",
        "| figure | unit | n | ours | raw | ratio |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['name']} | {r['unit']} | {r['n']:,} | {_number(r['ours'])} "
                     f"| {_number(r['raw'])} | {r['ratio']:.3f} |")
    lines.append("")
    eod_notes = run.get("eod")
    if isinstance(eod_notes, dict):
        lines.append(f"- eod: {eod_notes['positions']:,} positions over "
                     f"{eod_notes['accounts']:,} accounts in {eod_notes['eod_s']:.1f} s, peak "
                     f"RSS {eod_notes['peak_rss_mb']:,.0f} MiB, {eod_notes['events_written']:,} "
                     f"events written (raw append of them {eod_notes['raw_s']:.2f} s); target "
                     f"{eod_notes['targets']}")
    lines += [f"- {key}: {value}" for key, value in report["machine"].items() if key != "run"]
    lines += [f"- run.{key}: {value}" for key, value in run.items()
              if not isinstance(value, dict)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


GROUPS: dict[str, tuple[str, ...]] = {
    "append": ("append_batched", "append_copy_raw_reference"),
    "read": ("read_all",),
    "single": ("append_single",),
    "clear": ("clear_trades", "clear_trades_append_only", "clear_trades_vs_stored_rows"),
    "margin": ("margin_portfolio_batch", "margin_pretrade_p50", "margin_pretrade_p99"),
    "eod": ("eod",),
    "reconcile": ("reconcile_balances",),
    "rebuild": ("rebuild",),
    "contention": ("append_contention",),
}
"""`--only` names, each a group of report rows. `read` and `single` run on the log `append`
wrote, so they bring it along (its rows are reported too); `rebuild` folds the log
`clear` imported, so it brings `clear` along."""
NEEDS = {"read": "append", "single": "append", "rebuild": "clear"}


def selected_groups(only: str | None) -> list[str]:
    """The groups to run, in report order: all of them, or those named and what they need."""
    if not only:
        return list(GROUPS)
    names = {name.strip() for name in only.split(",") if name.strip()}
    unknown = names - set(GROUPS)
    if unknown:
        raise BenchError(f"unknown figure(s) {', '.join(sorted(unknown))} for --only "
                         f"(known: {', '.join(GROUPS)})")
    names |= {NEEDS[name] for name in names if name in NEEDS}
    return [name for name in GROUPS if name in names]


def _log_result(result: Result) -> None:
    log(f"  {result.name}: ours {_number(result.ours)}, raw {_number(result.raw)} "
        f"{result.unit}, ratio {result.ratio:.3f}")


def _store_figures(place: Place, scale: Scale, groups: Sequence[str]) -> list[Result]:
    engine = create_engine_for(place.store_url)
    try:
        upgrade(engine)
        for table in ("raw_events", "raw_events_copy"):
            place.create_raw_table(table)
        bench = Bench(place, EventStore(engine, event_catalogue=bench_catalogue), scale,
                      run_id=uuid.uuid4().hex[:8])
        results: list[Result] = []
        chosen = {"append": append_batched, "read": read_all, "single": append_single}
        for group, figure in chosen.items():
            if group not in groups:
                continue
            log(f"{figure.__name__} ...")
            produced = figure(bench)
            for result in produced if isinstance(produced, list) else [produced]:
                _log_result(result)
                results.append(result)
        return results
    finally:
        engine.dispose()


def run_bench(db: str, scale_name: str, only: str | None = None) -> dict[str, Any]:
    """Run the figures (every one, or the `only` groups) each on a fresh place and return
    the report (SPEC section 7 shape)."""
    scale = SCALES[scale_name]
    ledger_scale = LEDGER_SCALES[scale_name]
    groups = selected_groups(only)
    started = time.perf_counter()
    results: list[Result] = []
    notes: dict[str, Any] = {}
    timings: dict[str, float] = {}
    kind = make_url(db).get_backend_name()
    server_version = ""

    def add(figures: Sequence[Figure], key: str, figure_notes: dict[str, Any]) -> None:
        for figure in figures:
            result = figure_result(figure)
            _log_result(result)
            results.append(result)
        notes[key] = figure_notes

    def timed(name: str, began: float) -> None:
        timings[name] = round(time.perf_counter() - began, 1)

    if any(g in groups for g in ("append", "read", "single")):
        began = time.perf_counter()
        with open_place(db) as place:
            results += _store_figures(place, scale, groups)
            server_version = place.server_version()
        timed("store", began)
    if "clear" in groups:
        began = time.perf_counter()
        log("clear_trades ...")
        with open_place(db) as place:
            figures, trades_notes = clear_trades(place, ledger_scale)
            add(figures, "clear_trades", trades_notes)
            timed("clear_trades", began)
            if "rebuild" in groups:
                began = time.perf_counter()
                log("rebuild ...")
                add(*_swap(rebuild(place), "rebuild"))
                timed("rebuild", began)
            server_version = place.server_version()
    if "margin" in groups:
        began = time.perf_counter()
        log("margin ...")
        add(*_swap(margin(ledger_scale), "margin"))
        timed("margin", began)
    if "eod" in groups:
        began = time.perf_counter()
        log("eod ...")
        with open_place(db) as place:
            add(*_swap(eod(place, EOD_SCALES[scale_name]), "eod"))
            server_version = place.server_version()
        timed("eod", began)
    if "reconcile" in groups:
        began = time.perf_counter()
        log("reconcile_balances ...")
        with open_place(db) as place:
            add(*_swap(reconcile_balances(place, RECONCILE_SCALES[scale_name]),
                       "reconcile_balances"))
            server_version = place.server_version()
        timed("reconcile_balances", began)
    if "contention" in groups:  # N writer processes on shared streams (bench_contention.py)
        began = time.perf_counter()
        log("append_contention ...")
        with open_place(db) as place:
            add(*_swap(contention(place, CONTENTION_SCALES[scale_name]), "append_contention"))
            server_version = place.server_version()
        timed("append_contention", began)
    run = {
        "backend": kind,
        "scale": scale_name,
        "figures": groups,
        "batch_size": BATCH_SIZE,
        "streams": STREAMS,
        "read_page_size": READ_PAGE_SIZE,
        "payload_bytes": payload_bytes(),
        "raw_table": "position primary key, idempotency_key unique; no other index "
                     "(the store's events table has 7 indexes and constraints)",
        **notes,
        "figure_wall_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
    }
    return {"machine": machine_info(kind, server_version, run),
            "results": [asdict(r) for r in results]}


def _swap(produced: tuple[list[Figure], dict[str, Any]], key: str
          ) -> tuple[list[Figure], str, dict[str, Any]]:
    figures, figure_notes = produced
    return figures, key, figure_notes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=(
            "Isolation: on PostgreSQL each run creates a schema bench_<hex>, migrates it, "
            "points the store at it with options=-csearch_path and drops it (CASCADE) at the "
            "end, also on error or SIGTERM. On SQLite each run uses a new temporary file: a "
            "sqlite:///PATH URL only says where to put it (PATH if it is a directory, else "
            "its parent directory; the system temp dir otherwise); PATH itself is never "
            f"opened. Figures: append_batched (N events, appends of {BATCH_SIZE:,}; raw: "
            "executemany per batch + commit), append_copy_raw_reference (PostgreSQL only: "
            "COPY of the same rows, per batch + commit), read_all (store pages of "
            f"{READ_PAGE_SIZE:,}, typed decode; raw: server-side cursor + json.loads), "
            "append_single (one event per transaction; raw: INSERT + commit); then, on a "
            "second fresh place, clear_trades (one trades file of two-leg trades through "
            "Ledger.import_file: parse, decide, append, projections; raw: COPY (PostgreSQL) "
            "or executemany (SQLite) of the same rows in one transaction), "
            "clear_trades_append_only (the store's append within that import, same raw), "
            "clear_trades_vs_stored_rows (the same import; raw: every row it stored, "
            "events, streams and read models, written by the bare driver into bare tables "
            "with the same keys and indexes, one transaction: the database's own limit for "
            "what clearing must store), "
            "rebuild (ProjectionRunner.rebuild of that ledger, events/s; raw: server-side "
            "cursor over the events + json.loads + COPY of a row per event, a page per "
            "transaction), "
            "the pure margin figures margin_portfolio_batch, margin_pretrade_p50/p99 "
            "(portfolio_requirements_many / portfolio_requirement; raw: bare numpy "
            "Black-76 over the same positions and scenarios), eod (run_job(ledger, 'eod', "
            "at) in a child process over a book set up through the domain's decide "
            "functions: wall time, peak RSS in the notes; raw: COPY of the rows it wrote, "
            "one transaction) and reconcile_balances (reconcile() of a balances statement, "
            "rows/s; raw: csv.reader over the file + server-side cursor over the balances "
            "table). Scales: "
            + ", ".join(f"{name} N={s.events:,} (single {s.single_events:,}), "
                        f"{LEDGER_SCALES[name].trades:,} trades over "
                        f"{LEDGER_SCALES[name].accounts:,} accounts, "
                        f"{LEDGER_SCALES[name].margin_books:,} margin books, eod "
                        f"{EOD_SCALES[name].accounts:,} accounts x "
                        f"{EOD_SCALES[name].positions_per_account} positions, statement "
                        f"{RECONCILE_SCALES[name].rows:,} rows"
                        for name, s in SCALES.items()) + "."
        ),
    )
    parser.add_argument("--db", required=True, help="SQLAlchemy URL (postgresql or sqlite)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--markdown", metavar="FILE", type=Path,
                        help="also write the results as a Markdown table to FILE")
    parser.add_argument("--only", metavar="NAME,...",
                        help=f"run only these figures ({', '.join(GROUPS)}); read and "
                             "single bring append along, rebuild brings clear along")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """Turn SIGTERM into SystemExit so the run's schema or file is still removed."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        report = run_bench(args.db, args.scale, args.only)
    except BenchError as exc:
        log(f"bench: {exc}")
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render_table(report)
    if args.markdown is not None:
        args.markdown.write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
