"""The ledger's stored read models, kept by the domain's `evolve`.

A batch of facts is applied by loading exactly the rows they touch into a `LedgerState`,
running `evolve` over the facts, and writing those rows back, in the transaction that moves
the checkpoint. The tables are handed in, so a rebuild runs this same code into fresh tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from functools import lru_cache
from operator import itemgetter
from sys import intern
from typing import Any, NamedTuple

import psycopg
from psycopg import sql as pg_sql
from psycopg.rows import namedtuple_row, tuple_row
from sqlalchemy import (
    Connection,
    Select,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from clearing.domain.events import TradeLeg
from clearing.domain.instruments import Instrument, InstrumentKind, OptionType
from clearing.domain.ledger import (
    Account,
    LedgerState,
    MarginState,
    Mark,
    Position,
    StatementLine,
    TradeRecord,
    Touched,
    evolve,
    touched,
)
from clearing.domain.ledger import Fact
from clearing.domain.risk_parameters import ParameterChange
from clearing.projections import tables as t
from clearing.store.copy_text import copy_buffer
from clearing.store.text_arrays import text_array

KEY_CHUNK = 2_000
COPY_ROWS_MIN = 50
"""Rows from which PostgreSQL upserts go through COPY and a scratch table (see
`_upsert_postgresql`)."""
PLAIN_ROWS_PAGE = 20_000
"""Rows per fetch when a whole table is read through a server-side cursor."""
Tables = Mapping[str, Table]


class LedgerProjection:
    """Balances, positions, statement, trades, marks, accounts and instruments."""

    name = "ledger"
    tables = t.LEDGER_TABLES

    def apply(self, conn: Connection, facts: Sequence[Fact], tables: Tables,
              known: Callable[[Touched], LedgerState | None] | None = None) -> LedgerState:
        """Fold `facts` into the stored rows they touch; returns those rows as folded.
        `known` may supply the rows as they stand (a process's kept book) instead of
        reading them; it returns None when it cannot."""
        keys = touched([f.event for f in facts])
        state = known(keys) if known is not None else None
        if state is None:
            state = load_state(conn, tables, keys)
        before = state_rows(state)
        for fact in facts:
            evolve(state, fact)
        save_state(conn, tables, state, unchanged_from=before)
        return state


def _in(conn: Connection, table: Table, columns: list[str], keys: Iterable[Any],
        plain: bool = False) -> list[Any]:
    """The rows of `table` with these keys, each with the table's columns in order; with
    `plain`, as bare tuples on PostgreSQL (no named tuple per row: a fold of a batch
    payment reads a hundred thousand positions) and to be unpacked, not read by name."""
    keys = list(keys)
    if not keys:
        return []
    if conn.dialect.name == "postgresql":
        return _in_postgresql(conn, table, columns, keys, plain)
    if len(columns) > 1:
        return list(conn.execute(_select_by_json_keys(table, tuple(columns)),
                                 {"keys": json.dumps(keys)}))
    rows: list[Any] = []
    query = _select_in(table, columns[0])
    for start in range(0, len(keys), KEY_CHUNK):
        rows.extend(conn.execute(query, {"keys": keys[start : start + KEY_CHUNK]}))
    return rows


@lru_cache(maxsize=256)
def _select_in(table: Table, column: str) -> Select[Any]:
    """The rows of `table` whose `column` is among the keys bound as `keys`, built once:
    building and keying a statement costs more than running it on a few rows."""
    return select(table).where(table.c[column].in_(bindparam("keys", expanding=True)))


@lru_cache(maxsize=256)
def _select_by_json_keys(table: Table, columns: tuple[str, ...]) -> Select[Any]:
    """SQLite: the rows of `table` whose `columns` match a key of the JSON array of arrays
    bound as `keys`, looked up key by key in the primary key (`json_each` drives the join).
    A row-value IN list is answered by scanning the whole table for each list: 9 of a
    100,000-trade import's 41 s of catch-up went to scanning positions that way."""
    keys = func.json_each(bindparam("keys")).table_valued("value").alias("k")
    matches = and_(*(table.c[column] == func.json_extract(keys.c.value, _JSON_ITEM[index])
                     for index, column in enumerate(columns)))
    return select(table).select_from(keys.join(table, matches))


_JSON_ITEM = tuple(literal_column("'$[%d]'" % index) for index in range(4))
"""`json_extract` paths of a key's first four values, as SQL literals."""


@lru_cache(maxsize=256)
def _select_all(table: Table) -> Select[Any]:
    return select(table)


def _in_postgresql(conn: Connection, table: Table, columns: list[str],
                   keys: list[Any], plain: bool = False) -> list[Any]:
    """Rows by key through a join on unnested arrays: one statement, index lookups, however
    many keys (an IN list of row values is checked row by row)."""
    db = conn.connection.driver_connection
    key_columns = [keys] if len(columns) == 1 else [list(c) for c in zip(*keys, strict=True)]
    selected = tuple(c.name for c in table.columns)
    if len(columns) == 1 and not all(isinstance(key, str) for key in keys):
        params: tuple[Any, ...] = (keys,)  # not text (a position): psycopg sends the list
        statement = _pg_select_by_keys(table.name, selected, tuple(columns), textual=False)
    else:
        params = tuple(text_array(column) for column in key_columns)
        statement = _pg_select_by_keys(table.name, selected, tuple(columns), textual=True)
    with db.cursor(row_factory=tuple_row if plain else namedtuple_row) as cur:
        cur.execute(statement, params)
        return cur.fetchall()


@lru_cache(maxsize=256)
def _pg_select_by_keys(table: str, selected: tuple[str, ...], columns: tuple[str, ...],
                       textual: bool) -> str:
    """`_in_postgresql`'s statement, composed by psycopg once per table and key: the
    `selected` columns (named, so that rows follow the table's description whatever the
    stored column order), keys bound as text[] array literals (`text_array`), or as a list
    when not text."""
    name = pg_sql.Identifier(table)
    if len(columns) == 1:
        statement = pg_sql.SQL("SELECT {} FROM {} WHERE {} = ANY({})").format(
            pg_sql.SQL(", ").join(map(pg_sql.Identifier, selected)),
            name, pg_sql.Identifier(columns[0]),
            pg_sql.SQL("%s::text[]" if textual else "%s"))
    else:
        keys_as = [pg_sql.Identifier(f"k{i}") for i in range(len(columns))]
        statement = pg_sql.SQL("SELECT {} FROM {} t JOIN unnest({}) AS k({}) ON {}").format(
            pg_sql.SQL(", ").join(pg_sql.SQL("t.{}").format(pg_sql.Identifier(c))
                                  for c in selected),
            name,
            pg_sql.SQL(", ").join(pg_sql.SQL("%s::text[]") for _ in columns),
            pg_sql.SQL(", ").join(keys_as),
            pg_sql.SQL(" AND ").join(
                pg_sql.SQL("t.{} = k.{}").format(pg_sql.Identifier(c), key)
                for c, key in zip(columns, keys_as, strict=True)))
    return statement.as_string(None)


def _plain_rows(conn: Connection, table: Table, columns: list[str],
                as_text: Collection[str] = ()) -> Iterator[tuple[Any, ...]]:
    """Every row of `table` as plain tuples of `columns`, values as the domain holds them
    (those named in `as_text` as their exact text instead). On PostgreSQL straight from the
    driver through a server-side cursor: a million rows without a result layer's per-value
    processing, and never all of them in memory at once."""
    if conn.dialect.name != "postgresql":
        selected = [cast(table.c[c], Text) if c in as_text else table.c[c] for c in columns]
        yield from conn.execute(select(*selected)).tuples()
        return
    listed = pg_sql.SQL(", ").join(
        pg_sql.SQL("{}::text").format(pg_sql.Identifier(c)) if c in as_text
        else pg_sql.Identifier(c) for c in columns)
    statement = pg_sql.SQL("SELECT {} FROM {}").format(listed, pg_sql.Identifier(table.name))
    with conn.connection.driver_connection.cursor(name=f"all_{table.name}") as cur:
        cur.execute(statement)
        while rows := cur.fetchmany(PLAIN_ROWS_PAGE):
            yield from rows


def instrument_from_row(row: Any) -> Instrument:
    """The instrument a stored row holds. Rows are read far more often than instruments are
    listed and an `Instrument` is frozen, so one built copy serves every row with exactly
    these values, decimals to the digit (the memo is cleared when full: a bound on memory
    only)."""
    key = (row.symbol, row.kind, row.underlying, row.settlement_asset, row.expiry,
           None if row.strike is None else str(row.strike), str(row.multiplier),
           row.option_type)
    instrument = _INSTRUMENTS.get(key)
    if instrument is None:
        instrument = Instrument.model_construct(
            symbol=row.symbol, kind=InstrumentKind(row.kind), underlying=row.underlying,
            settlement_asset=row.settlement_asset, expiry=row.expiry, strike=row.strike,
            option_type=None if row.option_type is None else OptionType(row.option_type),
            multiplier=row.multiplier,
        )
        if len(_INSTRUMENTS) >= INSTRUMENTS_CACHED_MAX:
            _INSTRUMENTS.clear()
        _INSTRUMENTS[key] = instrument
    return instrument


_INSTRUMENTS: dict[tuple[Any, ...], Instrument] = {}
INSTRUMENTS_CACHED_MAX = 100_000


def position_from_row(row: Any) -> Position:
    return Position(row.quantity, row.average_entry_price, row.settlement_basis,
                    row.realised_pnl)


def margin_state_from_row(row: Any) -> MarginState:
    return MarginState(row.status, row.equity, row.initial, row.maintenance, row.since,
                       row.position)


def change_from_row(row: Any) -> ParameterChange:
    return ParameterChange(row.name, row.underlying, row.value, row.effective_at, row.position)


def load_state(conn: Connection, tables: Tables, keys: Any) -> LedgerState:
    state = LedgerState()
    for row in _in(conn, tables["accounts"], ["account_id"], keys.accounts):
        state.accounts[row.account_id] = Account(row.account_id, row.owner, row.margin_model)
    for row in _in(conn, tables["margin_states"], ["account_id"], keys.margin_states):
        state.margin_states[row.account_id] = margin_state_from_row(row)
    for row in _in(conn, tables["instruments"], ["symbol"], keys.instruments):
        state.instruments[row.symbol] = instrument_from_row(row)
    for row in _in(conn, tables["settlements"], ["symbol"], keys.instruments):
        state.settlements[row.symbol] = row.settlement_price
    balances, positions = state.balances, state.positions
    for account_id, asset, balance in _in(conn, tables["balances"], ["account_id", "asset"],
                                          keys.balances, plain=True):
        balances[(account_id, asset)] = balance
    for account_id, symbol, quantity, entry, basis, realised in _in(
            conn, tables["positions"], ["account_id", "instrument"], keys.positions,
            plain=True):
        positions[(account_id, symbol)] = Position(quantity, entry, basis, realised)
    for row in _in(conn, tables["marks"], ["symbol"], keys.marks):
        state.marks[row.symbol] = Mark(row.price, row.iv, row.marked_at, row.position)
    _load_trades(state, _in(conn, tables["trade_legs"], ["trade_id"], keys.trades))
    return state


def _load_trades(state: LedgerState, rows: Iterable[Any]) -> None:
    legs: dict[str, list[Any]] = {}
    for row in rows:
        legs.setdefault(row.trade_id, []).append(row)
    for trade_id, trade_rows in legs.items():
        trade_rows.sort(key=lambda r: r.leg)
        state.trades[trade_id] = TradeRecord(
            tuple(
                TradeLeg.model_construct(
                    leg=r.leg, instrument=r.instrument, buyer=r.buyer, seller=r.seller,
                    quantity=r.quantity, price=r.price, buyer_fee=r.buyer_fee,
                    seller_fee=r.seller_fee)
                for r in trade_rows
            ),
            trade_rows[0].traded_at,
            trade_rows[0].busted,
        )


def _upsert(conn: Connection, table: Table, rows: list[tuple[Any, ...]]) -> None:
    """Insert or replace rows given as tuples in the table's column order."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _upsert_postgresql(conn, table, rows)
        return
    _write_sqlite(conn, table, rows, upsert=True)


def _write_sqlite(conn: Connection, table: Table, rows: Sequence[tuple[Any, ...]],
                  upsert: bool) -> None:
    """SQLite: rows (tuples in the table's column order) inserted, or upserted, through the
    driver's `executemany` in the caller's transaction, each value bound by its column's
    type (`_sqlite_values`). Through SQLAlchemy's execute every row became a dict of
    parameters processed one by one: half of a big import's catch-up."""
    if rows:
        conn.connection.driver_connection.executemany(
            _sqlite_statement(table, upsert), _sqlite_values(table, rows))


@lru_cache(maxsize=64)
def _sqlite_statement(table: Table, upsert: bool) -> str:
    """INSERT (with `upsert`: ... ON CONFLICT DO UPDATE) of every column, positional
    parameters in column order, compiled by SQLAlchemy once per table (its SQLite upsert
    construct is never cached)."""
    statement = sqlite_insert(table).values({c.name: bindparam(c.name) for c in table.columns})
    if upsert:
        keys = _primary_key(table)
        updates = {c.name: statement.excluded[c.name] for c in table.columns
                   if c.name not in keys}
        statement = (statement.on_conflict_do_update(index_elements=keys, set_=updates)
                     if updates else statement.on_conflict_do_nothing(index_elements=keys))
    compiled = statement.compile(dialect=_SQLITE_QMARK)
    if list(compiled.positiontup or ()) != [c.name for c in table.columns]:
        raise RuntimeError(f"{table.name}: parameters not in column order")
    return str(compiled)


_SQLITE_QMARK = sqlite_dialect.pysqlite.dialect(paramstyle="qmark")


def _sqlite_values(table: Table, rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows with each value as its column's type binds it on SQLite (a decimal as its plain
    text, a time as its fixed-width UTC text): the types' own bind processors, called
    directly, without SQLAlchemy's per-row parameter handling around them."""
    converting = _sqlite_binds(table)
    converted = []
    for row in rows:
        values = list(row)
        for index, bind in converting:
            values[index] = bind(values[index])
        converted.append(values)
    return converted


@lru_cache(maxsize=64)
def _sqlite_binds(table: Table) -> tuple[tuple[int, Callable[[Any], Any]], ...]:
    """The columns of `table` whose type converts a value before SQLite stores it, with the
    conversion."""
    binds = ((index, column.type.dialect_impl(_SQLITE_QMARK).bind_processor(_SQLITE_QMARK))
             for index, column in enumerate(table.columns))
    return tuple((index, bind) for index, bind in binds if bind is not None)


def _upsert_postgresql(conn: Connection, table: Table, rows: list[tuple[Any, ...]]) -> None:
    """A few rows: one INSERT ... ON CONFLICT each, sent together (psycopg pipelines an
    `executemany`). Many rows: COPY into a session-scoped scratch table, then one INSERT ...
    ON CONFLICT from it, which costs four round trips whatever the number of rows."""
    db = conn.connection.driver_connection
    statements = _pg_statements(table)
    if len(rows) < COPY_ROWS_MIN:
        with db.cursor() as cur:
            cur.executemany(statements.insert_values, rows)
        return
    with db.cursor() as cur:
        cur.execute(statements.create_scratch)
        _copy_rows(cur, statements.copy_into_scratch, len(table.columns), rows)
        cur.execute(statements.insert_from_scratch)
        cur.execute(statements.empty_scratch)


def _insert_new_postgresql(conn: Connection, table: Table, rows: list[tuple[Any, ...]]
                           ) -> None:
    """Rows whose keys were looked up and not found: COPYed straight into the table. The
    checkpoint lock keeps other writers of the read model out, so they are new; should one
    exist all the same (a key the facts did not say they touch), the COPY is undone to its
    savepoint and the rows are upserted."""
    if not rows:
        return
    db = conn.connection.driver_connection
    # A savepoint by hand: psycopg's own `transaction()` would open and commit a transaction
    # of its own if none had begun yet, outside the one the caller holds.
    with db.cursor() as cur:
        cur.execute("SAVEPOINT read_model_copy")
        try:
            _copy_rows(cur, _pg_statements(table).copy_into_table, len(table.columns), rows)
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT read_model_copy")
            _upsert(conn, table, rows)
        else:
            cur.execute("RELEASE SAVEPOINT read_model_copy")


class _PgStatements(NamedTuple):
    insert_values: str
    insert_plain: str
    create_scratch: str
    copy_into_scratch: str
    insert_from_scratch: str
    empty_scratch: str
    copy_into_table: str


@lru_cache(maxsize=64)
def _pg_statements(table: Table) -> _PgStatements:
    """The statements that write one read-model table, composed by psycopg (names quoted as
    identifiers) once per table."""
    columns = [c.name for c in table.columns]
    keys = [c.name for c in table.primary_key.columns]
    name = pg_sql.Identifier(table.name)
    scratch = pg_sql.Identifier(f"scratch_{table.name}")
    column_list = pg_sql.SQL(", ").join(map(pg_sql.Identifier, columns))
    updates = [pg_sql.SQL("{} = excluded.{}").format(pg_sql.Identifier(c), pg_sql.Identifier(c))
               for c in columns if c not in keys]
    conflict = pg_sql.SQL("ON CONFLICT ({}) {}").format(
        pg_sql.SQL(", ").join(map(pg_sql.Identifier, keys)),
        pg_sql.SQL("DO UPDATE SET {}").format(pg_sql.SQL(", ").join(updates)) if updates
        else pg_sql.SQL("DO NOTHING"))
    composed = _PgStatements(
        insert_values=pg_sql.SQL("INSERT INTO {} ({}) VALUES ({}) {}").format(
            name, column_list, pg_sql.SQL(", ").join(pg_sql.Placeholder() * len(columns)),
            conflict),
        insert_plain=pg_sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            name, column_list, pg_sql.SQL(", ").join(pg_sql.Placeholder() * len(columns))),
        create_scratch=pg_sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING "
                                  "DEFAULTS) ON COMMIT DELETE ROWS").format(scratch, name),
        copy_into_scratch=pg_sql.SQL("COPY {} ({}) FROM STDIN").format(scratch, column_list),
        insert_from_scratch=pg_sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} {}").format(
            name, column_list, column_list, scratch, conflict),
        empty_scratch=pg_sql.SQL("TRUNCATE {}").format(scratch),
        copy_into_table=pg_sql.SQL("COPY {} ({}) FROM STDIN").format(name, column_list),
    )
    return _PgStatements(*(statement.as_string(None) for statement in composed))


