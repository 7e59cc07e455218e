"""The ledger's stored read models, kept by the domain's `evolve`.

A batch of facts is applied by loading exactly the rows they touch into a `LedgerState`,
running `evolve` over the facts, and writing those rows back, in the transaction that moves
the checkpoint. The tables are handed in, so a rebuild runs this same code into fresh tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from operator import itemgetter
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Table, select, tuple_
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
    evolve,
    touched,
)
from clearing.domain.ledger import Fact
from clearing.domain.risk_parameters import ParameterChange
from clearing.projections import tables as t
from clearing.store.text_arrays import text_array

KEY_CHUNK = 2_000
Tables = Mapping[str, Table]


class LedgerProjection:
    """Balances, positions, statement, trades, marks, accounts and instruments."""

    name = "ledger"
    tables = t.LEDGER_TABLES

    def apply(self, conn: Connection, facts: Sequence[Fact], tables: Tables) -> None:
        keys = touched([f.event for f in facts])
        state = load_state(conn, tables, keys)
        before = state_rows(state)
        for fact in facts:
            evolve(state, fact)
        save_state(conn, tables, state, unchanged_from=before)


def _in(conn: Connection, table: Table, columns: list[str], keys: Iterable[Any]) -> list[Any]:
    keys = list(keys)
    if not keys:
        return []
    if conn.dialect.name == "postgresql":
        return _in_postgresql(conn, table, columns, keys)
    rows: list[Any] = []
    for start in range(0, len(keys), KEY_CHUNK):
        chunk = keys[start : start + KEY_CHUNK]
        if len(columns) == 1:
            condition = table.c[columns[0]].in_(chunk)
        else:
            condition = tuple_(*(table.c[c] for c in columns)).in_(chunk)
        rows.extend(conn.execute(select(table).where(condition)))
    return rows


def _in_postgresql(conn: Connection, table: Table, columns: list[str],
                   keys: list[Any]) -> list[Any]:
    """Rows by key through a join on unnested arrays: one statement, index lookups, however
    many keys (an IN list of row values is checked row by row)."""
    db = conn.connection.driver_connection
    name = _quoted(table.name)
    key_columns = [keys] if len(columns) == 1 else [[key[i] for key in keys]
                                                   for i in range(len(columns))]
    arrays, params = zip(*(text_array(column) for column in key_columns), strict=True)
    if len(columns) == 1:
        sql = f'SELECT * FROM {name} WHERE "{columns[0]}" = ANY({arrays[0]})'
    else:
        names = ", ".join(f"k{i}" for i in range(len(columns)))
        join = " AND ".join(f't."{c}" = k.k{i}' for i, c in enumerate(columns))
        sql = (f"SELECT t.* FROM {name} t JOIN unnest({', '.join(arrays)}) AS k({names}) "
               f"ON {join}")
    with db.cursor(row_factory=namedtuple_row) as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def _quoted(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"unexpected table name {name!r}")
    return f'"{name}"'


def instrument_from_row(row: Any) -> Instrument:
    return Instrument.model_construct(
        symbol=row.symbol, kind=InstrumentKind(row.kind), underlying=row.underlying,
        settlement_asset=row.settlement_asset, expiry=row.expiry, strike=row.strike,
        option_type=None if row.option_type is None else OptionType(row.option_type),
        multiplier=row.multiplier,
    )


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
    for row in _in(conn, tables["balances"], ["account_id", "asset"], keys.balances):
        state.balances[(row.account_id, row.asset)] = row.balance
    for row in _in(conn, tables["positions"], ["account_id", "instrument"], keys.positions):
        state.positions[(row.account_id, row.instrument)] = position_from_row(row)
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
    insert = sqlite_insert
    statement = insert(table)
    keys = [c.name for c in table.primary_key.columns]
    statement = statement.on_conflict_do_update(
        index_elements=keys,
        set_={c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys},
    )
    columns = [c.name for c in table.columns]
    conn.execute(statement, [dict(zip(columns, row, strict=True)) for row in rows])


def _upsert_postgresql(conn: Connection, table: Table, rows: list[tuple[Any, ...]]) -> None:
    """COPY into a session-scoped scratch table, then one INSERT ... ON CONFLICT from it."""
    db = conn.connection.driver_connection
    name = _quoted(table.name)
    scratch = _quoted(f"scratch_{table.name}")
    columns = [c.name for c in table.columns]
    keys = [c.name for c in table.primary_key.columns]
    column_list = ", ".join(f'"{c}"' for c in columns)
    updates = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in keys)
    with db.cursor() as cur:
        cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {scratch} "
                    f"(LIKE {name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
        _copy_rows(cur, scratch, table, rows)
        cur.execute(f"INSERT INTO {name} ({column_list}) SELECT {column_list} FROM {scratch} "
                    f"ON CONFLICT ({', '.join(chr(34) + k + chr(34) for k in keys)}) "
                    f"DO UPDATE SET {updates}")
        cur.execute(f"TRUNCATE {scratch}")


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
            _copy_rows(cur, _quoted(table.name), table, rows)
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT read_model_copy")
            _upsert(conn, table, rows)
        else:
            cur.execute("RELEASE SAVEPOINT read_model_copy")


def _copy_rows(cur: Any, target: str, table: Table, rows: Sequence[tuple[Any, ...]]) -> None:
    """COPY rows (tuples in `table`'s column order) into `target` as one text buffer, with
    each value as psycopg's own `write_row` would send it (`str` of numbers and times, `t`
    or `f`, `\\N` for NULL), without a call into the driver per value. Text needing COPY's
    escapes (a backslash, tab, newline or carriage return) is rare: the buffer is checked
    as a whole, and escaped value by value only when it holds one."""
    if not rows:
        return
    columns = ", ".join(f'"{c.name}"' for c in table.columns)
    lines = ["\t".join([_NULL if v is None else _BOOL[v] if v is True or v is False
                         else str(v) for v in row]) for row in rows]
    data = "\n".join(lines)
    tabs = len(rows) * (len(table.columns) - 1)
    if (data.count("\t") != tabs or data.count("\n") != len(rows) - 1 or "\\" in data
            or "\r" in data):
        lines = ["\t".join([_NULL if v is None else _BOOL[v] if v is True or v is False
                             else _copy_text(v) if isinstance(v, str) else str(v)
                             for v in row]) for row in rows]
        data = "\n".join(lines)
    with cur.copy(f"COPY {target} ({columns}) FROM STDIN") as copy:
        copy.write(data + "\n")


_NULL = "\\N"
_BOOL = {True: "t", False: "f"}


def _copy_text(value: str) -> str:
    """A text field as COPY's text format needs it."""
    return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


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


