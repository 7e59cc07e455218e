"""Append and read the log.

Appends are atomic across streams, check an expected version per stream, and are idempotent:
each event carries an idempotency key, an event whose key is already stored with the same
content is not written again (its original position is returned), and the same key with
other content is refused. Nothing is written when any check fails.

Reading never skips an event, even on PostgreSQL where transactions commit out of sequence
order. Each event records the id of the transaction that wrote it; readers order the log by
(txid, position) and only read transactions older than the oldest event writer still in
flight. A transaction that commits late therefore becomes visible only once nothing older can
still appear, and always after everything a reader has already seen.

Which transactions are event writers: every append first takes a shared advisory lock keyed by
its log (the database and schema it writes to), before its transaction has an id. A reader
takes its snapshot, then looks up the in-flight transactions of backends holding its log's
lock; the oldest of them (or the snapshot's xmax when there is none) bounds the read. An
unrelated long transaction elsewhere on the server (an analyst's open session, or an append
to another ledger in another database or schema) therefore does not hold readers back, as a
bound on `pg_snapshot_xmin` would. Stream locks are advisory locks taken before the
transaction's first write too, so a writer that waited for a stream gets a later txid than
the writer it waited for, and stream versions follow the log order. Streams hash into
LOCK_BUCKETS locks; an append of many streams takes one lock over all of them instead
(`_take_stream_locks`).

Failures (see `clearing.store.failures`): an append that meets a transient conflict (a racing
duplicate, a serialization failure, a deadlock) or loses its connection is run again, at most
`APPEND_RETRIES_MAX` times in all, and the retry looks every idempotency key up first, so a
COMMIT that succeeded although its acknowledgement was lost is recognised, never written
twice (found at the positions that attempt took, it is reported as written by this
append). A read that loses its connection between pages reconnects and resumes after the
last event it returned, at most `READ_RECONNECTS_MAX` times.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple

import psycopg
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, and_, bindparam, func, or_, select, tuple_
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError

from clearing.domain.clock import ensure_utc, from_storage_time, storage_time
from clearing.domain.event import (
    Event,
    EventCatalogue,
    InvalidEventPayload,
    canonical_json,
    catalogue,
)
from clearing.store.errors import (
    ConcurrencyConflict,
    DuplicateKeyInAppend,
    EmptyAppend,
    IdempotencyConflict,
    PayloadTooLarge,
    UnknownPosition,
)
from clearing.store.failures import (
    backoff,
    is_connection_lost,
    is_racing_duplicate,
    is_transient,
)
from clearing.store.event_ids import event_id_for
from clearing.store.hashchain import GENESIS_HASH, chain_hash, envelope_bytes
from clearing.store.copy_text import copy_buffer
from clearing.store.database import read_connection, write_transaction
from clearing.store.testhooks import PAUSE_IN_APPEND_ENV, pause_at
from clearing.store.tables import events, streams
from clearing.store.text_arrays import text_array

ANY_VERSION = -1
"""Expected version meaning: append whatever version the stream is at."""
NO_STREAM = 0
"""Expected version meaning: the stream must not exist yet."""

PAYLOAD_BYTES_MAX = 65_536
"""Largest canonical JSON payload accepted for one event (documented in README)."""
APPEND_RETRIES_MAX = 5
"""Attempts in all at an append that meets a transient conflict (a racing duplicate, a
serialization failure, a deadlock) or loses its connection."""
READ_RECONNECTS_MAX = 3
"""Reconnections one `read_all` may make after losing its connection between pages."""
LOCK_BUCKETS = 1_024
"""Stream locks are hashed into this many advisory locks, so one large append holds a
bounded number of locks whatever its number of streams."""
BUCKETS_LOCKED_MAX = 64
"""Bucket locks an append takes one by one; beyond, it locks every stream at once."""
ALL_STREAMS_KEY = LOCK_BUCKETS
"""The key, beside the buckets' 0..LOCK_BUCKETS-1, of the lock over every stream."""
LOCK_NAMESPACE = 0x434C  # "CL": keeps the store's advisory locks apart from the scheduler's
WRITER_NAMESPACE = 0x434D  # "CM": held (shared) by every appending transaction
READ_BOUND_SQL = """
WITH snap AS (SELECT pg_current_snapshot() AS s),
writers AS (
    SELECT x.transactionid::text::bigint AS xid32
    FROM pg_locks l
    JOIN pg_locks x ON x.pid = l.pid AND x.locktype = 'transactionid'
                   AND x.mode = 'ExclusiveLock' AND x.granted
    WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objsubid = 2 AND l.granted
      AND l.objid = (hashtext(current_schema()) & 2147483647)::oid
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT coalesce(
    (SELECT min(x::text::bigint) FROM snap, pg_snapshot_xip(snap.s) AS x
     WHERE x::text::bigint %% 4294967296 IN (SELECT xid32 FROM writers)),
    (SELECT pg_snapshot_xmax(s)::text::bigint FROM snap))
"""
"""The read bound. Writers' transaction ids come from `pg_locks` (every transaction holds an
exclusive lock on its own id), which every role may read, unlike `pg_stat_activity`, whose
`backend_xid` is hidden from a role that is not the session's: the least-privilege
application role must see every in-flight writer."""


