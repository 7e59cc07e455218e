"""Keeps the read models up to date with the log, exactly once, and rebuilds them.

Each projection has a checkpoint (the last fact it applied, in log order). A batch of facts is
applied in one transaction that also moves the checkpoint, after locking the checkpoint row,
so a crash never applies a fact twice or skips one, and two runners never apply the same
batch. A rebuild folds every fact into fresh tables with the same code, then swaps them in
within one transaction, so a reader sees either the old model or the new, never a half.

A catch-up that meets a transient failure (a lost connection, a serialization failure or a
deadlock; see `clearing.store.failures`) starts again from the checkpoint, at most
`RETRY_ATTEMPTS_MAX` times in all: the page it was applying was rolled back with its
checkpoint, or, when only the acknowledgement of its COMMIT was lost, the checkpoint already
says so; either way no fact is applied twice or skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from psycopg import sql as pg_sql
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, MetaData, Table, bindparam, inspect, select, text

from clearing.domain.ledger import Fact
from clearing.projections import kept
from clearing.projections.ledger import LedgerProjection, Tables
from clearing.store.eventstore import (READ_BOUND_SQL, START, UNSET, WRITER_NAMESPACE,
                                      EventStore, LogPosition)
from clearing.store.database import read_connection, write_transaction
from clearing.store.failures import retrying
from clearing.store.testhooks import PAUSE_IN_PROJECTION_ENV, pause_at
from clearing.store.tables import checkpoints, events

PAGE_SIZE = 20_000
"""Facts per catch-up page (and transaction). Each page loads the rows its facts touch and
writes back every row it changed, so a row touched in several pages is read and rewritten in
each. On a 100,000-trade import, pages of 20,000 instead of 5,000 cut the rows upserted
(positions 168,643 -> 112,746, balances 126,463 -> 49,147) and the time loading touched rows
(3.4 -> 1.0 s); the end-of-day batch's peak memory stayed at 1,429 MB (full scale)."""
SHADOW_SUFFIX = "__rebuild"

# Built once: every catch-up runs them, and building and keying a statement costs more than
# running it. The INSERT is plain SQL because SQLAlchemy's dialect-specific upserts are never
# cached, so they would be compiled again on every call.
_READ_CHECKPOINT = select(checkpoints.c.txid, checkpoints.c.position).where(
    checkpoints.c.name == bindparam("name"))
_LOG_HEAD = select(events.c.txid, events.c.position).order_by(
    events.c.txid.desc(), events.c.position.desc()).limit(1)
_PROBE_CHECKPOINT = select(
    checkpoints.c.txid, checkpoints.c.position,
    _LOG_HEAD.with_only_columns(events.c.txid).scalar_subquery().label("head_txid"),
    _LOG_HEAD.with_only_columns(events.c.position).scalar_subquery().label("head_position"),
    select(events.c.hash).where(events.c.position == checkpoints.c.position)
    .scalar_subquery().label("checkpoint_hash"),
).where(checkpoints.c.name == bindparam("name"))
"""A checkpoint, the hash of the fact it stands at (which names that fact, whatever the
database) and the last visible fact of the log, in one query (one-row index probes): a
catch-up with nothing to do, the common case, costs this one round trip. Facts still in
flight cannot hide below a checkpoint: readers stop below the oldest append in flight, so a
checkpoint is always older than any append not yet committed."""
_PROBE_CHECKPOINT_PG = pg_sql.SQL("""
SELECT c.txid, c.position, h.txid AS head_txid, h.position AS head_position,
       (SELECT e.hash FROM events e WHERE e.position = c.position) AS checkpoint_hash,
       CASE WHEN (h.txid, h.position) > (c.txid, c.position) THEN ({}) END AS visible_below
FROM checkpoints c
LEFT JOIN LATERAL (SELECT txid, position FROM events
                   ORDER BY txid DESC, position DESC LIMIT 1) h ON true
WHERE c.name = %s
""").format(pg_sql.SQL(READ_BOUND_SQL)).as_string(None)
"""`_PROBE_CHECKPOINT` on PostgreSQL, with the read bound (`READ_BOUND_SQL`) when the log
holds facts past the checkpoint: the page read that follows then needs no query of its own
for it. The server computes the bound only then (a CASE branch not taken leaves its
subquery unexecuted: the bound reads `pg_locks`, the dearest part of a probe). Read in a
statement before the page's, as `read_page` would read it."""
_ADD_CHECKPOINT = text("INSERT INTO checkpoints (name, txid, position) VALUES (:name, 0, 0) "
                       "ON CONFLICT (name) DO NOTHING")
_CLAIM_CHECKPOINT_PG_SQL = ("INSERT INTO checkpoints (name, txid, position) VALUES (%s, 0, 0) "
                            "ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name "
                            "RETURNING txid, position")
