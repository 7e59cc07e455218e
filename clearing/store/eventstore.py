"""Append and read the log.

Appends are atomic across streams, check an expected version per stream, and are idempotent:
each event carries an idempotency key, an event whose key is already stored with the same
content is not written again (its original position is returned), and the same key with
other content is refused. Nothing is written when any check fails.

Reading never skips an event, even on PostgreSQL where transactions commit out of sequence
order. Each event records the id of the transaction that wrote it; readers order the log by
(txid, position) and only read transactions older than the oldest one still in flight
(`pg_snapshot_xmin`). A transaction that commits late therefore becomes visible only once
nothing older can still appear, and always after everything a reader has already seen. Stream
locks are advisory locks taken before the transaction's first write, so a writer that waited
for a stream gets a later txid than the writer it waited for, and stream versions follow the
log order.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from clearing.domain.clock import ensure_utc
from clearing.domain.event import Event, EventCatalogue, canonical_json, catalogue
from clearing.store.errors import (
    ConcurrencyConflict,
    DuplicateKeyInAppend,
    EmptyAppend,
    IdempotencyConflict,
    PayloadTooLarge,
    UnknownPosition,
)
from clearing.store.hashchain import GENESIS_HASH, canonical_event_bytes, chain_hash
from clearing.store.database import write_transaction
from clearing.store.tables import events, streams

ANY_VERSION = -1
"""Expected version meaning: append whatever version the stream is at."""
NO_STREAM = 0
"""Expected version meaning: the stream must not exist yet."""

PAYLOAD_BYTES_MAX = 65_536
"""Largest canonical JSON payload accepted for one event (documented in README)."""
APPEND_RETRIES_MAX = 5
"""Bound on retries after a transient conflict (a racing duplicate, a deadlock)."""
LOCK_BUCKETS = 1_024
"""Stream locks are hashed into this many advisory locks, so one large append holds a
bounded number of locks whatever its number of streams."""
LOCK_NAMESPACE = 0x434C  # "CL": keeps the store's advisory locks apart from the scheduler's
KEY_CHUNK = 900
EVENT_NAMESPACE = uuid.UUID("5b0f4f1e-6c1a-4a53-9d1e-2f6c9e0c1a77")


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


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored, with its envelope."""

    position: int
    txid: int
    stream_id: str
    stream_version: int
    event_id: str
    type: str
    schema_version: int
    event: Event
    metadata: dict[str, Any]
    effective_at: datetime
    recorded_at: datetime
    idempotency_key: str
    hash: str

    @property
    def log_position(self) -> LogPosition:
        return LogPosition(self.txid, self.position)


@dataclass(frozen=True)
class AppendResult:
    """Where each submitted event is in the log; duplicates keep their original position."""

    positions: tuple[int, ...]
    written: int

    @property
    def duplicates(self) -> int:
        return len(self.positions) - self.written

    @property
    def already_done(self) -> bool:
        return self.written == 0