class _Unset:
    """No value given (where None is a value: no read bound, on SQLite)."""


UNSET = _Unset()
RECENT_EVENTS_MAX = 250_000
"""Typed events kept in memory after an append, for this process's next read of them."""


@dataclass(frozen=True, order=True)
class LogPosition:
    """A reader's place in the log: events are read in (txid, position) order."""

    txid: int
    position: int


START = LogPosition(0, 0)


@dataclass(frozen=True)
class PendingEvent:
    """An event on its way into the log."""

    stream_id: str
    event: Event
    idempotency_key: str
    effective_at: datetime
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_payload(
        cls,
        stream_id: str,
        type_name: str,
        payload: dict[str, Any],
        *,
        idempotency_key: str,
        effective_at: datetime,
        metadata: Mapping[str, Any] | None = None,
        event_catalogue: EventCatalogue = catalogue,
    ) -> PendingEvent:
        """An event given as stored-form JSON (a type name and payload), validated against
        its model; an unknown type or an invalid payload is refused here, before any write."""
        model = event_catalogue.model(type_name)
        event = event_catalogue.decode(type_name, model.schema_version, payload)
        return cls(stream_id, event, idempotency_key, effective_at, dict(metadata or {}))


class RecordedEvent:
    """An event as stored, with its envelope. It wraps the stored row and decodes on first
    use (the typed event, the metadata, SQLite's text times): a fold that reads a million
    facts pays for exactly what it touches."""

    __slots__ = ("_row", "_event", "_metadata", "_catalogue", "_text_times", "_remember")

    def __init__(self, row: tuple[Any, ...], event_catalogue: EventCatalogue,
                 text_times: bool = False, remember: bool = True) -> None:
        self._row = row
        self._event: Event | None = None
        self._metadata: dict[str, Any] | None = None
        self._catalogue = event_catalogue
        self._text_times = text_times
        self._remember = remember

    position = property(lambda self: self._row[0])
    txid = property(lambda self: self._row[1])
    stream_id = property(lambda self: self._row[2])
    stream_version = property(lambda self: self._row[3])
    event_id = property(lambda self: self._row[4])
    type = property(lambda self: self._row[5])
    schema_version = property(lambda self: self._row[6])
    payload = property(lambda self: self._row[7])
    idempotency_key = property(lambda self: self._row[11])
    hash = property(lambda self: self._row[12])

    @property
    def effective_at(self) -> datetime:
        value = self._row[9]
        return from_storage_time(value) if self._text_times else value

    @property
    def recorded_at(self) -> datetime:
        value = self._row[10]
        return from_storage_time(value) if self._text_times else value

    @property
    def event(self) -> Event:
        """The typed event, upcast from an older schema version when needed."""
        if self._event is None:
            row = self._row
            current_version, read_json = self._catalogue.json_reader(row[5])
            if row[6] == current_version:
                self._event = _decoded(read_json, row[5], row[7], self._remember)
            else:
                self._event = self._catalogue.decode(row[5], row[6], json.loads(row[7]))
        return self._event

    @property
    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = json.loads(self._row[8])
        return self._metadata

    @property
    def log_position(self) -> LogPosition:
        return LogPosition(self.txid, self.position)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordedEvent) and (self.position, self.hash) == (
            other.position, other.hash)

    def __hash__(self) -> int:
        return hash((self.position, self.hash))

    def __repr__(self) -> str:
        return (f"RecordedEvent(position={self.position}, stream={self.stream_id!r} "
                f"v{self.stream_version}, type={self.type!r})")


@dataclass(frozen=True)
class AppendResult:
    """Where each submitted event is in the log; duplicates keep their original position."""

    positions: tuple[int, ...]
    written: int
    log_end: LogPosition | None = None
    """Where the last event of the append is in log order, when the append knows it without
    a query: on PostgreSQL, an append that wrote every one of its events (its transaction id
    is theirs)."""

    @property
    def duplicates(self) -> int:
        return len(self.positions) - self.written

    @property
    def already_done(self) -> bool:
        return self.written == 0


class _Prepared(NamedTuple):
    """An event serialised once: its payload text is what is hashed, stored and compared."""

    event: Event
    index: int
    stream_id: str
    type_name: str
    schema_version: int
    payload: str
    metadata: str
    effective_at: datetime
    idempotency_key: str