"""PostgreSQL: add the checkpoint if missing and lock it, in one statement (an upsert locks
the row it meets and returns it as it stands once the lock is granted, as SELECT ... FOR
UPDATE would). Sent by psycopg itself, in a pipeline."""
_SAVE_CHECKPOINT = text("UPDATE checkpoints SET txid = :txid, position = :position "
                        "WHERE name = :name")


class Projection(Protocol):
    name: str
    tables: tuple[Table, ...]

    def apply(self, conn: Connection, facts: Sequence[Fact], tables: Tables) -> Any: ...


def default_projections() -> list[Projection]:
    return [LedgerProjection()]


class ProjectionRunner:
    def __init__(self, store: EventStore, projections: list[Projection] | None = None,
                 page_size: int = PAGE_SIZE) -> None:
        self.store = store
        self.engine = store.engine
        self.projections = projections if projections is not None else default_projections()
        self.page_size = page_size
        self._reached: dict[str, LogPosition] = {}
        self._seen: dict[str, tuple[LogPosition, str | None]] = {}

    # ------------------------------------------------------------ live updates

    def catch_up(self) -> int:
        """Apply every fact after each projection's checkpoint; returns how many were applied."""
        applied = 0
        for projection in self.projections:
            applied += retrying(lambda p=projection: self._catch_up(p))  # type: ignore[misc]
        return applied

    def _catch_up(self, projection: Projection) -> int:
        tables = {t.name: t for t in projection.tables}
        applied = 0
        while True:
            with read_connection(self.engine) as conn:
                probe = self._probe(conn, projection.name)
                checkpoint = self._note(projection.name, START if probe is None else
                                        LogPosition(int(probe.txid), int(probe.position)))
                checkpoint_hash = None if probe is None else probe.checkpoint_hash
                self._seen[projection.name] = (checkpoint, checkpoint_hash)
                if probe is not None and (probe.head_txid is None or (
                        probe.head_txid, probe.head_position) <= (probe.txid, probe.position)):
                    return applied
                page = self.store.read_page(
                    conn, checkpoint, self.page_size,
                    UNSET if probe is None or not self.store.is_postgresql
                    else int(probe.visible_below))
            if not page:
                return applied
            with write_transaction(self.engine) as conn:
                if self._lock_checkpoint(conn, projection.name) != checkpoint:
                    continue  # another runner applied this page meanwhile; read again
                keeps = isinstance(projection, LedgerProjection)
                if keeps:
                    folded = projection.apply(conn, page, tables,
                                              kept.rows_known_at(self.engine, checkpoint,
                                                                checkpoint_hash))
                else:
                    projection.apply(conn, page, tables)
                pause_at(PAUSE_IN_PROJECTION_ENV)
                self._save_checkpoint(conn, projection.name, page[-1].log_position)
            if keeps:
                # Committed: the kept book follows.
                kept.applied(self.engine, checkpoint, checkpoint_hash, page, folded)
            self._note(projection.name, page[-1].log_position)  # committed
            self._seen[projection.name] = (page[-1].log_position, page[-1].hash)
            applied += len(page)
            if len(page) < self.page_size:
                return applied  # the log held nothing more when this page was read

    @staticmethod
    def _probe(conn: Connection, name: str) -> Any:
        """The checkpoint `name` (None when it has none yet), the hash of its fact, the log's
        head and, on PostgreSQL when the head is past the checkpoint, the read bound."""
        if conn.dialect.name != "postgresql":
            return conn.execute(_PROBE_CHECKPOINT, {"name": name}).first()
        with conn.connection.driver_connection.cursor(row_factory=namedtuple_row) as cur:
            cur.execute(_PROBE_CHECKPOINT_PG, (WRITER_NAMESPACE, name))
            return cur.fetchone()

    def checkpoint(self, name: str) -> LogPosition:
        with read_connection(self.engine) as conn:
            return self._read_checkpoint(conn, name)

    def reached(self, name: str) -> LogPosition:
        """The checkpoint of `name` as this runner last read or moved it (no query): the
        stored one is never behind it, since checkpoints only move forward."""
        return self._reached.get(name, START)

    def last_seen(self, name: str) -> tuple[LogPosition, str | None] | None:
        """The checkpoint of `name` as this runner's last probe found it or its last commit
        left it, with the hash of the fact there (None at the start of the log): the fact
        that names the position in this log, whatever else shares the engine."""
        return self._seen.get(name)

    def _read_checkpoint(self, conn: Connection, name: str) -> LogPosition:
        row = conn.execute(_READ_CHECKPOINT, {"name": name}).first()
        return self._note(name, START if row is None
                          else LogPosition(int(row.txid), int(row.position)))

    def _note(self, name: str, at: LogPosition) -> LogPosition:
        self._reached[name] = max(at, self._reached.get(name, START))
        return at

    def _lock_checkpoint(self, conn: Connection, name: str) -> LogPosition:
        if conn.dialect.name == "postgresql":
            # Pipelined: the transaction's BEGIN goes with it, one round trip for both.
            # (Read after the pipeline closes: closing it is the one sync.)
            db = conn.connection.driver_connection
            with db.cursor() as cur:
                with db.pipeline():
                    cur.execute(_CLAIM_CHECKPOINT_PG_SQL, (name,))
                txid, position = cur.fetchone()
            return self._note(name, LogPosition(int(txid), int(position)))
        else:  # the write transaction already holds SQLite's one write lock
            conn.execute(_ADD_CHECKPOINT, {"name": name})
            row = conn.execute(_READ_CHECKPOINT, {"name": name}).one()
        return self._note(name, LogPosition(int(row.txid), int(row.position)))

    def _save_checkpoint(self, conn: Connection, name: str, at: LogPosition) -> None:
        conn.execute(_SAVE_CHECKPOINT, {"name": name, "txid": at.txid,
                                        "position": at.position})

    # ------------------------------------------------------------ rebuild

    def rebuild(self) -> int:
        """Rebuild every projection from the first fact into fresh tables, then swap."""
        folded = 0
        for projection in self.projections:
            folded += self._rebuild(projection)
        return folded

    def _rebuild(self, projection: Projection) -> int:
        with write_transaction(self.engine) as conn:
            shadows = {t.name: _create_shadow(conn, t) for t in projection.tables}
        position = START
        folded = 0
        while True:
            page = list(self.store.read_all(position, page_size=self.page_size,
                                            limit=self.page_size))
            if page:
                with write_transaction(self.engine) as conn:
                    projection.apply(conn, page, shadows)
                position = page[-1].log_position
                folded += len(page)
                continue
            with write_transaction(self.engine) as conn:
                self._lock_checkpoint(conn, projection.name)
                # Facts that arrived while folding: apply them under the lock, then swap.
                late = list(self.store.read_all(position))
                if late:
                    projection.apply(conn, late, shadows)
                    position = late[-1].log_position
                    folded += len(late)
                for table in projection.tables:
                    _swap(conn, table.name, shadows[table.name].name)
                self._save_checkpoint(conn, projection.name, position)
            return folded


