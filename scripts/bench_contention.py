"""The contention figure (issue 8): `WRITERS` processes appending at once to the same streams.

Each writer process appends `events_per_writer` events through `EventStore.append`, in appends
of `BATCH` events, and every append of every writer touches the same `SHARED_STREAMS` streams
(round-robin, each writer starting at another stream): the writers contend for the same stream
locks and stream heads on every append, as importers of files on overlapping accounts do.
The figure is the total rate, all writers' events over the wall time from the moment they are
released together (each has built its events and opened its connection beforehand) until the
last one is done.

Raw: the same number of processes, released the same way, each writing the same rows (the
rows the store would write, bench_events.Workload.raw_rows) into one bare table of the
events' shape, in the same batches, one transaction per batch: COPY on PostgreSQL (what the
store itself uses), executemany on SQLite. The bare table has no stream heads and no stream
locks, so raw writers never wait for each other on PostgreSQL; on SQLite both sides queue
for the single write lock. The ratio is what stream ordering (locks held to commit, heads,
hash chains, gap-free reads) costs when writers collide.

After the store's run the log is checked: every event once, and every stream's versions
contiguous from 1 whatever the interleaving.

Processes are forked from the bench (its own connections are left untouched by them), so
they start without the interpreter's start-up; each opens its own connections.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from bench_events import RAW_COLUMNS, Workload, bench_catalogue
from bench_ledger import Figure

WRITERS = 4
SHARED_STREAMS = 16
BATCH = 100
"""Events per append (store) and per COPY/executemany transaction (raw)."""
RACE_TIMEOUT_S = 1_800.0
RAW_TABLE = "raw_contention"


@dataclass(frozen=True)
class ContentionScale:
    events_per_writer: int


CONTENTION_SCALES = {"small": ContentionScale(5_000), "full": ContentionScale(100_000)}


class ContentionError(RuntimeError):
    """A writer failed, or the log it left is not what it appended."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class SharedStreams(Workload):
    """Writer `writer`'s events: keys of its own, streams shared with every other writer."""

    def __init__(self, run_id: str, writer: int) -> None:
        super().__init__(f"{run_id}-w{writer}", SHARED_STREAMS)
        self.run_id = run_id
        self.writer = writer

    def stream_id(self, index: int) -> str:
        return f"{self.run_id}-shared-{(index + self.writer) % SHARED_STREAMS:04d}"


# ---------------------------------------------------------------------------- the race