@dataclass(frozen=True)
class LogFilter:
    """Bounds on a read of the whole log (SPEC "two clocks")."""

    until: LogPosition | None = None
    before: LogPosition | None = None
    """Exclusive upper bound in log order: only events strictly before this one (a job
    rerun decides from the log as it stood before its batch's first fact)."""
    effective_until: datetime | None = None
    recorded_until: datetime | None = None
    types: tuple[str, ...] | None = None
    stream_id: str | None = None
    timeless_types: tuple[str, ...] = ()
    """Types read whatever their effective time (reference data such as listings: a trade
    effective before an instrument's listing was recorded still needs the instrument)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class EventStore:
    """The append-only log on one database."""

    def __init__(
        self,
        engine: Engine,
        *,
        event_catalogue: EventCatalogue = catalogue,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.catalogue = event_catalogue
        self.clock = clock
        self.is_postgresql = engine.dialect.name == "postgresql"
        self._recent: dict[int, Event] = {}

    # ------------------------------------------------------------------ append

    def append(
        self,
        pending: Sequence[PendingEvent],
        expected_versions: Mapping[str, int] | None = None,
    ) -> AppendResult:
        """Append atomically; see the module docstring for the guarantees."""
        prepared = self._prepare(pending)
        expected = dict(expected_versions or {})
        # Optimistic first: the unique index on idempotency keys is the durable check, so an
        # append of new facts skips looking them up; a collision rolls back, and the retry
        # looks every key up and writes only what is new.
        check_keys = False
        attempt = 0
        claimed: dict[str, int] = {}
        while True:
            attempt += 1
            try:
                with write_transaction(self.engine) as conn:
                    result = self._append_in(conn, prepared, expected, check_keys, claimed)
                self._remember(prepared, result)
                return result
            except (DBAPIError, psycopg.Error, sqlite3.Error) as exc:
                if attempt >= APPEND_RETRIES_MAX or not is_transient(exc):
                    raise
                check_keys = True
                if not is_racing_duplicate(exc):  # the winner has committed: look now
                    backoff(attempt)

    def _remember(self, prepared: list[_Prepared], result: AppendResult) -> None:
        """Keep the typed events just committed, by position, so that this process's next
        read of them (the read models catching up) need not parse them back from JSON:
        the stored payload is exactly their serialisation."""
        if not result.written:
            return
        if len(self._recent) + len(prepared) > RECENT_EVENTS_MAX:
            self._recent.clear()
        for p, position in zip(prepared, result.positions, strict=True):
            self._recent[position] = p.event

    def _prepare(self, pending: Sequence[PendingEvent]) -> list[_Prepared]:
        if not pending:
            raise EmptyAppend()
        seen: set[str] = set()
        prepared = []
        for index, item in enumerate(pending):
            self.catalogue.validate(item.event)
            if item.idempotency_key in seen:
                raise DuplicateKeyInAppend(item.idempotency_key, index)
            seen.add(item.idempotency_key)
            payload = item.event.model_dump_json()
            # UTF-8 takes at most 4 bytes a character: a short payload needs no encoding.
            if len(payload) * 4 > PAYLOAD_BYTES_MAX:
                size = len(payload.encode("utf-8"))
                if size > PAYLOAD_BYTES_MAX:
                    raise PayloadTooLarge(index, size, PAYLOAD_BYTES_MAX)
            prepared.append(
                _Prepared(
                    event=item.event,
                    index=index,
                    stream_id=item.stream_id,
                    type_name=item.event.type_name,
                    schema_version=item.event.schema_version,
                    payload=payload,
                    metadata=canonical_json(dict(item.metadata)) if item.metadata else "{}",
                    effective_at=(item.effective_at if item.effective_at.tzinfo is UTC
                                  else ensure_utc(item.effective_at)),
                    idempotency_key=item.idempotency_key,
                )
            )
        return prepared

    def _append_in(
        self, conn: Connection, prepared: list[_Prepared], expected: dict[str, int],
        check_keys: bool = True, claimed: dict[str, int] | None = None,
    ) -> AppendResult:
        """One attempt at an append, in `conn`'s transaction. `claimed` carries, from one
        attempt to the next, the positions an earlier attempt of the same append gave its
        events (PostgreSQL): a key found stored at exactly that position was written by that
        attempt, whose COMMIT landed although its acknowledgement was lost, so it counts as
        written by this append (sequence values are never handed out twice)."""
        db = _driver(conn)
        stream_ids = sorted({p.stream_id for p in prepared} | set(expected))
        positions: list[int | None] = [None] * len(prepared)
        if self.is_postgresql and not check_keys:
            # The common case (new facts): locks, stream heads and positions in one round
            # trip; the unique index on keys is the check (see `append`).
            heads, new_positions, txid = self._lock_and_allocate(db, stream_ids,
                                                                 len(prepared))
            self._check_expected(heads, expected)
            result = self._write(db, prepared, positions, heads, new_positions, claimed, 0)
            return replace(result, log_end=LogPosition(txid, max(new_positions)))
        if self.is_postgresql:
            self._lock_streams(db, stream_ids)
        existing = self._existing_keys(db, [p.idempotency_key for p in prepared])
        fresh: list[_Prepared] = []
        ours = 0
        for p in prepared:
            found = existing.get(p.idempotency_key)
            if found is None:
                fresh.append(p)
                continue
            position, stream_id, type_name, payload = found
            if (stream_id, type_name, payload) != (p.stream_id, p.type_name, p.payload):
                raise IdempotencyConflict(p.idempotency_key, p.index, position)
            positions[p.index] = position
            if claimed and claimed.get(p.idempotency_key) == position:
                ours += 1
        if not fresh:
            return AppendResult(tuple(int(x) for x in positions if x is not None), ours)
        heads = self._stream_heads(db, stream_ids)
        self._check_expected(heads, expected)
        new_positions = self._allocate_positions(db, len(fresh))
        return self._write(db, fresh, positions, heads, new_positions, claimed, ours)

    @staticmethod
    def _check_expected(heads: dict[str, tuple[int, str]], expected: dict[str, int]) -> None:
        for stream_id, version in expected.items():
            if version == ANY_VERSION:
                continue
            actual = heads.get(stream_id, (0, GENESIS_HASH))[0]
            if actual != version:
                raise ConcurrencyConflict(stream_id, version, actual)

    def _write(self, db: Any, fresh: list[_Prepared], positions: list[int | None],
               heads: dict[str, tuple[int, str]], new_positions: list[int],
               claimed: dict[str, int] | None, ours: int) -> AppendResult:
        """Write `fresh` at `new_positions` after the streams' `heads`, chaining hashes;
        `positions` (one per event of the append) are filled in."""
        recorded_at = self.clock()
        if recorded_at.tzinfo is not UTC:
            recorded_at = ensure_utc(recorded_at)
        if claimed is not None and self.is_postgresql:
            claimed.update((p.idempotency_key, n) for p, n in zip(fresh, new_positions,
                                                                  strict=True))
        recorded_text = storage_time(recorded_at)
        new_heads: dict[str, tuple[int, str]] = {}
        effective_texts: dict[datetime, str] = {}  # a file's facts share a few times
        # A few events (a trade, a job's closing fact) go in one pipeline with the stream
        # heads: one round trip, where a COPY and the heads' statement took three.
        pipelined = self.is_postgresql and len(fresh) <= PIPELINED_EVENTS_MAX
        collected: list[tuple[Any, ...]] = []
        writer = _collected_rows(collected) if pipelined \
            else _event_rows_writer(db, self.is_postgresql)
        with writer as rows:
            for p, position in zip(fresh, new_positions, strict=True):
                version, previous_hash = new_heads.get(p.stream_id) or heads.get(
                    p.stream_id, (0, GENESIS_HASH)
                )
                version += 1
                event_id = event_id_for(position, p.idempotency_key)
                effective_text = effective_texts.get(p.effective_at)
                if effective_text is None:
                    effective_text = effective_texts[p.effective_at] = storage_time(
                        p.effective_at)
                digest = chain_hash(previous_hash, envelope_bytes(
                    p.stream_id, version, event_id, p.type_name, p.schema_version, p.payload,
                    p.metadata, effective_text, recorded_text, p.idempotency_key))
                new_heads[p.stream_id] = (version, digest)
                rows.add((position, p.stream_id, version, event_id, p.type_name,
                          p.schema_version, p.payload, p.metadata, effective_text,
                          recorded_text, p.idempotency_key, digest))
                positions[p.index] = position
        if pipelined:
            with db.pipeline(), db.cursor() as cur:
                cur.executemany(_INSERT_EVENTS_PG, collected)
                cur.execute(_SAVE_HEADS_PG, _heads_arrays(new_heads))
        else:
            self._save_heads(db, new_heads)
        pause_at(PAUSE_IN_APPEND_ENV)
        return AppendResult(tuple(int(x) for x in positions if x is not None),
                            len(fresh) + ours)

    def _lock_streams(self, db: Any, stream_ids: list[str]) -> None:
        with db.cursor() as cur:
            _take_stream_locks(cur, stream_ids)

    def _lock_and_allocate(self, db: Any, stream_ids: list[str], count: int,
                           ) -> tuple[dict[str, tuple[int, str]], list[int], int]:
        """`_lock_streams`, `_stream_heads` and `_allocate_positions` pipelined, with the
        transaction's id (the `txid` its events get): sent together, in that order, and
        answered in one round trip."""
        with db.cursor() as locks, db.cursor() as heads_cur, db.cursor() as positions_cur, \
                db.cursor() as txid_cur:
            # The results are read after the pipeline closes: closing it syncs (a round
            # trip of its own, so a `sync()` inside the block would cost a second one).
            with db.pipeline():
                _take_stream_locks(locks, stream_ids)
                heads_cur.execute(_STREAM_HEADS_PG, (text_array(stream_ids),))
                positions_cur.execute(_ALLOCATE_POSITIONS_PG, (count,))
                txid_cur.execute(_CURRENT_TXID_PG)
            heads = {stream_id: (version, last_hash)
                     for stream_id, version, last_hash in heads_cur.fetchall()}
            new_positions = sorted(int(r[0]) for r in positions_cur.fetchall())
            txid = int(txid_cur.fetchone()[0])
        return heads, new_positions, txid

    def _existing_keys(self, db: Any, keys: list[str]) -> dict[str, tuple[int, str, str, str]]:
        found: dict[str, tuple[int, str, str, str]] = {}
        cur = db.cursor()
        try:
            if self.is_postgresql:
                cur.execute(_EXISTING_KEYS_PG, (text_array(keys),))
            else:
                cur.execute(_EXISTING_KEYS_SQLITE, (json.dumps(keys),))
            rows = cur.fetchall()
        finally:
            cur.close()
        for key, position, stream_id, type_name, payload in rows:
            found[key] = (position, stream_id, type_name, payload)
        return found

    def _stream_heads(self, db: Any, stream_ids: list[str]) -> dict[str, tuple[int, str]]:
        cur = db.cursor()
        try:
            if self.is_postgresql:
                cur.execute(_STREAM_HEADS_PG, (text_array(stream_ids),))
            else:
                cur.execute(_STREAM_HEADS_SQLITE, (json.dumps(stream_ids),))
            rows = cur.fetchall()
        finally:
            cur.close()
        return {stream_id: (version, last_hash) for stream_id, version, last_hash in rows}

    def _allocate_positions(self, db: Any, count: int) -> list[int]:
        if self.is_postgresql:
            with db.cursor() as cur:
                cur.execute(_ALLOCATE_POSITIONS_PG, (count,))
                return sorted(int(r[0]) for r in cur.fetchall())
        row = db.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence "
                         "WHERE name = 'events'").fetchone()
        last = int(row[0]) if row else 0
        return list(range(last + 1, last + 1 + count))

    def _save_heads(self, db: Any, heads: dict[str, tuple[int, str]]) -> None:
        if self.is_postgresql:
            # One statement over arrays, not one per stream: a trades file moves a stream
            # head per trade.
            with db.cursor() as cur:
                cur.execute(_SAVE_HEADS_PG, _heads_arrays(heads))
            return
        rows = [(s, v, h) for s, (v, h) in heads.items()]
        cur = db.cursor()
        try:
            cur.executemany(_SAVE_HEAD_SQLITE, rows)
        finally:
            cur.close()

    # ------------------------------------------------------------------ read

    def read_all(
        self,
        after: LogPosition = START,
        *,
        bounds: LogFilter | None = None,
        page_size: int = 1_000,
        limit: int | None = None,
    ) -> Iterator[RecordedEvent]:
        """Every visible event after `after`, in log order, a page per query.

        A lost connection (a terminated backend, a server restart) is survived: the read
        reconnects, takes a fresh visibility bound and resumes after the last event it
        returned, which is exactly what a reader resuming from a checkpoint does, so no event
        is skipped or returned twice."""
        bounds = bounds or LogFilter()
        cursor = after
        remaining = limit
        reconnects = 0
        while True:
            try:
                with read_connection(self.engine) as conn:
                    # One bound serves the whole read: every event below it is from a
                    # transaction that had finished when it was taken, so later pages may
                    # use it safely.
                    visible_below = self._visible_bound(conn)
                    read = 0
                    while remaining is None or remaining > 0:
                        size = page_size if remaining is None else min(page_size, remaining)
                        page = self._read_page(cursor, bounds, size, visible_below, conn,
                                               remember=read < REMEMBERED_PER_READ)
                        read += len(page)
                        yield from page
                        if remaining is not None:
                            remaining -= len(page)
                        if len(page) < size:
                            return
                        cursor = page[-1].log_position
                    return
            except (DBAPIError, psycopg.Error) as exc:
                reconnects += 1
                if reconnects > READ_RECONNECTS_MAX or not is_connection_lost(exc):
                    raise
                backoff(reconnects)

    def read_page(self, conn: Connection, after: LogPosition, size: int,
                  visible_below: int | None | _Unset = UNSET) -> list[RecordedEvent]:
        """Up to `size` visible events after `after`, in log order, read on `conn` (a reader
        that keeps its own bookkeeping in the same database, such as a checkpoint, reads both
        on one connection). `visible_below`, when given, is the read bound as a statement
        before this one found it (`READ_BOUND_SQL`); else it is read first. Losing the
        connection is the caller's to retry."""
        if isinstance(visible_below, _Unset):
            visible_below = self._visible_bound(conn)
        return self._read_page(after, LogFilter(), size, visible_below, conn)

    def visible_bound(self) -> int | None:
        """The txid below which every event writer has finished (PostgreSQL; None on
        SQLite, where writers are serialised and nothing commits out of order)."""
        if not self.is_postgresql:
            return None
        with read_connection(self.engine) as conn:
            return self._visible_bound(conn)

    def _visible_bound(self, conn: Connection) -> int | None:
        if not self.is_postgresql:
            return None
        with _driver(conn).cursor() as cur:
            cur.execute(READ_BOUND_SQL, (WRITER_NAMESPACE,))
            bound = int(cur.fetchone()[0])
        conn.rollback()
        return bound

    def _read_page(self, after: LogPosition, bounds: LogFilter, size: int,
                   visible_below: int | None, conn: Connection, remember: bool = True
                   ) -> list[RecordedEvent]:
        params: dict[str, Any] = {"after_txid": after.txid, "after_position": after.position,
                                  "page_size": int(size)}
        if visible_below is not None:
            params["visible_below"] = visible_below
        if bounds.until is not None:
            params["until_txid"], params["until_position"] = bounds.until.txid, \
                bounds.until.position
        if bounds.before is not None:
            params["before_txid"], params["before_position"] = bounds.before.txid, \
                bounds.before.position
        if bounds.effective_until is not None:
            params["effective_until"] = self._time_param(bounds.effective_until)
            params.update((f"timeless_{i}", t) for i, t in enumerate(bounds.timeless_types))
        if bounds.recorded_until is not None:
            params["recorded_until"] = self._time_param(bounds.recorded_until)
        types = bounds.types or ()
        params.update((f"type_{i}", t) for i, t in enumerate(types))
        if bounds.stream_id is not None:
            params["stream_id"] = bounds.stream_id
        query, fixed = _page_query(
            self.is_postgresql, visible_below is not None, bounds.until is not None,
            bounds.before is not None, bounds.effective_until is not None,
            len(bounds.timeless_types) if bounds.effective_until is not None else 0,
            bounds.recorded_until is not None, len(types), bounds.stream_id is not None)
        return self._query_events(query, {**fixed, **params}, conn, remember)

    def _time_param(self, value: datetime) -> Any:
        return ensure_utc(value) if self.is_postgresql else storage_time(value)

    def _query_events(self, sql: str, params: Sequence[Any] | Mapping[str, Any],
                      conn: Connection | None = None, remember: bool = True
                      ) -> list[RecordedEvent]:
        if conn is None:
            with read_connection(self.engine) as own:
                return self._query_events(sql, params, own)
        # PostgreSQL sends the rows in binary: its integers and timestamps then decode
        # without parsing text, a fifth of the fetch's cost on a long read.
        cur = _driver(conn).cursor(binary=True) if self.is_postgresql else _driver(conn).cursor()
        try:
            cur.execute(sql, params)
            rows = cur.fetchall()
        finally:
            cur.close()
        conn.rollback()  # each page its own snapshot; hold nothing open between pages
        catalogue_ = self.catalogue
        text_times = not self.is_postgresql
        found = [RecordedEvent(row, catalogue_, text_times, remember) for row in rows]
        recent = self._recent
        if recent:
            for recorded in found:
                event = recent.pop(recorded.position, None)
                if event is not None and type(event).schema_version == recorded._row[6]:
                    recorded._event = event
        return found

    def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        """One stream in version order (a stream is small: an account, a trade)."""
        return self._query_events(
            _READ_STREAM_PG if self.is_postgresql else _READ_STREAM_SQLITE,
            (stream_id, after_version))

    def stream_version(self, stream_id: str) -> int:
        with read_connection(self.engine) as conn:
            version = conn.execute(
                select(streams.c.version).where(streams.c.stream_id == stream_id)
            ).scalar_one_or_none()
        return int(version or 0)

    def log_position_of(self, position: int) -> LogPosition:
        """The log order key of the event at `position` (for `--until POSITION`)."""
        with read_connection(self.engine) as conn:
            txid = conn.execute(
                select(events.c.txid).where(events.c.position == position)
            ).scalar_one_or_none()
        if txid is None:
            raise UnknownPosition(position)
        return LogPosition(int(txid), position)

    def head(self) -> LogPosition:
        """The last event a reader can see now (START on an empty log)."""
        query = select(events.c.txid, events.c.position)
        bound = self.visible_bound()
        if bound is not None:
            query = query.where(events.c.txid < bound)
        query = query.order_by(events.c.txid.desc(), events.c.position.desc()).limit(1)
        with read_connection(self.engine) as conn:
            row = conn.execute(query).first()
        return START if row is None else LogPosition(int(row.txid), int(row.position))

    def count(self) -> int:
        with read_connection(self.engine) as conn:
            return int(conn.execute(select(func.count()).select_from(events)).scalar_one())