def _create_shadow(conn: Connection, table: Table) -> Table:
    """A fresh, empty copy of `table` with the same columns, keys and indexes.

    PostgreSQL copies it itself (`LIKE ... INCLUDING ALL`), the names composed by psycopg;
    SQLite's copy is the table as reflected from the database, created by SQLAlchemy under
    the new name, its indexes suffixed (SQLite index names are schema-wide)."""
    shadow_name = table.name + SHADOW_SUFFIX
    if conn.dialect.name == "postgresql":
        with conn.connection.driver_connection.cursor() as cur:
            cur.execute(pg_sql.SQL("DROP TABLE IF EXISTS {}").format(
                pg_sql.Identifier(shadow_name)))
            # Without defaults: a serial column's default names the original table's
            # sequence, which would then refuse to be dropped at the swap. Read models write
            # every column.
            cur.execute(pg_sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL EXCLUDING DEFAULTS)")
                        .format(pg_sql.Identifier(shadow_name), pg_sql.Identifier(table.name)))
    else:
        stored = Table(table.name, MetaData(), autoload_with=conn)
        copy = stored.to_metadata(MetaData(), name=shadow_name)
        for index in copy.indexes:
            index.name = f"{index.name}{SHADOW_SUFFIX}"
        copy.drop(conn, checkfirst=True)
        copy.create(conn)
    return Table(shadow_name, MetaData(), *(c._copy() for c in table.columns))


def _swap(conn: Connection, name: str, shadow: str) -> None:
    if conn.dialect.name == "postgresql":
        with conn.connection.driver_connection.cursor() as cur:
            cur.execute(pg_sql.SQL("DROP TABLE {}").format(pg_sql.Identifier(name)))
            cur.execute(pg_sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                pg_sql.Identifier(shadow), pg_sql.Identifier(name)))
        return
    operations = Operations(MigrationContext.configure(conn))
    operations.drop_table(name)
    operations.rename_table(shadow, name)
    # Index names keep the shadow suffix after the rename: give them their names back.
    for index in inspect(conn).get_indexes(name):
        index_name = index["name"]
        if index_name and index_name.endswith(SHADOW_SUFFIX):
            operations.drop_index(index_name, table_name=name)
            operations.create_index(index_name[: -len(SHADOW_SUFFIX)], name,
                                    list(index["column_names"]), unique=index["unique"])