COPY_CHUNK_ROWS = 1_000
"""Rows formatted and sent to COPY at a time: the server stores one chunk while the next is
formatted, so the two work side by side instead of in turn."""


def _copy_rows(cur: Any, copy_statement: str, width: int,
               rows: Sequence[tuple[Any, ...]]) -> None:
    """COPY rows (tuples of `width` values in the table's column order), chunk by chunk."""
    if not rows:
        return
    with cur.copy(copy_statement) as copy:
        for start in range(0, len(rows), COPY_CHUNK_ROWS):
            copy.write(copy_buffer(rows[start:start + COPY_CHUNK_ROWS], width))


def _primary_key(table: Table) -> list[str]:
    return [c.name for c in table.primary_key.columns]


def _primary_key_indexes(table: Table) -> list[int]:
    names = [c.name for c in table.columns]
    return [names.index(c.name) for c in table.primary_key.columns]


def state_rows(state: LedgerState) -> dict[str, list[tuple[Any, ...]]]:
    """The rows each table holds for this state, as tuples in the table's column order: the
    one mapping between the two."""
    return {
        "accounts": [
            (a.account_id, a.owner, a.margin_model) for a in state.accounts.values()
        ],
        "instruments": [
            (i.symbol, str(i.kind), i.underlying, i.settlement_asset, i.expiry, i.strike,
             None if i.option_type is None else str(i.option_type), i.multiplier)
            for i in state.instruments.values()
        ],
        "balances": [
            (a, asset, balance) for (a, asset), balance in state.balances.items()
        ],
        "positions": [
            (a, i, p.quantity, p.average_entry_price, p.settlement_basis, p.realised_pnl)
            for (a, i), p in state.positions.items()
        ],
        "trade_legs": [
            (trade_id, leg.leg, leg.instrument, leg.buyer, leg.seller, leg.quantity,
             leg.price, leg.buyer_fee, leg.seller_fee, record.traded_at, record.busted)
            for trade_id, record in state.trades.items()
            for leg in record.legs
        ],
        "marks": [
            (s, m.price, m.iv, m.marked_at, m.position) for s, m in state.marks.items()
        ],
        "risk_parameter_changes": [
            (c.position, c.name, c.underlying, c.value, c.effective_at)
            for c in state.risk_changes.values()
        ],
        "margin_states": [
            (a, m.status, m.equity, m.initial, m.maintenance, m.since, m.position)
            for a, m in state.margin_states.items()
        ],
        "settlements": [
            (symbol, price) for symbol, price in state.settlements.items()
        ],
        # A statement line is a named tuple of the statement table's columns, in order.
        "statement": state.statement,
    }