READ_COLUMNS = ("position", "txid", "stream_id", "stream_version", "event_id", "type",
                "schema_version", "payload", "metadata", "effective_at", "recorded_at",
                "idempotency_key", "hash")
"""The columns of a stored event as `RecordedEvent` holds them, in this order."""

# Statements are whole constants or built by SQLAlchemy from the table's metadata: no SQL
# text is ever assembled from strings. Lists of keys travel as one array (PostgreSQL) or
# one JSON array unpacked by json_each (SQLite), so a statement's text never depends on how
# many keys it looks up.
_EXISTING_KEYS_PG = ("SELECT idempotency_key, position, stream_id, type, payload FROM events "
                     "WHERE idempotency_key = ANY(%s::text[])")
_EXISTING_KEYS_SQLITE = ("SELECT idempotency_key, position, stream_id, type, payload FROM "
                         "events WHERE idempotency_key IN (SELECT value FROM json_each(?))")
_WRITER_LOCK_PG = ("SELECT pg_advisory_xact_lock_shared(%s, "
                   "hashtext(current_schema()) & 2147483647)")
"""First, before the transaction has an id: mark it as an event writer of this log (the lock
is database-wide; its second key names the schema)."""
_ALL_STREAMS_LOCK_PG = "SELECT pg_advisory_xact_lock(%s, %s)"
_ALL_STREAMS_SHARED_LOCK_PG = "SELECT pg_advisory_xact_lock_shared(%s, %s)"
_STREAM_LOCKS_PG = ("SELECT count(pg_advisory_xact_lock(%s, b)) FROM "
                    "(SELECT b FROM unnest(%s::integer[]) AS b ORDER BY b) AS ordered")
