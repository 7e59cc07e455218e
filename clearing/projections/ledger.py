"""The ledger's stored read models, kept by the domain's `evolve`.

A batch of facts is applied by loading exactly the rows they touch into a `LedgerState`,
running `evolve` over the facts, and writing those rows back, in the transaction that moves
the checkpoint. The tables are handed in, so a rebuild runs this same code into fresh tables.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from sys import intern
from typing import Any

from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Table, Text, cast, select, tuple_
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

KEY_CHUNK = 2_000
PLAIN_ROWS_PAGE = 20_000
"""Rows per fetch when a whole table is read through a server-side cursor."""
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
    if len(columns) == 1:
        sql = f'SELECT * FROM {name} WHERE "{columns[0]}" = ANY(%s)'
        params: tuple[Any, ...] = (keys,)
    else:
        arrays = ", ".join("%s::text[]" for _ in columns)
        names = ", ".join(f"k{i}" for i in range(len(columns)))
        join = " AND ".join(f't."{c}" = k.k{i}' for i, c in enumerate(columns))
        sql = f"SELECT t.* FROM {name} t JOIN unnest({arrays}) AS k({names}) ON {join}"
        params = tuple([key[i] for key in keys] for i in range(len(columns)))
    with db.cursor(row_factory=namedtuple_row) as cur:
        cur.execute(sql, params)
        return cur.fetchall()


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
    listed = ", ".join(f'"{c}"::text' if c in as_text else f'"{c}"' for c in columns)
    with conn.connection.driver_connection.cursor(name=f"all_{table.name}") as cur:
        cur.execute(f"SELECT {listed} FROM {_quoted(table.name)}")
        while rows := cur.fetchmany(PLAIN_ROWS_PAGE):
            yield from rows


def _shared(shared: dict[str, Decimal], text: str) -> Decimal:
    value = shared.get(text)
    if value is None:
        value = shared[text] = Decimal(text)
    return value


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


def _upsert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
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
    conn.execute(statement, rows)


def _upsert_postgresql(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
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
        _copy_rows(cur, scratch, columns, rows)
        cur.execute(f"INSERT INTO {name} ({column_list}) SELECT {column_list} FROM {scratch} "
                    f"ON CONFLICT ({', '.join(chr(34) + k + chr(34) for k in keys)}) "
                    f"DO UPDATE SET {updates}")
        cur.execute(f"TRUNCATE {scratch}")


def _copy_rows(cur: Any, table: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with cur.copy(f"COPY {table} ({', '.join(chr(34) + c + chr(34) for c in columns)}) "
                  "FROM STDIN") as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


def _primary_key(table: Table) -> list[str]:
    return [c.name for c in table.primary_key.columns]


def state_rows(state: LedgerState) -> dict[str, list[dict[str, Any]]]:
    """The rows each table holds for this state: the one mapping between the two."""
    return {
        "accounts": [
            {"account_id": a.account_id, "owner": a.owner, "margin_model": a.margin_model}
            for a in state.accounts.values()
        ],
        "instruments": [
            {"symbol": i.symbol, "kind": str(i.kind), "underlying": i.underlying,
             "settlement_asset": i.settlement_asset, "expiry": i.expiry, "strike": i.strike,
             "option_type": None if i.option_type is None else str(i.option_type),
             "multiplier": i.multiplier}
            for i in state.instruments.values()
        ],
        "balances": [
            {"account_id": a, "asset": asset, "balance": balance}
            for (a, asset), balance in state.balances.items()
        ],
        "positions": [
            {"account_id": a, "instrument": i, "quantity": p.quantity,
             "average_entry_price": p.average_entry_price,
             "settlement_basis": p.settlement_basis, "realised_pnl": p.realised_pnl}
            for (a, i), p in state.positions.items()
        ],
        "trade_legs": [
            {"trade_id": trade_id, "leg": leg.leg, "instrument": leg.instrument,
             "buyer": leg.buyer, "seller": leg.seller, "quantity": leg.quantity,
             "price": leg.price, "buyer_fee": leg.buyer_fee, "seller_fee": leg.seller_fee,
             "traded_at": record.traded_at, "busted": record.busted}
            for trade_id, record in state.trades.items()
            for leg in record.legs
        ],
        "marks": [
            {"symbol": s, "price": m.price, "iv": m.iv, "marked_at": m.marked_at,
             "position": m.position}
            for s, m in state.marks.items()
        ],
        "risk_parameter_changes": [
            {"position": c.position, "name": c.name, "underlying": c.underlying,
             "value": c.value, "effective_at": c.effective_at}
            for c in state.risk_changes.values()
        ],
        "margin_states": [
            {"account_id": a, "status": m.status, "equity": m.equity, "initial": m.initial,
             "maintenance": m.maintenance, "since": m.since, "position": m.position}
            for a, m in state.margin_states.items()
        ],
        "settlements": [
            {"symbol": symbol, "settlement_price": price}
            for symbol, price in state.settlements.items()
        ],
        "statement": [
            {"position": line.position, "account_id": line.account_id, "asset": line.asset,
             "effective_at": line.effective_at, "type": line.type,
             "reference": line.reference, "amount": line.amount, "balance": line.balance}
            for line in state.statement
        ],
    }


def save_state(conn: Connection, tables: Tables, state: LedgerState,
               unchanged_from: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Write the state's rows back; rows equal to `unchanged_from` (as loaded) are skipped."""
    rows = state_rows(state)
    statement_rows = rows.pop("statement")
    for name, table_rows in rows.items():
        if unchanged_from is not None and unchanged_from.get(name):
            keys = _primary_key(tables[name])
            loaded = {tuple(r[k] for k in keys): r for r in unchanged_from[name]}
            table_rows = [r for r in table_rows
                          if loaded.get(tuple(r[k] for k in keys)) != r]
        _upsert(conn, tables[name], table_rows)
    if not statement_rows:
        return
    if conn.dialect.name == "postgresql":
        columns = [c.name for c in tables["statement"].columns]
        with conn.connection.driver_connection.cursor() as cur:
            _copy_rows(cur, _quoted(tables["statement"].name), columns, statement_rows)
    else:
        conn.execute(tables["statement"].insert(), statement_rows)