@dataclass(frozen=True)
class _Prepared:
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

    # ------------------------------------------------------------------ append

    def append(
        self,
        pending: Sequence[PendingEvent],
        expected_versions: Mapping[str, int] | None = None,
    ) -> AppendResult:
        """Append atomically; see the module docstring for the guarantees."""
        prepared = self._prepare(pending)
        expected = dict(expected_versions or {})
        attempt = 0
        while True:
            attempt += 1
            try:
                with write_transaction(self.engine) as conn:
                    return self._append_in(conn, prepared, expected)
            except (IntegrityError, OperationalError, DBAPIError) as exc:
                if attempt >= APPEND_RETRIES_MAX or not _is_transient(exc):
                    raise

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
            payload = canonical_json(item.event.to_payload())
            size = len(payload.encode("utf-8"))
            if size > PAYLOAD_BYTES_MAX:
                raise PayloadTooLarge(index, size, PAYLOAD_BYTES_MAX)
            prepared.append(
                _Prepared(
                    index=index,
                    stream_id=item.stream_id,
                    type_name=item.event.type_name,
                    schema_version=item.event.schema_version,
                    payload=payload,
                    metadata=canonical_json(dict(item.metadata)),
                    effective_at=ensure_utc(item.effective_at),
                    idempotency_key=item.idempotency_key,
                )
            )
        return prepared

    def _append_in(
        self, conn: Connection, prepared: list[_Prepared], expected: dict[str, int]
    ) -> AppendResult:
        stream_ids = sorted({p.stream_id for p in prepared} | set(expected))
        if self.is_postgresql:
            self._lock_streams(conn, stream_ids)
        positions: list[int | None] = [None] * len(prepared)
        existing = self._existing_keys(conn, [p.idempotency_key for p in prepared])
        fresh: list[_Prepared] = []
        for p in prepared:
            found = existing.get(p.idempotency_key)
            if found is None:
                fresh.append(p)
                continue
            position, stream_id, type_name, payload = found
            if (stream_id, type_name, payload) != (p.stream_id, p.type_name, p.payload):
                raise IdempotencyConflict(p.idempotency_key, p.index, position)
            positions[p.index] = position
        if not fresh:
            return AppendResult(tuple(int(x) for x in positions if x is not None), 0)

        heads = self._stream_heads(conn, stream_ids)
        for stream_id, version in expected.items():
            if version == ANY_VERSION:
                continue
            actual = heads.get(stream_id, (0, GENESIS_HASH))[0]
            if actual != version:
                raise ConcurrencyConflict(stream_id, version, actual)

        recorded_at = self.clock()
        txid = self._next_txid(conn)
        new_positions = self._allocate_positions(conn, len(fresh))
        rows = []
        new_heads: dict[str, tuple[int, str]] = {}
        for p, position in zip(fresh, new_positions, strict=True):
            version, previous_hash = new_heads.get(p.stream_id) or heads.get(
                p.stream_id, (0, GENESIS_HASH)
            )
            version += 1
            event_id = str(uuid.uuid5(EVENT_NAMESPACE, p.idempotency_key))
            digest = chain_hash(
                previous_hash,
                canonical_event_bytes(
                    stream_id=p.stream_id,
                    stream_version=version,
                    event_id=event_id,
                    type_name=p.type_name,
                    schema_version=p.schema_version,
                    payload=p.payload,
                    metadata=p.metadata,
                    effective_at=p.effective_at,
                    recorded_at=recorded_at,
                    idempotency_key=p.idempotency_key,
                ),
            )
            new_heads[p.stream_id] = (version, digest)
            row = {
                "position": position,
                "stream_id": p.stream_id,
                "stream_version": version,
                "event_id": event_id,
                "type": p.type_name,
                "schema_version": p.schema_version,
                "payload": p.payload,
                "meta": p.metadata,
                "effective_at": p.effective_at,
                "recorded_at": recorded_at,
                "idempotency_key": p.idempotency_key,
                "hash": digest,
            }
            if txid is not None:
                row["txid"] = txid
            rows.append(row)
            positions[p.index] = position
        conn.execute(events.insert(), rows)
        self._save_heads(conn, new_heads)
        return AppendResult(tuple(int(x) for x in positions if x is not None), len(fresh))

    def _lock_streams(self, conn: Connection, stream_ids: list[str]) -> None:
        buckets = sorted({zlib.crc32(s.encode("utf-8")) % LOCK_BUCKETS for s in stream_ids})
        conn.execute(
            text(
                "SELECT count(pg_advisory_xact_lock(:ns, b)) FROM "
                "(SELECT b FROM unnest(CAST(:buckets AS integer[])) AS b ORDER BY b) AS ordered"
            ),
            {"ns": LOCK_NAMESPACE, "buckets": buckets},
        )

    def _existing_keys(
        self, conn: Connection, keys: list[str]
    ) -> dict[str, tuple[int, str, str, str]]:
        found: dict[str, tuple[int, str, str, str]] = {}
        columns = (events.c.idempotency_key, events.c.position, events.c.stream_id,
                   events.c.type, events.c.payload)
        for chunk in _chunks(keys, KEY_CHUNK if not self.is_postgresql else 20_000):
            query = select(*columns).where(events.c.idempotency_key.in_(chunk))
            for row in conn.execute(query):
                found[row.idempotency_key] = (row.position, row.stream_id, row.type, row.payload)
        return found

    def _stream_heads(self, conn: Connection, stream_ids: list[str]) -> dict[str, tuple[int, str]]:
        heads: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(stream_ids, KEY_CHUNK if not self.is_postgresql else 20_000):
            query = select(streams.c.stream_id, streams.c.version, streams.c.last_hash).where(
                streams.c.stream_id.in_(chunk)
            )
            for row in conn.execute(query):
                heads[row.stream_id] = (row.version, row.last_hash)
        return heads

    def _next_txid(self, conn: Connection) -> int | None:
        if self.is_postgresql:
            return None  # the column default records pg_current_xact_id()
        return int(conn.execute(select(func.coalesce(func.max(events.c.txid), 0))).scalar_one()) + 1

    def _allocate_positions(self, conn: Connection, count: int) -> list[int]:
        if self.is_postgresql:
            rows = conn.execute(
                text(
                    "SELECT nextval(pg_get_serial_sequence('events', 'position')) "
                    "FROM generate_series(1, :n)"
                ),
                {"n": count},
            )
            return sorted(int(r[0]) for r in rows)
        last = conn.execute(
            text("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'events'")
        ).scalar_one()
        return list(range(int(last) + 1, int(last) + 1 + count))

    def _save_heads(self, conn: Connection, heads: dict[str, tuple[int, str]]) -> None:
        rows = [{"stream_id": s, "version": v, "last_hash": h} for s, (v, h) in heads.items()]
        insert = pg_insert if self.is_postgresql else sqlite_insert
        statement = insert(streams)
        statement = statement.on_conflict_do_update(
            index_elements=[streams.c.stream_id],
            set_={"version": statement.excluded.version,
                  "last_hash": statement.excluded.last_hash},
        )
        conn.execute(statement, rows)

    # ------------------------------------------------------------------ read

    def read_all(
        self,
        after: LogPosition = START,
        *,
        bounds: LogFilter | None = None,
        page_size: int = 1_000,
        limit: int | None = None,
    ) -> Iterator[RecordedEvent]:
        """Every visible event after `after`, in log order, a page per query."""
        bounds = bounds or LogFilter()
        cursor = after
        remaining = limit
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(page_size, remaining)
            page = self._read_page(cursor, bounds, size)
            yield from page
            if remaining is not None:
                remaining -= len(page)
            if len(page) < size:
                return
            cursor = page[-1].log_position

    def _read_page(self, after: LogPosition, bounds: LogFilter, size: int) -> list[RecordedEvent]:
        query = select(events).where(
            tuple_(events.c.txid, events.c.position) > tuple_(after.txid, after.position)
        )
        if self.is_postgresql:
            query = query.where(
                events.c.txid < text("(pg_snapshot_xmin(pg_current_snapshot())::text)::bigint")
            )
        if bounds.until is not None:
            query = query.where(
                tuple_(events.c.txid, events.c.position)
                <= tuple_(bounds.until.txid, bounds.until.position)
            )
        if bounds.effective_until is not None:
            condition = events.c.effective_at <= bounds.effective_until
            if bounds.timeless_types:
                condition = condition | events.c.type.in_(bounds.timeless_types)
            query = query.where(condition)
        if bounds.recorded_until is not None:
            query = query.where(events.c.recorded_at <= bounds.recorded_until)
        if bounds.types:
            query = query.where(events.c.type.in_(bounds.types))
        if bounds.stream_id is not None:
            query = query.where(events.c.stream_id == bounds.stream_id)
        query = query.order_by(events.c.txid, events.c.position).limit(size)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [self._decode(row) for row in rows]

    def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        """One stream in version order (a stream is small: an account, a trade)."""
        query = (
            select(events)
            .where(events.c.stream_id == stream_id, events.c.stream_version > after_version)
            .order_by(events.c.stream_version)
        )
        with self.engine.connect() as conn:
            return [self._decode(row) for row in conn.execute(query)]

    def stream_version(self, stream_id: str) -> int:
        with self.engine.connect() as conn:
            version = conn.execute(
                select(streams.c.version).where(streams.c.stream_id == stream_id)
            ).scalar_one_or_none()
        return int(version or 0)

    def log_position_of(self, position: int) -> LogPosition:
        """The log order key of the event at `position` (for `--until POSITION`)."""
        with self.engine.connect() as conn:
            txid = conn.execute(
                select(events.c.txid).where(events.c.position == position)
            ).scalar_one_or_none()
        if txid is None:
            raise UnknownPosition(position)
        return LogPosition(int(txid), position)

    def head(self) -> LogPosition:
        """The last event a reader can see now (START on an empty log)."""
        query = select(events.c.txid, events.c.position)
        if self.is_postgresql:
            query = query.where(
                events.c.txid < text("(pg_snapshot_xmin(pg_current_snapshot())::text)::bigint")
            )
        query = query.order_by(events.c.txid.desc(), events.c.position.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return START if row is None else LogPosition(int(row.txid), int(row.position))

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(events)).scalar_one())

    def _decode(self, row: Any) -> RecordedEvent:
        model = self.catalogue.model(row.type)
        if row.schema_version == model.schema_version:
            event = model.model_validate_json(row.payload)
        else:
            event = self.catalogue.decode(row.type, row.schema_version, json.loads(row.payload))
        return RecordedEvent(
            position=int(row.position),
            txid=int(row.txid),
            stream_id=row.stream_id,
            stream_version=row.stream_version,
            event_id=row.event_id,
            type=row.type,
            schema_version=row.schema_version,
            event=event,
            metadata=json.loads(row.meta),
            effective_at=row.effective_at,
            recorded_at=row.recorded_at,
            idempotency_key=row.idempotency_key,
            hash=row.hash,
        )


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_TRANSIENT_SQLSTATES = {"40001", "40P01", "23505"}


def _is_transient(exc: Exception) -> bool:
    """Racing duplicates, serialization failures and deadlocks resolve on a retry; a retry
    re-runs the idempotency check, so it never writes twice."""
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _TRANSIENT_SQLSTATES:
        return True
    message = str(orig or exc).lower()
    return isinstance(exc, IntegrityError) and "unique" in message or "database is locked" in message