_ALLOCATE_POSITIONS_PG = (
    "SELECT nextval(sequence) FROM (SELECT pg_get_serial_sequence('events', 'position')"
    "::regclass AS sequence OFFSET 0) AS events_sequence, generate_series(1, %s)")
"""Positions for an append. The sequence is looked up once in a subquery (OFFSET 0 keeps
the planner from pulling the lookup into the row loop, where it cost four fifths of the
statement's time)."""
_CURRENT_TXID_PG = "SELECT pg_current_xact_id()::text::bigint"
"""The id the events of this transaction are stored with (the `txid` column's default)."""
_STREAM_HEADS_PG = ("SELECT stream_id, version, last_hash FROM streams "
                    "WHERE stream_id = ANY(%s::text[])")
_STREAM_HEADS_SQLITE = ("SELECT stream_id, version, last_hash FROM streams "
                        "WHERE stream_id IN (SELECT value FROM json_each(?))")
_SAVE_HEADS_PG = ("INSERT INTO streams (stream_id, version, last_hash) "
                  "SELECT * FROM unnest(%s::text[], %s::text[]::integer[], %s::text[]) "
                  "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
                  "last_hash = excluded.last_hash")
_SAVE_HEAD_SQLITE = ("INSERT INTO streams (stream_id, version, last_hash) VALUES (?, ?, ?) "
                     "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
                     "last_hash = excluded.last_hash")