def _race(writer: Callable[[int], Callable[[], None]], writers: int) -> float:
    """Fork `writers` processes; each calls `writer(k)` to prepare (not timed) and gets the
    function it then runs when all are released together. The wall time of the run."""
    go_read, go_write = os.pipe()
    children: list[tuple[int, int]] = []
    for k in range(writers):
        report_read, report_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the bench
            code = 1
            try:
                os.close(report_read)
                run = writer(k)
                os.write(report_write, b"r")
                if os.read(go_read, 1) != b"g":
                    raise ContentionError("released without the signal")
                run()
                os.write(report_write, b"d")
                code = 0
            except BaseException as exc:  # noqa: BLE001 - reported, then the child exits
                print(f"writer {k}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        os.close(report_write)
        children.append((pid, report_read))
    try:
        for _, report in children:
            if os.read(report, 1) != b"r":
                raise ContentionError("a writer failed while preparing (see stderr)")
        began = time.perf_counter()
        os.write(go_write, b"g" * writers)
        for _, report in children:
            if os.read(report, 1) != b"d":
                raise ContentionError("a writer failed (see stderr)")
        elapsed_s = time.perf_counter() - began
    finally:
        for pid, report in children:
            os.close(report)
            status = os.waitpid(pid, 0)[1]
            if os.waitstatus_to_exitcode(status) != 0:
                raise ContentionError(f"writer process {pid} exited with status {status}")
        os.close(go_read)
        os.close(go_write)
    return elapsed_s


def _store_writer(url: str, run_id: str, events: int) -> Callable[[int], Callable[[], None]]:
    def prepare(k: int) -> Callable[[], None]:
        from clearing.store.database import create_engine_for
        from clearing.store.eventstore import EventStore

        workload = SharedStreams(run_id, k)
        batches = [workload.batch(start, min(BATCH, events - start))
                   for start in range(0, events, BATCH)]
        store = EventStore(create_engine_for(url), event_catalogue=bench_catalogue)
        store.count()  # the connection is open before the start

        def run() -> None:
            for batch in batches:
                if store.append(batch).written != len(batch):
                    raise ContentionError(f"writer {k}: an append wrote less than asked")
        return run
    return prepare


def _raw_writer(place: Any, run_id: str, events: int) -> Callable[[int], Callable[[], None]]:
    def prepare(k: int) -> Callable[[], None]:
        workload = SharedStreams(f"{run_id}-raw", k)
        first = k * events + 1
        recorded_at = datetime.now(UTC)
        batches = [workload.raw_rows(start, min(BATCH, events - start),
                                     first_position=first + start, recorded_at=recorded_at,
                                     timestamp=place.timestamp)
                   for start in range(0, events, BATCH)]
        url = make_url(place.store_url)
        if place.kind == "postgresql":
            params: dict[str, Any] = url.translate_connect_args(username="user",
                                                                database="dbname")
            params.update({key: str(value) for key, value in url.query.items()})
            conn = psycopg.connect(**params, application_name="clearing-bench")
            statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(RAW_TABLE), sql.SQL(", ").join(map(sql.Identifier, RAW_COLUMNS)))

            def run() -> None:
                for rows in batches:
                    with conn.cursor() as cur, cur.copy(statement) as copy:
                        for row in rows:
                            copy.write_row(row)
                    conn.commit()
            return run
        lite = sqlite3.connect(url.database, timeout=60)
        lite.execute("PRAGMA journal_mode=WAL")
        lite.execute("PRAGMA synchronous=NORMAL")
        insert = (f'INSERT INTO "{RAW_TABLE}" ({", ".join(RAW_COLUMNS)}) '
                  f'VALUES ({", ".join("?" * len(RAW_COLUMNS))})')

        def run_sqlite() -> None:
            for rows in batches:
                lite.executemany(insert, rows)
                lite.commit()
        return run_sqlite
    return prepare


def _check_log(url: str, expected: int) -> None:
    """Every event once; every shared stream's versions contiguous from 1."""
    from sqlalchemy import func, select

    from clearing.store.database import create_engine_for
    from clearing.store.tables import events

    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(events.c.stream_id, func.count(),
                                       func.max(events.c.stream_version),
                                       func.count(func.distinct(events.c.idempotency_key)))
                                .group_by(events.c.stream_id)).all()
    finally:
        engine.dispose()
    total = sum(int(r[1]) for r in rows)
    if total != expected or any(int(r[1]) != int(r[2]) or r[1] != r[3] for r in rows):
        raise ContentionError(f"the log holds {total} events (expected {expected}) or a "
                              "stream's versions have a gap or a repeat")


def contention(place: Any, scale: ContentionScale) -> tuple[list[Figure], dict[str, Any]]:
    """The append_contention figure on a fresh place."""
    import uuid

    from clearing.store.database import create_engine_for, upgrade

    engine = create_engine_for(place.store_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    place.create_raw_table(RAW_TABLE)
    run_id = uuid.uuid4().hex[:8]
    per_writer = scale.events_per_writer
    n = WRITERS * per_writer
    ours_s = _race(_store_writer(place.store_url, run_id, per_writer), WRITERS)
    _check_log(place.store_url, n)
    raw_s = _race(_raw_writer(place, run_id, per_writer), WRITERS)
    _log(f"  {WRITERS} writers x {per_writer:,} events over {SHARED_STREAMS} shared streams: "
         f"store {ours_s:.2f} s, raw {raw_s:.2f} s")
    figure = Figure("append_contention", "events/s", n, n / ours_s, n / raw_s, rate=True)
    notes = {"writers": WRITERS, "events_per_writer": per_writer,
             "shared_streams": SHARED_STREAMS, "batch": BATCH,
             "ours_s": round(ours_s, 3), "raw_s": round(raw_s, 3),
             "raw": "COPY per batch" if place.kind == "postgresql"
                    else "executemany per batch"}
    return [figure], notes