def load_full_state(conn: Connection, tables: Tables, with_statement: bool = True,
                    with_trades: bool = True) -> LedgerState:
    """Every stored row, as a state (for comparing with a replay, or the whole book a job
    decides from). Account ids and symbols are interned: a book repeats each of them in
    many keys, and one string apiece keeps a million positions' keys small."""
    state = LedgerState()
    for row in conn.execute(select(tables["accounts"])):
        account_id = intern(row.account_id)
        state.accounts[account_id] = Account(account_id, row.owner, row.margin_model)
    for row in conn.execute(select(tables["instruments"])):
        state.instruments[intern(row.symbol)] = instrument_from_row(row)
    balances = state.balances
    for account_id, asset, balance in _plain_rows(conn, tables["balances"],
                                                  ["account_id", "asset", "balance"]):
        balances[(intern(account_id), intern(asset))] = balance
    positions = state.positions
    # Quantities, entry prices and realised P&L repeat across a book's positions: read as
    # their exact text, each distinct figure becomes one Decimal shared by every position
    # holding it (Decimals are immutable; the text keeps 1.5 and 1.50 apart).
    shared: dict[str, Decimal] = {}
    for account_id, symbol, quantity, entry, basis, realised in _plain_rows(
            conn, tables["positions"], ["account_id", "instrument", "quantity",
                                        "average_entry_price", "settlement_basis",
                                        "realised_pnl"],
            as_text={"quantity", "average_entry_price", "realised_pnl"}):
        positions[(intern(account_id), intern(symbol))] = Position(
            _shared(shared, quantity), _shared(shared, entry), basis,
            _shared(shared, realised))
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