_READ_STREAM_PG = ("SELECT position, txid, stream_id, stream_version, event_id, type, "
                   "schema_version, payload, metadata, effective_at, recorded_at, "
                   "idempotency_key, hash FROM events WHERE stream_id = %s "
                   "AND stream_version > %s ORDER BY stream_version")
_READ_STREAM_SQLITE = ("SELECT position, txid, stream_id, stream_version, event_id, type, "
                       "schema_version, payload, metadata, effective_at, recorded_at, "
                       "idempotency_key, hash FROM events WHERE stream_id = ? "
                       "AND stream_version > ? ORDER BY stream_version")
_DIALECTS = {True: postgresql_dialect.psycopg.dialect(paramstyle="pyformat"),
             False: sqlite_dialect.pysqlite.dialect(paramstyle="named")}
"""Dialects the page query is compiled for, with the parameter style of the bare driver
(named parameters, so a page's values are passed as one dictionary)."""


@lru_cache(maxsize=256)
def _page_query(postgresql: bool, visible_bound: bool, until: bool, before: bool,
                effective_until: bool, timeless_types: int, recorded_until: bool,
                types: int, stream: bool) -> tuple[str, Mapping[str, Any]]:
    """A page of the log in (txid, position) order under the bounds asked for, compiled
    once per combination of bounds: its text and the values the dialect fixed itself
    (SQLite's OFFSET 0); `_read_page` supplies the others by name."""
    log_order = tuple_(events.c.txid, events.c.position)
    conditions = [log_order > tuple_(bindparam("after_txid"), bindparam("after_position"))]
    if visible_bound:
        conditions.append(events.c.txid < bindparam("visible_below"))
    if until:
        conditions.append(log_order <= tuple_(bindparam("until_txid"),
                                              bindparam("until_position")))
    if before:
        conditions.append(log_order < tuple_(bindparam("before_txid"),
                                             bindparam("before_position")))
    if effective_until:
        in_time = events.c.effective_at <= bindparam("effective_until")
        if timeless_types:
            in_time = or_(in_time, events.c.type.in_(
                [bindparam(f"timeless_{i}") for i in range(timeless_types)]))
        conditions.append(in_time)
    if recorded_until:
        conditions.append(events.c.recorded_at <= bindparam("recorded_until"))
    if types:
        conditions.append(events.c.type.in_([bindparam(f"type_{i}") for i in range(types)]))
    if stream:
        conditions.append(events.c.stream_id == bindparam("stream_id"))
    columns = {column.name: column for column in events.columns}  # `metadata` is keyed `meta`
    query = (select(*(columns[name] for name in READ_COLUMNS))
             .where(and_(*conditions))
             .order_by(events.c.txid, events.c.position)
             .limit(bindparam("page_size")))
    compiled = query.compile(dialect=_DIALECTS[postgresql])
    return str(compiled), {k: v for k, v in compiled.params.items() if v is not None}