ROW_COLUMNS = {
    "accounts": ("account_id", "owner", "margin_model"),
    "instruments": ("symbol", "kind", "underlying", "settlement_asset", "expiry", "strike",
                    "option_type", "multiplier"),
    "balances": ("account_id", "asset", "balance"),
    "positions": ("account_id", "instrument", "quantity", "average_entry_price",
                  "settlement_basis", "realised_pnl"),
    "trade_legs": ("trade_id", "leg", "instrument", "buyer", "seller", "quantity", "price",
                   "buyer_fee", "seller_fee", "traded_at", "busted"),
    "marks": ("symbol", "price", "iv", "marked_at", "position"),
    "risk_parameter_changes": ("position", "name", "underlying", "value", "effective_at"),
    "margin_states": ("account_id", "status", "equity", "initial", "maintenance", "since",
                      "position"),
    "settlements": ("symbol", "settlement_price"),
    "statement": StatementLine._fields,
}
"""The order of `state_rows`' tuples; it must be each table's column order (checked below)."""
for _table in t.LEDGER_TABLES:
    if tuple(c.name for c in _table.columns) != ROW_COLUMNS[_table.name]:
        raise RuntimeError(f"state_rows of {_table.name} do not follow its columns")


def _restated(before: tuple[Any, ...], after: tuple[Any, ...]) -> bool:
    """Whether a row equal in value now reads differently (2.30 became 2.3): the stored row
    must say exactly what the fold says, or a rebuild would differ from it in text, and so
    would anything decided from the stored row instead of the fold."""
    for old, new in zip(before, after, strict=True):
        if type(new) is Decimal and type(old) is Decimal and old.as_tuple() != new.as_tuple():
            return True
    return False