def save_state(conn: Connection, tables: Tables, state: LedgerState,
               unchanged_from: dict[str, list[tuple[Any, ...]]] | None = None) -> None:
    """Write the state's rows back; rows equal to `unchanged_from` (as loaded) are skipped."""
    rows = state_rows(state)
    statement_rows = rows.pop("statement")
    postgresql = conn.dialect.name == "postgresql"
    for name, table_rows in rows.items():
        if unchanged_from is None or not table_rows:
            _upsert(conn, tables[name], table_rows)
            continue
        key_of = itemgetter(*_primary_key_indexes(tables[name]))
        loaded = {key_of(r): r for r in unchanged_from.get(name, ())}
        changed, added = [], []
        for row in table_rows:
            before = loaded.get(key_of(row))
            if before is None:
                added.append(row)
            elif before != row:
                changed.append(row)
        _upsert(conn, tables[name], changed)
        if postgresql:
            _insert_new_postgresql(conn, tables[name], added)
        else:
            _upsert(conn, tables[name], added)
    if not statement_rows:
        return
    if conn.dialect.name == "postgresql":
        with conn.connection.driver_connection.cursor() as cur:
            _copy_rows(cur, _quoted(tables["statement"].name), tables["statement"],
                       statement_rows)
    else:
        columns = StatementLine._fields
        conn.execute(tables["statement"].insert(),
                     [dict(zip(columns, line, strict=True)) for line in statement_rows])


def load_full_state(conn: Connection, tables: Tables, with_statement: bool = True,
                    with_trades: bool = True) -> LedgerState:
    """Every stored row, as a state (for comparing with a replay)."""
    state = LedgerState()
    for row in conn.execute(select(tables["accounts"])):
        state.accounts[row.account_id] = Account(row.account_id, row.owner, row.margin_model)
    for row in conn.execute(select(tables["instruments"])):
        state.instruments[row.symbol] = instrument_from_row(row)
    for row in conn.execute(select(tables["balances"])):
        state.balances[(row.account_id, row.asset)] = row.balance
    for row in conn.execute(select(tables["positions"])):
        state.positions[(row.account_id, row.instrument)] = position_from_row(row)
    for row in conn.execute(select(tables["marks"])):
        state.marks[row.symbol] = Mark(row.price, row.iv, row.marked_at, row.position)
    if with_trades:
        _load_trades(state, conn.execute(select(tables["trade_legs"])))
    for row in conn.execute(select(tables["risk_parameter_changes"])):
        state.risk_changes[row.position] = change_from_row(row)
    for row in conn.execute(select(tables["margin_states"])):
        state.margin_states[row.account_id] = margin_state_from_row(row)
    for row in conn.execute(select(tables["settlements"])):
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