_DECODED: dict[tuple[Callable[[str], Event], str], Event] = {}
DECODED_EVENTS_MAX = 50_000
"""Typed events kept by their stored payload (see `_decoded`)."""
REMEMBERED_PER_READ = 5_000
"""Events of one `read_all` whose decoding is remembered; later ones are looked up only."""


def _decoded(read_json: Callable[[str], Event], type_name: str, payload: str,
             remember: bool = True) -> Event:
    """The event a stored payload of the current schema decodes to. A stored event never
    changes and a typed event is frozen, so one decoded copy serves every later read of it
    in this process (the read models catching up, a job reading the marks, a bust reading
    the trades, `verify` replaying): JSON parsing and validation are most of a read's cost.
    The memo is cleared when full, a bound on memory, never a change in what is returned.
    A long read (a replay, a rebuild) stops adding to it after REMEMBERED_PER_READ events:
    keeping every event of a replay alive only makes the garbage collector walk them, for
    events the process will not read again."""
    key = (read_json, payload)
    event = _DECODED.get(key)
    if event is None:
        try:
            event = read_json(payload)
        except ValidationError as exc:
            raise InvalidEventPayload(type_name, exc.errors()) from None
        if remember:
            if len(_DECODED) >= DECODED_EVENTS_MAX:
                _DECODED.clear()
            _DECODED[key] = event
    return event