def save_state(conn: Connection, tables: Tables, state: LedgerState,
               unchanged_from: dict[str, list[tuple[Any, ...]]] | None = None) -> None:
    """Write the state's rows back; rows equal to `unchanged_from` (as loaded) are skipped."""
    rows = state_rows(state)
    statement_rows = rows.pop("statement")
    postgresql = conn.dialect.name == "postgresql"
    writes: list[tuple[Table, list[tuple[Any, ...]], list[tuple[Any, ...]]]] = []
    """Per table: rows changed (upserted) and rows new to it (inserted)."""
    for name, table_rows in rows.items():
        if not table_rows:
            continue
        if unchanged_from is None:
            writes.append((tables[name], table_rows, []))
            continue
        key_of = itemgetter(*_primary_key_indexes(tables[name]))
        loaded = {key_of(r): r for r in unchanged_from.get(name, ())}
        changed, added = [], []
        for row in table_rows:
            before = loaded.get(key_of(row))
            if before is None:
                added.append(row)
            elif before != row or _restated(before, row):
                changed.append(row)
        writes.append((tables[name], changed, added))
    if postgresql and sum(len(c) + len(a) for _, c, a in writes) + len(statement_rows) \
            < COPY_ROWS_MIN:
        _write_together_postgresql(conn, writes, tables["statement"], statement_rows)
        return
    for table, changed, added in writes:
        _upsert(conn, table, changed)
        if postgresql:
            _insert_new_postgresql(conn, table, added)
        else:
            _upsert(conn, table, added)
    if not statement_rows:
        return
    if postgresql:
        with conn.connection.driver_connection.cursor() as cur:
            _copy_rows(cur, _pg_statements(tables["statement"]).copy_into_table,
                       len(tables["statement"].columns), statement_rows)
    else:
        _write_sqlite(conn, tables["statement"], statement_rows, upsert=False)