def forget_decoded_events() -> None:
    """Empty the memo of decoded payloads (the benchmark, to time a replay from storage)."""
    _DECODED.clear()


def _take_stream_locks(cur: Any, stream_ids: list[str]) -> None:
    """The writer's mark, then its streams' locks, always in this order (so no two appends
    wait on each other in a cycle): an append of a few streams holds the all-streams lock
    shared and its buckets exclusively; one of many streams (a trades file, a batch's chunk)
    holds the all-streams lock exclusively instead, one lock where a thousand bucket locks
    cost the server about 18 us each and excluded almost every other writer all the same."""
    cur.execute(_WRITER_LOCK_PG, (WRITER_NAMESPACE,))
    buckets = sorted({zlib.crc32(s.encode("utf-8")) % LOCK_BUCKETS for s in stream_ids})
    if len(buckets) > BUCKETS_LOCKED_MAX:
        cur.execute(_ALL_STREAMS_LOCK_PG, (LOCK_NAMESPACE, ALL_STREAMS_KEY))
        return
    cur.execute(_ALL_STREAMS_SHARED_LOCK_PG, (LOCK_NAMESPACE, ALL_STREAMS_KEY))
    cur.execute(_STREAM_LOCKS_PG, (LOCK_NAMESPACE, buckets))


def _driver(conn: Connection) -> Any:
    """The DBAPI connection under a SQLAlchemy connection, in the same transaction: the hot
    paths talk to psycopg and sqlite3 directly."""
    return conn.connection.driver_connection


COPY_CHUNK_ROWS = 128
"""Rows sent to PostgreSQL's COPY at a time during an append: the server stores each chunk
while the next one's hashes are computed (the client and the server work side by side)."""
_COPY_EVENTS_PG = ("COPY events (position, stream_id, stream_version, event_id, type, "
                   "schema_version, payload, metadata, effective_at, recorded_at, "
                   "idempotency_key, hash) FROM STDIN")


_INSERT_EVENTS_PG = ("INSERT INTO events (position, stream_id, stream_version, event_id, type, "
                     "schema_version, payload, metadata, effective_at, recorded_at, "
                     "idempotency_key, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                     "%s::timestamptz, %s::timestamptz, %s, %s)")
"""`_COPY_EVENTS_PG` as an INSERT, for a few rows sent in a pipeline: the same text in the
same columns (times as the same ISO 8601 text, read by the same input function)."""
PIPELINED_EVENTS_MAX = 50
"""Events of an append up to which they are INSERTed in one pipeline rather than COPYed."""


def _heads_arrays(heads: dict[str, tuple[int, str]]) -> tuple[str, str, str]:
    return (text_array(list(heads)), text_array([str(v) for v, _ in heads.values()]),
            text_array([h for _, h in heads.values()]))


@contextmanager
def _collected_rows(collected: list[tuple[Any, ...]]) -> Iterator[_EventRows]:
    rows = _EventRows(collected.extend, sys.maxsize)
    yield rows
    rows.flush()


class _EventRows:
    """An append's rows on their way into the events table (see `_event_rows_writer`)."""

    def __init__(self, send: Callable[[list[tuple[Any, ...]]], None], chunk: int) -> None:
        self._send = send
        self._chunk = chunk
        self._rows: list[tuple[Any, ...]] = []

    def add(self, row: tuple[Any, ...]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._chunk:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._send(self._rows)
            self._rows = []


@contextmanager
def _event_rows_writer(db: Any, postgresql: bool) -> Iterator[_EventRows]:
    """On PostgreSQL a COPY in text format (times are already ISO 8601 UTC text; `txid`
    takes its column default), fed chunk by chunk as rows are made; on SQLite one
    executemany at the end, under the transaction's next txid."""
    if postgresql:
        with db.cursor() as cur, cur.copy(_COPY_EVENTS_PG) as copy:
            rows = _EventRows(lambda chunk: copy.write(copy_buffer(chunk, 12)),
                              COPY_CHUNK_ROWS)
            yield rows
            rows.flush()
        return
    collected: list[tuple[Any, ...]] = []
    rows = _EventRows(collected.extend, sys.maxsize)
    yield rows
    rows.flush()
    _insert_sqlite_events(db, collected)


def _insert_sqlite_events(db: Any, rows: list[tuple[Any, ...]]) -> None:
    """The rows under the next txid: SQLite runs one writer at a time, so one more than the
    largest stored orders transactions as they commit."""
    txid = int(db.execute("SELECT coalesce(max(txid), 0) + 1 FROM events").fetchone()[0])
    db.executemany(
        "INSERT INTO events (position, txid, stream_id, stream_version, event_id, type, "
        "schema_version, payload, metadata, effective_at, recorded_at, idempotency_key, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(r[0], txid, *r[1:]) for r in rows],
    )