def _write_together_postgresql(
        conn: Connection, writes: list[tuple[Table, list[tuple[Any, ...]],
                                             list[tuple[Any, ...]]]],
        statement: Table, statement_rows: list[StatementLine]) -> None:
    """A few rows (the usual page of a live ledger: a trade, a file of marks): every
    statement sent in one pipeline, one round trip in all, where a COPY for each table's new
    rows and another for the statement lines would cost two or three each. New rows are
    upserted like changed ones (the same rows end up stored); statement lines are plain
    INSERTs, so a line already there fails the page as COPY would."""
    db = conn.connection.driver_connection
    with db.pipeline(), db.cursor() as cur:
        for table, changed, added in writes:
            if changed or added:
                cur.executemany(_pg_statements(table).insert_values, changed + added)
        if statement_rows:
            cur.executemany(_pg_statements(statement).insert_plain, statement_rows)


def load_full_state(conn: Connection, tables: Tables, with_statement: bool = True,
                    with_trades: bool = True) -> LedgerState:
    """Every stored row, as a state (for comparing with a replay, or the whole book a job
    decides from). Account ids and symbols are interned: a book repeats each of them in
    many keys, and one string apiece keeps a million positions' keys small."""
    state = LedgerState()
    for row in conn.execute(_select_all(tables["accounts"])):
        account_id = intern(row.account_id)
        state.accounts[account_id] = Account(account_id, row.owner, row.margin_model)
    for row in conn.execute(_select_all(tables["instruments"])):
        state.instruments[intern(row.symbol)] = instrument_from_row(row)
    balances = state.balances
    for account_id, asset, balance in _plain_rows(conn, tables["balances"],
                                                  ["account_id", "asset", "balance"]):
        balances[(intern(account_id), intern(asset))] = balance
    positions = state.positions
    # Quantities, entry prices and realised P&L repeat across a book's positions: read as
    # their exact text, each distinct figure becomes one Decimal shared by every position
    # holding it (Decimals are immutable; the text keeps 1.5 and 1.50 apart).
    # (The lookups are written out, not called: this loop runs once per position.)
    shared: dict[str, Decimal] = {}
    known = shared.get
    for account_id, symbol, quantity, entry, basis, realised in _plain_rows(
            conn, tables["positions"], ["account_id", "instrument", "quantity",
                                        "average_entry_price", "settlement_basis",
                                        "realised_pnl"],
            as_text={"quantity", "average_entry_price", "realised_pnl"}):
        q = known(quantity)
        if q is None:
            q = shared[quantity] = Decimal(quantity)
        e = known(entry)
        if e is None:
            e = shared[entry] = Decimal(entry)
        r = known(realised)
        if r is None:
            r = shared[realised] = Decimal(realised)
        positions[(intern(account_id), intern(symbol))] = Position(q, e, basis, r)
    for row in conn.execute(_select_all(tables["marks"])):
        state.marks[row.symbol] = Mark(row.price, row.iv, row.marked_at, row.position)
    if with_trades:
        _load_trades(state, conn.execute(_select_all(tables["trade_legs"])))
    for row in conn.execute(_select_all(tables["risk_parameter_changes"])):
        state.risk_changes[row.position] = change_from_row(row)
    for row in conn.execute(_select_all(tables["margin_states"])):
        state.margin_states[row.account_id] = margin_state_from_row(row)
    for row in conn.execute(_select_all(tables["settlements"])):
        state.settlements[row.symbol] = row.settlement_price
    if not with_statement:
        return state
    statement = tables["statement"]
    for row in conn.execute(select(statement).order_by(statement.c.position,
                                                       statement.c.account_id,
                                                       statement.c.asset)):
        state.statement.append(StatementLine(row.position, row.account_id, row.asset,
                                             row.effective_at, row.type, row.reference,
                                             row.amount, row.balance))
    return state


